"""The Triton model-repository layout, written so a failed export leaves nothing behind.

    REPO/NAME/config.pbtxt
    REPO/NAME/labels.txt
    REPO/NAME/<version>/model.onnx (+ verification.json, optional TensorRT engines)

A version is assembled in a hidden staging folder beside the versions and renamed into
place only once it has verified; earlier versions are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from defcnn.atomic import folder_mode
from defcnn.errors import ConfigError, ExportError
from defcnn.names import LABELS_FILE, parse_version

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_model_name(name: str) -> str:
    """Model names become folder names: no separators, no '..', no leading dot."""
    if not _NAME.match(name) or ".." in name:
        raise ConfigError(
            f"model name {name!r} must be 1-128 letters, digits, '_', '-' or '.', "
            "not starting with '.' and without '..'"
        )
    return name


def versions(model_dir: Path) -> list[int]:
    """Existing numeric version folders, ascending."""
    if not model_dir.is_dir():
        return []
    found = ((parse_version(p.name), p) for p in model_dir.iterdir())
    return sorted(v for v, p in found if v is not None and p.is_dir())


def next_version(model_dir: Path, requested: int | None) -> int:
    """The requested version (which must be new and >= 1) or one past the newest."""
    existing = versions(model_dir)
    if requested is None:
        return (existing[-1] + 1) if existing else 1
    if requested < 1:
        raise ConfigError(f"--version must be >= 1, got {requested}")
    if requested in existing:
        raise ExportError(
            f"{model_dir / str(requested)} already exists; versions are immutable, "
            "choose another --version"
        )
    return requested


@contextmanager
def staged_version(model_dir: Path, version: int) -> Iterator[Path]:
    """Yield a staging folder; on success rename it to `model_dir/version`, else delete it."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    os.chmod(staging, folder_mode())  # mkdtemp's 0700 would hide it from a server's user
    try:
        yield staging
        target = model_dir / str(version)
        if target.exists():
            raise ExportError(f"{target} appeared while exporting; not overwriting it")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_labels(model_dir: Path, classes: list[str]) -> None:
    """A model's versions share one label file: refuse a version with other classes."""
    labels = model_dir / LABELS_FILE
    if labels.exists() and labels.read_text().splitlines() != classes:
        raise ExportError(
            f"{labels} lists other classes than this checkpoint; export under another --name"
        )
