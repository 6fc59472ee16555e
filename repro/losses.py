"""Loss terms of the adversarial-training methods, as plain functions of logits.

Each takes ``reduction="mean"`` (batch mean) or ``"none"`` (one value per example, for
per-example weighting as in BAT). Chapters add their own terms here (HE margin, LMT margin,
BAT weights, discrimination loss).
"""
from __future__ import annotations

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
    """ALP's pairing term (Kannan et al. 2018): squared L2 distance between the logits of an
    image and of its adversarial version, summed over classes per example."""
    per_example = (logits_adv.float() - logits_clean.float()).pow(2).sum(1)
    return _reduce(per_example, reduction)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction correct as a 0-d tensor (no host sync)."""
    return (logits.argmax(1) == y).float().mean()


# ----------------------------------------------------------------------------- HE (Pang et al. 2020)

def he_logits(cos: torch.Tensor, y: torch.Tensor, s: float, m: float = 0.0) -> torch.Tensor:
    """HE's logits s·(cos θ − m·1_y): the true class's cosine is lowered by the margin m, then
    every cosine is scaled by s (CosFace form). With m = 0 these are the scaled logits s·cos θ
    that HE's training attack ascends. Float32 even under bf16 autocast."""
    cos = cos.float()
    if m == 0:
        return s * cos
    return s * (cos - m * F.one_hot(y, cos.shape[1]).to(cos.dtype))


def he_cross_entropy(cos: torch.Tensor, y: torch.Tensor, s: float = 10.0, m: float = 0.2,
                     reduction: str = "mean") -> torch.Tensor:
    """HE's training loss CE(s·(cos θ − m·1_y), y) on the cosine logits of a hypersphere head."""
    return F.cross_entropy(he_logits(cos, y, s, m), y, reduction=reduction)
