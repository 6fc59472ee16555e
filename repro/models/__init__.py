"""Models by name: ``build("preact_resnet18", 10, mean_std=data.mean_std, head="hypersphere")``.

Every model takes images in [0, 1] (normalisation is its first layer), exposes
``model.features(x)``, ``model.head`` and ``model(x, return_features=True)``, and accepts
``head`` ("linear" | "hypersphere" | "hypersphere_graph", see ``heads.HypersphereHead``),
``norm`` ("bn" | "dual_bn" | "none") and ``width`` (a channel knob for tiny smoke-test
models).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from repro.models.heads import FeatureClassifier, HypersphereHead, make_head
from repro.models.norms import DualBatchNorm2d, Normalize, bn_route, make_norm
from repro.models.preact_resnet import PreActBlock, PreActResNet, preact_resnet18
from repro.models.small_cnn import SmallCNN, small_cnn
from repro.models.wide_resnet import WideBasicBlock, WideResNet, wide_resnet

# name -> (constructor, default keyword arguments)
REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict]] = {}


def register(name: str, constructor: Callable[..., nn.Module], **defaults) -> None:
    REGISTRY[name] = (constructor, defaults)


register("preact_resnet18", preact_resnet18, norm="bn")
register("wrn", wide_resnet, norm="bn")  # depth=, widen_factor= as keywords
register("wrn16_4", wide_resnet, depth=16, widen_factor=4, norm="bn")
register("wrn28_10", wide_resnet, depth=28, widen_factor=10, norm="bn")
register("wrn34_10", wide_resnet, depth=34, widen_factor=10, norm="bn")
register("small_cnn", small_cnn, norm="none")


def available() -> list[str]:
    return sorted(REGISTRY)


def build(name: str, num_classes: int, *, mean_std=None, head: str = "linear",
          norm: str | None = None, width: int | None = None, **kw) -> FeatureClassifier:
    """Build a registered model. ``norm=None`` takes the model's own default ("bn" for the
    ResNets, "none" for small_cnn); ``width=None`` the paper's width."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(available())}")
    constructor, defaults = REGISTRY[name]
    options = {**defaults, **kw, "mean_std": mean_std, "head": head, "width": width}
    if norm is not None:
        options["norm"] = norm
    return constructor(num_classes=num_classes, **options)


__all__ = ["build", "available", "register", "REGISTRY", "FeatureClassifier", "HypersphereHead",
           "DualBatchNorm2d", "Normalize", "bn_route", "make_norm", "make_head",
           "PreActBlock", "PreActResNet", "WideBasicBlock", "WideResNet", "SmallCNN"]
