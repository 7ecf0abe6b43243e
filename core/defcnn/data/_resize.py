"""Batch resizing of uint8 NCHW arrays, for loaders whose source size differs from the request."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_CHUNK = 4096


def resize_uint8(x: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of uint8 [N, C, H, W] to [N, C, size, size] (or to
    [N, C, height, width] for a `size` of (height, width))."""
    size = (size, size) if isinstance(size, int) else size
    if x.shape[2:] == size:
        return np.ascontiguousarray(x)
    out = np.empty((x.shape[0], x.shape[1], *size), dtype=np.uint8)
    for start in range(0, len(x), _CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + _CHUNK])).float()
        resized = F.interpolate(
            chunk, size=size, mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + _CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out
