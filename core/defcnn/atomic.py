"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Torch-free on purpose: the server, the client and the reports use it too.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temp file beside `path`, fsync it, then rename it over `path`.

    The file gets the mode a plain ``open()`` would give (0666 less the umask), not
    mkstemp's 0600: an exported repository is read by a server that may run as another user.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)  # the only way to read it is to set it
    os.umask(current)
    return current


def file_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode `mkdir` gives a new folder: 0777 less the umask (0755 under umask 022)."""
    return 0o777 & ~_umask()


def write_text(path: Path, text: str) -> None:
    """Write text atomically (reports people read)."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (reports, configs, metrics)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True))
