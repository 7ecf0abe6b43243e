"""ImageFolder trees (a directory or a tar archive) with or without train/test splits."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from defcnn.data._decode import ImageDecoder
from defcnn.data._split import stratified_split
from defcnn.data.dataset import ImageDataset
from defcnn.errors import DataError
from defcnn.images import IMAGE_EXTENSIONS, Source, is_image_name

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TRAIN_SPLIT = "train"
TEST_SPLITS = ("test", "val")

Parts = tuple[str, ...]


def _wanted(parts: Parts) -> bool:
    if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return is_image_name(PurePosixPath(parts[-1]))


def _walk_directory(root: Path) -> Iterator[tuple[Parts, Source]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root).parts
        for filename in sorted(filenames):
            parts = (*rel, filename)
            if _wanted(parts):
                yield parts, os.path.join(dirpath, filename)


def _walk_archive(archive: Path) -> Iterator[tuple[Parts, Source]]:
    """Stream regular members; member paths only name classes and splits, nothing is written."""
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                if not member.isfile() or member.name.startswith("/"):
                    continue
                parts = tuple(p for p in PurePosixPath(member.name).parts if p != ".")
                if ".." in parts or not _wanted(parts):
                    continue
                fh = tf.extractfile(member)
                if fh is not None:
                    yield parts, fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read archive {archive}: {exc}") from exc


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _strip_wrappers(paths: list[Parts]) -> int:
    """How many single wrapper directories (like `cifar10/`) sit above the real root."""
    depth = 0
    while True:
        firsts = {p[depth] for p in paths}
        only = next(iter(firsts))
        if len(firsts) != 1 or only in (TRAIN_SPLIT, *TEST_SPLITS):
            return depth
        if any(len(p) - depth < 3 for p in paths):
            return depth
        depth += 1


def _assign(paths: list[Parts], where: str) -> list[tuple[str | None, str] | None]:
    """(split, class) per path: split is None when the tree has no train/test folders."""
    depth = _strip_wrappers(paths)
    rel = [p[depth:] for p in paths]
    tops = {r[0] for r in rel if len(r) > 1}
    split_dirs = tops & {TRAIN_SPLIT, *TEST_SPLITS}
    if not split_dirs:
        return [(None, r[0]) if len(r) >= 2 else None for r in rel]
    test_dir = next((s for s in TEST_SPLITS if s in tops), None)
    if TRAIN_SPLIT not in tops or test_dir is None:
        raise DataError(
            f"{where}: found {sorted(split_dirs)} but expected both train/ and test/ (or val/), "
            "each holding one folder per class; or no split folders at all"
        )
    names = {TRAIN_SPLIT: "train", test_dir: "test"}
    return [(names[r[0]], r[1]) if len(r) >= 3 and r[0] in names else None for r in rel]


def load_imagefolder(
    path: str | Path, *, image_size: int = 32, progress: bool = True
) -> ImageDataset:
    """Decode every image under `path`; classes are sorted folder names, like torchvision's."""
    path = Path(path).expanduser()
    if path.is_dir():
        entries = _walk_directory(path)
    elif path.is_file() and _is_archive(path):
        entries = _walk_archive(path)
    elif path.exists():
        raise DataError(f"{path}: expected a directory or a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    else:
        raise DataError(f"{path} does not exist; expected an ImageFolder directory or archive")

    paths: list[Parts] = []
    with ImageDecoder(image_size, progress=progress, desc=f"decoding {path.name}") as decoder:
        for parts, src in entries:
            paths.append(parts)
            decoder.add("/".join(parts) + f" in {path}", src)
        images = decoder.result()
    if not paths:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")

    labelled = [(a[0], a[1], paths[i], i) for i, a in enumerate(_assign(paths, str(path))) if a]
    if not labelled:
        raise DataError(f"{path}: no images inside class folders (expected <class>/<image>)")
    classes = tuple(sorted({cls for _, cls, _, _ in labelled}))
    index = {name: i for i, name in enumerate(classes)}
    labelled.sort(key=lambda rec: (index[rec[1]], rec[2]))
    image_idx = np.array([rec[3] for rec in labelled], dtype=np.int64)
    labels = np.array([index[rec[1]] for rec in labelled], dtype=np.int64)
    if labelled[0][0] is None:
        train, test = stratified_split(labels)
    else:
        split = np.array([rec[0] for rec in labelled])
        train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    for name, idx in (("train", train), ("test", test)):
        if len(idx) == 0:
            raise DataError(f"{path}: the {name} split has no images")
    return ImageDataset(
        name="imagefolder",
        classes=classes,
        train_x=images[image_idx[train]],
        train_y=labels[train],
        test_x=images[image_idx[test]],
        test_y=labels[test],
        source=str(path.resolve()),
    )
