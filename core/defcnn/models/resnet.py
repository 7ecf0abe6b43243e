"""ResNets: CIFAR ResNet-18 / ResNet-50 (32x32) and ImageNet ResNet-18 (224x224).

He et al., arXiv 1512.03385; CIFAR variants as in the defective-CNN authors' code
(3x3 stem, no max-pool). Defect slots follow the paper: after each BatchNorm of a
basic block and of the projection shortcut; in a bottleneck only after the 3x3 conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defcnn.models._common import conv_bn, conv_unit, defect_slot, projection, scaled


class BasicBlock(nn.Module):
    """Two 3x3 convs; masks after each BatchNorm and after the shortcut's BatchNorm."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c_in, planes, 3, stride)
        self.defect1 = defect_slot()
        self.conv2, self.bn2 = conv_bn(planes, planes, 3)
        self.defect2 = defect_slot()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != planes:
            self.shortcut = projection(c_in, planes, stride, with_defect=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.defect1(self.bn1(self.conv1(x))))
        out = self.defect2(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1; the paper masks only the 3x3 conv's output."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(c_in, planes, 1)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride)
        self.defect2 = defect_slot()
        self.conv3, self.bn3 = conv_bn(planes, planes * 4, 1)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != planes * 4:
            self.shortcut = projection(c_in, planes * 4, stride, with_defect=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.defect2(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, four stages (`layer1`..`layer4`), global pooling, linear head."""

    # Built in a loop with setattr; declared so the type checker knows them.
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int,
        width: float = 1.0,
        imagenet_stem: bool = False,
    ) -> None:
        super().__init__()
        planes = [scaled(c, width) for c in (64, 128, 256, 512)]
        if imagenet_stem:
            self.stem = conv_unit(3, planes[0], 7, 2)
            self.stem.add_module("pool", nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.stem = conv_unit(3, planes[0], 3)
        c_in = planes[0]
        for i, (p, n) in enumerate(zip(planes, num_blocks, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, p, 2 if (i > 0 and j == 0) else 1))
                c_in = p * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 10, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-18 (32x32 inputs)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, width)


def resnet50(num_classes: int = 10, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-50 (32x32 inputs)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, width)


def resnet18_imagenet(num_classes: int = 1000, width: float = 1.0) -> ResNet:
    """ImageNet ResNet-18 (224x224 inputs): 7x7 stride-2 stem and max-pool."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, width, imagenet_stem=True)
