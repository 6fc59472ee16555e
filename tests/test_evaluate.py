"""Evaluation on the tiny real-MNIST CNN of test_attacks.py: per-example results, official
AutoAttack, and the gradient-masking report (including on a model that masks gradients)."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from repro import attacks as A
from repro import corruptions, data, lipschitz
from repro import evaluate as E
from test_attacks import EPS, tiny_mnist_cnn  # one trained model per test process

N = 100  # AutoAttack's APGD-T (9 targets x 100 steps) dominates the run time


@pytest.fixture(scope="module")
def model(mnist):
    return tiny_mnist_cnn(mnist)


@pytest.fixture(scope="module")
def xy(mnist):
    return mnist.x_test[:N], mnist.y_test[:N]  # uint8: evaluate converts


def pgd10(eps=EPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda m, x, y: A.pgd(m, x, y, eps=eps, alpha=eps / 4, steps=10, generator=g)


def fgsm(m, x, y):
    return A.fgsm(m, x, y, eps=EPS)


@pytest.fixture(scope="module")
def pgd_result(model, xy):
    return E.robust_eval(model, *xy, {"pgd10": pgd10(), "fgsm": fgsm}, batch_size=64,
                         progress=False, threat=("linf", EPS))


def test_robust_eval_per_example_worst_case(pgd_result, model, xy):
    r = pgd_result
    assert r.n == N and r.clean.dtype == bool and r.per_attack["pgd10"].dtype == bool
    np.testing.assert_array_equal(r.worst, r.clean & r.per_attack["pgd10"] & r.per_attack["fgsm"])
    assert not (r.per_attack["pgd10"] & ~r.clean).any()  # misclassified clean is not robust
    acc = r.accuracy()
    assert acc["worst"] <= min(acc["pgd10"], acc["fgsm"]) and acc["pgd10"] < acc["clean"] - 0.2
    clean = (E.predict(model, xy[0]) == xy[1]).numpy()
    np.testing.assert_array_equal(r.clean, clean)
    assert r.info["pgd10"]["threat"] == ["linf", EPS] and r.info["fgsm"]["attack"].endswith("fgsm")
    back = E.EvalResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.accuracy() == acc and back.info == r.info


def test_robust_eval_is_batch_size_invariant(model, xy):
    det = lambda m, x, y: A.pgd(m, x, y, eps=EPS, alpha=EPS / 4, steps=5,  # noqa: E731
                                random_start=False)
    a = E.robust_eval(model, *xy, [det], batch_size=N, progress=False)
    b = E.robust_eval(model, *xy, [det], batch_size=37, progress=False)
    np.testing.assert_array_equal(a.per_attack["<lambda>"], b.per_attack["<lambda>"])


def test_threat_check_catches_an_attack_that_cheats(model, xy):
    def cheat(m, x, y):
        return (x + 2 * EPS * torch.randn_like(x).sign()).clamp(0, 1)
    with pytest.raises(AssertionError, match="left the threat model"):
        E.robust_eval(model, *xy, {"cheat": cheat}, progress=False, threat=("linf", EPS))


@pytest.fixture(scope="module")
def aa_fast(model, xy):
    return E.autoattack(model, *xy, eps=EPS, norm="Linf", version="fast", batch_size=N)


def test_autoattack_fast_is_at_least_as_strong_as_pgd(aa_fast, pgd_result):
    key = "autoattack-fast"
    info = aa_fast.info[key]
    assert info["version"] == "fast" and info["attacks"] == ["apgd-ce", "apgd-t"]
    assert info["package"] == "pyautoattack" and info["overrides"] == {}
    merged = pgd_result.merge(aa_fast)
    acc = merged.accuracy()
    print(f"\nclean {acc['clean']:.3f}  PGD-10 {acc['pgd10']:.3f}  AutoAttack-fast "
          f"{acc[key]:.3f}  gap {100 * (acc['pgd10'] - acc[key]):.1f} points (n={N})")
    assert acc[key] <= acc["pgd10"]
    assert acc["worst"] <= acc[key]


def test_autoattack_standard_says_which(model, xy):
    x, y = xy[0][:8], xy[1][:8]
    r = E.autoattack(model, x, y, eps=EPS, version="standard", n_iter=10, square_queries=100)
    (key,) = r.per_attack
    assert key == "autoattack-standard-modified"  # reduced budgets are not "standard"
    assert r.info[key]["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert r.info[key]["overrides"] == {"n_iter": 10, "square_queries": 100}
    assert r.per_attack[key].sum() <= r.clean.sum()


def test_sanity_report_passes_on_a_standard_model(model, xy):
    rep = E.sanity_report(model, *xy, eps=EPS, square_queries=200,
                          aa_n_iter=50)
    print("\n" + str(rep))
    for name in ("large_eps", "more_steps", "autoattack_not_above_pgd",
                 "pgd_close_to_autoattack", "blackbox_not_better", "zero_gradients"):
        assert rep[name].passed, str(rep[name])
        assert name in str(rep)
    json.dumps(rep.to_dict())


class Quantize(nn.Module):
    """Input quantisation without a straight-through gradient: a textbook masked gradient."""

    def forward(self, x):
        return torch.round(x * 4) / 4


def test_sanity_report_flags_masked_gradients(model, xy):
    masked = nn.Sequential(Quantize(), model)
    rep = E.sanity_report(masked, *xy, eps=0.2, square_queries=200,
                          aa_n_iter=10)
    print("\n" + str(rep))
    assert not rep.passed
    assert not rep["zero_gradients"].passed
    assert rep["zero_gradients"].observed["fraction"] == 1.0
    assert not rep["blackbox_not_better"].passed


@pytest.mark.parametrize("entry", [
    lambda m, x, y: E.predict(m, x),
    lambda m, x, y: E.robust_eval(m, x, y, {"none": lambda m, x, y: x}, progress=False),
    lambda m, x, y: E.autoattack(m, x, y, eps=EPS, version="fast", n_iter=2),
    lambda m, x, y: E.zero_gradient_fraction(m, x, y),
    lambda m, x, y: E.sanity_report(m, x, y, eps=EPS, steps=1, aa_n_iter=2, square_queries=5),
    lambda m, x, y: lipschitz.certify(m, x, y, 10.0),
    lambda m, x, y: corruptions.corrupt(x, "contrast", 1),
    lambda m, x, y: corruptions.distortion(x, "gaussian_noise", 1),
], ids=["predict", "robust_eval", "autoattack", "zero_gradient_fraction", "sanity_report",
        "lipschitz.certify", "corruptions.corrupt", "corruptions.distortion"])
def test_every_entry_point_refuses_images_outside_0_1(model, xy, entry):
    """Issue 13: normalised images or 0..255 floats used to run silently (PGD's output lay
    1.8 or 254 away from its input) and gave accuracies that mean nothing."""
    x, y = xy[0][:8], xy[1][:8]
    xf = data.to_float(x)
    (mean,), (std,) = data.MEAN_STD["mnist"]
    for bad in ((xf - mean) / std, xf * 255):
        with pytest.raises(ValueError, match=r"un-normalised float pixels in \[0, 1\], got "
                                             rf"values in \[{bad.min().item():.4g}, "):
            entry(model, bad, y)
    entry(model, x, y)   # uint8 pixels are accepted where images are evaluated
    entry(model, xf, y)  # and so are the same images as floats in [0, 1]


def _first_logits(model, k):
    """The trained 10-class CNN restricted to its first k logits: a k-class classifier of the
    digits 0..k-1 (a real model of a class subset, no extra training)."""
    class Take(nn.Module):
        def forward(self, x):
            return model(x)[:, :k]
    return Take()


@pytest.mark.parametrize("k,version,kept", [
    (2, "standard", ["apgd-ce", "fab-t", "square"]),
    (3, "standard", ["apgd-ce", "fab-t", "square"]),
    (3, "fast", ["apgd-ce"]),
    (4, "fast", ["apgd-ce", "apgd-t"]),
])
def test_autoattack_with_fewer_than_4_classes_leaves_out_apgd_t(mnist, model, k, version, kept):
    """Issue 13: a 3-class model crashed inside pyautoattack (IndexError: index -4 is out of
    bounds): APGD-T's targeted DLR loss needs the 4th-largest logit. Now it is left out and
    the result says so; from 4 classes on nothing changes."""
    keep = mnist.y_test < k
    x, y = mnist.x_test[keep][:16], mnist.y_test[keep][:16]
    r = E.autoattack(_first_logits(model, k), x, y, eps=0.3, version=version, n_iter=5,
                     square_queries=20)  # 0.3: also breaks the easy 0-vs-1 model
    (key,) = r.per_attack
    info = r.info[key]
    assert key == f"autoattack-{version}-modified" and info["attacks"] == kept
    if k < 4:
        assert set(info["dropped"]) == {"apgd-t"} and "4 classes" in info["dropped"]["apgd-t"]
    else:
        assert info["dropped"] == {}
    assert r.clean.mean() > 0.9 and r.per_attack[key].sum() < r.clean.sum()  # it attacked


def test_autoattack_refuses_a_single_logit(mnist, model):
    with pytest.raises(ValueError, match="at least 2 classes"):
        E.autoattack(_first_logits(model, 1), mnist.x_test[:4], mnist.y_test[:4] * 0, eps=EPS)


@pytest.mark.slow
def test_compiled_evaluation_is_the_same_fp32_evaluation(cifar10, monkeypatch):
    """``REPRO_COMPILE_EVAL=1`` (the CPU campaign's evaluations) attacks ``torch.compile``
    of the model: the same fp32 arithmetic, differently fused. Clean logits agree to fp32
    rounding (tolerance 1e-4 relative: fused kernels reorder sums of a few thousand terms
    at ~1e-7 each), the model's attributes are its own (HE's geometry reads ``head``), and
    a PGD attack is as strong: its sign steps may differ only where a gradient is ~0."""
    from repro.experiments import common, he
    ds = cifar10.limit(n_train=10, n_val=10, n_test=64)
    torch.manual_seed(0)
    model = common.model_for("preact_resnet18", ds, width=4, head="hypersphere")().eval()
    x, y = data.to_float(ds.x_test), ds.y_test
    monkeypatch.setenv("REPRO_COMPILE_EVAL", "0")
    same, how = common.evaluation_model(model)
    assert same is model and not how["compile"]
    monkeypatch.setenv("REPRO_COMPILE_EVAL", "1")
    net, how = common.evaluation_model(model)
    assert net is not model and how == {"compile": True, "why": "REPRO_COMPILE_EVAL=1"}
    assert net.head is model.head
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-5)
    geo_c, geo_e = he.feature_geometry(net, x, y), he.feature_geometry(model, x, y)
    np.testing.assert_allclose(geo_c["angle"], geo_e["angle"], rtol=1e-4, atol=1e-3)

    def pgd_acc(m):
        g = torch.Generator().manual_seed(0)
        x_adv = A.pgd(m, x, y, eps=8 / 255, alpha=2 / 255, steps=5, generator=g)
        assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
        with torch.no_grad():
            return (model(x_adv).argmax(1) == y).float().mean().item()
    clean = (model(x).argmax(1) == y).float().mean().item()
    eager, compiled = pgd_acc(model), pgd_acc(net)
    assert eager < clean and compiled < clean
    assert abs(compiled - eager) <= 2 / 64, (eager, compiled)
    monkeypatch.setenv("REPRO_COMPILE_EVAL", "yes")
    with pytest.raises(ValueError, match="REPRO_COMPILE_EVAL must be 0 or 1"):
        common.evaluation_model(model)
