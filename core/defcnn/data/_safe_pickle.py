"""A pickle reader that only rebuilds numpy arrays, because pickles can run arbitrary code."""

from __future__ import annotations

import codecs
import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from defcnn.errors import DataError


def _numpy_attr(module: str, name: str) -> Any:
    """numpy 2 moved numpy.core to numpy._core; resolve whichever exists without warnings."""
    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise DataError(f"this numpy has no {module}.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Python 3 protocol-2 pickles store bytes as codecs.encode(str, 'latin1'); allow only that."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ARRAY_GLOBALS = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in (
            "ndarray",
            "dtype",
        ):
            return getattr(np, name)
        for prefix in ("numpy.core.", "numpy._core."):
            sub = module.removeprefix(prefix)
            if module.startswith(prefix) and (sub, name) in _ARRAY_GLOBALS:
                return _numpy_attr(sub, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise DataError(f"refusing to unpickle {module}.{name} from {self._path}")


def load_array_pickle(path: Path) -> Any:
    """Unpickle `path` (bytes keys, like the official CIFAR loader), allowing only numpy arrays."""
    try:
        with open(path, "rb") as fh:
            return _ArrayUnpickler(fh, path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{path} is not a readable pickle: {exc}") from exc
