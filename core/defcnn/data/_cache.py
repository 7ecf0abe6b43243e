"""Decoded data sets cached as one .npz (no pickle), keyed by source identity and settings."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from defcnn.atomic import atomic_write
from defcnn.data.dataset import ImageDataset
from defcnn.errors import DataError

# 2: defcnn.images decodes EXIF orientation, 16-bit and alpha differently than 1 did.
CACHE_FORMAT_VERSION = 2
CACHE_ENV = "DEFCNN_CACHE_DIR"
_ARRAYS = ("train_x", "train_y", "test_x", "test_y")

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$DEFCNN_CACHE_DIR, else ~/.cache/defcnn."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "defcnn"


def _fingerprint(source: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of the source file, or of every file under a source directory."""
    if source.is_file():
        st = source.stat()
        return [(source.name, st.st_size, st.st_mtime_ns)]
    entries = []
    for dirpath, _dirs, files in os.walk(source):
        for name in files:
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            entries.append((os.path.relpath(full, source), st.st_size, st.st_mtime_ns))
    return sorted(entries)


def cache_file(cache_dir: Path, name: str, source: Path, image_size: int) -> Path:
    """Where the cache for this (data set, source state, image size, format) lives."""
    resolved = source.resolve()
    key = json.dumps(
        [CACHE_FORMAT_VERSION, name, str(resolved), _fingerprint(resolved), image_size]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir / f"{name}-{image_size}px-{digest}.npz"


def load_cache(path: Path) -> ImageDataset | None:
    """The cached data set, or None when the file is missing or unreadable (it gets rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: np.ascontiguousarray(npz[key]) for key in _ARRAYS}
            return ImageDataset(
                name=str(npz["name"]),
                classes=tuple(str(c) for c in npz["classes"]),
                source=str(npz["source"]),
                **arrays,
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, DataError) as exc:
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, exc)
        return None


def save_cache(path: Path, ds: ImageDataset) -> None:
    """Write atomically, so a crash never leaves a half-written cache."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                name=np.array(ds.name),
                classes=np.array(ds.classes, dtype=str),
                source=np.array(ds.source),
                **{key: getattr(ds, key) for key in _ARRAYS},
            )

    atomic_write(path, write)


def cached(
    cache_dir: Path, name: str, source: Path, image_size: int, build: Callable[[], ImageDataset]
) -> ImageDataset:
    """Load from the cache, or build and store; an unwritable cache only costs a warning."""
    path = cache_file(cache_dir, name, source, image_size)
    ds = load_cache(path)
    if ds is not None:
        return ds
    ds = build()
    try:
        save_cache(path, ds)
    except OSError as exc:
        log.warning("could not write cache %s: %s", path, exc)
    return ds
