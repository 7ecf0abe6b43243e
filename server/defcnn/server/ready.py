"""The ready file: what `defcnn serve --ready-file PATH` writes once it serves.

A launcher (a test, the demo, a benchmark, a shell script) waits for this JSON document
instead of parsing the human ready line: the port really bound (``--port 0`` picks one),
the metrics port, the server's pid and every model version with its readiness. It is
written atomically, so a reader sees no file or the whole document, and removed when the
server stops.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from defcnn.atomic import write_json
from defcnn.errors import ConfigError

FORMAT = 1


@dataclass(frozen=True)
class ModelState:
    """One model version as the server loaded it; `reason` says why it is not ready."""

    name: str
    version: int
    ready: bool
    reason: str = ""


@dataclass(frozen=True)
class ReadyFile:
    """The document itself; `metrics_port` is None when the metrics endpoint is off."""

    host: str
    port: int
    metrics_port: int | None
    pid: int
    tls: bool
    models: tuple[ModelState, ...]
    format: int = FORMAT

    def write(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> ReadyFile:
        """Parse a ready file; a missing or malformed one raises OSError or ConfigError."""
        raw = json.loads(Path(path).read_text())
        try:
            if raw.get("format") != FORMAT:
                raise ConfigError(f"{path}: ready file format {raw.get('format')!r}, "
                                  f"expected {FORMAT}")  # fmt: skip
            models = tuple(ModelState(**m) for m in raw["models"])
            return cls(**{**raw, "models": models})
        except (AttributeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a defcnn serve ready file ({exc})") from exc


def check_writable(path: Path) -> None:
    """Refuse, before serving, a ready file that could not be written: its folder must exist
    and take a new file (tried for real, since permission bits do not bind root). Removes a
    stale ready file at `path`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--ready-file {path} is a folder; expected a file path")
    if (path.exists() or path.is_symlink()) and not (path.is_file() and not path.is_symlink()):
        raise ConfigError(f"--ready-file {path} exists and is not a regular file; not replaced")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"--ready-file {path}: the folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise ConfigError(f"--ready-file {path}: cannot write in {folder}: "
                          f"{exc.strerror or exc}") from exc  # fmt: skip
    os.close(fd)
    os.unlink(probe)
    # A file left by an earlier server (killed, or one that failed to start) would tell a
    # watcher this one is ready, on the old port: it goes before this server starts.
    path.unlink(missing_ok=True)
