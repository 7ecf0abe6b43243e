"""Make the embedded CIFAR-10 subset that `defcnn demo` trains on by default.

A fixed, seeded per-class selection of the JPEG q75 copy of CIFAR-10
(../shared/data/cifar10-jpeg.tar.gz): the chosen JPEG files are copied byte for byte (no
re-encoding) into a deterministic ImageFolder tar (sorted members, zeroed times and owners),
gzipped with no name or time in its header. The sha256 of the tar and of the .tar.gz go to
the manifest beside it; the loader checks the .tar.gz's on every load, and this script,
rerun, must reproduce the tar's (the gzip bytes can differ between zlib versions). The
selection hashes each file's name with the seed, so it needs no random generator.

    python tools/make_cifar10_subset.py [--source ARCHIVE] [--check]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "core" / "defcnn" / "data" / "embedded"
ARCHIVE = OUT_DIR / "cifar10-subset.tar.gz"
MANIFEST = OUT_DIR / "cifar10-subset.json"
SOURCE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SOURCE_SHA256 = "d91980dd69f53077ebff3184b7c693b8bb41a49626ac0e63521b10db5e987f77"
PER_CLASS = {"train": 1000, "test": 200}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")  # fmt: skip
SEED = 0


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_source(source: Path) -> dict[tuple[str, str], dict[str, bytes]]:
    """(split, class) -> {file name: JPEG bytes} from the source ImageFolder archive."""
    files: dict[tuple[str, str], dict[str, bytes]] = {}
    with tarfile.open(source, "r:gz") as tf:
        for member in tf:
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) != 4 or parts[1] not in PER_CLASS:
                continue
            fh = tf.extractfile(member)
            assert fh is not None
            files.setdefault((parts[1], parts[2]), {})[parts[3]] = fh.read()
    return files


def _select(names: list[str], n: int, split: str, cls: str) -> list[str]:
    """The n names whose sha256(SEED/split/class/name) sort first, in name order: a seeded
    draw that depends on no random generator's stream (NumPy's may change across versions)."""

    def key(name: str) -> str:
        return hashlib.sha256(f"{SEED}/{split}/{cls}/{name}".encode()).hexdigest()

    return sorted(sorted(names, key=key)[:n])


def build_tar(source: Path) -> tuple[bytes, dict[str, dict[str, int]]]:
    files = _read_source(source)
    buf = io.BytesIO()
    counts: dict[str, dict[str, int]] = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for split, cls in sorted(files):
            chosen = _select(sorted(files[(split, cls)]), PER_CLASS[split], split, cls)
            counts.setdefault(split, {})[cls] = len(chosen)
            for name in chosen:
                data = files[(split, cls)][name]
                info = tarfile.TarInfo(f"cifar10-subset/{split}/{cls}/{name}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue(), counts


def gzip_bytes(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=SOURCE)
    p.add_argument(
        "--check",
        action="store_true",
        help="rebuild in memory and compare with the committed manifest; write nothing",
    )
    args = p.parse_args(argv)
    if not args.source.is_file():
        print(f"error: {args.source} not found", file=sys.stderr)
        return 2
    source_sha = _sha256(args.source.read_bytes())
    if source_sha != SOURCE_SHA256:
        print(
            f"error: {args.source} has sha256 {source_sha}, expected {SOURCE_SHA256}",
            file=sys.stderr,
        )
        return 2
    tar, counts = build_tar(args.source)
    expected = {split: {cls: n for cls in CLASSES} for split, n in PER_CLASS.items()}
    if counts != expected:
        print(f"error: selected {counts}, expected {expected}", file=sys.stderr)
        return 1
    if args.check:
        manifest = json.loads(MANIFEST.read_text())
        committed = gzip.decompress(ARCHIVE.read_bytes())
        checks = {
            "rebuilt tar": _sha256(tar) == manifest["tar_sha256"],
            "committed archive": _sha256(ARCHIVE.read_bytes()) == manifest["sha256"],
            "committed archive's tar": _sha256(committed) == manifest["tar_sha256"],
        }
        for what, ok in checks.items():
            print(f"{what}: {'matches' if ok else 'DIFFERS from'} the manifest")
        return 0 if all(checks.values()) else 1
    gz = gzip_bytes(tar)
    manifest = {
        "name": "cifar10-subset",
        "description": "CIFAR-10 (Krizhevsky, 2009), JPEG q75 copy: a fixed per-class subset",
        "source": "cifar10-jpeg.tar.gz",
        "source_sha256": SOURCE_SHA256,
        "seed": SEED,
        "per_class": PER_CLASS,
        "counts": counts,
        "tar_sha256": _sha256(tar),
        "sha256": _sha256(gz),
        "bytes": len(gz),
        "made_by": "python tools/make_cifar10_subset.py",
        "selection": "per split and class: the names whose sha256(seed/split/class/name) "
        "sort first",
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    ARCHIVE.write_bytes(gz)
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{ARCHIVE}: {len(gz) / 1e6:.2f} MB, sha256 {manifest['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
