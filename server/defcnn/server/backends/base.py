"""The backend interface and device detection that does not spam CPU-only machines."""

from __future__ import annotations

import ctypes
import functools
from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs one batch: float32 [N, 3, H, W] -> float32 logits [N, classes]. Thread-confined."""

    name: str
    device: str

    def run(self, images: np.ndarray) -> np.ndarray: ...


@functools.cache
def cuda_usable() -> bool:
    """True when the CUDA driver loads and sees a GPU; asks the driver, not ONNX Runtime,
    so CPU-only machines get no error logs from failed provider loads."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    return count.value > 0
