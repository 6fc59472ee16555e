"""Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016), as in the TRADES / HE / LMT code:
a 3x3 stem, three groups of (d-4)/6 pre-activation WideBasicBlocks with k-times wider
channels, a final BN-ReLU, global average pooling and the head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repro.models.heads import FeatureClassifier, init_weights, make_head
from repro.models.norms import Normalize, make_norm
from repro.models.preact_resnet import PreActBlock


class WideBasicBlock(PreActBlock):
    """BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3 plus a shortcut (1x1 conv on the
    pre-activated input when the shape changes, ``nn.Identity`` otherwise): the
    pre-activation block with Wide ResNet's optional dropout, under the name the WRN
    code uses."""


class WideResNet(FeatureClassifier):
    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, *,
                 mean_std=None, head: str = "linear", norm: str = "bn", width: int = 16,
                 drop_rate: float = 0.0, in_channels: int | None = None):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 34, ...), got {depth}")
        n = (depth - 4) // 6
        mean, std = mean_std if mean_std is not None else ((0.0,), (1.0,))
        in_channels = in_channels or (len(mean) if len(mean) > 1 else 3)
        self.depth, self.widen_factor = depth, widen_factor
        self.normalize = Normalize(mean, std)
        widths = [width * widen_factor * 2 ** i for i in range(3)]
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        groups, in_planes = [], width
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBasicBlock(in_planes, planes, stride, norm, drop_rate))
                in_planes = planes
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = make_norm(norm)(in_planes)
        self.feature_dim = in_planes
        self.head = make_head(head, in_planes, num_classes)
        init_weights(self)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def wide_resnet(num_classes: int = 10, depth: int = 28, widen_factor: int = 10, **kw):
    """``width`` is the stem's channel count (16 in the paper); groups have width*k*(1,2,4)."""
    kw["width"] = kw.get("width") or 16
    return WideResNet(depth, widen_factor, num_classes, **kw)
