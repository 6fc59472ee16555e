"""Models: shapes, the features/head split, the hypersphere head and dual-BN routing."""
import pytest
import torch
from torch import nn

from repro import models
from repro.models.norms import DualBatchNorm2d, bn_route

CIFAR = ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
MNIST = ((0.1307,), (0.3081,))


@pytest.mark.parametrize("name,kw,shape", [
    ("preact_resnet18", {}, (2, 3, 32, 32)),
    ("wrn16_4", {}, (2, 3, 32, 32)),
    ("wrn28_10", {}, (2, 3, 32, 32)),
    ("wrn34_10", {}, (2, 3, 32, 32)),
    ("wrn", {"depth": 10, "widen_factor": 2}, (2, 3, 32, 32)),
    ("small_cnn", {}, (2, 1, 28, 28)),
    ("small_cnn", {"in_size": 32}, (2, 3, 32, 32)),
])
@pytest.mark.parametrize("head", ["linear", "hypersphere"])
def test_shapes_with_tiny_width(name, kw, shape, head):
    mean_std = MNIST if shape[1] == 1 else CIFAR
    model = models.build(name, 7, mean_std=mean_std, head=head, width=4, **kw)
    x = torch.rand(shape)
    logits, feats = model(x, return_features=True)
    assert logits.shape == (2, 7)
    assert feats.shape == (2, model.feature_dim)
    assert torch.equal(model.features(x), feats)
    assert torch.allclose(model.head(feats), logits)


def test_paper_sizes():
    """Parameter counts of the reference implementations."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(models.build("preact_resnet18", 10)) == 11_171_146 + 1024  # + final BN
    assert count(models.build("wrn34_10", 10)) == 46_160_474
    assert count(models.build("small_cnn", 10, mean_std=MNIST)) == 166_406


def test_residual_blocks_are_explicit():
    model = models.build("wrn16_4", 10, width=4)
    blocks = [m for m in model.modules() if isinstance(m, models.WideBasicBlock)]
    assert len(blocks) == 6
    for b in blocks:
        for attr in ("bn1", "conv1", "bn2", "conv2", "shortcut"):
            assert hasattr(b, attr)
    assert isinstance(blocks[0].shortcut, nn.Conv2d) and isinstance(blocks[1].shortcut, nn.Identity)
    pre = [m for m in models.build("preact_resnet18", 10, width=4).modules()
           if isinstance(m, models.PreActBlock)]
    assert len(pre) == 8


def test_normalize_is_first_layer():
    model = models.build("small_cnn", 10, mean_std=MNIST)
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(model.normalize(x), (x - 0.1307) / 0.3081)


def test_hypersphere_logits_are_cosines():
    model = models.build("preact_resnet18", 10, mean_std=CIFAR, head="hypersphere", width=4)
    logits, feats = model(torch.rand(8, 3, 32, 32) * 3, return_features=True)
    assert logits.abs().max() <= 1.0
    w = model.head.weight
    expected = torch.nn.functional.normalize(feats, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    assert torch.allclose(logits, expected, atol=1e-6)
    assert not any("bias" in n for n, _ in model.head.named_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cosines stay float32 under autocast
        assert model(torch.rand(2, 3, 32, 32)).dtype == torch.float32


def test_hypersphere_head_projects_its_rows_as_the_official_code():
    """weight_norm="project" (AT_HE models/wideresnet.py: weight.data = normalize(weight) in
    forward): rows become unit at each forward and the gradient is the plain linear layer's
    at those rows; "graph" normalises inside the autograd graph and leaves the rows alone."""
    torch.manual_seed(0)
    f = torch.randn(6, 5)
    w0 = torch.randn(4, 5) * 0.3
    proj, graph = models.HypersphereHead(5, 4), models.HypersphereHead(5, 4, weight_norm="graph")
    with torch.no_grad():
        proj.weight.copy_(w0)
        graph.weight.copy_(w0)
    cos_p, cos_g = proj(f), graph(f)
    assert torch.allclose(cos_p, cos_g, atol=1e-6)  # same logits at the same directions
    unit = torch.nn.functional.normalize(w0, dim=1)
    assert torch.allclose(proj.weight.detach(), unit, atol=1e-6)  # overwritten in place
    assert torch.equal(graph.weight.detach(), w0)  # untouched
    # gradients: the linear layer's at the unit rows vs. through the normalisation
    g = torch.randn(6, 4)
    (cos_p * g).sum().backward()
    (cos_g * g).sum().backward()
    w = unit.clone().requires_grad_(True)
    (torch.nn.functional.linear(torch.nn.functional.normalize(f, dim=1), w) * g).sum().backward()
    assert torch.allclose(proj.weight.grad, w.grad, atol=1e-5)
    tangent = w.grad - (w.grad * unit).sum(1, keepdim=True) * unit
    norms = w0.norm(dim=1, keepdim=True)
    assert torch.allclose(graph.weight.grad, tangent / norms, atol=1e-5)
    assert not torch.allclose(proj.weight.grad, graph.weight.grad, atol=1e-3)
    # an SGD step moves the rows off the sphere; the next forward puts them back
    opt = torch.optim.SGD(proj.parameters(), lr=0.5, weight_decay=5e-4)
    opt.step()
    assert not torch.allclose(proj.weight.detach().norm(dim=1), torch.ones(4), atol=1e-3)
    proj(f)
    assert torch.allclose(proj.weight.detach().norm(dim=1), torch.ones(4), atol=1e-6)
    # two forwards before one backward (TRADES, ALP) work: the overwrite is not tracked
    a, b = proj(f), proj(f + 0.1)
    (a.sum() + b.sum()).backward()
    with torch.inference_mode():
        assert proj(f).shape == (6, 4)
    with pytest.raises(ValueError, match="weight_norm"):
        models.HypersphereHead(5, 4, weight_norm="lazy")
    m = models.build("small_cnn", 10, mean_std=MNIST, head="hypersphere_graph", width=4)
    assert m.head.weight_norm == "graph"


def test_dual_bn_routes_statistics():
    model = models.build("wrn16_4", 10, mean_std=CIFAR, norm="dual_bn", width=4)
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    assert duals and all(m.route == "main" for m in duals)
    snapshot = lambda bn: (bn.running_mean.clone(), bn.running_var.clone())
    main0 = [snapshot(m.main) for m in duals]
    aux0 = [snapshot(m.aux) for m in duals]
    model.train()
    with bn_route(model, "aux"):
        assert all(m.route == "aux" for m in duals)
        model(torch.rand(4, 3, 32, 32))
    assert all(m.route == "main" for m in duals)  # restored
    for m, (mu, var), (amu, avar) in zip(duals, main0, aux0):
        assert torch.equal(m.main.running_mean, mu) and torch.equal(m.main.running_var, var)
        assert not torch.equal(m.aux.running_mean, amu)
    aux1 = [snapshot(m.aux) for m in duals]
    model(torch.rand(4, 3, 32, 32))  # main route
    for m, (amu, avar) in zip(duals, aux1):
        assert torch.equal(m.aux.running_mean, amu) and torch.equal(m.aux.running_var, avar)
    assert not torch.equal(duals[0].main.running_mean, main0[0][0])
    # the two routes give different outputs in eval mode once their statistics differ
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    with bn_route(model, "aux"):
        out_aux = model(x)
    assert not torch.allclose(model(x), out_aux)


def test_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("resnet1000", 10)
    with pytest.raises(ValueError, match="unknown head"):
        models.build("small_cnn", 10, head="cosine")
    with pytest.raises(ValueError, match="unknown norm"):
        models.build("small_cnn", 10, norm="ln")
