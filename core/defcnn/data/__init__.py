"""Data sets for training and evaluation: decoded once to uint8 NCHW arrays and cached."""

from defcnn.data._cache import default_cache_dir
from defcnn.data.augment import augment_batch
from defcnn.data.cifar10 import CIFAR10_MD5, CIFAR10_URL, download_cifar10
from defcnn.data.dataset import ImageDataset
from defcnn.data.registry import DATASETS, load_dataset

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DATASETS",
    "ImageDataset",
    "augment_batch",
    "default_cache_dir",
    "download_cifar10",
    "load_dataset",
]
