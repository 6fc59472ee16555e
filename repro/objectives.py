"""Training objectives: one callable per method, ``objective(model, batch, state) -> (loss, logs)``.

``batch`` has ``x`` (float images in [0, 1]), ``y`` and ``index`` (positions in the training
set, for per-example state such as BAT's weights). ``state`` says where training is (epoch,
global step, total steps, ``fraction`` done for ramps such as LMT's c) and carries
``generator``, a random generator that is a pure function of (seed, step): attacks draw their
random starts from it, so a resumed run draws exactly what an uninterrupted one would.

``logs`` maps names to floats or 0-d tensors (tensors avoid a host sync per step; the
trainer averages them). An objective with state across steps (LMT's power-iteration
vectors) implements ``state_dict()`` / ``load_state_dict()`` and the trainer checkpoints it.
New methods subclass ``Objective`` (or are any callable of the same form).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from repro import losses


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


@dataclass
class StepState:
    epoch: int
    step: int              # global optimisation step, 0-based
    total_steps: int
    steps_per_epoch: int
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def fraction(self) -> float:
        """Fraction of training done before this step, in [0, 1)."""
        return self.step / max(1, self.total_steps)


class Objective:
    """Base class: hyperparameters as attributes, ``config()`` lists them for run records."""

    name = "objective"

    def __call__(self, model: nn.Module, batch: Batch, state: StepState):
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v for k, v in vars(self).items()
                                      if not k.startswith("_") and isinstance(v, (int, float, str, bool))}}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{self.name}({args})"


class Standard(Objective):
    """Cross-entropy on clean images."""

    name = "standard"

    def __call__(self, model, batch, state):
        logits = model(batch.x)
        loss = losses.cross_entropy(logits, batch.y)
        return loss, {"loss": loss.detach(), "acc": losses.accuracy(logits.detach(), batch.y)}


class PGDAT(Objective):
    """Madry et al. (2018): cross-entropy on PGD adversarial examples only."""

    name = "pgd_at"

    def __init__(self, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf"):
        self.eps, self.alpha, self.steps, self.norm = eps, alpha, steps, norm

    def __call__(self, model, batch, state):
        from repro import attacks
        x_adv = attacks.pgd(model, batch.x, batch.y, eps=self.eps, alpha=self.alpha,
                            steps=self.steps, norm=self.norm, generator=state.generator)
        logits = model(x_adv)
        loss = losses.cross_entropy(logits, batch.y)
        return loss, {"loss": loss.detach(), "adv_acc": losses.accuracy(logits.detach(), batch.y)}


class TRADES(Objective):
    """Zhang et al. (2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv maximising the KL.

    The attack starts uniformly in the eps-ball (repro.attacks' random start) where the
    official code starts at x + 0.001 * N(0, 1); both then take ``steps`` signed steps.
    """

    name = "trades"

    def __init__(self, beta=6.0, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf"):
        self.beta, self.eps, self.alpha, self.steps, self.norm = beta, eps, alpha, steps, norm

    def __call__(self, model, batch, state):
        from repro import attacks
        x_adv = attacks.pgd(model, batch.x, batch.y, eps=self.eps, alpha=self.alpha,
                            steps=self.steps, norm=self.norm, loss="kl", generator=state.generator)
        logits_clean = model(batch.x)
        logits_adv = model(x_adv)
        natural = losses.cross_entropy(logits_clean, batch.y)
        robust = losses.trades_kl(logits_adv, logits_clean)
        loss = natural + self.beta * robust
        return loss, {"loss": loss.detach(), "natural": natural.detach(), "kl": robust.detach(),
                      "acc": losses.accuracy(logits_clean.detach(), batch.y),
                      "adv_acc": losses.accuracy(logits_adv.detach(), batch.y)}


class ALP(Objective):
    """Adversarial logit pairing (Kannan et al. 2018), in HE's form:
    (1 - w) * CE(f(x), y) + w * CE(f(x_adv), y) + beta * ||logits(x) - logits(x_adv)||^2,
    with w = ``adv_weight`` (0.5: the mixed-batch version) and x_adv from a CE PGD attack."""

    name = "alp"

    def __init__(self, beta=0.5, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf",
                 adv_weight=0.5):
        self.beta, self.eps, self.alpha, self.steps, self.norm = beta, eps, alpha, steps, norm
        self.adv_weight = adv_weight

    def __call__(self, model, batch, state):
        from repro import attacks
        x_adv = attacks.pgd(model, batch.x, batch.y, eps=self.eps, alpha=self.alpha,
                            steps=self.steps, norm=self.norm, generator=state.generator)
        logits_clean = model(batch.x)
        logits_adv = model(x_adv)
        ce_clean = losses.cross_entropy(logits_clean, batch.y)
        ce_adv = losses.cross_entropy(logits_adv, batch.y)
        pairing = losses.logit_pairing(logits_adv, logits_clean)
        loss = (1 - self.adv_weight) * ce_clean + self.adv_weight * ce_adv + self.beta * pairing
        return loss, {"loss": loss.detach(), "pairing": pairing.detach(),
                      "acc": losses.accuracy(logits_clean.detach(), batch.y),
                      "adv_acc": losses.accuracy(logits_adv.detach(), batch.y)}


class FGSMRS(Objective):
    """"Fast is better than free" (Wong et al. 2020): one FGSM step of size ``alpha`` from a
    uniform random start in the eps-ball, projected back; CE on the result."""

    name = "fgsm_rs"

    def __init__(self, eps=8 / 255, alpha=10 / 255):
        self.eps, self.alpha = eps, alpha

    def __call__(self, model, batch, state):
        from repro import attacks
        x_adv = attacks.fgsm(model, batch.x, batch.y, eps=self.eps, random_start=True,
                             alpha=self.alpha, generator=state.generator)
        logits = model(x_adv)
        loss = losses.cross_entropy(logits, batch.y)
        return loss, {"loss": loss.detach(), "adv_acc": losses.accuracy(logits.detach(), batch.y)}


def standard() -> Standard:
    return Standard()


def pgd_at(eps=8 / 255, alpha=2 / 255, steps=10, norm="linf") -> PGDAT:
    return PGDAT(eps, alpha, steps, norm)


def trades(beta=6.0, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf") -> TRADES:
    return TRADES(beta, eps, alpha, steps, norm)


def alp(beta=0.5, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf", adv_weight=0.5) -> ALP:
    return ALP(beta, eps, alpha, steps, norm, adv_weight)


def fgsm_rs(eps=8 / 255, alpha=10 / 255) -> FGSMRS:
    return FGSMRS(eps, alpha)


OBJECTIVES = {"standard": standard, "pgd_at": pgd_at, "trades": trades, "alp": alp,
              "fgsm_rs": fgsm_rs}


def build(name: str, **kw) -> Objective:
    """An objective by name, e.g. ``build("trades", beta=6)``."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**kw)


# ----------------------------------------------------------------------------- HE (Pang et al. 2020)

class ScaledLogits(nn.Module):
    """``s · model(x)``: what HE's training attack sees on a hypersphere-head model (scaled
    cosines, no margin). A view of ``model``, not a copy: same parameters, same modes."""

    def __init__(self, model: nn.Module, s: float):
        super().__init__()
        self.model, self.s = model, float(s)

    def forward(self, x, return_features: bool = False):
        out = self.model(x, return_features=return_features) if return_features else self.model(x)
        if return_features:
            return self.s * out[0].float(), out[1]
        return self.s * out.float()


class _HE(Objective):
    """Shared by the HE objectives: the model must have a hypersphere head (its output is
    cos θ); s scales the cosines, m is the CosFace margin on the true class in the loss only.
    As in the official CIFAR code (github.com/ShawnXYang/AT_HE), the training attack ascends
    its loss on the scaled logits s·cos θ *without* the margin."""

    def _check(self, model):
        head = getattr(model, "head", None)
        if head is not None and type(head).__name__ != "HypersphereHead":
            raise ValueError(f"{self.name} needs a model built with head='hypersphere' "
                             f"(its logits must be cos θ); got head {type(head).__name__}")


class PGDATHE(_HE):
    """PGD-AT+HE: CE(s·(cos θ(x_adv) − m·1_y), y), x_adv from PGD on CE(s·cos θ, y).
    Official defaults s = 10, m = 0.2."""

    name = "pgd_at_he"

    def __init__(self, s=10.0, m=0.2, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf"):
        self.s, self.m = float(s), float(m)
        self.eps, self.alpha, self.steps, self.norm = eps, alpha, steps, norm

    def __call__(self, model, batch, state):
        from repro import attacks
        self._check(model)
        x_adv = attacks.pgd(ScaledLogits(model, self.s), batch.x, batch.y, eps=self.eps,
                            alpha=self.alpha, steps=self.steps, norm=self.norm,
                            generator=state.generator)
        cos = model(x_adv)
        loss = losses.he_cross_entropy(cos, batch.y, self.s, self.m)
        return loss, {"loss": loss.detach(), "adv_acc": losses.accuracy(cos.detach(), batch.y)}


class TRADESHE(_HE):
    """TRADES+HE: CE(s·(cos θ(x) − m·1_y), y) + β·KL(p_s(x) || p_s(x_adv)), p_s = softmax of
    s·cos θ (no margin in the KL term); x_adv maximises that KL. Official defaults β = 6,
    s = 15, m = 0.2."""

    name = "trades_he"

    def __init__(self, beta=6.0, s=15.0, m=0.2, eps=8 / 255, alpha=2 / 255, steps=10,
                 norm="linf"):
        self.beta, self.s, self.m = float(beta), float(s), float(m)
        self.eps, self.alpha, self.steps, self.norm = eps, alpha, steps, norm

    def __call__(self, model, batch, state):
        from repro import attacks
        self._check(model)
        x_adv = attacks.pgd(ScaledLogits(model, self.s), batch.x, batch.y, eps=self.eps,
                            alpha=self.alpha, steps=self.steps, norm=self.norm, loss="kl",
                            generator=state.generator)
        cos_clean, cos_adv = model(batch.x), model(x_adv)
        natural = losses.he_cross_entropy(cos_clean, batch.y, self.s, self.m)
        robust = losses.trades_kl(self.s * cos_adv.float(), self.s * cos_clean.float())
        loss = natural + self.beta * robust
        return loss, {"loss": loss.detach(), "natural": natural.detach(), "kl": robust.detach(),
                      "acc": losses.accuracy(cos_clean.detach(), batch.y),
                      "adv_acc": losses.accuracy(cos_adv.detach(), batch.y)}


class ALPHE(_HE):
    """ALP+HE: (1 − w)·CE_m(x) + w·CE_m(x_adv) + β·||s·cos θ(x) − s·cos θ(x_adv)||², CE_m the
    margin loss CE(s·(cos θ − m·1_y), y), the pairing on the scaled logits (no margin), x_adv
    from PGD on CE(s·cos θ, y). Official defaults β = 0.5, s = 20, m = 0.3."""

    name = "alp_he"

    def __init__(self, beta=0.5, s=20.0, m=0.3, eps=8 / 255, alpha=2 / 255, steps=10,
                 norm="linf", adv_weight=0.5):
        self.beta, self.s, self.m = float(beta), float(s), float(m)
        self.eps, self.alpha, self.steps, self.norm = eps, alpha, steps, norm
        self.adv_weight = adv_weight

    def __call__(self, model, batch, state):
        from repro import attacks
        self._check(model)
        x_adv = attacks.pgd(ScaledLogits(model, self.s), batch.x, batch.y, eps=self.eps,
                            alpha=self.alpha, steps=self.steps, norm=self.norm,
                            generator=state.generator)
        cos_clean, cos_adv = model(batch.x), model(x_adv)
        ce_clean = losses.he_cross_entropy(cos_clean, batch.y, self.s, self.m)
        ce_adv = losses.he_cross_entropy(cos_adv, batch.y, self.s, self.m)
        pairing = losses.logit_pairing(self.s * cos_adv.float(), self.s * cos_clean.float())
        loss = (1 - self.adv_weight) * ce_clean + self.adv_weight * ce_adv + self.beta * pairing
        return loss, {"loss": loss.detach(), "pairing": pairing.detach(),
                      "acc": losses.accuracy(cos_clean.detach(), batch.y),
                      "adv_acc": losses.accuracy(cos_adv.detach(), batch.y)}


def pgd_at_he(s=10.0, m=0.2, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf") -> PGDATHE:
    return PGDATHE(s, m, eps, alpha, steps, norm)


def trades_he(beta=6.0, s=15.0, m=0.2, eps=8 / 255, alpha=2 / 255, steps=10,
              norm="linf") -> TRADESHE:
    return TRADESHE(beta, s, m, eps, alpha, steps, norm)


def alp_he(beta=0.5, s=20.0, m=0.3, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf",
           adv_weight=0.5) -> ALPHE:
    return ALPHE(beta, s, m, eps, alpha, steps, norm, adv_weight)


OBJECTIVES.update(pgd_at_he=pgd_at_he, trades_he=trades_he, alp_he=alp_he)


class AdvProp(Objective):
    """AdvProp (Xie et al., CVPR 2020): every batch gives clean images, normalised by the main
    BatchNorms, and PGD adversarial images, generated and normalised with the auxiliary BNs
    (``repro.models.norms.bn_route``); the loss is the equal-weight mean of the two
    cross-entropies (the paper sums them; the mean keeps the learning rate comparable with
    vanilla training). Inference uses the main BNs only (a model's default route).

    The attacker is the paper's: L-inf PGD, ``eps`` in {1..4}/255, ``steps`` = eps·255 + 1
    (default), step 1/255, random start, run with the model in eval mode (so the attack reads
    the auxiliary running statistics and changes no statistic). ``targeted=True`` attacks a
    uniformly random wrong label (drawn from ``state.generator``), as in the PyTorch port.

    ``aux_bn=False`` is the paper's "preliminary way" (Sec. 3/4.1): the same attack, but one
    shared BN sees clean and adversarial images together in one concatenated batch. With
    ``aux_bn=True`` the model must contain ``DualBatchNorm2d`` layers (``norm="dual_bn"``).
    """

    name = "advprop"

    def __init__(self, eps=1 / 255, alpha=1 / 255, steps=None, targeted=False, aux_bn=True):
        self.eps, self.alpha = float(eps), float(alpha)
        self.steps = int(steps) if steps is not None else int(round(self.eps * 255)) + 1
        self.targeted, self.aux_bn = bool(targeted), bool(aux_bn)
        self._checked = None
        if not self.aux_bn:
            self.name = "advprop_shared_bn"

    def _check(self, model):
        if self._checked is model:
            return
        from repro.models.norms import DualBatchNorm2d
        has_dual = any(isinstance(m, DualBatchNorm2d) for m in model.modules())
        if self.aux_bn and not has_dual:
            raise ValueError("AdvProp with aux_bn=True needs a model with DualBatchNorm2d "
                             "layers (build(..., norm='dual_bn'))")
        self._checked = model

    def attack(self, model, x, y, generator=None):
        """The adversarial half of a batch (auxiliary BNs when ``aux_bn``)."""
        from repro import attacks
        from repro.models.norms import bn_route
        target = y
        if self.targeted:
            with attacks.eval_mode(model), torch.no_grad():
                n_classes = model(x[:1]).shape[1]
            dev = generator.device if generator is not None else y.device
            shift = torch.randint(1, n_classes, y.shape, generator=generator, device=dev)
            target = (y + shift.to(y.device)) % n_classes
        with bn_route(model, "aux" if self.aux_bn else "main"):
            return attacks.pgd(model, x, target, eps=self.eps, alpha=self.alpha,
                               steps=self.steps, targeted=self.targeted, generator=generator)

    def __call__(self, model, batch, state):
        from repro.models.norms import bn_route
        self._check(model)
        x_adv = self.attack(model, batch.x, batch.y, state.generator)
        if self.aux_bn:
            with bn_route(model, "main"):
                logits_clean = model(batch.x)
            with bn_route(model, "aux"):
                logits_adv = model(x_adv)
        else:  # one BN normalises the clean+adversarial mixture
            logits_clean, logits_adv = model(torch.cat([batch.x, x_adv])).chunk(2)
        ce_clean = losses.cross_entropy(logits_clean, batch.y)
        ce_adv = losses.cross_entropy(logits_adv, batch.y)
        loss = 0.5 * (ce_clean + ce_adv)
        return loss, {"loss": loss.detach(), "ce_clean": ce_clean.detach(),
                      "ce_adv": ce_adv.detach(),
                      "acc": losses.accuracy(logits_clean.detach(), batch.y),
                      "adv_acc": losses.accuracy(logits_adv.detach(), batch.y)}


def advprop(eps=1 / 255, alpha=1 / 255, steps=None, targeted=False, aux_bn=True) -> AdvProp:
    return AdvProp(eps, alpha, steps, targeted, aux_bn)


def advprop_shared_bn(eps=1 / 255, alpha=1 / 255, steps=None, targeted=False) -> AdvProp:
    """The "preliminary way": adversarial training on clean + adversarial, one shared BN."""
    return AdvProp(eps, alpha, steps, targeted, aux_bn=False)


OBJECTIVES["advprop"] = advprop
OBJECTIVES["advprop_shared_bn"] = advprop_shared_bn


class BAT(Objective):
    """Benign Adversarial Training (Xu et al., arXiv 2106.04794): on PGD examples,
    sum_i w_i CE_i / sum_i w_i + beta * discrimination loss, where w_i =
    exp(-alpha * max_{k != y} p_k(x_i^adv)) for atypical *misclassified* samples (else 1) and
    the discrimination loss (``losses.discrimination_loss``, temperature ``tau``) acts on the
    penultimate features of the batch's *typical* adversarial samples.

    ``atypical``: one bool per training example (mem(x_i) > t, see ``repro.memorization``),
    looked up with ``batch.index``. Its count and a digest go into ``config()`` so a run's
    cache key changes with the split.
    """

    name = "bat"

    def __init__(self, atypical, alpha=1.0, beta=0.2, tau=0.5, eps=8 / 255, step=2 / 255,
                 steps=10, norm="linf"):
        import hashlib
        import numpy as np
        flags = np.asarray(atypical.cpu() if torch.is_tensor(atypical) else atypical, dtype=bool)
        self._atypical = torch.from_numpy(flags)
        self.alpha, self.beta, self.tau = float(alpha), float(beta), float(tau)
        self.eps, self.step, self.steps, self.norm = eps, step, steps, norm
        self.n_atypical = int(flags.sum())
        self.atypical_digest = hashlib.sha1(np.packbits(flags).tobytes()).hexdigest()[:12]

    def __call__(self, model, batch, state):
        from repro import attacks
        if self._atypical.device != batch.index.device:
            self._atypical = self._atypical.to(batch.index.device)
        atyp = self._atypical[batch.index]
        x_adv = attacks.pgd(model, batch.x, batch.y, eps=self.eps, alpha=self.step,
                            steps=self.steps, norm=self.norm, generator=state.generator)
        logits, feats = model(x_adv, return_features=True)
        w = losses.bat_weights(logits, batch.y, atyp, self.alpha)
        ce = losses.weighted_cross_entropy(logits, batch.y, w)
        dl = (losses.discrimination_loss(feats, batch.y, ~atyp, tau=self.tau)
              if self.beta else ce.new_zeros(()))
        loss = ce + self.beta * dl
        # feat_norm watches for the collapse seen at laptop scale (small_cnn, CIFAR-10) with
        # tau = 0.1: the discrimination loss drove the ReLU penultimate features to 0
        # (constant prediction); see losses.discrimination_loss for why tau defaults to 0.5
        return loss, {"loss": loss.detach(), "wce": ce.detach(), "disc": dl.detach(),
                      "mean_w": w.mean(), "feat_norm": feats.detach().float().norm(dim=1).mean(),
                      "adv_acc": losses.accuracy(logits.detach(), batch.y)}


def bat(atypical, alpha=1.0, beta=0.2, tau=0.5, eps=8 / 255, step=2 / 255, steps=10,
        norm="linf") -> BAT:
    return BAT(atypical, alpha, beta, tau, eps, step, steps, norm)


OBJECTIVES["bat"] = bat


class LMT(Objective):
    """Lipschitz-margin training (Tsuzuku, Sato & Sugiyama, NeurIPS 2018): cross-entropy on
    logits with sqrt(2)·c·L added to every non-target logit, L the network's L2 Lipschitz
    bound (``repro.lipschitz``); LMT++ (``plus=True``, ``lmt-fc`` in the official configs)
    adds c·||w_t - w_i||·L_penultimate instead (the per-pair bound of Prop. 2).

    ``form="official"`` (default) scales the added margin per example by
    clip(margin / required margin, 0, 1), not differentiated, as the official Chainer code
    does; ``form="full"`` adds it whole (see ``repro.lipschitz.lmt_logits``).

    L comes from a ``LipschitzEstimator``: ``power_steps`` power-iteration steps per
    optimisation step per conv and ``linear_steps`` per Linear (paper: 1 each; None: as
    ``power_steps``) on persistent vectors, differentiable in the weights (BN bounded with
    its running statistics, as at inference). Why more than 1: the loss lowers ||A u|| along
    exactly the vector u the iteration has found, so one step per optimiser step trails the
    weights (measured on MNIST: an estimate 25% below the exact bound after 5 epochs; see
    ``LipschitzEstimator``). Its vectors
    are this objective's ``state_dict``, so the trainer checkpoints them and a resumed run
    continues exactly. The estimator is built on the first call (it needs the model and the
    input shape) and rebuilt if the model changes. ``bound_check(model)`` compares the
    estimate with the exact bound (the chapter logs it at every epoch end).

    c ramps geometrically from ``c_start`` (default c/1000) to ``c`` over ``warmup_epochs``
    (fractional epochs: per step), see ``repro.lipschitz.lmt_c``; 0 keeps c constant (the
    official MNIST config).
    """

    name = "lmt"

    def __init__(self, c=1.0, plus=False, warmup_epochs=0.0, c_start=None, seed=0,
                 form="official", power_steps=1, linear_steps=None, block=1):
        from repro import lipschitz
        if form not in lipschitz.LMT_FORMS:
            raise ValueError(f"form must be one of {lipschitz.LMT_FORMS}, got {form!r}")
        self.c, self.plus, self.warmup_epochs = float(c), bool(plus), float(warmup_epochs)
        self.c_start = None if c_start is None else float(c_start)
        self.seed, self.form = int(seed), form
        self.power_steps = int(power_steps)
        self.linear_steps = self.power_steps if linear_steps is None else int(linear_steps)
        self.block = int(block)
        self._estimator, self._model, self._pending = None, None, None

    def c_at(self, state: StepState) -> float:
        from repro import lipschitz
        epoch = state.step / max(1, state.steps_per_epoch)
        return lipschitz.lmt_c(epoch, self.c, self.warmup_epochs, self.c_start)

    def estimator(self, model: nn.Module, input_shape) -> "nn.Module":
        """The (persistent) training-time bound for ``model``."""
        from repro import lipschitz
        if self._estimator is None or self._model is not model:
            est = lipschitz.LipschitzEstimator(model, tuple(input_shape), pairwise=self.plus,
                                               seed=self.seed, power_steps=self.power_steps,
                                               linear_steps=self.linear_steps,
                                               block=self.block)
            if self._pending is not None:
                est.load_state_dict(self._pending)
                self._pending = None
            device = next(model.parameters()).device
            self._estimator, self._model = est.to(device), model
        return self._estimator

    def __call__(self, model, batch, state):
        from repro import lipschitz
        est = self.estimator(model, batch.x.shape[1:])
        bound = est()
        c = self.c_at(state)
        logits = model(batch.x).float()
        loss = losses.cross_entropy(lipschitz.lmt_logits(logits, batch.y, c, bound, self.form),
                                    batch.y)
        scalar = bound if bound.dim() == 0 else bound.detach().amax()
        return loss, {"loss": loss.detach(), "acc": losses.accuracy(logits.detach(), batch.y),
                      "lipschitz": scalar.detach(), "c": c}

    def bound_check(self, model: nn.Module, input_shape=None) -> dict:
        """{"bound_estimate", "bound_exact", "bound_ratio"}: the training estimate at its
        current vectors (L, or L_penultimate for LMT++) and the rigorous float64 value of the
        same quantity for the current weights. Empty before the first step (no estimator)."""
        if self._estimator is None or self._model is not model:
            if input_shape is None:
                return {}
            self.estimator(model, input_shape)
        est, exact = self._estimator.value(), self._estimator.exact()
        return {"bound_estimate": est, "bound_exact": exact,
                "bound_ratio": est / exact if exact > 0 else float("nan")}

    def state_dict(self) -> dict:
        if self._estimator is not None:
            return {k: v.detach().clone() for k, v in self._estimator.state_dict().items()}
        return dict(self._pending or {})

    def load_state_dict(self, state: dict) -> None:
        # Applied when the estimator is (re)built on the next call: the model may be new.
        self._pending = dict(state) if state else None
        self._estimator, self._model = None, None


def lmt(c=1.0, plus=False, warmup_epochs=0.0, c_start=None, seed=0, form="official",
        power_steps=1, linear_steps=None, block=1) -> LMT:
    return LMT(c, plus, warmup_epochs, c_start, seed, form, power_steps, linear_steps, block)


OBJECTIVES["lmt"] = lmt
