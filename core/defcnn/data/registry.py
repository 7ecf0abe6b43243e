"""One entry point naming every data set, so the CLI and training never import loaders directly."""

from __future__ import annotations

from pathlib import Path

from defcnn.data._cache import cached, default_cache_dir
from defcnn.data.cifar10 import locate_cifar10, read_cifar10
from defcnn.data.cifar10_subset import load_cifar10_subset, verified_subset_archive
from defcnn.data.dataset import ImageDataset
from defcnn.data.digits import load_digits_dataset
from defcnn.data.imagefolder import load_imagefolder
from defcnn.errors import ConfigError, DataError
from defcnn.names import DATASETS

DEFAULT_IMAGE_SIZE = 32
EMBEDDED = ("digits", "cifar10-subset")


def _check_size(image_size: int | None) -> int:
    if image_size is None:
        return DEFAULT_IMAGE_SIZE
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    download: bool = False,
    progress: bool = True,
) -> ImageDataset:
    """Load a data set by name, decoded once and cached as uint8 arrays.

    digits and cifar10-subset (both embedded) ignore data_dir; cifar10 defaults data_dir
    to <cache dir>/cifar10; imagefolder needs it.
    """
    if name not in DATASETS:
        raise ConfigError(f"dataset {name!r} is unknown; expected one of {', '.join(DATASETS)}")
    size = _check_size(image_size)
    if name in EMBEDDED and (data_dir is not None or download):
        # a folder or download given for a data set that has none would be silently ignored
        raise ConfigError(f"dataset {name!r} is embedded: it takes no data_dir or download")
    if name == "digits":
        return load_digits_dataset(image_size=size)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if name == "cifar10-subset":
        archive = verified_subset_archive()
        return cached(cache_root, name, archive, size,
                      lambda: load_cifar10_subset(image_size=size, progress=progress))  # fmt: skip
    if name == "cifar10":
        root = Path(data_dir) if data_dir is not None else default_cache_dir() / "cifar10"
        folder = locate_cifar10(root, download=download, progress=progress)
        return cached(cache_root, name, folder, size, lambda: read_cifar10(folder, image_size=size))
    if data_dir is None:
        raise ConfigError(
            "dataset 'imagefolder' needs data_dir: a directory or .tar/.tar.gz/.tgz archive "
            "of an ImageFolder tree"
        )
    source = Path(data_dir).expanduser()
    if not source.exists():
        raise DataError(f"{source} does not exist; expected an ImageFolder directory or archive")
    return cached(
        cache_root,
        name,
        source,
        size,
        lambda: load_imagefolder(source, image_size=size, progress=progress),
    )
