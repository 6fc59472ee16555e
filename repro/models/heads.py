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
    """HE's head (Pang et al. 2020): logits = cos θ between normalised features (FN) and
    normalised weight rows (WN), no bias, so every logit is in [-1, 1]. The scale s and
    margin m belong to the loss (``losses.HE``), not the head, so attacks can see the plain
    cosines. Input (N, in_features), output (N, num_classes), float32.

    ``weight_norm`` says how the rows stay on the unit sphere:

    * ``"project"`` (default), as the official code (ShawnXYang/AT_HE,
      ``CIFAR-10/models/wideresnet.py``: ``module.weight.data = F.normalize(module.weight)``
      in ``forward``): every forward overwrites the rows with their normalised values and
      then uses them as a plain linear layer. The gradient is the linear layer's at the unit
      rows, and the next forward projects the SGD step back onto the sphere: projected SGD,
      with the full learning rate on the rows' directions and weight decay without effect on
      them.
    * ``"graph"``: normalisation inside the autograd graph, w/||w||. The gradient is
      projected onto the sphere's tangent and divided by ||w||, and weight decay shrinks
      ||w||, so the head's effective learning rate is lr/||w||² and drifts during training
      (this book's HE runs before the change used it).

    Measured once (MNIST small_cnn width 8, PGD-AT+HE s=10 m=0.2, 400 SGD steps of batch 64,
    lr 0.05, momentum 0.9, weight decay 5e-4, seeds 0 and 1, same init and data): in "graph"
    mode the rows' norm grew from 0.58 at init to 2.37 / 2.30, i.e. an effective head
    learning rate of ~0.18·lr by the end, and the rows turned by 57° / 54° against 68° / 65°
    with "project"; clean and C&W-PGD-10 accuracy on 500 test images were 94.2 / 83.6 and
    92.8 / 81.8 % ("graph") against 94.6 / 84.0 and 93.2 / 83.6 % ("project"), differences
    within the noise of 500 images.
    """

    def __init__(self, in_features: int, num_classes: int, weight_norm: str = "project"):
        super().__init__()
        if weight_norm not in ("project", "graph"):
            raise ValueError(f"weight_norm must be 'project' or 'graph', got {weight_norm!r}")
        self.in_features, self.out_features = in_features, num_classes
        self.weight_norm = weight_norm
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # same as nn.Linear

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: HE scales cosines by s = 10..20, and bf16's 8-bit
        # mantissa would put errors of ~0.05 on those logits
        with torch.autocast(features.device.type, enabled=False):
            if self.weight_norm == "project":
                # in place through .data, as the official code: autograd does not track it,
                # so a graph built by an earlier forward of the same step (TRADES, ALP) stays
                # valid (the rows are already unit then: the overwrite changes nothing)
                with torch.no_grad():
                    self.weight.data.copy_(F.normalize(self.weight.data.float(), dim=1))
                w = self.weight.float()
            else:
                w = F.normalize(self.weight.float(), dim=1)
            cos = F.linear(F.normalize(features.float(), dim=1), w)
        return cos.clamp(-1.0, 1.0)  # rounding can step just outside [-1, 1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_norm={self.weight_norm!r}")


def _hypersphere_graph(in_features: int, num_classes: int) -> HypersphereHead:
    return HypersphereHead(in_features, num_classes, weight_norm="graph")


HEADS = {"linear": nn.Linear, "hypersphere": HypersphereHead,
         "hypersphere_graph": _hypersphere_graph}


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
