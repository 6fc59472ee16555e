"""Loss terms of the adversarial-training methods, as plain functions of logits.

Each takes ``reduction="mean"`` (batch mean) or ``"none"`` (one value per example, for
per-example weighting as in BAT). Chapters add their own terms here (HE margin, LMT margin,
BAT weights, discrimination loss).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _reduce(per_example: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    if reduction == "none":
        return per_example
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # computed in float32 even under bf16 autocast: log-softmax of low-precision logits is lossy
    return F.cross_entropy(logits.float(), y, reduction=reduction)


def trades_kl(logits_adv: torch.Tensor, logits_clean: torch.Tensor,
              reduction: str = "mean") -> torch.Tensor:
    """TRADES's robust term KL(p(x) || p(x_adv)), summed over classes per example.

    As in the official code the clean distribution is *not* detached: the gradient flows
    through both branches. ``"mean"`` equals ``KLDivLoss(size_average=False) / batch_size``.
    """
    log_p_clean = F.log_softmax(logits_clean.float(), dim=1)
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    per_example = F.kl_div(log_p_adv, log_p_clean, reduction="none", log_target=True).sum(1)
    return _reduce(per_example, reduction)


def logit_pairing(logits_adv: torch.Tensor, logits_clean: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """ALP's pairing term (Kannan et al. 2018) in the official HE code's form
    (github.com/ShawnXYang/AT_HE, ``CIFAR-10/losses.py``: ``F.mse_loss(logits, logits_adv)``):
    the squared difference between the outputs for an image and for its adversarial version,
    averaged over classes *and* batch. Inputs (N, K), the model's output (for an HE model the
    unscaled cosines). ``"none"``: one value per example, the mean over the K classes, so that
    ``"mean"`` equals ``F.mse_loss`` exactly; ``"sum"`` sums those per-example means.

    (Until this was fixed the term summed over classes, K = 10 times the official value, and
    ALP+HE paired s·cos θ, s²·K times it.)"""
    per_example = (logits_adv.float() - logits_clean.float()).pow(2).mean(1)
    return _reduce(per_example, reduction)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction correct as a 0-d tensor (no host sync)."""
    return (logits.argmax(1) == y).float().mean()


# ----------------------------------------------------------------------------- HE (Pang et al. 2020)

def he_logits(cos: torch.Tensor, y: torch.Tensor | None, s: float, m: float = 0.0) -> torch.Tensor:
    """HE's logits s·(cos θ − m·1_y): the true class's cosine is lowered by the margin m, then
    every cosine is scaled by s (CosFace form). With m = 0 these are the scaled logits s·cos θ
    that HE's training attack ascends (``y`` may then be None). Float32 even under bf16
    autocast. Source: the official ``HELoss`` (ShawnXYang/AT_HE, ``CIFAR-10/he.py``)."""
    cos = cos.float()
    if m == 0:
        return s * cos
    return s * (cos - m * F.one_hot(y, cos.shape[1]).to(cos.dtype))


def he_cross_entropy(cos: torch.Tensor, y: torch.Tensor, s: float = 10.0, m: float = 0.2,
                     reduction: str = "mean") -> torch.Tensor:
    """HE's training loss CE(s·(cos θ − m·1_y), y) on the cosine logits of a hypersphere head."""
    return F.cross_entropy(he_logits(cos, y, s, m), y, reduction=reduction)


@dataclass(frozen=True)
class HE:
    """Hypersphere embedding as one argument any objective takes (``objectives.pgd_at(he=HE())``).

    HE is two things (Pang et al. 2020): a head whose logits are cos θ between
    normalised features (FN) and normalised weight rows (WN), ``models.HypersphereHead``
    built with ``head="hypersphere"``; and a CosFace margin in the training loss,
    CE(s·(cos θ − m·1_y), y). Everything else in an objective sees the scaled cosines s·cos θ
    *without* the margin: its training attack (the official CIFAR code attacks CE(s·cos θ)
    or TRADES's KL of softmax(s·cos θ)), TRADES's KL term and BAT's weights. ALP's pairing
    acts on the model's output itself, the unscaled cos θ (official ``F.mse_loss`` on it).

    ``s``: scale (official CIFAR-10 README at d3e9776: PGD-AT+HE 10, TRADES+HE 15, ALP+HE 20;
    PGD-AT+HE was 15 until 2020-07-26). ``m``: margin in cosine units (0.2, 0.2, 0.3).
    ``weight_norm``: how the head keeps its rows on the unit sphere, and the head the
    objective requires (``models.HypersphereHead``): "project" as the official code
    (rows overwritten with their normalised values at every forward) or "graph"
    (normalised inside the autograd graph).
    """

    s: float = 10.0
    m: float = 0.2
    weight_norm: str = "project"

    def __post_init__(self):
        if self.s <= 0 or self.m < 0:
            raise ValueError(f"HE needs s > 0 and m >= 0, got s={self.s}, m={self.m}")
        if self.weight_norm not in ("project", "graph"):
            raise ValueError(f"weight_norm must be 'project' or 'graph', got {self.weight_norm!r}")

    def scaled(self, cos: torch.Tensor) -> torch.Tensor:
        """s·cos θ (float32): what the training attack, TRADES's KL and BAT's weights see."""
        return he_logits(cos, None, self.s, 0.0)

    def margin_logits(self, cos: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """s·(cos θ − m·1_y), (N, K): the logits of the training loss."""
        return he_logits(cos, y, self.s, self.m)

    def cross_entropy(self, cos: torch.Tensor, y: torch.Tensor,
                      reduction: str = "mean") -> torch.Tensor:
        """CE(s·(cos θ − m·1_y), y): HE's training loss on cosine logits (N, K)."""
        return he_cross_entropy(cos, y, self.s, self.m, reduction)

    def config(self) -> dict:
        return {"s": float(self.s), "m": float(self.m), "weight_norm": self.weight_norm}


# --- BAT (Xu et al., arXiv 2106.04794) ------------------------------------------------------

def bat_weights(logits_adv: torch.Tensor, y: torch.Tensor, atypical: torch.Tensor,
                alpha: float) -> torch.Tensor:
    """BAT's cost-sensitive weights, one per example (no gradient):
    w_i = exp(-alpha * max_{k != y_i} p_k(x_i^adv)) if x_i is atypical (mem > t) and
    misclassified on x_i^adv, else 1. ``atypical`` is a bool tensor over the batch."""
    with torch.no_grad():
        p = F.softmax(logits_adv.detach().float(), dim=1)
        q = p.scatter(1, y[:, None], float("-inf")).amax(1)
        wrong = logits_adv.detach().argmax(1) != y
        w = torch.where(atypical.to(torch.bool) & wrong, torch.exp(-alpha * q),
                        torch.ones_like(q))
    return w


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * CE_i / sum_i w_i (BAT's normalised classification loss)."""
    ce = cross_entropy(logits, y, reduction="none")
    w = weights.to(ce.dtype)
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


def discrimination_loss(features: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                        tau: float = 0.5, normalize: bool = True,
                        include_positive: bool = True) -> torch.Tensor:
    """BAT's discrimination loss on penultimate features h of (typical, adversarial) samples:
    the mean over ordered pairs (i, j), i != j, y_i = y_j, of
    -log( e^{h_i.h_j/tau} / (e^{h_i.h_j/tau} + sum_{b: y_b != y_i} e^{h_i.h_b/tau}) ).

    ``mask`` (bool) selects the samples that take part (BAT: the typical ones). Features are
    L2-normalised first (``normalize``; the paper writes h^T h without saying). The paper's
    denominator lists only the negatives; ``include_positive=False`` gives that form (it is
    unbounded below), the default is the InfoNCE form. Returns 0 (with a gradient path) when
    no anchor has both a positive and a negative.

    ``tau``: the paper gives no value; 0.5 is our choice. With normalised features the
    gradient w.r.t. h_i is O(1 / (tau * ||h_i||)), and penultimate ReLU features are
    non-negative (all cosines >= 0), so pushing a negative pair apart means switching shared
    units off. At tau = 0.1 (SupCon's value, for projection-head outputs) that gradient was
    2-3x the CE gradient early in training and drove a runaway on the laptop small_cnn:
    fewer live units -> smaller ||h|| -> larger gradient, until every unit of the
    penultimate layer was dead (features 0, constant prediction, CE = ln 10) in 4 of 5
    seeds on 3000 CIFAR-10 images; at tau = 0.5 none collapsed (tests/test_bat.py).

    Float32 even under bf16 autocast (the trainer's default on CUDA): autocast would run the
    similarity matmul in bf16, whose 8-bit mantissa puts errors of ~0.01 on sim = h.h/tau.
    """
    with torch.autocast(features.device.type, enabled=False):
        return _discrimination_loss(features, y, mask, tau, normalize, include_positive)


def _discrimination_loss(features, y, mask, tau, normalize, include_positive):
    h = features.float()
    if mask is not None:
        h, y = h[mask.to(torch.bool)], y[mask.to(torch.bool)]
    if len(y) < 2:
        return features.sum() * 0.0
    if normalize:
        h = F.normalize(h, dim=1)
    sim = h @ h.t() / tau
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
    pos, neg = same & ~eye, ~same
    valid = pos & neg.any(1, keepdim=True)
    if not valid.any():
        return features.sum() * 0.0
    neg_lse = torch.logsumexp(sim.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)
    if include_positive:
        denom = torch.logaddexp(sim, neg_lse.expand_as(sim))
    else:
        denom = neg_lse.expand_as(sim)
    per_pair = denom - sim
    return per_pair[valid].mean()
