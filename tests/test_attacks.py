"""Attacks on a tiny CNN trained here on real MNIST, cross-checked against torchattacks."""
import math
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repro import attacks as A
from repro import data

EPS = 0.1      # MNIST L-inf budget where a standard CNN is hurt but not destroyed
EPS_L2 = 1.5
N_TEST = 200


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


_CACHE = {}


def tiny_mnist_cnn(mnist):
    """A standard-trained CNN (~94% test accuracy, a few seconds on CPU), trained once per
    process and shared with test_evaluate.py. Deterministic: fixed seed, fixed batches."""
    if "model" not in _CACHE:
        torch.manual_seed(0)
        model = nn.Sequential(
            Normalize(*data.MEAN_STD["mnist"]),
            nn.Conv2d(1, 16, 5, 2, 2), nn.ReLU(), nn.Conv2d(16, 32, 5, 2, 2), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.Adam(model.parameters(), 2e-3)
        t = time.time()
        for xb, yb in data.train_batches(mnist.x_train[:12800], mnist.y_train[:12800], 128,
                                         seed=0, epoch=0, augment_images=False):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        _CACHE["model"], _CACHE["train_s"] = model, time.time() - t
    return _CACHE["model"]


@pytest.fixture(scope="module")
def model(mnist):
    return tiny_mnist_cnn(mnist)


@pytest.fixture(scope="module")
def xy(mnist):
    return data.to_float(mnist.x_test[:N_TEST]), mnist.y_test[:N_TEST]


def acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_model_is_a_reasonable_standard_model(model, xy):
    assert acc(model, *xy) > 0.9


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", EPS_L2)])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_eps_ball_and_box_hold_exactly(model, xy, norm, eps, loss):
    x, y = xy
    g = torch.Generator().manual_seed(1)
    # large steps push hard against both the ball and the box
    x_adv = A.pgd(model, x, y, eps=eps, alpha=eps / 2, steps=5, norm=norm, restarts=2,
                  loss=loss, generator=g)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.double().norm(dim=1)
    assert size.max() <= eps + 1e-6            # float rounding of x + eps only
    assert size.max() > 0.9 * eps              # ...and the attack does use the budget


def test_fgsm_and_fgsm_rs_constraints(model, xy):
    x, y = xy
    for kw in ({}, {"random_start": True, "alpha": 1.25 * EPS,
                    "generator": torch.Generator().manual_seed(0)}):
        x_adv = A.fgsm(model, x, y, eps=EPS, **kw)
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert acc(model, A.fgsm(model, x, y, eps=EPS), y) < acc(model, x, y) - 0.1


def test_mode_and_requires_grad_restored(model, xy):
    x, y = xy[0][:32], xy[1][:32]
    model.train()
    model[6].eval()                      # a deliberately mixed state must survive too
    model[1].weight.requires_grad_(False)
    before = [(m.training) for m in model.modules()], [p.requires_grad for p in model.parameters()]

    def state():
        return [(m.training) for m in model.modules()], [p.requires_grad for p in model.parameters()]

    try:
        with torch.no_grad():  # e.g. called from evaluation code: must still work
            x_adv = A.pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=2)
        assert (x_adv != x).any()
        assert state() == before
        A.fgsm(model, x, y, eps=EPS)
        A.cw_l2(model, x, y, steps=2, binary_search_steps=1, lr=0.01, initial_const=1.0)
        A.deepfool_l2(model, x, y, steps=2)
        assert state() == before

        def broken(logits, y, clean):
            raise RuntimeError("boom")
        with pytest.raises(RuntimeError, match="boom"):
            A.pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=2, loss=broken)
        assert state() == before
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)


def test_attack_hurts_and_large_eps_destroys(model, xy):
    x, y = xy
    clean = acc(model, x, y)
    g = torch.Generator().manual_seed(0)
    robust = acc(model, A.pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=10, generator=g), y)
    assert robust < clean - 0.2
    huge = acc(model, A.pgd(model, x, y, eps=1.0, alpha=0.25, steps=20, generator=g), y)
    assert huge <= 0.01
    huge_l2 = acc(model, A.pgd(model, x, y, eps=10.0, alpha=2.5, steps=20, norm="l2",
                               generator=g), y)
    assert huge_l2 <= 0.01


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", EPS_L2)])
def test_restarts_never_increase_accuracy(model, xy, norm, eps):
    x, y = xy
    kw = dict(eps=eps, alpha=eps / 4, steps=5, norm=norm)
    one = A.pgd(model, x, y, restarts=1, generator=torch.Generator().manual_seed(3), **kw)
    three = A.pgd(model, x, y, restarts=3, generator=torch.Generator().manual_seed(3), **kw)
    with torch.no_grad():
        fooled1, fooled3 = model(one).argmax(1) != y, model(three).argmax(1) != y
    assert not (fooled1 & ~fooled3).any()  # per example, not only on average
    assert fooled3.sum() >= fooled1.sum()


def test_targeted_reaches_targets(model, xy):
    x, y = xy
    target = (y + 1) % 10
    x_adv = A.pgd(model, x, target, eps=0.3, alpha=0.03, steps=40, targeted=True,
                  generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hit = (model(x_adv).argmax(1) == target).float().mean().item()
    assert hit > 0.8  # untargeted chance of hitting one given class is ~0.1


def test_kl_and_callable_losses(model, xy):
    x, y = xy[0][:64], xy[1][:64]
    with torch.no_grad():
        clean_logits = model(x)
    seen = {}

    def loss(logits, yy, clean):
        seen["clean"] = clean
        return F.cross_entropy(logits, yy, reduction="none")

    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x_cb = A.pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=5, loss=loss, generator=g())
    x_ce = A.pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=5, loss="ce", generator=g())
    torch.testing.assert_close(seen["clean"], clean_logits)
    torch.testing.assert_close(x_cb, x_ce)  # the callable path is the same attack
    x_kl = A.pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=5, loss="kl", generator=g())
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(model(x_kl), 1), F.softmax(clean_logits, 1),
                      reduction="batchmean")
    assert kl > 0.1 and (x_kl - x).abs().max() <= EPS + 1e-6


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", EPS_L2)])
def test_pgd_agrees_with_torchattacks(model, xy, norm, eps):
    """Same eps / step size / steps, no random start on either side: both attacks are then
    deterministic, so the comparison is fair and cannot flake."""
    ta = pytest.importorskip("torchattacks",
                             reason="pip install --no-deps -r .ci/requirements-nodeps.txt")
    x, y = xy
    steps, alpha = 10, eps / 4
    mine = A.pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=False)
    cls = ta.PGD if norm == "linf" else ta.PGDL2
    theirs = cls(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    a_mine, a_theirs = acc(model, mine, y), acc(model, theirs, y)
    print(f"\n{norm} eps={eps}: repro PGD {100 * a_mine:.2f}%  torchattacks "
          f"{100 * a_theirs:.2f}%  (clean {100 * acc(model, x, y):.2f}%, n={len(y)})")
    assert abs(a_mine - a_theirs) <= 0.005


# ----------------------------------------------------------------------------- minimal L2

def lipschitz_bound(model, shape=(1, 1, 28, 28), iters=100):
    """Product of per-layer L2 operator norms (power iteration on the true conv operator,
    float64): an upper bound on the logit map's Lipschitz constant, hence a lower bound
    margin / (sqrt(2) L) on the distance to any adversarial example."""
    L = 1.0 / model[0].std.min().item()
    v = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            W = layer.weight.detach().double()
            if isinstance(layer, nn.Conv2d):
                op = lambda t: F.conv2d(t, W, stride=layer.stride, padding=layer.padding)  # noqa
            else:
                op = lambda t: F.linear(t, W)  # noqa: E731
            u = v.clone()
            for _ in range(iters):
                u = u.requires_grad_(True)
                (g,) = torch.autograd.grad(op(u).pow(2).sum() / 2, u)  # A^T A u
                u = (g / g.norm()).detach()
            L *= op(u).norm().item() * 1.01  # power iteration approaches sigma from below
            v = op(v)
        elif isinstance(layer, nn.Flatten):
            v = v.flatten(1)
    return L


@pytest.fixture(scope="module")
def correct_subset(model, xy):
    x, y = xy
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok][:32], y[ok][:32]


def test_deepfool_and_cw_find_misclassified_points_beyond_certified_radius(model,
                                                                           correct_subset):
    x, y = correct_subset
    with torch.no_grad():
        logits = model(x)
    radius = -A.margin(logits, y) / (math.sqrt(2) * lipschitz_bound(model))
    assert (radius > 0).all()
    results = {"deepfool": A.deepfool_l2(model, x, y, steps=50, overshoot=0.02),
               # MNIST pixels sit at 0/1, where tanh space moves slowly: a large lr makes
               # 100 steps enough (the paper's MNIST setting is 10,000 steps at lr 0.01)
               "cw": A.cw_l2(model, x, y, steps=100, binary_search_steps=5, lr=0.05,
                             initial_const=1.0)}
    for name, (x_adv, dist) in results.items():
        found = torch.isfinite(dist)
        assert found.float().mean() >= 0.9, name
        with torch.no_grad():
            assert (model(x_adv[found]).argmax(1) != y[found]).all(), name
        assert (dist[found] > 0).all(), name
        assert (dist[found] >= radius[found]).all(), name       # no point inside a certificate
        torch.testing.assert_close(dist[found], (x_adv - x)[found].flatten(1).norm(dim=1))
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert (x_adv[~found] == x[~found]).all()
        print(f"\n{name}: median L2 {dist[found].median():.3f}, "
              f"found {int(found.sum())}/{len(y)}, certified radius median {radius.median():.4f}")
    # C&W optimises the distance itself; it should not be much worse than DeepFool
    assert results["cw"][1].median() <= 1.25 * results["deepfool"][1].median()


def test_pgd_under_bf16_autocast(model, xy):
    """The CUDA recipe (bf16 autocast) exercised on the CPU: bf16 logits, float32 loss,
    float32 images back, still exactly inside the ball and the box."""
    x, y = xy[0][:64], xy[1][:64]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = A.pgd(model, x, y, eps=EPS, alpha=EPS / 4, steps=5,
                      generator=torch.Generator().manual_seed(0))
        x_l2 = A.pgd(model, x, y, eps=EPS_L2, alpha=EPS_L2 / 4, steps=5, norm="l2",
                     restarts=2, loss="cw", generator=torch.Generator().manual_seed(0))
    assert x_adv.dtype == torch.float32 and (x_adv - x).abs().max() <= EPS + 1e-6
    assert (x_l2 - x).flatten(1).norm(dim=1).max() <= EPS_L2 + 1e-6
    assert min(x_adv.min(), x_l2.min()) >= 0 and max(x_adv.max(), x_l2.max()) <= 1
    assert acc(model, x_adv, y) < acc(model, x, y) - 0.2


def _bad_images(x):
    """The two mistakes of issue 13: MNIST already normalised with its mean/std, and float
    pixels in 0..255."""
    mean, std = data.MEAN_STD["mnist"]
    return {"normalised": (x - mean[0]) / std[0], "0..255": x * 255}


@pytest.mark.parametrize("attack", [
    lambda m, x, y: A.pgd(m, x, y, eps=EPS, alpha=EPS / 4, steps=2),
    lambda m, x, y: A.pgd(m, x, y, eps=EPS_L2, alpha=0.5, steps=2, norm="l2"),
    lambda m, x, y: A.fgsm(m, x, y, eps=EPS),
    lambda m, x, y: A.cw_l2(m, x, y, steps=2, binary_search_steps=1),
    lambda m, x, y: A.deepfool_l2(m, x, y, steps=2),
], ids=["pgd", "pgd-l2", "fgsm", "cw_l2", "deepfool_l2"])
def test_attacks_refuse_images_outside_0_1(model, xy, attack):
    x, y = xy[0][:8], xy[1][:8]
    for kind, bad in _bad_images(x).items():
        lo, hi = bad.min().item(), bad.max().item()
        with pytest.raises(ValueError, match=r"un-normalised .*\[0, 1\], got values in") as e:
            attack(model, bad, y)
        assert f"[{lo:.4g}, {hi:.4g}]" in str(e.value), (kind, str(e.value))
        assert ("normalised with a mean/std" if kind == "normalised" else "divide by 255") \
            in str(e.value)
    with pytest.raises(ValueError, match="contain NaN"):
        attack(model, torch.where(x > 0.5, math.nan, x), y)
    with pytest.raises(ValueError, match="repro.data.to_float"):  # uint8 must be converted
        attack(model, (x * 255).round().to(torch.uint8), y)
    attack(model, x, y)  # the same images in [0, 1] run


def test_check_images_edges():
    A.check_images(torch.zeros(0, 1, 28, 28), "empty")  # an empty batch passes
    A.check_images(torch.tensor([0.0, 1.0]), "bounds")  # both ends are in range
    A.check_images(torch.tensor([0, 255], dtype=torch.uint8), "u8", allow_uint8=True)
    A.check_images(torch.tensor([0.0, 1.0], dtype=torch.bfloat16), "bf16")
    with pytest.raises(ValueError, match=r"where: .*got values in \[0, 1\.001\]"):
        A.check_images(torch.tensor([0.0, 1.001]), "where")
    with pytest.raises(ValueError, match="got dtype torch.int64"):
        A.check_images(torch.tensor([0, 1]), "int", allow_uint8=True)


def test_cw_defaults_find_what_deepfool_finds(model, xy):
    """Issue 13, item 3: C&W-L2 with its defaults is a minimum-distance attack that must not
    stop early. On a standard-trained MNIST CNN it finds at least the points DeepFool finds,
    at a median distance no larger than DeepFool's (the old defaults, lr 0.01 from c = 1e-3,
    found 51 of 100 here)."""
    x, y = xy
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok][:50], y[ok][:50]
    _, d_df = A.deepfool_l2(model, x, y)
    x_cw, d_cw = A.cw_l2(model, x, y)
    found_df, found_cw = torch.isfinite(d_df), torch.isfinite(d_cw)
    print(f"\nDeepFool: {int(found_df.sum())}/{len(y)} at median {d_df.median():.3f}; "
          f"C&W defaults: {int(found_cw.sum())}/{len(y)} at median {d_cw.median():.3f}")
    assert found_cw.sum() >= found_df.sum() and found_df.float().mean() > 0.9
    assert d_cw.median() <= d_df.median()
    with torch.no_grad():
        assert (model(x_cw[found_cw]).argmax(1) != y[found_cw]).all()
    # the old defaults stop early on the same points (the test can fail)
    _, d_old = A.cw_l2(model, x, y, lr=0.01, initial_const=1e-3)
    assert torch.isfinite(d_old).sum() < found_df.sum()
