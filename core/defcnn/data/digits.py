"""scikit-learn's 8x8 digit scans as a tiny RGB data set, the default that needs no download."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from defcnn.data._resize import resize_uint8
from defcnn.data._split import stratified_split
from defcnn.data.dataset import ImageDataset

DIGITS_SOURCE = "scikit-learn digits"


def load_digits_dataset(*, image_size: int = 32) -> ImageDataset:
    """1797 scans scaled to 0..255, resized, replicated to RGB, split 80/20 with a fixed seed."""
    bunch = load_digits()
    gray = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    gray = resize_uint8(gray[:, None], image_size)
    rgb = np.ascontiguousarray(np.repeat(gray, 3, axis=1))
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels)
    return ImageDataset(
        name="digits",
        classes=tuple(str(d) for d in range(10)),
        train_x=rgb[train_idx],
        train_y=labels[train_idx],
        test_x=rgb[test_idx],
        test_y=labels[test_idx],
        source=DIGITS_SOURCE,
    )
