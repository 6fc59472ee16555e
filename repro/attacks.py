"""White-box attacks on models that take images in [0, 1] (normalisation is the model's job).

Bounded attacks: ``pgd`` (L-inf / L2, random start, restarts, loss choice, targeted) and
``fgsm`` (also Wong et al.'s FGSM-RS). Minimal-distance L2 attacks for the LMT chapter:
``cw_l2`` (Carlini & Wagner 2017) and ``deepfool_l2`` (Moosavi-Dezfooli et al. 2016).

Every attack validates its arguments before any work (``repro.validate``; the table is
``book/validation.md``): the model, images outside [0, 1] (``check_images``: a ``ValueError``
naming the range it got), labels (1-D int64, one per image, 0 <= y < the model's number of
outputs, checked against the first forward's logits without another host sync), eps, alpha,
steps, restarts, norm, loss, flags and generator. It runs the model in eval mode with its
parameters frozen and restores both afterwards (``eval_mode``), computes losses in float32,
and returns images inside the threat model and [0, 1] exactly: the last operation on every
returned tensor is the projection/clamp.

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

from repro import validate as V

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Loss = Union[str, LossFn]


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Put every submodule in eval mode and freeze parameters; restore both on exit.

    Modes are restored per module, so a model that was deliberately mixed (e.g. frozen BN
    inside a training model) comes back exactly as it was, also after an exception.
    Gradients are enabled inside, so attacks also work when called under ``torch.no_grad``.
    """
    V.module("attacks.eval_mode", "model", model)
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
        else:  # a name or a torch.device; switching autocast off needs no such device here
            device = V.device("attacks.float32", "device", device, none=False, auto=False,
                              available=False)
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
    nothing. Every public function of ``repro`` that takes images runs this check once per
    call: one ``aminmax`` and one host sync (never per attack step). Empty batches pass.

    Raises ``ValueError`` naming ``where``, the dtype or the range found (min/max). The
    check itself lives in ``repro.validate.image_values`` (with the other argument checks).
    """
    V.image_values(x, where, allow_uint8=allow_uint8)


# ----------------------------------------------------------------------------- losses

def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example ``max_{j != y} z_j - z_y`` (positive iff misclassified). ``logits``
    (N, C), ``y`` int64 (N,) (shapes and dtypes are checked; no host sync)."""
    W = "attacks.margin"
    V.tensor(W, "logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"{W}: logits must be a 2-D tensor (N, C), got shape "
                         f"{tuple(logits.shape)}")
    V.tensor(W, "y", y)
    if y.dtype != torch.int64 or y.shape != logits.shape[:1]:
        raise ValueError(f"{W}: y must be int64 class indices of shape ({logits.shape[0]},), "
                         f"got dtype {y.dtype} and shape {tuple(y.shape)}")
    return _margin(logits, y)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - z_y


LOSSES = ("ce", "cw", "kl")


def _check_loss(where: str, loss) -> None:
    if not callable(loss):
        if not isinstance(loss, str):
            raise TypeError(f"{where}: loss must be one of 'ce', 'cw', 'kl' or a callable "
                            f"f(logits, y, clean_logits), got {type(loss).__name__}")
        if loss not in LOSSES:
            raise ValueError(f"{where}: loss must be one of 'ce', 'cw', 'kl' or a callable "
                             f"f(logits, y, clean_logits), got {loss!r}")


def _loss_fn(loss: Loss) -> LossFn:
    if callable(loss):
        return loss
    if loss == "ce":
        return lambda z, y, _: F.cross_entropy(z, y, reduction="none")
    if loss == "cw":
        return lambda z, y, _: _margin(z, y)
    if loss == "kl":  # TRADES: KL(p_clean || p_adv) per example
        return lambda z, y, zc: F.kl_div(F.log_softmax(z, 1), F.log_softmax(zc, 1),
                                         reduction="none", log_target=True).sum(1)
    raise ValueError(f"unknown loss {loss!r}; use 'ce', 'cw', 'kl' or a callable")


def _logit_check(where: str, n: int, y_range, min_classes: int = 1):
    """Host-only check of a model's output against the labels' range (fetched with the
    image range, so no extra sync): logits (n, C), C >= ``min_classes``, every y < C."""
    def check(logits):
        c = V.logits(where, logits, n)
        if c < min_classes:
            raise ValueError(f"{where}: the model must return logits for at least "
                             f"{min_classes} classes, got shape {tuple(logits.shape)}")
        V.classes(where, y_range, c)
    return check


def _objective(model, x_adv, y, loss_fn, clean_logits, targeted, check=None):
    """The quantity every attack step ascends: the loss, or minus it when targeted."""
    logits = model(x_adv).float()  # float32 loss even under a bf16 autocast
    if check is not None:
        check(logits)
    obj = loss_fn(logits, y, clean_logits)
    return (-obj if targeted else obj), logits


# ----------------------------------------------------------------------------- norms

def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project ``x_adv`` onto the ``norm`` ball ('linf' | 'l2', any case) of radius ``eps``
    (finite, >= 0) around ``x`` (same shape), then [0, 1]."""
    W = "attacks.project"
    V.tensor(W, "x_adv", x_adv)
    V.tensor(W, "x", x)
    if x_adv.shape != x.shape:
        raise ValueError(f"{W}: x_adv must have the shape of x {tuple(x.shape)}, got "
                         f"{tuple(x_adv.shape)}")
    return _project(x_adv, x, V.radius(W, "eps", eps), V.norm(W, "norm", norm))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
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
    return _project(x + d.to(x.device, x.dtype), x, eps, norm)


def _step(x_adv, grad, alpha, norm):
    if norm == "linf":
        return x_adv + alpha * grad.sign()
    return x_adv + alpha * grad / _flat_norm(grad).clamp_min(1e-12)


# ----------------------------------------------------------------------------- PGD

def _pgd_run(model, x, y, eps, alpha, steps, norm, loss_fn, clean_logits, start, targeted,
             score=True, check=None):
    """One PGD run from ``start``. ``score``: also return the final objective and success
    (one more forward pass; only needed to pick the worst of several restarts)."""
    x_adv = start
    for _ in range(steps):  # no early stopping: every example takes every step
        x_adv = x_adv.detach().requires_grad_(True)
        obj, _ = _objective(model, x_adv, y, loss_fn, clean_logits, targeted, check)
        (grad,) = torch.autograd.grad(obj.sum(), x_adv)
        x_adv = _project(_step(x_adv.detach(), grad, alpha, norm), x, eps, norm)
    if not score:
        return x_adv.detach(), None, None
    with torch.no_grad():
        obj, logits = _objective(model, x_adv, y, loss_fn, clean_logits, targeted, check)
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

    Validated first (``ValueError``/``TypeError`` naming the argument): ``model`` a Module;
    ``x`` float images in [0, 1] with a batch dimension; ``y`` int64 (N,) with
    0 <= y < the model's outputs; ``eps``, ``alpha`` finite >= 0; ``steps`` int >= 0;
    ``restarts`` int >= 1; ``norm`` 'linf' | 'l2' (any case); ``loss`` as above ('kl' needs
    ``random_start``); ``random_start``, ``targeted`` bools; ``generator`` None or a
    ``torch.Generator``.
    """
    W = "attacks.pgd"
    V.module(W, "model", model)
    eps, alpha = V.radius(W, "eps", eps), V.radius(W, "alpha", alpha)
    steps = V.count(W, "steps", steps, min=0)
    restarts = V.count(W, "restarts", restarts, min=1)
    norm = V.norm(W, "norm", norm)
    _check_loss(W, loss)
    random_start = V.flag(W, "random_start", random_start)
    targeted = V.flag(W, "targeted", targeted)
    V.generator(W, "generator", generator)
    if isinstance(loss, str) and loss == "kl" and not random_start and steps > 0:
        raise ValueError(f"{W}: loss='kl' needs random_start=True (the KL to the clean "
                         f"prediction has zero gradient at x, so PGD would not move), got "
                         f"random_start=False")
    y_range = V.batch(W, x, y, ndim=None, min_ndim=2)  # the one host sync
    return _pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, restarts=restarts,
                loss=loss, random_start=random_start, targeted=targeted, generator=generator,
                check=_logit_check(W, len(x), y_range))


def _pgd(model, x, y, *, eps, alpha, steps, norm, restarts, loss, random_start, targeted,
         generator, check):
    """``pgd`` after validation."""
    loss_fn = _loss_fn(loss)
    x, y = x.detach(), y.detach()
    with eval_mode(model):
        clean_logits = None
        if loss != "ce" and loss != "cw":  # 'kl' and callables see the clean prediction
            with torch.no_grad():
                clean_logits = model(x).float()
            check(clean_logits)
        best = best_obj = best_success = None
        for _ in range(restarts):
            start = _random_start(x, eps, norm, generator) if random_start else x.clone()
            x_adv, obj, success = _pgd_run(model, x, y, eps, alpha, steps, norm, loss_fn,
                                           clean_logits, start, targeted, score=restarts > 1,
                                           check=check)
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
    Validated like ``pgd`` (``alpha``: None or finite >= 0).
    """
    W = "attacks.fgsm"
    V.module(W, "model", model)
    eps = V.radius(W, "eps", eps)
    alpha = eps if alpha is None else V.radius(W, "alpha", alpha)
    _check_loss(W, loss)
    random_start = V.flag(W, "random_start", random_start)
    V.generator(W, "generator", generator)
    if isinstance(loss, str) and loss == "kl" and not random_start:
        raise ValueError(f"{W}: loss='kl' needs random_start=True (the KL to the clean "
                         f"prediction has zero gradient at x), got random_start=False")
    y_range = V.batch(W, x, y, ndim=None, min_ndim=2)
    return _pgd(model, x, y, eps=eps, alpha=alpha, steps=1, norm="linf", restarts=1,
                loss=loss, random_start=random_start, targeted=False, generator=generator,
                check=_logit_check(W, len(x), y_range))


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

    Validated first: ``steps``, ``binary_search_steps`` ints >= 1; ``lr``, ``initial_const``
    finite > 0; ``confidence`` finite >= 0; images and labels as in ``pgd``; the model must
    have at least 2 outputs.
    """
    W = "attacks.cw_l2"
    V.module(W, "model", model)
    steps = V.count(W, "steps", steps, min=1)
    binary_search_steps = V.count(W, "binary_search_steps", binary_search_steps, min=1)
    lr = V.positive(W, "lr", lr)
    confidence = V.nonneg(W, "confidence", confidence)
    initial_const = V.positive(W, "initial_const", initial_const)
    check = _logit_check(W, len(x), V.batch(W, x, y, ndim=None, min_ndim=2), min_classes=2)
    checked = False
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
                if not checked:
                    check(logits)
                    checked = True
                dist2 = (x_adv.float() - x.float()).flatten(1).pow(2).sum(1)
                f = (-_margin(logits, y) + confidence).clamp_min(0)
                opt.zero_grad(set_to_none=True)
                (dist2 + const * f).sum().backward()
                opt.step()
                with torch.no_grad():  # C&W success test: misclassified by `confidence`
                    ok = (_margin(logits, y) > confidence if confidence > 0
                          else logits.argmax(1) != y)
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

    Validated first: ``steps`` int >= 1; ``overshoot`` finite >= 0; ``candidates`` int >= 2;
    images and labels as in ``pgd``; the model must have at least 2 outputs.
    """
    W = "attacks.deepfool_l2"
    V.module(W, "model", model)
    steps = V.count(W, "steps", steps, min=1)
    overshoot = V.nonneg(W, "overshoot", overshoot)
    candidates = V.count(W, "candidates", candidates, min=2)
    check = _logit_check(W, len(x), V.batch(W, x, y, ndim=None, min_ndim=2), min_classes=2)
    x, y = x.detach(), y.detach()
    shape1 = (-1,) + (1,) * (x.dim() - 1)
    with eval_mode(model), float32(x.device):
        with torch.no_grad():
            logits0 = model(x).float()
        check(logits0)
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
