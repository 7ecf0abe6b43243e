"""Image corruptions on uint8 NCHW arrays, seeded so every model sees the same images.

Patch shuffling (Luo et al., section 4.2): cut each image into a k x k grid of patches and
put the patches back in a random order. Local texture survives, the object's shape does
not, so a model that relies on shape loses more accuracy than one that relies on texture.
"""

from __future__ import annotations

import numpy as np

from defcnn.errors import ConfigError

CORRUPTIONS = ("patch_shuffle", "gaussian_noise")


def patch_shuffle(images: np.ndarray, grid: int, *, seed: int = 0) -> np.ndarray:
    """Each image's k x k patches in a fresh random order (one permutation per image).

    The side must divide by `grid` (32 / 2, 4, 8 for CIFAR-10); grid 1 returns a copy.
    """
    if images.ndim != 4:
        raise ConfigError(f"expected images [N, C, H, W], got shape {images.shape}")
    n, c, h, w = images.shape
    if grid < 1 or h % grid or w % grid:
        raise ConfigError(f"a {grid}x{grid} grid does not tile {h}x{w} images")
    ph, pw = h // grid, w // grid
    # [N, C, gy, ph, gx, pw] -> [N, gy*gx, C, ph, pw]: one row per patch
    patches = images.reshape(n, c, grid, ph, grid, pw).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n, grid * grid, c, ph, pw)
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((n, grid * grid)), axis=1)
    shuffled = np.take_along_axis(patches, order[:, :, None, None, None], axis=1)
    shuffled = shuffled.reshape(n, grid, grid, c, ph, pw).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(shuffled.reshape(n, c, h, w))


def gaussian_noise(images: np.ndarray, sigma: float, *, seed: int = 0) -> np.ndarray:
    """Add N(0, sigma^2) noise in [0, 1] pixel units, clip, and round back to uint8."""
    if sigma < 0:
        raise ConfigError(f"noise sigma must be >= 0, got {sigma}")
    rng = np.random.default_rng(seed)
    noisy = images.astype(np.float32) / 255.0 + rng.normal(0.0, sigma, images.shape)
    return np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8)
