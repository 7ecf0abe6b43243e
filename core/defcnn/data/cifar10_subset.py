"""The CIFAR-10 subset shipped inside the package, the demo's default data set.

1,000 training and 200 test images per class of the JPEG q75 copy of CIFAR-10 (Krizhevsky,
2009), selected and packed by tools/make_cifar10_subset.py; the manifest beside the archive
records the selection and its sha256, checked here before the archive is decoded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from defcnn.data.dataset import ImageDataset
from defcnn.data.imagefolder import load_imagefolder
from defcnn.errors import DataError

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
SUBSET_ARCHIVE = EMBEDDED_DIR / "cifar10-subset.tar.gz"
SUBSET_MANIFEST = EMBEDDED_DIR / "cifar10-subset.json"
SUBSET_SOURCE = "CIFAR-10 subset (JPEG q75 copy, embedded: 1,000 train / 200 test per class)"


def verified_subset_archive() -> Path:
    """The archive, after checking its sha256 against the manifest (a damaged copy fails)."""
    try:
        manifest = json.loads(SUBSET_MANIFEST.read_text())
        data = SUBSET_ARCHIVE.read_bytes()
    except (OSError, ValueError) as exc:
        raise DataError(f"the embedded CIFAR-10 subset is unreadable: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.get("sha256"):
        raise DataError(
            f"{SUBSET_ARCHIVE} has sha256 {digest}, the manifest says {manifest.get('sha256')}; "
            "reinstall the package or rerun tools/make_cifar10_subset.py"
        )
    return SUBSET_ARCHIVE


def load_cifar10_subset(*, image_size: int = 32, progress: bool = True) -> ImageDataset:
    archive = verified_subset_archive()
    ds = load_imagefolder(archive, image_size=image_size, progress=progress)
    return replace(ds, name="cifar10-subset", source=SUBSET_SOURCE)
