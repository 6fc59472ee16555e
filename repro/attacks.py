"""White-box attacks on models that take images in [0, 1] (normalisation is the model's job).

Bounded attacks: ``pgd`` (L-inf / L2, random start, restarts, loss choice, targeted) and
``fgsm`` (also Wong et al.'s FGSM-RS). Minimal-distance L2 attacks for the LMT chapter:
``cw_l2`` (Carlini & Wagner 2017) and ``deepfool_l2`` (Moosavi-Dezfooli et al. 2016).

Every attack refuses images outside [0, 1] (``check_images``: a ``ValueError`` naming the
range it got), runs the model in eval mode with its parameters frozen and restores both
afterwards (``eval_mode``), computes losses in float32, and returns images inside the threat
model and [0, 1] exactly: the last operation on every returned tensor is the projection/clamp.

Precision: ``pgd`` and ``fgsm`` are also the *training* attacks, so they run the model under
whatever autocast the caller opened (the trainer's bf16 step makes them bf16 attacks, which
is fine for training). The evaluation-only attacks ``cw_l2`` and ``deepfool_l2`` always run
the model in fp32 (``float32``), and every entry point of ``repro.evaluate`` does the same
for the attacks it is given: an attack computed in bf16 can be weaker and overstate
robustness, so reported robustness never inherits a caller's bf16 by accident.
"""
from __future__ import annotations

import contextlib
import math
from contextlib import contextmanager
from typing import Callable, Union

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Loss = Union[str, LossFn]


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Put every submodule in eval mode and freeze parameters; restore both on exit.

    Modes are restored per module, so a model that was deliberately mixed (e.g. frozen BN
    inside a training model) comes back exactly as it was, also after an exception.
    Gradients are enabled inside, so attacks also work when called under ``torch.no_grad``.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)  # only input gradients are needed: no weight-grad graph
    try:
        with torch.enable_grad():
            yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def _autocast_kinds() -> list[str]:
    kinds = ["cpu"]
    if torch.cuda.is_available():
        kinds.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        kinds.append("mps")
    return kinds


@contextmanager
def float32(device=None):
    """Switch off any autocast a caller opened, so float32 inputs and weights compute in
    float32 inside (``torch.autocast(kind, enabled=False)``).

    ``device``: the device (``torch.device``, string, tensor or module) whose autocast to
    switch off, together with the CPU's; ``None``: every device type this machine has.
    Usable as a decorator too: ``@float32()``.
    """
    if device is None:
        kinds = _autocast_kinds()
    else:
        if isinstance(device, torch.nn.Module):
            device = next((t.device for t in device.parameters()), torch.device("cpu"))
        elif isinstance(device, torch.Tensor):
            device = device.device
        kinds = sorted({torch.device(device).type, "cpu"})
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield


# ----------------------------------------------------------------------------- inputs

def check_images(x: torch.Tensor, where: str, *, allow_uint8: bool = False) -> None:
    """Refuse images that are not un-normalised pixels: float values in [0, 1] (or, where
    ``allow_uint8``, uint8 pixels 0..255, which ``repro.data.to_float`` maps to [0, 1]).

    Normalisation is the model's first layer (``repro.models.norms.Normalize``), so a batch
    already normalised with a mean/std, or float pixels in 0..255, would be attacked with an
    eps meant for [0, 1] and clamped into [0, 1] by every projection: results that mean
    nothing. Every public function of ``repro`` that takes images calls this once per call:
    one ``aminmax`` and one host sync (never per attack step). Empty batches pass.

    Raises ``ValueError`` naming ``where``, the dtype or the range found (min/max).
    """
    if not torch.is_tensor(x):
        raise TypeError(f"{where}: images must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8 and allow_uint8:
        return
    if not x.is_floating_point():
        raise ValueError(
            f"{where}: images must be float pixels in [0, 1]"
            + (" or uint8 pixels" if allow_uint8 else
               " (convert uint8 images with repro.data.to_float)") + f", got dtype {x.dtype}")
    if x.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(x.detach())).float().tolist()  # the one host sync
    if lo >= 0 and hi <= 1:  # False for NaN too
        return
    if math.isnan(lo) or math.isnan(hi):
        hint = ": the images contain NaN"
    elif lo < 0:
        hint = (": negative values look like images already normalised with a mean/std; pass "
                "the raw [0, 1] images (normalisation is the model's first layer)")
    else:
        hint = (": values above 1 look like 0..255 pixels; divide by 255 (or pass uint8 "
                "images where accepted). Pass un-normalised [0, 1] images; normalisation is "
                "the model's first layer")
    raise ValueError(f"{where}: images must be un-normalised float pixels in [0, 1], got "
                     f"values in [{lo:.4g}, {hi:.4g}]{hint}")


# ----------------------------------------------------------------------------- losses

def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example ``max_{j != y} z_j - z_y`` (positive iff misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - z_y


def _loss_fn(loss: Loss) -> LossFn:
    if callable(loss):
        return loss
    if loss == "ce":
        return lambda z, y, _: F.cross_entropy(z, y, reduction="none")
    if loss == "cw":
        return lambda z, y, _: margin(z, y)
    if loss == "kl":  # TRADES: KL(p_clean || p_adv) per example
        return lambda z, y, zc: F.kl_div(F.log_softmax(z, 1), F.log_softmax(zc, 1),
                                         reduction="none", log_target=True).sum(1)
    raise ValueError(f"unknown loss {loss!r}; use 'ce', 'cw', 'kl' or a callable")


def _objective(model, x_adv, y, loss_fn, clean_logits, targeted):
    """The quantity every attack step ascends: the loss, or minus it when targeted."""
    logits = model(x_adv).float()  # float32 loss even under a bf16 autocast
    obj = loss_fn(logits, y, clean_logits)
    return (-obj if targeted else obj), logits


# ----------------------------------------------------------------------------- norms

def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project ``x_adv`` onto the ``norm`` ball of radius ``eps`` around ``x``, then [0, 1]."""
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    elif norm == "l2":
        delta = x_adv - x
        # float64 norm: the shrink factor must not round up (MPS has no float64: float32)
        n = _flat_norm(delta.to(torch.float32 if delta.device.type == "mps" else torch.float64))
        delta = delta * (eps / n.clamp_min(1e-30)).clamp(max=1.0).to(delta.dtype)
        x_adv = x + delta
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return x_adv.clamp(0.0, 1.0)  # clamping only moves points towards x: still in the ball


def _random_start(x, eps, norm, generator):
    dev = generator.device if generator is not None else x.device
    if norm == "linf":
        d = torch.rand(x.shape, generator=generator, device=dev).mul_(2).sub_(1).mul_(eps)
    else:  # direction uniform on the sphere, radius uniform in [0, eps]
        d = torch.randn(x.shape, generator=generator, device=dev)
        r = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator, device=dev)
        d = d / _flat_norm(d).clamp_min(1e-12) * r * eps
    return project(x + d.to(x.device, x.dtype), x, eps, norm)


def _step(x_adv, grad, alpha, norm):
    if norm == "linf":
        return x_adv + alpha * grad.sign()
    return x_adv + alpha * grad / _flat_norm(grad).clamp_min(1e-12)


# ----------------------------------------------------------------------------- PGD

def _pgd_run(model, x, y, eps, alpha, steps, norm, loss_fn, clean_logits, start, targeted,
             score=True):
    """One PGD run from ``start``. ``score``: also return the final objective and success
    (one more forward pass; only needed to pick the worst of several restarts)."""
    x_adv = start
    for _ in range(steps):  # no early stopping: every example takes every step
        x_adv = x_adv.detach().requires_grad_(True)
        obj, _ = _objective(model, x_adv, y, loss_fn, clean_logits, targeted)
        (grad,) = torch.autograd.grad(obj.sum(), x_adv)
        x_adv = project(_step(x_adv.detach(), grad, alpha, norm), x, eps, norm)
    if not score:
        return x_adv.detach(), None, None
    with torch.no_grad():
        obj, logits = _objective(model, x_adv, y, loss_fn, clean_logits, targeted)
        pred = logits.argmax(1)
        success = pred == y if targeted else pred != y
    return x_adv.detach(), obj.detach(), success


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
        steps: int, norm: str = "linf", restarts: int = 1, loss: Loss = "ce",
        random_start: bool = True, targeted: bool = False,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent in the ``norm`` ('linf' | 'l2') ball of radius ``eps``.

    ``loss``: 'ce', 'cw' (logit margin), 'kl' (KL to the clean prediction, TRADES; needs
    ``random_start`` since its gradient at x is zero) or ``f(logits, y, clean_logits)`` ->
    per-example loss. ``targeted``: ``y`` holds target classes and the loss is minimised.
    With ``restarts`` > 1, each example keeps its worst restart: successful first, then
    highest loss; restart 1 consumes the generator first, so more restarts never help the
    model. Returns x_adv with ``x``'s shape and dtype, in the ball and in [0, 1].
    """
    if steps < 0 or restarts < 1:
        raise ValueError("need steps >= 0 and restarts >= 1")
    check_images(x, "attacks.pgd")
    loss_fn = _loss_fn(loss)
    x, y = x.detach(), y.detach()
    with eval_mode(model):
        clean_logits = None
        if loss != "ce" and loss != "cw":  # 'kl' and callables see the clean prediction
            with torch.no_grad():
                clean_logits = model(x).float()
        best = best_obj = best_success = None
        for _ in range(restarts):
            start = _random_start(x, eps, norm, generator) if random_start else x.clone()
            x_adv, obj, success = _pgd_run(model, x, y, eps, alpha, steps, norm, loss_fn,
                                           clean_logits, start, targeted, score=restarts > 1)
            if best is None:
                best, best_obj, best_success = x_adv, obj, success
                continue
            better = (success & ~best_success) | ((success == best_success) & (obj > best_obj))
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
            best_obj = torch.where(better, obj, best_obj)
            best_success = best_success | success
    return best


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
         loss: Loss = "ce", random_start: bool = False, alpha: float | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One signed-gradient step of size ``alpha`` (default ``eps``) in the L-inf ball.

    With ``random_start=True`` and ``alpha`` ~ 1.25 eps this is FGSM-RS (Wong et al. 2020).
    """
    return pgd(model, x, y, eps=eps, alpha=eps if alpha is None else alpha, steps=1,
               norm="linf", loss=loss, random_start=random_start, generator=generator)


# ----------------------------------------------------------------------------- minimal L2

def _l2_dist(a, b):
    return (a - b).flatten(1).float().norm(dim=1)


def _finish_min_dist(model, x, y, x_adv, found):
    """Keep only adversarials the model really misclassifies; inf distance elsewhere."""
    with torch.no_grad():
        found = found & (model(x_adv).argmax(1) != y)
    x_adv = torch.where(found.view(-1, *([1] * (x.dim() - 1))), x_adv, x)
    dist = torch.where(found, _l2_dist(x_adv, x), torch.full_like(found, math.inf, dtype=torch.float32))
    return x_adv.detach(), dist


# C&W-L2's defaults. Carlini & Wagner's own (lr 0.01 from c = 1e-3, 10,000 steps) stop far too
# early at 100 steps: in tanh space a pixel at exactly 0 or 1 (most of an MNIST digit) starts
# where d pixel / d w ~ 1e-6, and Adam moves w by ~lr per step, so lr 0.01 needs ~500 steps
# before such pixels move at all, and c = 1e-3 spends three search rounds just growing c.
# Measured on a standard-trained MNIST CNN (100 correctly classified test digits): the old
# defaults found 51/100 (median 3.12 with the misses as inf), lr 0.1 from c = 0.1 finds 100/100
# at median 1.49 against DeepFool's 100/100 at 1.53 (tests/test_attacks.py checks this kind).
CW_DEFAULTS = {"steps": 100, "binary_search_steps": 9, "lr": 0.1, "initial_const": 0.1}


def cw_l2(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 100,
          binary_search_steps: int = 9, lr: float = 0.1, confidence: float = 0.0,
          initial_const: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Carlini-Wagner L2 (untargeted): Adam in tanh space on ||d||^2 + c * max(z_y - max_j z_j
    + confidence, 0), with a per-example binary search over c (x10 until the first success).
    Defaults: ``CW_DEFAULTS`` (why these and not the paper's lr 0.01 from c = 1e-3: see there).

    Returns (x_adv, dist): the smallest-L2 misclassified point found per example (x itself
    where none was found) and its L2 distance (inf where none was found).
    """
    check_images(x, "attacks.cw_l2")
    x, y = x.detach(), y.detach()
    n, shape1 = len(x), (-1,) + (1,) * (x.dim() - 1)
    dev = x.device
    lower = torch.zeros(n, device=dev)
    upper = torch.full((n,), 1e10, device=dev)
    const = torch.full((n,), float(initial_const), device=dev)
    best_dist = torch.full((n,), math.inf, device=dev)
    best_adv = x.clone()
    # atanh of the image, shrunk slightly so pixels at exactly 0 or 1 stay finite
    w0 = torch.atanh((x.float() * 2 - 1) * (1 - 1e-6))
    with eval_mode(model), float32(dev):
        for _ in range(binary_search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr)
            success_c = torch.zeros(n, dtype=torch.bool, device=dev)
            for _ in range(steps):
                x_adv = ((torch.tanh(w) + 1) / 2).to(x.dtype)
                logits = model(x_adv).float()
                dist2 = (x_adv.float() - x.float()).flatten(1).pow(2).sum(1)
                f = (-margin(logits, y) + confidence).clamp_min(0)
                opt.zero_grad(set_to_none=True)
                (dist2 + const * f).sum().backward()
                opt.step()
                with torch.no_grad():  # C&W success test: misclassified by `confidence`
                    ok = margin(logits, y) > confidence if confidence > 0 else logits.argmax(1) != y
                    d = dist2.sqrt()
                    improve = ok & (d < best_dist)
                    best_dist = torch.where(improve, d, best_dist)
                    best_adv = torch.where(improve.view(shape1), x_adv.detach(), best_adv)
                    success_c |= ok
            # binary search: shrink c after a success, grow it (x10 until bracketed) otherwise
            upper = torch.where(success_c, torch.minimum(upper, const), upper)
            lower = torch.where(success_c, lower, torch.maximum(lower, const))
            const = torch.where(success_c | (upper < 1e9), (lower + upper) / 2, const * 10)
        return _finish_min_dist(model, x, y, best_adv, torch.isfinite(best_dist))


def deepfool_l2(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 50,
                overshoot: float = 0.02, candidates: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepFool L2: step to the nearest linearised decision boundary among the
    ``candidates`` top-scoring classes until the label flips, then overshoot by (1 + o).

    Returns (x_adv, dist) like ``cw_l2``; images are clamped to [0, 1].
    """
    check_images(x, "attacks.deepfool_l2")
    x, y = x.detach(), y.detach()
    shape1 = (-1,) + (1,) * (x.dim() - 1)
    with eval_mode(model), float32(x.device):
        with torch.no_grad():
            logits0 = model(x).float()
        k = min(candidates, logits0.shape[1])
        # column 0: the true class; then the k-1 highest-scoring other classes
        others = logits0.scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).indices
        cand = torch.cat([y[:, None], others], 1)                  # n, k
        r_tot = torch.zeros_like(x, dtype=torch.float32)
        active = logits0.argmax(1) == y                             # already wrong: dist 0
        x_adv = x.clone()
        for _ in range(steps):
            if not active.any():
                break
            idx = active.nonzero().squeeze(1)
            xa = x_adv[idx].detach().requires_grad_(True)
            z = model(xa).float()
            zc = z.gather(1, cand[idx])                             # m, k
            # all k input-gradients in one vectorised backward pass (examples are independent)
            eye = torch.eye(k, device=x.device, dtype=zc.dtype)[:, None].expand(k, len(idx), k)
            grads = torch.autograd.grad(zc, xa, eye, is_grads_batched=True)[0].float()
            w = (grads[1:] - grads[:1]).transpose(0, 1)             # m, k-1, ...
            f = (zc[:, 1:] - zc[:, :1]).detach()                    # m, k-1 (< 0 until flipped)
            wn = w.flatten(2).norm(dim=2).clamp_min(1e-12)
            j = (f.abs() / wn).argmin(1)
            ar = torch.arange(len(idx), device=x.device)
            wj, fj, nj = w[ar, j], f[ar, j], wn[ar, j]
            r_tot[idx] += ((fj.abs() + 1e-4) / nj.pow(2)).view(shape1) * wj
            x_adv[idx] = (x[idx] + (1 + overshoot) * r_tot[idx].to(x.dtype)).clamp(0, 1)
            with torch.no_grad():
                still = model(x_adv[idx]).argmax(1) == y[idx]
            active[idx] = still
        return _finish_min_dist(model, x, y, x_adv, ~active)
