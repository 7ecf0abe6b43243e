"""Random-crop and flip augmentation on whole batches, reproducible on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from defcnn.errors import ConfigError


def crop_flip_params(
    n: int, *, generator: torch.Generator, pad: int = 4, flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image (row offset, column offset, flip) drawn on the CPU generator, in a fixed order."""
    if generator.device.type != "cpu":
        raise ConfigError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ConfigError(f"pad must be an integer >= 0, got {pad!r}")
    rows = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    cols = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return rows, cols, flips


def apply_crop_flip(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, flips: torch.Tensor, *, pad: int
) -> torch.Tensor:
    """Crop each zero-padded image at its offsets and mirror it where `flips` is set."""
    n, c, h, w = x.shape
    device = x.device
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    row_idx = rows.to(device)[:, None] + torch.arange(h, device=device)
    col_idx = cols.to(device)[:, None] + torch.arange(w, device=device)
    col_idx = torch.where(flips.to(device)[:, None], col_idx.flip(1), col_idx)
    return padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        row_idx[:, None, :, None],
        col_idx[:, None, None, :],
    ]


def augment_batch(
    x: torch.Tensor, *, generator: torch.Generator, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop after zero padding (like RandomCrop(size, padding=pad)) plus random h-flip.

    Randomness comes from a CPU generator, so CPU and GPU give identical results.
    """
    if x.ndim != 4:
        raise ConfigError(f"augment_batch expects x of shape [N, C, H, W], got {tuple(x.shape)}")
    rows, cols, flips = crop_flip_params(x.shape[0], generator=generator, pad=pad, flip=flip)
    return apply_crop_flip(x, rows, cols, flips, pad=pad)
