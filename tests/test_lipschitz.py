"""Lipschitz bounds, LMT loss and certificates (repro.lipschitz).

Every bound is checked against an independent ground truth: the spectral norm of the dense
Jacobian of a tiny layer (torch.autograd.functional.jacobian), secant quotients maximised by
gradient ascent for whole networks, and an L2 PGD attack inside certified radii of a model
trained with LMT on real MNIST.
"""
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repro import data, models
from repro import lipschitz as L


def jacobian_norm(fn, x):
    """Spectral norm of the Jacobian of fn at x (float64), fn on a single example."""
    jac = torch.autograd.functional.jacobian(fn, x.double())
    return torch.linalg.matrix_norm(jac.reshape(fn(x.double()).numel(), x.numel()), 2).item()


CONVS = [  # (c_in, c_out, kernel, stride, padding, dilation, groups, size)
    (2, 3, 3, 1, 1, 1, 1, 6), (2, 3, 3, 2, 1, 1, 1, 7), (2, 3, 4, 2, 1, 1, 1, 8),
    (2, 3, 3, 1, 0, 1, 1, 6), (2, 3, 3, 1, 2, 2, 1, 7), (4, 4, 3, 2, 1, 1, 2, 6),
    (3, 2, 1, 2, 0, 1, 1, 6), (2, 3, 5, 3, 2, 1, 1, 9),
]


@pytest.mark.parametrize("cin,cout,k,s,p,d,g,size", CONVS)
def test_conv_bounds_bracket_exact_jacobian_norm(cin, cout, k, s, p, d, g, size):
    torch.manual_seed(k * 10 + s)
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g).double()
    shape = (cin, size, size)
    exact = jacobian_norm(lambda x: conv(x[None])[0], torch.randn(shape))
    power = L.conv2d_operator_norm(conv, shape)
    circulant = L.conv2d_norm_upper(conv, shape)
    node, _ = L.plan(conv, shape)
    dense = L.operator_norm_bounds(node)
    big = L.operator_norm_bounds(node, dense_limit=0)  # force the circulant path
    print(f"k{k} s{s} p{p} d{d} g{g}: exact {exact:.5f} power {power:.5f} "
          f"circulant {circulant:.5f} ({circulant / exact:.3f}x)")
    assert power == pytest.approx(exact, rel=1e-6) and power <= exact * (1 + 1e-9)
    assert circulant >= exact * (1 - 1e-12) and circulant <= 1.2 * exact
    assert dense.method == "svd" and dense.upper >= exact and dense.lower == pytest.approx(exact)
    assert big.method == "circulant" and big.lower <= exact * (1 + 1e-9) <= big.upper


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv_string_padding(padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 4, padding=padding).double()  # "same" pads 1 left, 2 right
    shape = (2, 7, 7)
    exact = jacobian_norm(lambda x: conv(x[None])[0], torch.randn(shape))
    # Sound always; loose on a 7x7 image with "valid" (few outputs see the whole kernel).
    assert exact <= L.conv2d_norm_upper(conv, shape) <= 1.5 * exact
    assert L.conv2d_operator_norm(conv, shape) == pytest.approx(exact, rel=1e-6)


def test_conv_bound_is_the_operator_not_the_reshaped_kernel():
    overlap = nn.Conv2d(1, 1, 3, padding=1, bias=False).double()
    nn.init.ones_(overlap.weight)
    shape = (1, 8, 8)
    kernel_matrix = torch.linalg.matrix_norm(overlap.weight.reshape(1, -1), 2).item()  # = 3
    operator = L.conv2d_operator_norm(overlap, shape)  # -> 9 as the image grows
    assert operator == pytest.approx(jacobian_norm(lambda x: overlap(x[None])[0],
                                                   torch.rand(shape)), rel=1e-6)
    assert operator > 2.5 * kernel_matrix
    # Non-overlapping windows (kernel = stride): the operator is block-diagonal in the kernel.
    patch = nn.Conv2d(2, 3, 2, stride=2, bias=False)
    assert L.conv2d_operator_norm(patch, (2, 6, 6)) == pytest.approx(
        torch.linalg.matrix_norm(patch.weight.reshape(3, -1).double(), 2).item(), rel=1e-6)


def test_linear_and_batchnorm_and_normalize_bounds_are_exact():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).double()
    assert L.linear_norm(lin) == pytest.approx(jacobian_norm(lin, torch.randn(7)), rel=1e-9)
    bn = nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        bn.running_var.copy_(torch.tensor([0.25, 4.0, 0.01]))
    exact = jacobian_norm(lambda x: bn(x[None])[0], torch.randn(3, 2, 2))
    assert L.batchnorm_bound(bn).item() == pytest.approx(exact, rel=1e-5)
    assert exact == pytest.approx(1 / math.sqrt(0.01 + bn.eps), rel=1e-5)
    norm = models.Normalize((0.1, 0.2), (0.5, 0.25)).double()
    rep = L.network_bound(norm, (2, 3, 3))
    assert rep.lipschitz == pytest.approx(jacobian_norm(lambda x: norm(x[None])[0],
                                                        torch.rand(2, 3, 3)), rel=1e-6)
    with pytest.raises(L.UnsupportedLayerError):
        L.plan(nn.BatchNorm2d(3, track_running_stats=False).eval(), (3, 2, 2))


POOLS = [nn.MaxPool2d(2), nn.MaxPool2d(3, 1, 1), nn.MaxPool2d(3, 2, 1),
         nn.MaxPool2d(3, 2, ceil_mode=True), nn.AdaptiveMaxPool2d(3)]


@pytest.mark.parametrize("pool", POOLS, ids=repr)
def test_maxpool_bound_is_the_worst_local_jacobian(pool):
    shape = (2, 7, 7)
    bound = L.pooling_bound(pool, shape)
    torch.manual_seed(0)
    worst = max(jacobian_norm(lambda x: pool(x[None])[0], torch.randn(shape)) for _ in range(5))
    # A pixel that is the max of every window containing it attains sqrt(#windows).
    attained = 0.0
    for i in (2, 3, 4):
        spike = 1e-3 * torch.rand(shape)
        spike[:, i, i] = 1.0
        attained = max(attained, jacobian_norm(lambda x: pool(x[None])[0], spike))
    print(f"{pool}: bound {bound:.4f} random {worst:.4f} spike {attained:.4f}")
    assert worst <= bound * (1 + 1e-12)
    assert attained == pytest.approx(bound, rel=1e-9)


@pytest.mark.parametrize("pool", [nn.AvgPool2d(2), nn.AvgPool2d(3, 2, 1),
                                  nn.AvgPool2d(3, 2, 1, count_include_pad=False),
                                  nn.AvgPool2d(3, 1, 1), nn.AdaptiveAvgPool2d(1),
                                  nn.AdaptiveAvgPool2d(3)], ids=repr)
def test_avgpool_bound_is_its_operator_norm(pool):
    shape = (2, 8, 8)
    exact = jacobian_norm(lambda x: pool(x[None])[0], torch.rand(shape))
    bound = L.pooling_bound(pool, shape)
    schur = L.linear_pool_norm(pool, shape, dense_limit=0)
    print(f"{pool}: exact {exact:.4f} bound {bound:.4f} schur {schur:.4f}")
    assert bound == pytest.approx(exact, rel=1e-7) and bound >= exact
    assert schur >= exact * (1 - 1e-12)
    if isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size == 1:
        assert bound == pytest.approx(1 / 8, rel=1e-7)  # 1/sqrt(HW)


class TinyPreAct(nn.Module):
    """A test-only residual block with a 1x1 projection on the pre-activation."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        out = F.relu(self.bn(x))
        return self.conv(out) + self.shortcut(out)


@L.register_bound(TinyPreAct)
def _tiny_preact_rule(m, shape, name):
    bn, _ = L.plan(m.bn, shape, f"{name}.bn")
    conv, out = L.plan(m.conv, shape, f"{name}.conv")
    shortcut, _ = L.plan(m.shortcut, shape, f"{name}.shortcut")
    return L.Chain([bn, L.Sum([conv, shortcut])]), out


def tiny_net(classes=4):
    torch.manual_seed(1)
    net = nn.Sequential(
        models.Normalize((0.5,), (0.5,)), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
        nn.ReLU(), nn.MaxPool2d(2), TinyPreAct(4, 6, 2), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(6, 16), nn.Dropout(0.5), nn.LeakyReLU(0.1), nn.Linear(16, classes))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 2.0)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def secant_ascent(net, shape, *, start=None, steps=100, n=16, pair=None, seed=0):
    """Largest ||f(a+d) - f(a)|| / ||d|| (or |Δ(z_t - z_i)| / ||d|| for ``pair``) found by
    Adam on (a, d): a lower bound on the Lipschitz constant that works for ReLU nets (whose
    gradient norm is piecewise constant, so ascent on it would not move). float32: the
    quotients are far from rounding level."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand((n, *shape), generator=g) if start is None else start.clone()
    d = 0.1 * torch.randn((n, *shape), generator=g)
    a.requires_grad_(True)
    d.requires_grad_(True)
    opt = torch.optim.Adam([a, d], lr=0.02)
    best = 0.0
    for _ in range(steps):
        diff = net(a + d) - net(a)
        if pair is not None:
            diff = diff[:, pair[0]:pair[0] + 1] - diff[:, pair[1]:pair[1] + 1]
        q = diff.norm(dim=1) / d.flatten(1).norm(dim=1)
        best = max(best, q.max().item())
        opt.zero_grad()
        (-q.sum()).backward()
        opt.step()
    return best


def test_network_bound_dominates_secants_and_gradients():
    net = tiny_net()
    shape = (1, 8, 8)
    rep = L.network_bound(net, shape)
    found = secant_ascent(net, shape)
    x = torch.rand((64, *shape), dtype=torch.float64, requires_grad=True)
    z = net.double()(x)
    grad = torch.autograd.grad((z[:, 0] - z[:, 1]).sum(), x)[0].flatten(1).norm(dim=1)
    net.float()
    pair_found = secant_ascent(net, shape, pair=(0, 1))
    print(f"tiny net: bound {rep.lipschitz:.4f} (power-iteration estimate {rep.estimate:.4f}), "
          f"secant max {found:.4f}, ||grad(z0-z1)||/sqrt2 max {grad.max().item() / L.SQRT2:.4f}, "
          f"pair bound {rep.pairwise[0, 1].item():.4f} vs pair secant {pair_found:.4f}")
    assert found <= rep.lipschitz
    assert grad.max().item() / L.SQRT2 <= rep.lipschitz
    assert pair_found <= rep.pairwise[0, 1].item() <= L.SQRT2 * rep.lipschitz * (1 + 1e-9)
    assert rep.estimate <= rep.lipschitz
    names = [layer.name for layer in rep.layers]
    assert "5.shortcut" in names and "6" in names  # the registered rule and the avg pool
    with pytest.raises(L.UnsupportedLayerError, match="register"):
        L.plan(nn.Sequential(nn.Conv2d(1, 1, 3), nn.GELU()), (1, 5, 5))


def test_estimator_state_gradients_and_convergence():
    net = tiny_net()
    shape = (1, 8, 8)
    est = L.LipschitzEstimator(net, shape)
    assert all(k.startswith("u_") for k in est.state_dict())
    assert set(est.names.values()) == {"1", "5.conv", "5.shortcut", "8", "11"}
    first = est()
    first.backward()
    assert net[1].weight.grad is not None and net[2].weight.grad is not None
    assert net[11].weight.grad is not None
    # Checkpoint: a fresh estimator loaded from the state continues identically.
    again = L.LipschitzEstimator(net, shape, seed=5)
    again.load_state_dict(est.state_dict())
    assert torch.equal(again().detach(), est().detach())
    with torch.no_grad():
        for _ in range(200):
            value = est()
    rep = L.network_bound(net, shape)
    print(f"estimator: step 1 {first.item():.4f}, step 200 {value.item():.4f}, "
          f"exact {rep.lipschitz:.4f}")
    assert value.item() == pytest.approx(rep.estimate, rel=1e-3)
    assert value.item() <= rep.lipschitz * (1 + 1e-5)
    pair = L.LipschitzEstimator(net, shape, pairwise=True)
    with torch.no_grad():
        for _ in range(200):
            p = pair()
    assert p.shape == (4, 4) and torch.all(p.diag() == 0)
    assert torch.all(p.double() <= rep.pairwise * (1 + 1e-5))
    assert "u_11" not in pair.state_dict()  # the head's norm is not needed for LMT++


def test_lmt_logits_add_exactly_the_margin():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    y = torch.tensor([2, 0])
    out = L.lmt_logits(logits, y, 0.5, torch.tensor(3.0), form="full")
    add = 0.5 * math.sqrt(2) * 3.0
    assert torch.allclose(out, logits + torch.tensor([[add, add, 0], [0, add, add]]))
    pair = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 4.0], [2.0, 4.0, 0.0]])
    out = L.lmt_logits(logits, y, 0.5, pair, form="full")
    assert torch.allclose(out, logits + 0.5 * torch.tensor([[2.0, 4.0, 0.0], [0.0, 1.0, 2.0]]))
    loss = L.LMTMarginLoss(0.5, form="full")(logits, y, pair)
    assert loss.item() == pytest.approx(F.cross_entropy(out, y).item())
    with pytest.raises(ValueError, match="form"):
        L.lmt_logits(logits, y, 0.5, pair, form="scaled")


def _official_lmt(x, t, l):
    """numpy port of the official Chainer ``Lmt.forward`` (ytsmiling/lmt,
    src/function/last_fc.py), l = c·L: returns the shifted logits and the factor."""
    l = l * math.sqrt(2)
    x2 = x.copy()
    rows = list(range(t.size))
    x2[rows, t] = x.min(1)
    factor = np.clip((x[rows, t] - x2.max(1)) / l, 0.0, 1.0)
    x2[rows, t] = x[rows, t] - factor * l
    return x2, factor


def _official_lmt_fc(x, W, t, l):
    """numpy port of the official ``LmtFc.forward`` (numpy branch), l = c·L_penultimate."""
    diff = W[None] - W[t][:, None]                      # (N, K, D): w_i - w_t
    l = l * np.linalg.norm(diff, axis=2)                # (N, K)
    pred_margin = x[list(range(t.size)), t][:, None] - x
    factor = np.where(pred_margin >= 0,
                      np.where(pred_margin >= l, 1, pred_margin / (l + 1e-20)), 0)
    factor = factor.min(1, keepdims=True)
    return x + factor * l, factor[:, 0]


def test_official_lmt_form_matches_the_official_code_on_hand_made_logits():
    """Rows: misclassified (factor 0: plain CE), correct below the target margin (partial),
    certified at the target (factor 1: the whole margin), a tie (0 margin)."""
    x = np.array([[3.0, 1.0, 0.5],     # correct, margin 2: certified when sqrt(2)·c·L <= 2
                  [0.0, 2.0, 1.0],     # misclassified (y = 0)
                  [1.2, 1.0, -1.0],    # correct, margin 0.2 < the target: partial
                  [1.0, 1.0, 0.0]])    # tie
    t = np.array([0, 0, 0, 1])
    c, bound = 0.5, 2.0                 # sqrt(2)·c·L = 1.414
    ref, factor = _official_lmt(x, t, c * bound)
    assert factor.tolist() == pytest.approx([1.0, 0.0, 0.2 / (math.sqrt(2) * c * bound), 0.0])
    z, yt = torch.tensor(x), torch.tensor(t)
    got = L.lmt_logits(z, yt, c, torch.tensor(bound, dtype=torch.float64))
    # official lowers the target logit, ours raises the others: equal up to a per-row shift,
    # which softmax cross-entropy ignores
    shift = (got - torch.tensor(ref))
    assert torch.allclose(shift - shift[:, :1], torch.zeros_like(shift), atol=1e-12)
    ce = F.cross_entropy(got, yt, reduction="none")
    assert torch.allclose(ce, F.cross_entropy(torch.tensor(ref), yt, reduction="none"))
    assert ce[1] == pytest.approx(F.cross_entropy(z[1:2], yt[1:2]).item())  # plain CE

    # the factor is a constant: d loss / d L = sum over rows of factor·sqrt(2)·c·(1 - p_t)/N
    L_t = torch.tensor(bound, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(L.lmt_logits(z, yt, c, L_t), yt)
    loss.backward()
    p_t = torch.softmax(torch.tensor(ref), 1)[torch.arange(4), yt]
    expected = (torch.tensor(factor) * math.sqrt(2) * c * (1 - p_t)).mean()
    assert L_t.grad.item() == pytest.approx(expected.item(), rel=1e-10)

    # LMT++ (Prop. 2): per-pair a_i = c·||w_t - w_i||·L_pen, no sqrt(2)
    W = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.5]])
    l_pen = 0.8
    ref, factor = _official_lmt_fc(x, W, t, c * l_pen)
    pair = torch.tensor(np.linalg.norm(W[:, None] - W[None], axis=2) * l_pen)
    got = L.lmt_logits(z, yt, c, pair)
    assert torch.allclose(got, torch.tensor(ref), atol=1e-12)
    assert factor[0] == 1.0 and factor[1] == 0.0 and 0 < factor[2] < 1
    full = L.lmt_logits(z, yt, c, pair, form="full")
    assert torch.allclose(full[0], got[0]) and not torch.allclose(full[1], got[1])
    assert L.lmt_c(0, 1e-2, 5) == pytest.approx(1e-5) and L.lmt_c(5, 1e-2, 5) == 1e-2
    assert L.lmt_c(2.5, 1e-2, 5) == pytest.approx(math.sqrt(1e-5 * 1e-2))


def test_certified_radius_formulas():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 0])
    r = L.certified_radius(logits, y, 2.0)
    assert torch.allclose(r, torch.tensor([2.0, -2.0, 0.0], dtype=torch.float64) / (2 * L.SQRT2))
    pair = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 1.0], [4.0, 1.0, 0.0]])
    r = L.certified_radius(logits, y, pair)
    assert torch.allclose(r, torch.tensor([0.75, -2.0, 0.0], dtype=torch.float64))
    assert L.certified_accuracy(r, [0.0, 0.5, 1.0]) == pytest.approx([1 / 3, 1 / 3, 0.0])


def test_repro_models_bounds_and_refusals():
    torch.manual_seed(0)
    for name, shape, kw in [("small_cnn", (1, 28, 28), dict(width=2, norm="bn")),
                            ("wrn16_4", (3, 8, 8), dict(width=1)),
                            ("preact_resnet18", (3, 8, 8), dict(width=1, norm="dual_bn"))]:
        net = models.build(name, 10, mean_std=((0.5,) * shape[0], (0.3,) * shape[0]), **kw)
        with torch.no_grad():  # non-trivial BN statistics
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.running_var.uniform_(0.5, 2.0)
        net.eval()
        rep = L.network_bound(net, shape, max_iters=50)
        found = secant_ascent(net, shape, steps=60, n=8)
        print(f"{name}: bound {rep.lipschitz:.4g}, secant {found:.4g}, "
              f"ratio {rep.lipschitz / found:.1f}")
        assert found <= rep.lipschitz and rep.pairwise.shape == (10, 10)
        est = L.LipschitzEstimator(net, shape)
        assert 0 < est().item() <= rep.lipschitz * (1 + 1e-5)
    hyper = models.build("small_cnn", 10, width=2, head="hypersphere")
    with pytest.raises(L.UnsupportedLayerError, match="hypersphere"):
        L.network_bound(hyper, (1, 28, 28))


def l2_pgd(net, x, y, eps, steps=60):
    """Per-example-radius L2 PGD on the margin loss, random start; returns x_adv."""
    g = torch.Generator().manual_seed(0)
    shape1 = (-1,) + (1,) * (x.dim() - 1)
    delta = torch.randn(x.shape, generator=g, dtype=x.dtype)
    delta = delta / delta.flatten(1).norm(dim=1).view(shape1) * eps.view(shape1) * 0.5
    for _ in range(steps):
        delta.requires_grad_(True)
        z = net((x + delta).clamp(0, 1))
        other = z.scatter(1, y[:, None], -math.inf).max(1).values
        (grad,) = torch.autograd.grad((other - z.gather(1, y[:, None])[:, 0]).sum(), delta)
        with torch.no_grad():
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape1)
            delta = delta + 2.5 * eps.view(shape1) / steps * step
            norm = delta.flatten(1).norm(dim=1).view(shape1)
            delta = delta * torch.clamp(eps.view(shape1) / norm.clamp_min(1e-30), max=1.0)
    return (x + delta.detach()).clamp(0, 1)  # clamping only shrinks |delta| (x in [0, 1])


def test_lmt_trained_mnist_certificates_survive_pgd(mnist):
    torch.manual_seed(0)
    x = data.to_float(mnist.x_train[:2048])
    y = mnist.y_train[:2048]
    net = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=8)
    est = L.LipschitzEstimator(net, (1, 28, 28))
    loss_fn = L.LMTMarginLoss(c=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    epochs, bs = 3, 64
    steps_per_epoch = len(x) // bs
    times = {"plain": [], "lmt": []}
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            loss_fn.c = L.lmt_c(epoch + i / steps_per_epoch, 0.1, 1.0)
            t0 = time.perf_counter()
            logits = net(x[idx])
            if epoch == 0 and i % 2:  # interleaved plain steps to time the overhead
                loss = F.cross_entropy(logits, y[idx])
                kind = "plain"
            else:
                loss = loss_fn(logits, y[idx], est())
                kind = "lmt"
            opt.zero_grad()
            loss.backward()
            opt.step()
            if epoch == 0:
                times[kind].append(time.perf_counter() - t0)
    plain, lmt = (sorted(times[k])[len(times[k]) // 2] for k in ("plain", "lmt"))
    print(f"per-step time (median, batch {bs}): plain {plain * 1e3:.2f} ms, "
          f"LMT {lmt * 1e3:.2f} ms (+{100 * (lmt / plain - 1):.0f}%)")
    net.eval()
    rep = L.network_bound(net, (1, 28, 28))
    xt, yt = data.to_float(mnist.x_test[:200]), mnist.y_test[:200]
    radius = L.certify(net, xt, yt, rep.lipschitz)
    pair_radius = L.certify(net, xt, yt, rep.pairwise)
    acc = L.certified_accuracy(radius, [0.0, 0.1, 0.3])
    print(f"LMT MNIST: L {rep.lipschitz:.3f} (training estimate {est().item():.3f}), "
          f"certified acc at 0/0.1/0.3: {acc}, median radius {radius.median().item():.3f}, "
          f"pairwise median {pair_radius.median().item():.3f}")
    assert acc[0] > 0.6 and acc[1] > 0.1
    assert torch.all(pair_radius[radius > 0] >= radius[radius > 0])  # LMT++ bound is tighter
    ok = radius > 0
    net64 = net.double()
    adv = l2_pgd(net64, xt[ok].double(), yt[ok], radius[ok] * 0.999)
    with torch.no_grad():
        flipped = net64(adv).argmax(1) != yt[ok]
    assert not flipped.any(), "PGD found an adversarial example inside a certified radius"
    # The attack is not a no-op: far outside the radii it does flip predictions.
    adv = l2_pgd(net64, xt[ok].double(), yt[ok], torch.full_like(radius[ok], 4.0))
    with torch.no_grad():
        assert (net64(adv).argmax(1) != yt[ok]).float().mean() > 0.5


@pytest.mark.parametrize("k,s,p,d,g,size", [(4, 2, 1, 1, 1, 28), (3, 1, 1, 1, 2, 8),
                                            (3, 2, 0, 2, 1, 9), (1, 3, 0, 1, 1, 8),
                                            (4, 3, 2, 1, 2, 7)])
def test_training_power_step_transpose_equals_the_autograd_adjoint(k, s, p, d, g, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, k, s, p, dilation=d, groups=g, bias=False)
    node, _ = L.plan(conv, (2, size, size), "c")
    y = torch.randn((1, *node.out_shape))
    w = conv.weight.detach()
    torch.testing.assert_close(L._transpose_apply(node, y, w), L._adjoint(node, y, w))
    lin = nn.Linear(5, 3)
    node, _ = L.plan(lin, (5,), "l")
    y = torch.randn(1, 3)
    torch.testing.assert_close(L._transpose_apply(node, y, lin.weight.detach()),
                               L._adjoint(node, y, lin.weight.detach()))
