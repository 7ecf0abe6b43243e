"""The software versions recorded next to every result (training metrics, exported models,
attack reports), so a figure can be traced to what produced it.

Torch-free: versions are read from the installed distributions' metadata, never by
importing the packages.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

# Record key -> the distributions that provide it, first installed one wins.
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "defcnn": ("defective-cnn",),
    "art": ("adversarial-robustness-toolbox",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
}


def _installed(key: str) -> str | None:
    for distribution in _DISTRIBUTIONS.get(key, (key,)):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return None


def versions(*packages: str) -> dict[str, str]:
    """{"python", "platform", "defcnn", then each of `packages`}: their versions.

    `packages` are record keys: a distribution name, or one of the short names above
    ("art", "onnxruntime" for either build). A package that is not installed is left out.
    """
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for key in ("defcnn", *packages):
        found = _installed(key)
        if found is not None:
            out[key] = found
    return out
