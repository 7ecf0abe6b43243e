"""Verified downloads and safe tar extraction, so a bad mirror or tarball cannot hurt the disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from defcnn.errors import DataError

_BLOCK = 1 << 20


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_verified(url: str, dest: Path, *, md5: str, progress: bool = True) -> Path:
    """Fetch `url` to `dest` through a temp file; keep it only if its md5 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar:
                for block in iter(lambda: response.read(_BLOCK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if digest.hexdigest() != md5.lower():
            raise DataError(
                f"download of {url} failed verification: md5 {digest.hexdigest()}, expected {md5}"
            )
        os.replace(tmp, dest)
    except OSError as exc:
        raise DataError(f"cannot download {url} to {dest}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    parts = PurePosixPath(member.name).parts
    if member.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(f"{archive}: refusing member with unsafe path {member.name!r}")
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        if target.is_absolute() or ".." in target.parts:
            raise DataError(
                f"{archive}: refusing link {member.name!r} -> {member.linkname!r} "
                "pointing outside the archive"
            )
    elif not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: refusing special member {member.name!r}")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tarball into `dest`, refusing absolute, '..' and outward-link members."""
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            for member in members:
                _check_member(member, archive)
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, members=members, filter="data")
            else:
                tf.extractall(dest, members=members)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot extract {archive} into {dest}: {exc}") from exc
