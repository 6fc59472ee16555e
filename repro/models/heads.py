"""Classifier heads, and the features -> head split that every model in repro follows.

A model is ``Normalize -> body -> flatten -> head``. ``model.features(x)`` returns the
penultimate features (BAT's contrastive loss, HE's feature normalisation), ``model.head``
is the last layer (LMT reads its weight rows), and ``model(x, return_features=True)``
returns both logits and features from one forward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HypersphereHead(nn.Module):
    """HE's head (Pang et al. 2020): logits = cos θ between normalised features and
    normalised weight rows, no bias, so every logit is in [-1, 1]. The scale s and margin m
    belong to the loss, not the head, so attacks can see the plain cosines."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.in_features, self.out_features = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # same as nn.Linear

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: HE scales cosines by s = 10..20, and bf16's 8-bit
        # mantissa would put errors of ~0.05 on those logits
        with torch.autocast(features.device.type, enabled=False):
            cos = F.linear(F.normalize(features.float(), dim=1),
                           F.normalize(self.weight.float(), dim=1))
        return cos.clamp(-1.0, 1.0)  # rounding can step just outside [-1, 1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


HEADS = {"linear": nn.Linear, "hypersphere": HypersphereHead}


def make_head(kind: str, in_features: int, num_classes: int) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    return HEADS[kind](in_features, num_classes)


class FeatureClassifier(nn.Module):
    """Base class: subclasses set ``self.normalize``, ``self.head`` and implement
    ``body(x) -> (N, feature_dim)`` on normalised inputs."""

    feature_dim: int

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [0, 1]."""
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.features(x)
        logits = self.head(feats)
        return (logits, feats) if return_features else logits


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit BN, zero biases: the init of the ResNet/WRN reference code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
