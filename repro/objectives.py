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
    """Base class: hyperparameters as attributes, ``config()`` lists them for run records.

    HE (``losses.HE``) composes with an objective through its ``he`` argument: the model must
    then have a hypersphere head (its output is cos θ), the loss's cross-entropies take HE's
    margin, and everything else (the training attack, TRADES's KL, BAT's weights) sees the
    scaled cosines s·cos θ (``_attack_model``, ``_logits``); see ``losses.HE``. ``config()``
    then names the run ``<name>_he`` and adds s, m and the head's weight normalisation;
    without HE it is what it always was (the results cache is keyed by it).
    """

    name = "objective"
    _he: losses.HE | None = None

    def __call__(self, model: nn.Module, batch: Batch, state: StepState):
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        cfg = {"name": self.name, **{k: v for k, v in vars(self).items()
                                     if not k.startswith("_") and isinstance(v, (int, float, str, bool))}}
        if self._he is not None:
            cfg["name"] = f"{self.name}_he"
            cfg.update(self._he.config())
        return cfg

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{self.config()['name']}({args})"

    # --- HE composition (identity when self._he is None) ----------------------------------

    @property
    def he(self) -> losses.HE | None:
        return self._he

    def _set_he(self, he) -> None:
        if he is not None and not isinstance(he, losses.HE):
            raise TypeError(f"he must be a repro.losses.HE or None, got {type(he).__name__}")
        self._he = he

    def _check_head(self, model: nn.Module) -> None:
        """With HE, the model's head must be a hypersphere head with HE's weight norm."""
        if self._he is None:
            return
        head = getattr(model, "head", None)
        if head is None:
            return
        if type(head).__name__ != "HypersphereHead":
            raise ValueError(f"{self.config()['name']} needs a model built with "
                             f"head='hypersphere' (its logits must be cos θ); got head "
                             f"{type(head).__name__}")
        if head.weight_norm != self._he.weight_norm:
            raise ValueError(f"HE(weight_norm={self._he.weight_norm!r}) but the model's head "
                             f"normalises its weights by {head.weight_norm!r}")

    def _attack_model(self, model: nn.Module) -> nn.Module:
        """What the training attack runs on: the model, or its scaled view s·cos θ (HE)."""
        return model if self._he is None else ScaledLogits(model, self._he.s)

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        """Logits without margin: the output itself, or s·cos θ (HE)."""
        return out if self._he is None else self._he.scaled(out)

    def _ce(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The objective's cross-entropy: plain, or HE's margin loss CE(s·(cos θ − m·1_y))."""
        if self._he is None:
            return losses.cross_entropy(out, y, reduction)
        return self._he.cross_entropy(out, y, reduction)


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


class Standard(Objective):
    """Cross-entropy on clean images (with ``he``: HE's margin loss, no attack)."""

    name = "standard"

    def __init__(self, he: losses.HE | None = None):
        self._set_he(he)

    def __call__(self, model, batch, state):
        self._check_head(model)
        out = model(batch.x)
        loss = self._ce(out, batch.y)
        return loss, {"loss": loss.detach(), "acc": losses.accuracy(out.detach(), batch.y)}


class PGDAT(Objective):
    """Madry et al. (2018): cross-entropy on PGD adversarial examples only.

    With ``he`` (PGD-AT+HE, official ``pgd_loss(loss='pgd_he')``): PGD ascends CE(s·cos θ, y)
    without the margin, and the loss is CE(s·(cos θ(x_adv) − m·1_y), y)."""

    name = "pgd_at"

    def __init__(self, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf", he=None):
        self.eps, self.alpha, self.steps, self.norm = eps, alpha, steps, norm
        self._set_he(he)

    def __call__(self, model, batch, state):
        from repro import attacks
        self._check_head(model)
        x_adv = attacks.pgd(self._attack_model(model), batch.x, batch.y, eps=self.eps,
                            alpha=self.alpha, steps=self.steps, norm=self.norm,
                            generator=state.generator)
        out = model(x_adv)
        loss = self._ce(out, batch.y)
        return loss, {"loss": loss.detach(), "adv_acc": losses.accuracy(out.detach(), batch.y)}


class TRADES(Objective):
    """Zhang et al. (2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv maximising the KL.

    The attack starts uniformly in the eps-ball (repro.attacks' random start) where the
    official code starts at x + 0.001 * N(0, 1); both then take ``steps`` signed steps.

    With ``he`` (TRADES+HE, official ``trades_loss(loss='trades_he')``): the natural term is
    HE's margin loss on the clean cosines; the KL term, and the attack that maximises it,
    use softmax(s·cos θ) without margin."""

    name = "trades"

    def __init__(self, beta=6.0, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf", he=None):
        self.beta, self.eps, self.alpha, self.steps, self.norm = beta, eps, alpha, steps, norm
        self._set_he(he)

    def __call__(self, model, batch, state):
        from repro import attacks
        self._check_head(model)
        x_adv = attacks.pgd(self._attack_model(model), batch.x, batch.y, eps=self.eps,
                            alpha=self.alpha, steps=self.steps, norm=self.norm, loss="kl",
                            generator=state.generator)
        out_clean = model(batch.x)
        out_adv = model(x_adv)
        natural = self._ce(out_clean, batch.y)
        robust = losses.trades_kl(self._logits(out_adv), self._logits(out_clean))
        loss = natural + self.beta * robust
        return loss, {"loss": loss.detach(), "natural": natural.detach(), "kl": robust.detach(),
                      "acc": losses.accuracy(out_clean.detach(), batch.y),
                      "adv_acc": losses.accuracy(out_adv.detach(), batch.y)}


class ALP(Objective):
    """Adversarial logit pairing (Kannan et al. 2018), in HE's form (official ``alp_loss``):
    (1 - w) * CE(f(x), y) + w * CE(f(x_adv), y) + beta * mean_{batch, classes}(f(x) - f(x_adv))²
    (``losses.logit_pairing`` = ``F.mse_loss``), with w = ``adv_weight`` (0.5: the
    mixed-batch version) and x_adv from a CE PGD attack.

    With ``he`` (ALP+HE, official ``alp_loss(loss='alp_he')``): both cross-entropies take
    HE's margin, the attack ascends CE(s·cos θ) without it, and the pairing acts on the
    unscaled cosines (the model's output), as the official code."""

    name = "alp"

    def __init__(self, beta=0.5, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf",
                 adv_weight=0.5, he=None):
        self.beta, self.eps, self.alpha, self.steps, self.norm = beta, eps, alpha, steps, norm
        self.adv_weight = adv_weight
        # Not an option: it keys the results cache, so runs made before the pairing became
        # the official mean over classes (it summed over them) are not reused.
        self.pairing = "mse"
        self._set_he(he)

    def __call__(self, model, batch, state):
        from repro import attacks
        self._check_head(model)
        x_adv = attacks.pgd(self._attack_model(model), batch.x, batch.y, eps=self.eps,
                            alpha=self.alpha, steps=self.steps, norm=self.norm,
                            generator=state.generator)
        out_clean = model(batch.x)
        out_adv = model(x_adv)
        ce_clean = self._ce(out_clean, batch.y)
        ce_adv = self._ce(out_adv, batch.y)
        pairing = losses.logit_pairing(out_adv, out_clean)
        loss = (1 - self.adv_weight) * ce_clean + self.adv_weight * ce_adv + self.beta * pairing
        return loss, {"loss": loss.detach(), "pairing": pairing.detach(),
                      "acc": losses.accuracy(out_clean.detach(), batch.y),
                      "adv_acc": losses.accuracy(out_adv.detach(), batch.y)}


class FGSMRS(Objective):
    """"Fast is better than free" (Wong et al. 2020): one FGSM step of size ``alpha`` from a
    uniform random start in the eps-ball, projected back; CE on the result.

    With ``he`` (FastAT+HE): as PGD-AT+HE, the step ascends CE(s·cos θ) without margin and
    the loss is HE's margin loss. (The paper's FreeAT+HE, ImageNet ``main_free.py``, reuses
    the training gradient, so its perturbation follows the margin loss itself.)"""

    name = "fgsm_rs"

    def __init__(self, eps=8 / 255, alpha=10 / 255, he=None):
        self.eps, self.alpha = eps, alpha
        self._set_he(he)

    def __call__(self, model, batch, state):
        from repro import attacks
        self._check_head(model)
        x_adv = attacks.fgsm(self._attack_model(model), batch.x, batch.y, eps=self.eps,
                             random_start=True, alpha=self.alpha, generator=state.generator)
        out = model(x_adv)
        loss = self._ce(out, batch.y)
        return loss, {"loss": loss.detach(), "adv_acc": losses.accuracy(out.detach(), batch.y)}


# HE's official hyperparameters per base method (ShawnXYang/AT_HE, CIFAR-10/README.md at
# d3e9776): PGD-AT+HE s=10 m=0.2, TRADES+HE s=15 m=0.2, ALP+HE s=20 m=0.3. FGSM-RS and
# standard training have no CIFAR setting there; they take ImageNet FreeAT+HE's defaults
# (ImageNet/main_free.py: s_HE=10, angular_margin_HE=0.2).
HE_DEFAULTS = {"pgd_at": (10.0, 0.2), "trades": (15.0, 0.2), "alp": (20.0, 0.3),
               "fgsm_rs": (10.0, 0.2), "standard": (10.0, 0.2), "bat": (10.0, 0.2)}


def default_he(base: str, s=None, m=None, weight_norm="project") -> losses.HE:
    """``losses.HE`` with the official s and m of ``base`` unless given."""
    s0, m0 = HE_DEFAULTS[base]
    return losses.HE(float(s0 if s is None else s), float(m0 if m is None else m), weight_norm)


def standard(he=None) -> Standard:
    return Standard(he)


def pgd_at(eps=8 / 255, alpha=2 / 255, steps=10, norm="linf", he=None) -> PGDAT:
    return PGDAT(eps, alpha, steps, norm, he)


def trades(beta=6.0, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf", he=None) -> TRADES:
    return TRADES(beta, eps, alpha, steps, norm, he)


def alp(beta=0.5, eps=8 / 255, alpha=2 / 255, steps=10, norm="linf", adv_weight=0.5,
        he=None) -> ALP:
    return ALP(beta, eps, alpha, steps, norm, adv_weight, he)


def fgsm_rs(eps=8 / 255, alpha=10 / 255, he=None) -> FGSMRS:
    return FGSMRS(eps, alpha, he)


OBJECTIVES = {"standard": standard, "pgd_at": pgd_at, "trades": trades, "alp": alp,
              "fgsm_rs": fgsm_rs}


def build(name: str, **kw) -> Objective:
    """An objective by name, e.g. ``build("trades", beta=6)``. ``<base>_he`` composes HE with
    the base method, taking ``s``, ``m`` (official values of the base by default, see
    ``HE_DEFAULTS``) and ``weight_norm``: ``build("pgd_at_he")`` is
    ``pgd_at(he=losses.HE(10, 0.2))``."""
    if name.endswith("_he") and name[:-3] in OBJECTIVES and name[:-3] in HE_DEFAULTS:
        base = name[:-3]
        he = default_he(base, kw.pop("s", None), kw.pop("m", None),
                        kw.pop("weight_norm", "project"))
        return OBJECTIVES[base](he=he, **kw)
    if name not in OBJECTIVES:
        names = list(OBJECTIVES) + [f"{b}_he" for b in OBJECTIVES if b in HE_DEFAULTS]
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(names)}")
    return OBJECTIVES[name](**kw)


class AdvProp(Objective):
    """AdvProp (Xie et al., CVPR 2020): every batch gives clean images, normalised by the main
    BatchNorms, and PGD adversarial images, generated and normalised with the auxiliary BNs
    (``repro.models.norms.bn_route``); the loss is the equal-weight mean of the two
    cross-entropies (the paper sums them; the mean keeps the learning rate comparable with
    vanilla training, and is what the PyTorch port computes: one CE mean over the
    concatenated clean + adversarial batch). Inference uses the main BNs only.

    ``attacker="pgd"`` (default) is the attacker the paper describes: L-inf PGD, ``eps`` in
    {1..4}/255, ``steps`` = eps·255 + 1 (default), step 1/255, uniform random start, run with
    the model in eval mode (so the attack reads the auxiliary running statistics and changes
    no statistic). It ascends the loss of the true label, or with ``targeted=True`` descends
    the loss of a uniformly random *wrong* label.

    ``attacker="port"`` is the PyTorch port's attacker (github.com/tingxueronghua/
    pytorch-classification-advprop, ``attacker.py`` ``PGDAttacker`` at d0f6b04, used with
    ``prob_start_from_clean=0.2`` by ``imagenet.py``): always targeted, towards
    (y + U{0..K-1}) mod K, which is y itself with probability 1/K (the step then *lowers* the
    true label's loss); and it starts at a uniform random point of the eps-ball on a whole
    batch only when a standard normal draw exceeds 0.2, i.e. with probability
    1 − Φ(0.2) ≈ 0.42 (``PORT_START_PROB``), else at the clean images. The draw comes from a
    CPU generator seeded with ``state.generator``'s seed: reproducible, resumable, and no
    device sync. Step count and size are ``steps`` / ``alpha`` as for "pgd" (the port's
    ``run.sh`` trains ResNet-50 with one step of 1/255 at eps 1/255).

    ``aux_bn=False`` is the paper's "preliminary way" (Sec. 3/4.1): the same attack, but one
    shared BN sees clean and adversarial images together in one concatenated batch. With
    ``aux_bn=True`` the model must contain ``DualBatchNorm2d`` layers (``norm="dual_bn"``).
    """

    name = "advprop"
    ATTACKERS = ("pgd", "port")
    # P(N(0, 1) > 0.2): how often the port's attack starts from noise (attacker.py compares a
    # standard normal draw with prob_start_from_clean = 0.2)
    PORT_START_PROB = 0.42074029056089696

    def __init__(self, eps=1 / 255, alpha=1 / 255, steps=None, targeted=False, aux_bn=True,
                 attacker="pgd"):
        if attacker not in self.ATTACKERS:
            raise ValueError(f"attacker must be one of {self.ATTACKERS}, got {attacker!r}")
        self.eps, self.alpha = float(eps), float(alpha)
        self.steps = int(steps) if steps is not None else int(round(self.eps * 255)) + 1
        self.targeted, self.aux_bn = bool(targeted or attacker == "port"), bool(aux_bn)
        self._attacker = attacker
        self._checked = None
        if not self.aux_bn:
            self.name = "advprop_shared_bn"

    @property
    def attacker(self) -> str:
        return self._attacker

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        if self._attacker != "pgd":  # absent for the default: published run keys stay valid
            cfg["attacker"] = self._attacker
        return cfg

    def _check(self, model):
        if self._checked is model:
            return
        from repro.models.norms import DualBatchNorm2d
        has_dual = any(isinstance(m, DualBatchNorm2d) for m in model.modules())
        if self.aux_bn and not has_dual:
            raise ValueError("AdvProp with aux_bn=True needs a model with DualBatchNorm2d "
                             "layers (build(..., norm='dual_bn'))")
        self._checked = model

    def _num_classes(self, model, x) -> int:
        head = getattr(model, "head", None)
        n = getattr(head, "out_features", None)
        if n is not None:
            return int(n)
        from repro import attacks
        with attacks.eval_mode(model), torch.no_grad():
            return int(model(x[:1]).shape[1])

    def targets(self, model, x, y, generator=None) -> torch.Tensor:
        """The labels the attack aims at: y (untargeted), a random wrong label
        (``targeted``, "pgd"), or the port's (y + U{0..K-1}) mod K."""
        if not self.targeted:
            return y
        k = self._num_classes(model, x)
        dev = generator.device if generator is not None else y.device
        low = 0 if self._attacker == "port" else 1
        shift = torch.randint(low, k, y.shape, generator=generator, device=dev)
        return (y + shift.to(y.device)) % k

    def random_start(self, generator=None) -> bool:
        """Whether this batch's attack starts from a random point ("port": one draw per
        batch from a CPU generator, so no device sync; "pgd": always)."""
        if self._attacker == "pgd":
            return True
        cpu = torch.Generator()
        cpu.manual_seed(generator.initial_seed() if generator is not None
                        else int(torch.randint(2 ** 62, ()).item()))
        return bool(torch.rand((), generator=cpu).item() < self.PORT_START_PROB)

    def attack(self, model, x, y, generator=None):
        """The adversarial half of a batch (auxiliary BNs when ``aux_bn``)."""
        from repro import attacks
        from repro.models.norms import bn_route
        start = self.random_start(generator)
        target = self.targets(model, x, y, generator)
        with bn_route(model, "aux" if self.aux_bn else "main"):
            return attacks.pgd(model, x, target, eps=self.eps, alpha=self.alpha,
                               steps=self.steps, targeted=self.targeted, random_start=start,
                               generator=generator)

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


def advprop(eps=1 / 255, alpha=1 / 255, steps=None, targeted=False, aux_bn=True,
            attacker="pgd") -> AdvProp:
    return AdvProp(eps, alpha, steps, targeted, aux_bn, attacker)


def advprop_shared_bn(eps=1 / 255, alpha=1 / 255, steps=None, targeted=False,
                      attacker="pgd") -> AdvProp:
    """The "preliminary way": adversarial training on clean + adversarial, one shared BN."""
    return AdvProp(eps, alpha, steps, targeted, aux_bn=False, attacker=attacker)


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

    With ``he`` (BAT+HE, our composition; the HE paper has no BAT): the attack ascends
    CE(s·cos θ), the weights read softmax(s·cos θ(x_adv)), the weighted loss is HE's margin
    loss, and the discrimination loss acts on the (un-normalised) penultimate features.
    """

    name = "bat"

    def __init__(self, atypical, alpha=1.0, beta=0.2, tau=0.5, eps=8 / 255, step=2 / 255,
                 steps=10, norm="linf", he=None):
        import hashlib
        self._set_he(he)
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
        self._check_head(model)
        x_adv = attacks.pgd(self._attack_model(model), batch.x, batch.y, eps=self.eps,
                            alpha=self.step, steps=self.steps, norm=self.norm,
                            generator=state.generator)
        logits, feats = model(x_adv, return_features=True)
        w = losses.bat_weights(self._logits(logits), batch.y, atyp, self.alpha)
        ce_logits = logits if self._he is None else self._he.margin_logits(logits, batch.y)
        ce = losses.weighted_cross_entropy(ce_logits, batch.y, w)
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
        norm="linf", he=None) -> BAT:
    return BAT(atypical, alpha, beta, tau, eps, step, steps, norm, he)


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
