"""VGG-19 with BatchNorm for 32x32 inputs (Simonyan & Zisserman, arXiv 1409.1556).

Each conv is its own stage, `conv1`..`conv16`, so "the first 4 conv layers" (the
paper's default) is a list of stage names.
"""

from __future__ import annotations

import torch
from torch import nn

from defcnn.models._common import conv_unit, scaled

VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """Conv-BN-(mask)-ReLU stages with max-pools between groups, then a linear head."""

    def __init__(self, cfg: tuple[int | str, ...], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        c_in, n_conv, n_pool = 3, 0, 0
        for item in cfg:
            if item == "M":
                n_pool += 1
                setattr(self, f"pool{n_pool}", nn.MaxPool2d(2))
                continue
            n_conv += 1
            c_out = scaled(int(item), width)
            setattr(self, f"conv{n_conv}", conv_unit(c_in, c_out))
            c_in = c_out
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, module in self.named_children():
            if name == "fc":
                break
            x = module(x)
        return self.fc(torch.flatten(x, 1))


def vgg19(num_classes: int = 10, width: float = 1.0) -> VGG:
    """VGG-19 (BatchNorm) for 32x32 inputs."""
    return VGG(VGG19_CFG, num_classes, width)
