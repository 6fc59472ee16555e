"""Normalisation layers: input normalisation, BatchNorm, and AdvProp's dual BatchNorm.

Models take images in [0, 1] and normalise inside their first layer (``Normalize``), so
attacks and epsilons live in pixel space. ``DualBatchNorm2d`` keeps two independent sets of
statistics and affine parameters (AdvProp routes adversarial images through the auxiliary
set); ``bn_route(model, "aux")`` switches every dual BN in a model at once.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

ROUTES = ("main", "aux")


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean/std are buffers so they travel with the weights."""

    def __init__(self, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class DualBatchNorm2d(nn.Module):
    """Two BatchNorm2d layers, ``main`` and ``aux``; ``route`` picks which one a forward uses.

    Only the selected layer sees the batch, so the other's running statistics stay untouched.
    ``active`` is the selected BatchNorm2d (for code that reads gamma / running_var, e.g.
    Lipschitz bounds).
    """

    def __init__(self, num_features: int, **kw):
        super().__init__()
        self.main = nn.BatchNorm2d(num_features, **kw)
        self.aux = nn.BatchNorm2d(num_features, **kw)
        self.route = "main"

    @property
    def active(self) -> nn.BatchNorm2d:
        return self.aux if self.route == "aux" else self.main

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.active(x)

    def extra_repr(self) -> str:
        return f"route={self.route!r}"


@contextlib.contextmanager
def bn_route(model: nn.Module, route: str) -> Iterator[nn.Module]:
    """Within the block, every DualBatchNorm2d of ``model`` uses ``route`` ("main"/"aux")."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    previous = [m.route for m in duals]
    for m in duals:
        m.route = route
    try:
        yield model
    finally:
        for m, r in zip(duals, previous):
            m.route = r


def make_norm(kind: str) -> Callable[[int], nn.Module]:
    """A factory ``channels -> layer`` for the norm kinds a model accepts."""
    factories = {"bn": nn.BatchNorm2d, "dual_bn": DualBatchNorm2d,
                 "none": lambda channels: nn.Identity()}
    if kind not in factories:
        raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(factories)}")
    return factories[kind]
