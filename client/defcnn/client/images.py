"""Image files -> the float32 NCHW batches a model takes, for `defcnn classify` and scripts.

Pillow only (no torch): RGB, bilinear resize to the model's H x W, scaled to [0, 1], which
is how `defcnn.data` feeds the models during training.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from defcnn.errors import ConfigError, DataError

SUFFIXES = (".png", ".jpg", ".jpeg")


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively (sorted); ConfigError when none are found."""
    paths = list(paths)
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            )
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"no such file or folder: {path}")
    if not found:
        raise ConfigError(f"no images ({', '.join(SUFFIXES)}) found in {[str(p) for p in paths]}")
    return found


def load_image(path: Path, height: int, width: int) -> np.ndarray:
    """One image as float32 [3, height, width] in [0, 1]; DataError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return (np.asarray(rgb, dtype=np.float32) / 255.0).transpose(2, 0, 1).copy()


def load_images(paths: Iterable[Path], height: int, width: int) -> np.ndarray:
    """Images as one float32 [N, 3, height, width] batch."""
    return np.stack([load_image(p, height, width) for p in paths])
