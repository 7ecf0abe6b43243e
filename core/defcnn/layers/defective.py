"""Defective layers: a fixed random binary mask over a feature map.

Luo et al., "Defective Convolutional Layers Learn Robust CNNs", arXiv 1911.08432.
A defective layer multiplies a feature map by a binary mask with one entry per neuron
(channel, row, column). The mask is drawn once, before training, and kept for training
and inference: the masked neurons are constant zero, with no 1/p rescaling.

The mask is a persistent buffer named ``mask`` so it lands in every checkpoint and an
exporter sees it as a constant. Its shape is never written by hand: `make_defective`
runs one probe forward pass and reads the real output size of each target layer.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from defcnn.errors import ConfigError

__all__ = [
    "DefectiveMask",
    "derive_seed",
    "draw_mask",
    "make_defective",
    "mask_buffers",
    "zero_count",
]


def zero_count(keep_prob: float, numel: int) -> int:
    """Number of zeros in a mask of `numel` entries: round((1 - p) * numel), halves up.

    A tiny epsilon absorbs float error such as (1 - 0.7) * 10 = 2.9999999999999996.
    """
    _check_keep_prob(keep_prob)
    return min(numel, math.floor((1.0 - keep_prob) * numel + 0.5 + 1e-9))


def derive_seed(seed: int, name: str) -> int:
    """Independent, stable 63-bit seed per layer, so adding a layer never moves the others."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw_mask(
    shape: Sequence[int], keep_prob: float, seed: int, *, shared: bool = False
) -> torch.Tensor:
    """Binary float mask [1, C, H, W] with exactly `zero_count` zeros (per channel if shared).

    With ``shared`` one spatial [H, W] pattern is drawn and repeated over every channel.
    """
    if len(shape) != 4 or shape[0] != 1:
        raise ConfigError(f"mask shape must be [1, C, H, W], got {list(shape)}")
    _, c, h, w = (int(s) for s in shape)
    gen = torch.Generator().manual_seed(seed)
    n = h * w if shared else c * h * w
    flat = torch.ones(n, dtype=torch.float32)
    flat[torch.randperm(n, generator=gen)[: zero_count(keep_prob, n)]] = 0.0
    if shared:
        return flat.view(1, 1, h, w).expand(1, c, h, w).contiguous()
    return flat.view(1, c, h, w)


class DefectiveMask(nn.Module):
    """Multiply the input by a fixed binary mask buffer; the same in train and eval mode."""

    mask: torch.Tensor

    def __init__(
        self, shape: Sequence[int], keep_prob: float, seed: int, *, shared: bool = False
    ) -> None:
        super().__init__()
        self.keep_prob = float(keep_prob)
        self.seed = int(seed)
        self.shared = bool(shared)
        self.register_buffer("mask", draw_mask(shape, keep_prob, seed, shared=shared))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(dtype=x.dtype)

    def extra_repr(self) -> str:
        shape = list(self.mask.shape)
        return f"shape={shape}, keep_prob={self.keep_prob}, seed={self.seed}, shared={self.shared}"


def _check_keep_prob(keep_prob: float) -> None:
    if not (0.0 < keep_prob <= 1.0):
        raise ConfigError(f"keep_prob must be in (0, 1], got {keep_prob}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _probe_output_shapes(
    model: nn.Module, names: Sequence[str], input_size: Sequence[int]
) -> dict[str, torch.Size]:
    """Output shape of each named module, from one forward pass on zeros."""
    shapes: dict[str, torch.Size] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
            shapes[name] = out.shape

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ConfigError(f"layers never ran in a forward pass: {missing}")
    return shapes


def make_defective(
    model: nn.Module,
    layer_names: Iterable[str],
    *,
    keep_prob: float,
    seed: int,
    input_size: Sequence[int] = (3, 32, 32),
    shared: bool = False,
) -> nn.Module:
    """Make `model` defective in place: mask the output of each named layer.

    Name the BatchNorm layers (the mask goes after BatchNorm, before ReLU). A name that
    points at an ``nn.Identity`` placeholder is replaced by the mask; any other layer is
    wrapped as ``nn.Sequential(layer, mask)``. Each mask's seed is derived from `seed`
    and the layer's name. ``keep_prob == 1.0`` leaves the model untouched, so it is
    exactly the standard model.
    """
    _check_keep_prob(keep_prob)
    names = list(layer_names)
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate layer names: {names}")
    known = dict(model.named_modules())
    unknown = [n for n in names if n not in known or n == ""]
    if unknown:
        raise ConfigError(f"no such layers in {type(model).__name__}: {unknown}")
    if keep_prob == 1.0 or not names:
        return model
    shapes = _probe_output_shapes(model, names, input_size)
    param = next(model.parameters(), None)
    for name in names:
        if len(shapes[name]) != 4:
            raise ConfigError(f"layer {name!r} outputs {list(shapes[name])}, not [N, C, H, W]")
        mask = DefectiveMask(
            (1, *shapes[name][1:]), keep_prob, derive_seed(seed, name), shared=shared
        )
        if param is not None:
            mask = mask.to(param.device)
        target = known[name]
        _set_submodule(
            model, name, mask if isinstance(target, nn.Identity) else nn.Sequential(target, mask)
        )
    return model


def mask_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every defective mask in `model`, by state-dict key."""
    return {
        f"{name}.mask": m.mask for name, m in model.named_modules() if isinstance(m, DefectiveMask)
    }
