"""DenseNet-121 for 32x32 inputs (Huang et al., arXiv 1608.06993), CIFAR layout.

DenseNet is pre-activation (BN-ReLU-conv), so "after BatchNorm, before ReLU" puts a
mask after both BatchNorms of every bottleneck in the defective dense blocks
(`dense1` and `dense2` by default); transitions are left standard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defcnn.models._common import defect_slot, scaled


class DenseLayer(nn.Module):
    """BN-(mask)-ReLU-1x1 conv, BN-(mask)-ReLU-3x3 conv, concatenated to the input."""

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.defect1 = defect_slot()
        self.conv1 = nn.Conv2d(c_in, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.defect2 = defect_slot()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.defect1(self.bn1(x))))
        out = self.conv2(F.relu(self.defect2(self.bn2(out))))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv halving the channels, then 2x2 average pooling."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """Stem conv, four dense blocks with transitions, BN-ReLU, pooling, linear head."""

    # Built in a loop with setattr; declared so the type checker knows them.
    dense1: nn.Sequential
    dense2: nn.Sequential
    dense3: nn.Sequential
    dense4: nn.Sequential
    trans1: nn.Module
    trans2: nn.Module
    trans3: nn.Module

    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        growth: int,
        num_classes: int,
        width: float = 1.0,
        reduction: float = 0.5,
    ) -> None:
        super().__init__()
        growth = scaled(growth, width)
        c = 2 * growth
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        for i, n in enumerate(blocks, start=1):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            setattr(self, f"dense{i}", nn.Sequential(*layers))
            if i < len(blocks):
                c_out = int(c * reduction)
                setattr(self, f"trans{i}", Transition(c, c_out))
                c = c_out
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trans1(self.dense1(self.stem(x)))
        x = self.trans3(self.dense3(self.trans2(self.dense2(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.bn(self.dense4(x))), 1)
        return self.fc(torch.flatten(x, 1))


def densenet121(num_classes: int = 10, width: float = 1.0) -> DenseNet:
    """DenseNet-121 (growth 32, blocks 6-12-24-16) for 32x32 inputs."""
    return DenseNet((6, 12, 24, 16), 32, num_classes, width)
