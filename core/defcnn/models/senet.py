"""SENet-18 for 32x32 inputs (Hu et al., arXiv 1709.01507): ResNet-18 with squeeze-excitation.

Masks as in the defective ResNet-18: after each BatchNorm of a block (before the
squeeze-excitation and ReLU) and of the projection shortcut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defcnn.models._common import conv_bn, conv_unit, defect_slot, projection, scaled


class SEBlock(nn.Module):
    """Basic block whose residual branch is rescaled per channel by squeeze-excitation."""

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c_in, planes, 3, stride)
        self.defect1 = defect_slot()
        self.conv2, self.bn2 = conv_bn(planes, planes, 3)
        self.defect2 = defect_slot()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != planes:
            self.shortcut = projection(c_in, planes, stride, with_defect=True)
        self.fc1 = nn.Conv2d(planes, max(1, planes // 16), 1)
        self.fc2 = nn.Conv2d(max(1, planes // 16), planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.defect1(self.bn1(self.conv1(x))))
        out = self.defect2(self.bn2(self.conv2(out)))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(out, 1)))))
        return F.relu(out * w + self.shortcut(x))


class SENet(nn.Module):
    """Stem, four SE stages (`layer1`..`layer4`), pooling, linear head."""

    # Built in a loop with setattr; declared so the type checker knows them.
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self, num_blocks: tuple[int, int, int, int], num_classes: int, width: float
    ) -> None:
        super().__init__()
        planes = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.stem = conv_unit(3, planes[0])
        c_in = planes[0]
        for i, (p, n) in enumerate(zip(planes, num_blocks, strict=True)):
            blocks = [
                SEBlock(c_in if j == 0 else p, p, 2 if (i > 0 and j == 0) else 1) for j in range(n)
            ]
            c_in = p
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def senet18(num_classes: int = 10, width: float = 1.0) -> SENet:
    """SENet-18 for 32x32 inputs."""
    return SENet((2, 2, 2, 2), num_classes, width)
