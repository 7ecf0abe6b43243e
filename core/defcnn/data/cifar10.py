"""CIFAR-10 in the official python-pickle format (as torchvision downloads it), read safely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from defcnn.data._download import download_verified, md5_of, safe_extract
from defcnn.data._resize import resize_uint8
from defcnn.data._safe_pickle import load_array_pickle
from defcnn.data.dataset import ImageDataset
from defcnn.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
CIFAR10_FILES = (*TRAIN_BATCHES, TEST_BATCH, META_FILE)
_PIXELS = 3 * 32 * 32


def _missing(folder: Path) -> list[str]:
    return [name for name in CIFAR10_FILES if not (folder / name).is_file()]


def find_cifar10_folder(data_dir: str | Path) -> Path | None:
    """The batches folder: `data_dir` itself or `data_dir/cifar-10-batches-py`, if complete."""
    root = Path(data_dir).expanduser()
    for folder in (root, root / CIFAR10_FOLDER):
        if not _missing(folder):
            return folder
    return None


def download_cifar10(
    data_dir: str | Path, *, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, progress: bool = True
) -> Path:
    """Download (unless a verified archive is already there) and extract into `data_dir`."""
    root = Path(data_dir).expanduser()
    archive = root / CIFAR10_ARCHIVE
    if not (archive.is_file() and md5_of(archive) == md5.lower()):
        download_verified(url, archive, md5=md5, progress=progress)
    safe_extract(archive, root)
    folder = find_cifar10_folder(root)
    if folder is None:
        raise DataError(
            f"{archive} did not contain {CIFAR10_FOLDER}/ with {', '.join(CIFAR10_FILES)}"
        )
    return folder


def locate_cifar10(data_dir: str | Path, *, download: bool, progress: bool = True) -> Path:
    """The batches folder under `data_dir`, downloading it when allowed."""
    folder = find_cifar10_folder(data_dir)
    if folder is not None:
        return folder
    if download:
        return download_cifar10(data_dir, progress=progress)
    root = Path(data_dir).expanduser()
    raise DataError(
        f"CIFAR-10 python batches not found: looked in {root} and {root / CIFAR10_FOLDER} "
        f"for {', '.join(CIFAR10_FILES)} (missing: {', '.join(_missing(root / CIFAR10_FOLDER))}); "
        "pass --download to fetch them"
    )


def _field(record: Any, key: str, path: Path) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a dict, got {type(record).__name__}")
    for candidate in (key.encode(), key):
        if candidate in record:
            return record[candidate]
    raise DataError(f"{path}: missing key {key!r}")


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    record = load_array_pickle(path)
    data = _field(record, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a uint8 array [N, {_PIXELS}]")
    if data.shape[1] != _PIXELS:
        raise DataError(f"{path}: 'data' has {data.shape[1]} values per image, expected {_PIXELS}")
    try:
        labels = np.asarray(_field(record, "labels", path), dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'labels' must be a list of integers") from exc
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but 'labels' has shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), labels


def _read_classes(path: Path) -> tuple[str, ...]:
    names = _field(load_array_pickle(path), "label_names", path)
    if not isinstance(names, list | tuple) or not names:
        raise DataError(f"{path}: 'label_names' must be a non-empty list")
    try:
        return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: 'label_names' is not UTF-8") from exc


def read_cifar10(folder: str | Path, *, image_size: int = 32) -> ImageDataset:
    """Decode the five training batches and the test batch of a `cifar-10-batches-py` folder."""
    folder = Path(folder)
    classes = _read_classes(folder / META_FILE)
    train = [_read_batch(folder / name, len(classes)) for name in TRAIN_BATCHES]
    test_x, test_y = _read_batch(folder / TEST_BATCH, len(classes))
    train_x = np.concatenate([x for x, _ in train])
    return ImageDataset(
        name="cifar10",
        classes=classes,
        train_x=resize_uint8(train_x, image_size),
        train_y=np.concatenate([y for _, y in train]),
        test_x=resize_uint8(test_x, image_size),
        test_y=test_y,
        source=str(folder.resolve()),
    )
