"""The 4-layer MNIST CNN of Wong & Kolter (2018), also LMT's MNIST network:
conv(16, 4x4, stride 2, pad 1)-ReLU-conv(32, 4x4, stride 2, pad 1)-ReLU-fc(100)-ReLU-fc(10).
No normalisation layers by default (``norm="bn"`` inserts BatchNorm after each conv)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repro.models.heads import FeatureClassifier, make_head
from repro.models.norms import Normalize, make_norm


class SmallCNN(FeatureClassifier):
    def __init__(self, num_classes: int = 10, *, mean_std=None, head: str = "linear",
                 norm: str = "none", width: int = 16, hidden: int | None = None,
                 in_channels: int | None = None, in_size: int = 28):
        super().__init__()
        mean, std = mean_std if mean_std is not None else ((0.0,), (1.0,))
        in_channels = in_channels or len(mean)
        hidden = hidden or max(1, round(100 * width / 16))
        if in_size % 4:
            raise ValueError(f"in_size must be a multiple of 4, got {in_size}")
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 4, stride=2, padding=1)
        self.bn1 = make_norm(norm)(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)
        self.bn2 = make_norm(norm)(2 * width)
        self.fc1 = nn.Linear(2 * width * (in_size // 4) ** 2, hidden)
        self.feature_dim = hidden
        self.head = make_head(head, hidden, num_classes)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.fc1(torch.flatten(out, 1)))


def small_cnn(num_classes: int = 10, **kw) -> SmallCNN:
    kw["width"] = kw.get("width") or 16
    return SmallCNN(num_classes, **kw)
