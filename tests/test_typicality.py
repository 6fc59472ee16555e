"""Published typicality scores as a data source (repro.typicality) and BAT's official split.

The score files are the public ones in ../shared/data/scores (read there, never copied)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from repro import data, typicality


def test_calibrate_hand_made():
    # mem > 0.15 holds for the first two; the two lowest C-scores are the first and the last
    mem = np.array([0.9, 0.5, 0.1, 0.0, 0.05])
    cs = np.array([0.1, 0.3, 0.8, 0.9, 0.2])
    cal = typicality.calibrate(cs, mem, 0.15)
    # the 2 lowest C-scores are 0.1 and 0.2: the third-lowest (0.3) is the threshold
    assert cal.threshold == 0.3 and cal.fraction == 0.4
    assert (cal.precision, cal.recall) == (0.5, 0.5)        # 0.2 (mem 0.05) is chosen, 0.3 not
    assert cal.spearman < 0
    perfect = typicality.calibrate(1 - mem, mem, 0.15)
    assert (perfect.precision, perfect.recall) == (1.0, 1.0)
    assert perfect.spearman == pytest.approx(-1.0)   # float rounding of a rank correlation
    with pytest.raises(ValueError, match="nothing to calibrate"):
        typicality.calibrate(cs, np.zeros(5), 0.15)
    with pytest.raises(ValueError, match="one length"):
        typicality.calibrate(cs, mem[:3], 0.15)


def test_calibration_on_the_published_cifar100_scores():
    """C-score vs Feldman & Zhang's memorization on CIFAR-100, where both are published.
    Measured (2026-12-03): threshold 0.535, fraction 0.419, precision = recall 0.882,
    Spearman -0.918; the bounds below leave room for a re-export of the same files only."""
    mem = typicality.reference("cifar100", "mem")
    cal = typicality.calibration(0.15)
    assert cal.fraction == pytest.approx(float((mem > 0.15).mean()))
    assert cal.n == 50000 and 0.4 < cal.threshold < 0.7
    assert cal.precision > 0.85 and cal.recall > 0.85 and cal.spearman < -0.9
    # the C-score set has the mem set's size (no ties at the threshold in these files)
    cs = typicality.reference("cifar100", "cscore")
    assert int((cs < cal.threshold).sum()) == int((mem > 0.15).sum())


def test_cifar10_scores_follow_our_arrays(cifar10):
    ds = cifar10
    sc = typicality.for_dataset(ds)
    assert sc.values.shape == (len(ds.y_train),) and sc.kind == "cscore"
    idx = typicality.official_index(ds)
    labels = typicality.reference_labels("cifar10")
    np.testing.assert_array_equal(labels[idx], ds.y_train.numpy())
    np.testing.assert_array_equal(sc.values, typicality.reference("cifar10")[idx])
    val = typicality.for_dataset(ds, split="val")
    assert len(val.values) == len(ds.y_val)
    # train and validation are disjoint parts of the 50,000 official images
    assert not set(idx) & set(typicality.official_index(ds, "val"))
    # a limited dataset keeps a prefix of the split, and so of the scores
    small = typicality.for_dataset(ds.limit(n_train=300))
    np.testing.assert_array_equal(small.values, sc.values[:300])
    assert sc.provenance()["file"] == "cifar10-cscores-orig-order.npz"


def test_a_wrong_mapping_is_caught_by_the_labels(cifar10):
    rng = np.random.default_rng(0)
    extras = dict(cifar10.extras)
    extras["official_index_train"] = rng.permutation(extras["official_index_train"])
    ds = data.Dataset("cifar10", cifar10.classes, cifar10.x_train, cifar10.y_train,
                      cifar10.x_val, cifar10.y_val, cifar10.x_test, cifar10.y_test,
                      source=cifar10.source, extras=extras)
    with pytest.raises(ValueError, match="mapping is wrong"):
        typicality.for_dataset(ds)


def test_torchvision_folders_are_in_official_order(cifar10):
    extras = {k: v for k, v in cifar10.extras.items() if k != "official_index_train"}
    fake = data.Dataset("cifar10", cifar10.classes, cifar10.x_train[:5], cifar10.y_train[:5],
                        cifar10.x_val[:0], cifar10.y_val[:0], cifar10.x_test[:0],
                        cifar10.y_test[:0], source="/somewhere/cifar-10-batches-py",
                        extras={**extras, "train_index": np.array([4, 0, 7, 9, 11])})
    np.testing.assert_array_equal(typicality.official_index(fake), [4, 0, 7, 9, 11])
    npz = data.Dataset(**{**fake.__dict__, "source": "/somewhere/cifar10.npz"})
    with pytest.raises(typicality.NoOfficialScoresError, match="no official_index_train"):
        typicality.official_index(npz)


def test_no_scores_is_a_clear_error(cifar100, tmp_path):
    with pytest.raises(typicality.NoOfficialScoresError, match="not the official split"):
        typicality.atypical(cifar100)
    with pytest.raises(typicality.NoOfficialScoresError, match="no published mem scores for cifar10"):
        typicality.reference("cifar10", "mem")
    with pytest.raises(typicality.ScoresNotFoundError, match="REPRO_SCORES"):
        typicality.reference("cifar10", "cscore", root=tmp_path)
    with pytest.raises(ValueError, match="kind"):
        typicality.reference("cifar10", "typicality")


def test_scores_root_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REPRO_SCORES", str(tmp_path))
    assert typicality.scores_root() == Path(tmp_path)
    monkeypatch.delenv("REPRO_SCORES")
    assert typicality.scores_root() == typicality.SCORES_ROOT


def test_atypical_cifar10_uses_the_calibrated_cscore_threshold(cifar10):
    mask, cal, sc = typicality.atypical(cifar10, 0.15)
    assert sc.kind == "cscore"          # no memorization estimate published for CIFAR-10
    np.testing.assert_array_equal(mask, sc.values < cal.threshold)
    # CIFAR-10 is more regular than CIFAR-100: far fewer images fall below the threshold
    # (measured 10.8% against CIFAR-100's 41.9%)
    assert 0.03 < mask.mean() < cal.fraction / 2


def test_agreement_hand_made():
    sc = typicality.Scores("cifar10", "cscore", "train", np.array([0.1, 0.2, 0.9, 0.8]), "x")
    ours = np.array([0.8, 0.1, 0.0, 0.05])
    out = typicality.agreement(ours, ours > 0.15, sc, sc.values < 0.5)
    assert out["both"] == 1 and out["precision"] == 1.0 and out["recall"] == 0.5
    assert out["jaccard"] == 0.5 and out["spearman"] > 0   # C-scores enter negated


def test_fz_standard_error_bound():
    # sqrt(1/4 (1/2800 + 1/1200)): the largest SE of p_in - p_out from 4,000 models at 70%
    assert typicality.FZ_SE_MAX == pytest.approx(0.01725, abs=1e-5)


# ----------------------------------------------------------------------------- BAT

def test_bat_official_split_and_only(tmp_path, monkeypatch):
    """BAT with split_source=official: the training split is the published one, our estimate
    and its agreement are kept beside it, the run keys differ from the estimate's, ``only``
    trains one AT run, and the floors read the published split's precision."""
    from repro.experiments import bat, common
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path))
    small = dict(dataset="cifar10", contrast="none", n_train=300, n_val=50, n_test=60,
                 curve_test=60, mem_k=3, mem_epochs=1, epochs=1, progress=False)
    out = bat.run("smoke", split_source="official", only=["bat-a1"], **small)
    assert set(out["runs"]) == {"memorization", "proxy", "bat-a1"} and "summary" not in out
    mem = out["runs"]["memorization"]
    cfg = out["config"]
    ds = common.load_dataset("cifar10", n_train=300, n_test=60, n_val=50)
    want, cal, _ = typicality.atypical(ds, cfg["t"])
    np.testing.assert_array_equal(mem["arrays"]["train_atypical"], want)
    off = mem["metrics"]["official"]
    assert off["split_se"] == typicality.FZ_SE_MAX
    assert off["calibration"]["threshold"] == cal.threshold
    assert off["agreement"]["n"] == 300 and -1 <= off["agreement"]["spearman"] <= 1
    with pytest.raises(ValueError, match="unknown runs"):
        bat.run("smoke", split_source="official", only=["bat-a3"], **small)
    est = bat.run("smoke", split_source="estimate", only=["bat-a1"], **small)
    assert est["runs"]["bat-a1"]["path"] != out["runs"]["bat-a1"]["path"]
    assert "official" not in est["runs"]["memorization"]["metrics"]
    result = {"config": cfg, "runs": out["runs"]}
    assert bat.split_se(result) == typicality.FZ_SE_MAX
    assert bat.split_se({"config": cfg, "runs": est["runs"]}) == \
        est["runs"]["memorization"]["metrics"]["estimate"]["mean_se"]


def test_bat_official_split_refused_without_scores(tmp_path, monkeypatch):
    from repro.experiments import bat
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path))
    with pytest.raises(typicality.NoOfficialScoresError, match="cifar100"):
        bat.run("smoke", split_source="official", contrast="none", progress=False)
    assert not list(Path(tmp_path).rglob("*.npz")), "nothing is trained before the refusal"
