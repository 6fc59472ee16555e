"""The LMT objective through the trainer, its checkpointed estimator state, and the LMT
chapter's claims on small real-MNIST models: larger certified radii than standard training
at the same budget, and certificates that no attack beats."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repro import claims, data, lipschitz as L, models, objectives, train
from repro.experiments import lmt as chapter
from repro.train import TrainConfig


@pytest.fixture(scope="module")
def small(mnist):
    return mnist.limit(3000, 200, 300)


def _net(ds, width=8, seed=0):
    torch.manual_seed(seed)
    return models.build("small_cnn", 10, mean_std=ds.mean_std, width=width)


def _cfg(**kw):
    base = dict(epochs=2, batch_size=50, optimizer="adam", lr=1e-3, weight_decay=0.0,
                schedule="constant", augment=False, val_every=0, seed=0)
    return TrainConfig(**{**base, **kw})


class Spy(objectives.LMT):
    """Records, per step, the loss the objective returned and the loss recomputed by hand
    from the estimator state it started from."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.checks = []

    def __call__(self, model, batch, state):
        est = self.estimator(model, batch.x.shape[1:])
        before = {k: v.clone() for k, v in est.state_dict().items()}
        loss, logs = super().__call__(model, batch, state)
        # By hand: the same single power step from the same vectors, then the margin.
        ref = L.LipschitzEstimator(model, batch.x.shape[1:], pairwise=self.plus)
        ref.load_state_dict(before)
        with torch.no_grad():
            bound = ref()
            logits = model(batch.x).float()
            c = L.lmt_c(state.step / state.steps_per_epoch, self.c, self.warmup_epochs)
            other = 1 - F.one_hot(batch.y, 10).float()
            add = c * (math.sqrt(2) * bound * other if not self.plus else bound[batch.y] * other)
            # the official form: the margin scaled by min_i clip((z_y - z_i) / a_i, 0, 1)
            margin = logits.gather(1, batch.y[:, None]) - logits
            ratio = torch.where(add > 0, margin / add.clamp_min(1e-30), (margin >= 0).float())
            factor = ratio.clamp(0, 1).amin(1, keepdim=True)
            expected = F.cross_entropy(logits + factor * add, batch.y)
        self.checks.append((loss.item(), expected.item(), logs["c"], c))
        return loss, logs


@pytest.mark.parametrize("plus", [False, True])
def test_lmt_objective_adds_the_margin_through_the_trainer(small, tmp_path, plus):
    spy = Spy(c=0.5, plus=plus, warmup_epochs=0.05)
    train.train(_net(small), spy, small, _cfg(steps=5), tmp_path, device="cpu", progress=False)
    assert len(spy.checks) == 5
    for got, expected, c_logged, c in spy.checks:
        assert got == pytest.approx(expected, rel=1e-5)
        assert c_logged == c
    # the ramp moved c from c/1000 towards c within these steps (warmup 0.05 epoch = 3 steps)
    assert spy.checks[0][3] == pytest.approx(5e-4) and spy.checks[-1][3] == 0.5


def test_lmt_logits_by_hand():
    obj = objectives.lmt(c=0.3, form="full")
    torch.manual_seed(0)
    net = models.build("small_cnn", 10, width=4)
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    est = obj.estimator(net, (1, 28, 28))
    state = {k: v.clone() for k, v in est.state_dict().items()}
    loss, logs = obj(net, objectives.Batch(x, y, torch.arange(6)),
                     objectives.StepState(0, 0, 10, 10))
    ref = L.LipschitzEstimator(net, (1, 28, 28))
    ref.load_state_dict(state)
    bound = ref().item()
    with torch.no_grad():
        z = net(x)
    shifted = L.lmt_logits(z, y, 0.3, torch.tensor(bound), form="full")
    diff = shifted - z
    assert torch.allclose(diff[torch.arange(6), y], torch.zeros(6))
    mask = ~F.one_hot(y, 10).bool()
    assert torch.allclose(diff[mask], torch.full_like(diff[mask], math.sqrt(2) * 0.3 * bound))
    assert loss.item() == pytest.approx(F.cross_entropy(shifted, y).item(), rel=1e-6)
    assert logs["lipschitz"].item() == pytest.approx(bound, rel=1e-6)


class Interrupt(Exception):
    pass


class StopAt(objectives.LMT):
    def __init__(self, stop, **kw):
        super().__init__(**kw)
        self._stop = stop  # private: not part of the objective's config

    def __call__(self, model, batch, state):
        if state.step == self._stop:
            raise Interrupt
        return super().__call__(model, batch, state)


def test_lmt_resume_is_exact(small, tmp_path):
    cfg = _cfg(steps=8, checkpoint_every=3)
    kw = dict(c=1.0, plus=False, warmup_epochs=0.1)
    full_net, full_obj = _net(small), objectives.lmt(**kw)
    train.train(full_net, full_obj, small, cfg, tmp_path / "full", device="cpu", progress=False)

    with pytest.raises(Interrupt):  # killed at step 7: the checkpoint of step 6 remains
        train.train(_net(small), StopAt(7, **kw), small, cfg, tmp_path / "cut", device="cpu",
                    progress=False)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and any(k.startswith("u_") for k in ckpt["objective_state"])
    # A fresh process: new model, new objective (its vectors come from the checkpoint).
    net, obj = _net(small, seed=123), objectives.lmt(**kw)
    res = train.train(net, obj, small, cfg, tmp_path / "cut", device="cpu", progress=False)
    assert res.resumed_from == 6
    for (k, a), b in zip(full_net.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k
    for k, v in full_obj.state_dict().items():
        assert torch.equal(v, obj.state_dict()[k]), k


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
    """Standard and LMT CNNs on 3000 real MNIST digits, same budget (2 epochs)."""
    out = {}
    for name, obj in [("standard", objectives.standard()),
                      ("lmt", objectives.lmt(c=1.0, warmup_epochs=0.5))]:
        net = _net(small)
        train.train(net, obj, small, _cfg(), tmp_path_factory.mktemp(name), device="cpu",
                    progress=False)
        out[name] = net.eval()
    return out


@pytest.mark.precision
def test_lmt_enlarges_the_median_certified_radius(small, trained):
    x, y = data.to_float(small.x_test), small.y_test
    med = {}
    for name, net in trained.items():
        rep = L.network_bound(net, (1, 28, 28), max_iters=0)
        med[name] = L.certify(net, x, y, rep.lipschitz).clamp_min(0).median().item()
    print("median certified radius:", med)
    assert med["lmt"] > 1.5 * med["standard"] and med["lmt"] > 0.1  # measured: 0.22 vs 0.10


def test_no_attack_beats_the_certificate(small, trained):
    cfg = chapter.SPEC.resolve("smoke", n_test=300, n_attack=200, pgd_steps=20, cw_steps=20,
                               cw_search=4)
    setup = chapter.dataset_setup("mnist", cfg)
    for name, net in trained.items():
        metrics, arrays = chapter.evaluate_model(net, small, setup, cfg, torch.device("cpu"))
        s = metrics["soundness"]
        print(name, s, metrics["certified"]["median_pairwise"])
        assert s["violations"] == 0 and s["n_certified"] > 80 and s["n_checked"] == 200
        assert metrics["n_test"] == 300 and len(arrays["radius"]) == 300
        # the per-pair certificate (Prop. 2) is never smaller than the global one
        r, rp = arrays["radius"], arrays["radius_pair"]
        assert np.all(rp[r > 0] >= r[r > 0] * (1 - 1e-6)) and (rp > r).any()
        c, a = metrics["certified"], metrics["attacks"]
        # certified <= worst-case attack <= PGD, radius by radius
        assert all(p <= w + 1e-12 <= g + 1e-12 for p, w, g in zip(c["pairwise"], a["worst"],
                                                                  a["pgd"]))
        # the attacks are not no-ops: DeepFool finds adversarials for most correct points,
        # and every adversarial found lies outside the certified radius
        correct = arrays["correct_clean"][:200]
        assert np.isfinite(arrays["deepfool_dist"][correct]).mean() > 0.9
        for key in ("cw_dist", "deepfool_dist"):
            ok = correct & np.isfinite(arrays[key])
            assert np.all(arrays[key][ok] >= rp[:200][ok] * (1 - 1e-6))


def test_lmt_trains_a_resnet_with_batchnorm(cifar10, tmp_path):
    """The CIFAR-10 path of the gpu/paper presets, tiny: WRN-16 with BN, LMT's bound near
    1e4 at initialisation, SGD 0.1 with the chapter's gradient clip: finite losses, and the
    rigorous certificate covers the BN model."""
    ds = cifar10.limit(256, 50, 50)
    setup = chapter.dataset_setup("cifar10", chapter.SPEC.resolve("smoke"))
    torch.manual_seed(0)
    net = models.build("wrn16_4", 10, mean_std=ds.mean_std, width=2)
    obj = objectives.lmt(c=1e-2, warmup_epochs=0.5)
    cfg = _cfg(steps=8, batch_size=64, optimizer="sgd", lr=setup["lr"], momentum=0.9,
               grad_clip=setup["grad_clip"], augment=True)
    res = train.train(net, obj, ds, cfg, tmp_path, device="cpu", progress=False)
    assert all(math.isfinite(v) for v in res.history[-1].values() if isinstance(v, float))
    rep = L.network_bound(net.eval(), (3, 32, 32), max_iters=0)
    r = L.certify(net, data.to_float(ds.x_test), ds.y_test, rep.pairwise)
    assert math.isfinite(rep.lipschitz) and torch.isfinite(r[r > 0]).all()


@pytest.mark.precision
def test_training_estimate_is_a_lower_estimate_within_10_percent_of_the_exact_bound(mnist,
                                                                                    tmp_path):
    """The chapter's estimator settings (paper preset) after a short real run: LMT++ on the
    chapter's MNIST network (no normalisation layer, batch 50) for 400 steps. The persistent
    power-iteration vectors lag the weights, so the estimate approaches the exact bound from
    below. Measured (torch 2.13, AVX-512-bf16 EPYC, 2026-12-03; seeds 0-5 of init and data
    order): ratio estimate/exact 0.940-0.989 in fp32, 0.949-0.980 in bf16, mean 0.964; never
    above 1. So the training margin is up to ~6% smaller than c·√2·L (the certificates use
    the exact bound and are unaffected); 'within 5%' held for 10 of 12 runs, which is why the
    limit is 10% and the direction is asserted."""
    cfg = chapter.SPEC.resolve("paper", datasets=["mnist"])
    setup = chapter.dataset_setup("mnist", cfg)
    ds = mnist.limit(20000, 100, 100)
    net = chapter.common.model_for("small_cnn", ds, width=16, normalize=False)()
    assert not any(isinstance(m, models.Normalize) and (m.std != 1).any() for m in net.modules())
    obj = chapter.make_objective("lmt_plus", setup, cfg, c=1.0)
    train.train(net, obj, ds, _cfg(steps=400, batch_size=setup["batch_size"]), tmp_path,
                device="cpu", progress=False)
    check = obj.bound_check(net)
    assert 0.90 <= check["bound_ratio"] <= 1 + 1e-6, check


# ----------------------------------------------------------------------------- the claims
# Each evaluator on hand-made result dicts (what repro.experiments.lmt stores per run): one
# reproduced, one not reproduced at the floor, the same numbers below the floor.

def _claim_run(radius, cw=None, df=None, *, bound=(1.0, 2.0), violations=0):
    """One model's run as the claims read it: per-pair certified radii on the test images
    (negative: misclassified), C&W / DeepFool distances on the first len(cw) of them,
    (L, reshaped-kernel L) and the soundness check's violation count."""
    radius = np.asarray(radius, dtype=np.float32)
    cw = np.asarray(radius[:1000] if cw is None else cw, dtype=np.float64)
    df = np.asarray(cw if df is None else df, dtype=np.float64)
    na = len(cw)
    r, clean = radius[:na].astype(np.float64), radius >= 0
    ok = (r > 0) & clean[:na] & np.isfinite(np.minimum(cw, df))
    ratio = np.minimum(cw, df)[ok] / r[ok]
    metrics = {"n_test": len(radius), "n_attack": na,
               "bound": {"lipschitz": bound[0], "kernel_matrix_lipschitz": bound[1]},
               "certified": {"median_pairwise": float(np.median(np.maximum(radius, 0)))},
               "tightness": {"median_min_pairwise": float(np.median(ratio)) if ok.any()
                             else None},
               "soundness": {"n_checked": na, "n_certified": int((r > 0).sum()),
                             "violations": violations}}
    arrays = {"radius_pair": radius, "cw_dist": cw.astype(np.float32),
              "deepfool_dist": df.astype(np.float32), "correct_clean": clean}
    return {"metrics": metrics, "arrays": arrays}


def _claim_result(runs, epochs=20, n_train=None):
    return {"config": {"mnist_epochs": epochs, "n_train": n_train},
            "runs": {f"mnist-{k}": v for k, v in runs.items()}}


def _judge(claim_id, result):
    (c,) = [c for c in chapter.CLAIMS if c.id == claim_id]
    return c.judge(result)


N, NA = 10000, 1000
STD = _claim_run(np.linspace(0, 0.1, N), np.linspace(0.5, 1.5, NA))
WD = _claim_run(np.linspace(0, 0.2, N), np.linspace(0.5, 1.5, NA))


def test_larger_radius_claim_compares_lmt_with_the_best_baseline_median():
    big = _claim_run(np.linspace(0.1, 1.5, N))          # every radius above WD's median 0.1
    small = _claim_run(np.linspace(0, 0.1, N))         # none above it
    o = _judge("lmt.larger-radius", _claim_result({"standard": STD, "weight_decay": WD,
                                                    "lmt_plus-c1": big}))
    assert o.verdict == claims.REPRODUCED and o.floor_met is True
    # beyond r = 0.1 (weight decay's median): 50% of WD's images, ~all of LMT's
    assert o.value == pytest.approx(50.0, abs=0.1) and "beyond 0.100" in o.ours
    assert o.mde == pytest.approx(2.80 * 0.5, rel=0.01)  # paired SE of a 0/1 flip on half
    worse = _claim_result({"standard": STD, "weight_decay": WD, "lmt_plus-c1": small})
    assert _judge("lmt.larger-radius", worse).verdict == claims.NOT_REPRODUCED
    short = _claim_result({"standard": STD, "weight_decay": WD, "lmt_plus-c1": small}, epochs=5)
    o = _judge("lmt.larger-radius", short)
    assert o.verdict == claims.INCONCLUSIVE and o.floor_met is False
    assert "mnist_epochs = 5" in o.floor_why


def test_attack_claim_needs_both_attacks_beyond_the_standard_median():
    r = np.linspace(0.1, 1.5, N)
    far = _claim_run(r, np.linspace(1.0, 3.0, NA))      # both attacks beyond std's median 1.0
    near = _claim_run(r, np.linspace(0.2, 1.0, NA))
    split = _claim_run(r, np.linspace(1.0, 3.0, NA), np.linspace(0.2, 1.0, NA))
    runs = {"standard": STD, "lmt_plus-c1": far}
    o = _judge("lmt.attack-robust", _claim_result(runs))
    assert o.verdict == claims.REPRODUCED and o.floor_met is True and o.mde > 0
    assert "C&W" in o.ours and "DeepFool" in o.ours
    for lmt in (near, split):   # DeepFool finds closer adversarials: not reproduced
        o = _judge("lmt.attack-robust", _claim_result({"standard": STD, "lmt_plus-c1": lmt}))
        assert o.verdict == claims.NOT_REPRODUCED and o.floor_met is True
    few = {k: _claim_run(v["arrays"]["radius_pair"], v["arrays"]["cw_dist"][:200])
           for k, v in {"standard": STD, "lmt_plus-c1": near}.items()}
    o = _judge("lmt.attack-robust", _claim_result(few))
    assert o.verdict == claims.INCONCLUSIVE and o.floor_met is False
    assert "attacked_images = 200" in o.floor_why


def test_tight_certificate_claim_counts_points_within_the_tolerance():
    r = np.linspace(0.5, 1.5, N)
    tol = chapter.TIGHTNESS_TOLERANCE
    tight = _claim_run(r, r[:NA] * np.linspace(1.2, 3.0, NA))     # 72% within 2.5x
    loose = _claim_run(r, r[:NA] * np.linspace(2.0, 6.0, NA))     # 12.5% within
    o = _judge("lmt.tight-certificate", _claim_result({"standard": STD, "lmt_plus-c1": tight}))
    assert o.verdict == claims.REPRODUCED and o.floor_met is True
    assert o.value == pytest.approx(100 * (tol - 1.2) / 1.8, abs=0.2)
    assert o.interval[0] > 50
    o = _judge("lmt.tight-certificate", _claim_result({"standard": STD, "lmt_plus-c1": loose}))
    assert o.verdict == claims.NOT_REPRODUCED and o.interval[1] < 50
    # a point no attack broke is not within the tolerance: 60% unbroken -> 0.4·72% within
    d = r[:NA] * np.linspace(1.2, 3.0, NA)
    d[np.arange(NA) % 5 < 3] = np.inf
    o = _judge("lmt.tight-certificate",
               _claim_result({"standard": STD, "lmt_plus-c1": _claim_run(r, d)}))
    assert o.value == pytest.approx(0.4 * 100 * (tol - 1.2) / 1.8, abs=0.3)
    assert o.verdict == claims.NOT_REPRODUCED
    o = _judge("lmt.tight-certificate",
               _claim_result({"standard": STD, "lmt_plus-c1": loose}, n_train=20000))
    assert o.verdict == claims.INCONCLUSIVE and "full_training_set = False" in o.floor_why


def test_sound_claim_is_an_exact_count_over_every_certified_point():
    ok = _claim_run(np.linspace(0.01, 1, N))            # 1,000 certified points attacked
    o = _judge("lmt.sound", _claim_result({"standard": STD, "lmt_plus-c1": ok}))
    assert o.verdict == claims.REPRODUCED and o.floor_met is True
    assert o.value == 0 and o.mde == 0                  # a count: no sampling error
    broken = _claim_run(np.linspace(0.01, 1, N), violations=1)
    o = _judge("lmt.sound", _claim_result({"standard": STD, "lmt_plus-c1": broken}))
    assert o.verdict == claims.NOT_REPRODUCED and o.value == 1
    # 2 x 150 attacked points, 0 violations: not enough checks to call the theorem confirmed
    few = {k: _claim_run(np.linspace(0.01, 1, N), np.ones(150)) for k in ("standard", "lmt-c1")}
    o = _judge("lmt.sound", _claim_result(few))
    assert o.verdict == claims.INCONCLUSIVE and "checked_points = 300" in o.floor_why


def test_tighter_bound_claim_takes_the_smallest_ratio_over_the_models():
    r = np.linspace(0, 1, N)
    runs = {"standard": _claim_run(r, bound=(2.0, 6.0)),
            "lmt_plus-c1": _claim_run(r, bound=(1.0, 1.3))}
    o = _judge("lmt.tighter-bound", _claim_result(runs))
    assert o.verdict == claims.REPRODUCED and o.value == pytest.approx(1.3)
    assert o.floor_met is True and "1.30–3.00 over 2 models" in o.ours
    runs["lmt-c1"] = _claim_run(r, bound=(1.0, 0.9))   # a model where it is looser (a bug)
    assert _judge("lmt.tighter-bound", _claim_result(runs)).verdict == claims.NOT_REPRODUCED
    del runs["standard"]                                # no unregularised model to compare
    o = _judge("lmt.tighter-bound", _claim_result(runs))
    assert o.verdict == claims.INCONCLUSIVE and "standard_models = 0" in o.floor_why
