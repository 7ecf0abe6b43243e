"""Seeded subsets of a data set's images, so that `defcnn evaluate` and the attack harness
pick the same images for the same seed and count. Torch-free (numpy only)."""

from __future__ import annotations

import numbers

import numpy as np

from defcnn.errors import ConfigError


def seeded_subset(n: int, k: int, seed: int, *, what: str = "--num-images") -> np.ndarray:
    """`k` distinct indices out of range(n), chosen by `seed`, in ascending order (int64).

    `k` must be 1..n: asking for more images than there are is a ConfigError, not a silent
    cap, because a result recorded as "k images" must have used k images. `what` names the
    setting in the message.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ConfigError(f"{what} must be a whole number, got {k!r}")
    if k < 1:
        raise ConfigError(f"{what} must be >= 1, got {k}")
    if k > n:
        raise ConfigError(f"{what} is {k} but there are only {n} images; pass at most {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n)[:k]).astype(np.int64)
