"""Reading a model repository as untrusted input: every file the server opens resolves
inside the folder it belongs to, is a regular file of bounded size, and is decoded with a
clear error; every path a reason shows is relative to the repository.

A repository is often assembled by someone other than the operator (a CI job, a shared
volume). A symlinked `labels.txt` must not put `/etc/passwd` into classification answers, a
FIFO named `config.pbtxt` must not hang the start, and a reason a client reads must not
reveal where the server keeps its files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from defcnn.names import parse_version
from defcnn.server.errors import InvalidArgument

CONFIG_LIMIT = 1 << 20  # config.pbtxt: a few hundred bytes from defcnn export
LABELS_LIMIT = 16 << 20  # labels.txt: ImageNet's 1,000 names take 20 KB


class RepositoryFiles:
    """Paths under one repository root, checked and shown relative to it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.real_root = self.root.resolve()

    def shown(self, path: Path) -> str:
        """`path` as a reason shows it: relative to the repository, never absolute."""
        for base in (self.root, self.real_root, self.root.absolute()):
            if path.is_relative_to(base):
                return str(path.relative_to(base)) or "."
        return path.name

    def scrub(self, text: str) -> str:
        """A message from a library (ONNX Runtime names absolute paths) with the
        repository's location removed."""
        for base in sorted({str(self.real_root), str(self.root.absolute())}, key=len,
                           reverse=True):  # fmt: skip
            text = text.replace(base + os.sep, "").replace(base, ".")
        return text

    def inside(self, folder: Path, path: Path, what: str) -> Path:
        """`path` resolved, refused unless it stays inside `folder` (symlinks followed)."""
        try:
            real = path.resolve()
            inside = real.is_relative_to(folder.resolve())
        except (OSError, RuntimeError):  # a symlink loop, a name too long
            raise InvalidArgument(
                f"{what} {self.shown(path)} does not resolve (a link loop?)"
            ) from None
        if not inside:
            raise InvalidArgument(
                f"{what} {self.shown(path)} resolves outside {self.shown(folder)}; refused"
            )
        return real

    def regular_file(self, folder: Path, path: Path, what: str, limit: int) -> Path:
        """The resolved path of a regular file inside `folder` of at most `limit` bytes."""
        real = self.inside(folder, path, what)
        try:
            info = real.stat()
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read {what} {self.shown(path)}: {exc.strerror or exc}"
            ) from None
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"{what} {self.shown(path)} is not a regular file")
        if info.st_size > limit:
            raise InvalidArgument(
                f"{what} {self.shown(path)} is {info.st_size} bytes, over the limit of {limit}"
            )
        return real

    def read_text(self, folder: Path, path: Path, what: str, limit: int) -> str:
        """A small UTF-8 text file from inside `folder`."""
        real = self.regular_file(folder, path, what, limit)
        try:
            with open(real, "rb") as fh:
                data = fh.read(limit + 1)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read {what} {self.shown(path)}: {exc.strerror or exc}"
            ) from None
        if len(data) > limit:
            raise InvalidArgument(f"{what} {self.shown(path)} is over the limit of {limit} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"{what} {self.shown(path)} is not UTF-8 text (byte {exc.start})"
            ) from None

    def version_folders(self, model_dir: Path) -> dict[int, Path]:
        """The model's version folders by version. Names that are no version ("²", "01",
        "v2") are left alone, as Triton does; where each one resolves is checked when it
        loads, so that a bad one is reported as that version not ready."""
        found = {}
        for entry in model_dir.iterdir():
            version = parse_version(entry.name)
            if version is not None and entry.is_dir():
                found[version] = entry
        return dict(sorted(found.items()))
