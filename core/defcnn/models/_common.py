"""Building blocks shared by the model zoo: width scaling and the defect placeholder."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def scaled(channels: int, width: float) -> int:
    """Channel count scaled by the width multiplier, at least 1."""
    return max(1, round(channels * width))


def defect_slot() -> nn.Identity:
    """A placeholder where a defective mask may go (after BatchNorm, before ReLU).

    Placeholders are attributes named ``defect*``; `make_defective` swaps them for masks.
    In a standard model they are identities with no state, so a standard checkpoint
    has the same keys as the architecture without them.
    """
    return nn.Identity()


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    """Conv (no bias, BatchNorm follows) and BatchNorm."""
    return [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]


def projection(c_in: int, c_out: int, stride: int, *, with_defect: bool) -> nn.Sequential:
    """Projection shortcut (1x1 conv + BatchNorm), with a defect slot in basic blocks."""
    conv, bn = conv_bn(c_in, c_out, 1, stride)
    parts: list[tuple[str, nn.Module]] = [("conv", conv), ("bn", bn)]
    if with_defect:
        parts.append(("defect", defect_slot()))
    return nn.Sequential(OrderedDict(parts))


def conv_unit(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv-BN-(defect slot)-ReLU, named so the slot is found as ``<unit>.defect``."""
    conv, bn = conv_bn(c_in, c_out, kernel, stride)
    return nn.Sequential(
        OrderedDict([("conv", conv), ("bn", bn), ("defect", defect_slot()), ("relu", nn.ReLU())])
    )
