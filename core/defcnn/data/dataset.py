"""The in-memory data set every loader returns, so training sees one shape whatever the source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defcnn.errors import DataError


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """uint8 NCHW images with int64 labels; checked on construction so bad caches fail early."""

    name: str
    classes: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if not self.classes:
            raise DataError(f"{self.name}: data set has no classes")
        for split in ("train", "test"):
            x = getattr(self, f"{split}_x")
            y = getattr(self, f"{split}_y")
            where = f"{self.name} ({self.source}) {split}"
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(f"{where}_x: expected a uint8 array [N, 3, H, W]")
            if x.shape[1] != 3 or not x.flags.c_contiguous:
                raise DataError(f"{where}_x: expected 3 channels, C-contiguous; got {x.shape}")
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (len(x),):
                raise DataError(f"{where}_y: expected int64 [{len(x)}]")
            if len(x) == 0:
                raise DataError(f"{where}: split has no images")
            if y.min() < 0 or y.max() >= len(self.classes):
                raise DataError(f"{where}_y: labels must lie in [0, {len(self.classes)})")
        if self.train_x.shape[2:] != self.test_x.shape[2:]:
            raise DataError(
                f"{self.name}: train images {self.train_x.shape[2:]} and test images "
                f"{self.test_x.shape[2:]} differ in size"
            )

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)
