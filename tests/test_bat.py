"""BAT's pieces on hand-made tensors: weights, normalised weighted CE, discrimination loss,
and the objective (atypical flags looked up by batch.index, registered by name)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repro import losses, objectives
from repro.models import build
from repro.objectives import Batch, StepState


def test_bat_weights_only_atypical_misclassified():
    logits = torch.tensor([[2.0, 0.0, 1.0],    # y=0 correct
                           [0.0, 3.0, 1.0],    # y=0 wrong
                           [0.0, 3.0, 1.0],    # y=0 wrong but typical
                           [1.0, 0.5, 0.0]])   # y=2 wrong, atypical
    y = torch.tensor([0, 0, 0, 2])
    atyp = torch.tensor([True, True, False, True])
    w = losses.bat_weights(logits, y, atyp, alpha=2.0)
    p = F.softmax(logits, 1)
    assert w[0] == 1 and w[2] == 1
    assert w[1].item() == pytest.approx(math.exp(-2 * p[1, 1].item()))  # max non-true prob
    assert w[3].item() == pytest.approx(math.exp(-2 * p[3, 0].item()))
    assert not w.requires_grad


def test_weighted_cross_entropy_is_normalised():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0])
    ce = F.cross_entropy(logits, y, reduction="none")
    w = torch.tensor([1.0, 0.5, 1.0, 0.2, 1.0])
    assert losses.weighted_cross_entropy(logits, y, w).item() == pytest.approx(
        ((w * ce).sum() / w.sum()).item(), rel=1e-6)
    assert losses.weighted_cross_entropy(logits, y, torch.ones(5)).item() == pytest.approx(
        ce.mean().item(), rel=1e-6)


def test_discrimination_loss_hand_computed():
    h = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [5.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    tau = 0.5
    hn = F.normalize(h, dim=1)
    s = hn @ hn.t() / tau
    # anchors with a positive and a negative: (0,1), (1,0), (2,3), (3,2)
    def term(i, j, negs):
        return -(s[i, j] - torch.logsumexp(torch.stack([s[i, j], *[s[i, b] for b in negs]]), 0))
    want = torch.stack([term(0, 1, [2, 3]), term(1, 0, [2, 3]), term(2, 3, [0, 1]),
                        term(3, 2, [0, 1])]).mean()
    got = losses.discrimination_loss(h, y, tau=tau)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # the paper's literal form (negatives only in the denominator)
    want2 = torch.stack([torch.logsumexp(s[0, [2, 3]], 0) - s[0, 1],
                         torch.logsumexp(s[1, [2, 3]], 0) - s[1, 0],
                         torch.logsumexp(s[2, [0, 1]], 0) - s[2, 3],
                         torch.logsumexp(s[3, [0, 1]], 0) - s[3, 2]]).mean()
    assert losses.discrimination_loss(h, y, tau=tau, include_positive=False).item() == \
        pytest.approx(want2.item(), rel=1e-5)


def test_discrimination_loss_mask_and_degenerate():
    h = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    mask = torch.tensor([True, True, True, True, False, False])
    full_masked = losses.discrimination_loss(h, y, mask)
    assert full_masked.item() == pytest.approx(losses.discrimination_loss(h[:4], y[:4]).item())
    # pulling same-class features together lowers it
    hc = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]])
    hf = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    yy = torch.tensor([0, 0, 1, 1])
    assert losses.discrimination_loss(hc, yy) < losses.discrimination_loss(hf, yy)
    # no positives at all: zero, still differentiable
    z = losses.discrimination_loss(h, torch.arange(6))
    assert z.item() == 0.0
    z.backward()


def test_bat_objective_uses_batch_index_and_is_registered():
    torch.manual_seed(0)
    model = build("small_cnn", 10, mean_std=((0.5,) * 3, (0.25,) * 3), width=4, in_channels=3,
                  in_size=32)
    atypical = np.zeros(50, dtype=bool)
    atypical[[3, 7, 11]] = True
    obj = objectives.build("bat", atypical=atypical, alpha=2.0, beta=0.2, steps=1)
    assert obj.config()["n_atypical"] == 3 and obj.config()["name"] == "bat"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])
    index = torch.tensor([3, 7, 11, 0, 1, 2, 4, 5])
    state = StepState(0, 0, 1, 1, torch.Generator().manual_seed(1))
    loss, logs = obj(model, Batch(x, y, index), state)
    loss.backward()
    assert torch.isfinite(loss) and logs["mean_w"] <= 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # beta = 0, alpha = 0 is plain PGD-AT cross-entropy on the same adversarial examples
    obj0 = objectives.build("bat", atypical=atypical, alpha=0.0, beta=0.0, steps=1)
    ref = objectives.build("pgd_at", steps=1, alpha=2 / 255)
    l0, _ = obj0(model, Batch(x, y, index), StepState(0, 0, 1, 1, torch.Generator().manual_seed(1)))
    lr, _ = ref(model, Batch(x, y, index), StepState(0, 0, 1, 1, torch.Generator().manual_seed(1)))
    assert l0.item() == pytest.approx(lr.item(), rel=1e-5)
    # another split gives another config (the run cache key)
    other = atypical.copy(); other[0] = True
    assert objectives.bat(other).config() != objectives.bat(atypical).config()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_bat_laptop_small_cnn_does_not_collapse(cifar10, tmp_path, seed):
    """Regression: with tau = 0.1 the discrimination loss killed every ReLU unit of the
    laptop small_cnn's penultimate layer within ~3 epochs on 3000 CIFAR-10 images (seeds 1
    and 2; features -> 0, one predicted class, CE = ln 10). The chapter's own model, training
    config and preset beta / tau must keep the features alive and the model above chance."""
    from repro import data, train
    from repro.experiments import bat, common
    cfg = bat.SPEC.resolve("laptop", dataset="cifar10", n_train=3000, n_val=0, epochs=3,
                           seed=seed)
    ds = common.load_dataset("cifar10", n_train=3000, n_test=500, n_val=0)
    model = bat._model_fn(cfg["arch"], cfg["width"], ds, seed)()
    eps = bat._eps(cfg)
    atyp = np.random.default_rng(seed).random(len(ds.y_train)) < 0.1
    obj = objectives.bat(atyp, alpha=1.0, beta=cfg["beta"], tau=cfg["tau"], eps=eps,
                         step=2.5 * eps / cfg["train_steps"], steps=cfg["train_steps"])
    tcfg = bat._train_cfg(cfg, epochs=cfg["epochs"], adversarial=True, n_val=0, seed=seed)
    res = train.train(model, obj, ds, tcfg, tmp_path / "run", device="cpu", progress=False)
    assert res.history[-1]["feat_norm"] > 1.0
    model.eval()
    with torch.no_grad():
        logits, feats = model(data.to_float(ds.x_test), return_features=True)
    assert (feats > 0).any(0).float().mean() > 0.05          # some units still alive
    assert len(logits.argmax(1).unique()) >= 4                # not a constant prediction
    assert (logits.argmax(1) == ds.y_test).float().mean() > 0.12    # chance: 0.1


def test_discrimination_loss_is_float32_under_bf16_autocast(cifar10):
    """On CUDA the trainer runs BAT's step under bf16 autocast, which ran the loss's
    similarity matmul in bf16 (a bf16 loss, ~0.1% off); it is now the fp32 value exactly."""
    torch.manual_seed(0)
    model = build("small_cnn", 10, mean_std=cifar10.mean_std, width=4, in_size=32, norm="bn")
    x, y = cifar10.x_train[:64].float() / 255, cifar10.y_train[:64]
    with torch.no_grad():
        feats = model.features(x)
    want = losses.discrimination_loss(feats, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = losses.discrimination_loss(feats, y)
        from_bf16 = losses.discrimination_loss(feats.bfloat16(), y)  # bf16 activations
    assert got.dtype == torch.float32 and got.item() == want.item()
    assert from_bf16.dtype == torch.float32
    assert from_bf16.item() == pytest.approx(want.item(), rel=1e-2)
