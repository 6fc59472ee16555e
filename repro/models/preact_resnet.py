"""Pre-activation ResNet-18 (He et al. 2016), in the form used by Wong et al. (2020) and
Rice et al. (2020) for CIFAR adversarial training: a 3x3 stem, four stages of two
PreActBlocks, a final BN-ReLU, global average pooling, then the head."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from repro.models.heads import FeatureClassifier, init_weights, make_head
from repro.models.norms import Normalize, make_norm


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    ``shortcut`` is a 1x1 strided conv when the shape changes (applied, as in the reference
    code, to the pre-activated input) and ``nn.Identity`` otherwise.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "bn",
                 drop_rate: float = 0.0):
        super().__init__()
        norm_layer = make_norm(norm)
        self.bn1 = norm_layer(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate  # dropout between the convs (Wide ResNet's option)
        self.projects = stride != 1 or in_planes != planes
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
                         if self.projects else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.projects else x
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + skip


class PreActResNet(FeatureClassifier):
    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, *,
                 mean_std=None, head: str = "linear", norm: str = "bn", width: int = 64,
                 in_channels: int | None = None):
        super().__init__()
        mean, std = mean_std if mean_std is not None else ((0.0,), (1.0,))
        in_channels = in_channels or (len(mean) if len(mean) > 1 else 3)
        self.normalize = Normalize(mean, std)
        widths = [width * 2 ** i for i in range(len(num_blocks))]
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        stages, in_planes = [], width
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, norm))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = make_norm(norm)(in_planes)
        self.feature_dim = in_planes
        self.head = make_head(head, in_planes, num_classes)
        init_weights(self)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def preact_resnet18(num_classes: int = 10, **kw) -> PreActResNet:
    """``width`` is the first stage's channel count (64 in the paper; 8 or 16 for smoke runs)."""
    kw["width"] = kw.get("width") or 64
    return PreActResNet((2, 2, 2, 2), num_classes, **kw)
