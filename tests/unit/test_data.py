"""Data loading: digits, official CIFAR-10 batches, ImageFolder trees, caching and augmentation."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from defcnn.data import (
    DATASETS,
    ImageDataset,
    augment_batch,
    default_cache_dir,
    download_cifar10,
    load_dataset,
)
from defcnn.data._cache import cache_file, save_cache
from defcnn.data._decode import ImageDecoder
from defcnn.data.augment import apply_crop_flip, crop_flip_params
from defcnn.data.imagefolder import load_imagefolder
from defcnn.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
REAL_CIFAR_JPEG = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
COLOURS = {"cat": (200, 10, 10), "dog": (10, 200, 10), "emu": (10, 10, 200)}


# ---------------------------------------------------------------- digits


def test_digits_shapes_split_and_channels() -> None:
    ds = load_dataset("digits")
    again = load_dataset("digits")
    assert DATASETS == ("digits", "cifar10-subset", "cifar10", "imagefolder")
    assert ds.name == "digits" and ds.source == "scikit-learn digits"
    assert ds.classes == tuple(str(d) for d in range(10))
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int64
    assert ds.train_x.shape[1:] == (3, 32, 32) and ds.image_size == (32, 32)
    assert ds.train_x.flags.c_contiguous and ds.test_x.flags.c_contiguous
    assert len(ds.train_x) + len(ds.test_x) == 1797
    assert 350 <= len(ds.test_x) <= 370
    np.testing.assert_array_equal(ds.train_x, again.train_x)
    np.testing.assert_array_equal(ds.test_y, again.test_y)
    assert set(ds.train_y.tolist()) == set(range(10)) == set(ds.test_y.tolist())
    assert np.array_equal(ds.train_x[:, 0], ds.train_x[:, 1])
    assert np.array_equal(ds.train_x[:, 0], ds.train_x[:, 2])
    assert ds.train_x.max() > 200
    train_rows = {row.tobytes() for row in ds.train_x}
    overlap = sum(row.tobytes() in train_rows for row in ds.test_x)
    assert overlap < 5


def test_digits_image_size_and_bad_arguments() -> None:
    assert load_dataset("digits", image_size=16).train_x.shape[2:] == (16, 16)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(ConfigError, match="unknown"):
        load_dataset("mnist")


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEFCNN_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DEFCNN_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "defcnn"


# ---------------------------------------------------------------- embedded CIFAR-10 subset


def test_the_embedded_cifar10_subset_loads_offline_with_its_stated_counts(tmp_path: Path) -> None:
    ds = load_dataset("cifar10-subset", cache_dir=tmp_path, progress=False)
    assert ds.name == "cifar10-subset" and "JPEG q75" in ds.source
    assert ds.classes == CIFAR_CLASSES  # the standard label order
    assert ds.train_x.shape == (10_000, 3, 32, 32) and ds.test_x.shape == (2_000, 3, 32, 32)
    assert np.bincount(ds.train_y).tolist() == [1000] * 10
    assert np.bincount(ds.test_y).tolist() == [200] * 10
    train_rows = {row.tobytes() for row in ds.train_x}
    assert not any(row.tobytes() in train_rows for row in ds.test_x)  # splits kept apart
    cached = load_dataset("cifar10-subset", cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(cached.test_x, ds.test_x)


def test_the_embedded_subset_is_small_and_matches_its_manifest() -> None:
    from defcnn.data.cifar10_subset import SUBSET_ARCHIVE, SUBSET_MANIFEST

    manifest = json.loads(SUBSET_MANIFEST.read_text())
    data = SUBSET_ARCHIVE.read_bytes()
    assert len(data) == manifest["bytes"] < 5_000_000
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"]


@pytest.mark.parametrize("name", ["cifar10-subset", "digits"])
def test_an_embedded_data_set_refuses_a_folder_or_download(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="embedded"):
        load_dataset(name, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="embedded"):
        load_dataset(name, download=True, progress=False)


def test_a_damaged_embedded_subset_is_refused(tmp_path: Path, monkeypatch) -> None:
    from defcnn.data import cifar10_subset

    damaged = tmp_path / "subset.tar.gz"
    data = bytearray(cifar10_subset.SUBSET_ARCHIVE.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(cifar10_subset, "SUBSET_ARCHIVE", damaged)
    with pytest.raises(DataError, match="sha256"):
        load_dataset("cifar10-subset", cache_dir=tmp_path, progress=False)


@pytest.mark.skipif(not REAL_CIFAR_JPEG.is_file(), reason=f"{REAL_CIFAR_JPEG} is absent")
def test_the_subset_script_reproduces_the_committed_selection() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_cifar10_subset.py"), "--check",
         "--source", str(REAL_CIFAR_JPEG)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "matches" in done.stdout


# ---------------------------------------------------------------- CIFAR-10 official batches


def _cifar_batch(n: int, offset: int) -> dict[bytes, Any]:
    data = ((np.arange(n * 3072).reshape(n, 3072) + offset) % 251).astype(np.uint8)
    return {
        b"batch_label": b"synthetic",
        b"labels": [(i + offset) % 10 for i in range(n)],
        b"data": data,
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def _write_cifar(folder: Path, per_batch: int = 3) -> None:
    folder.mkdir(parents=True)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
    for k, name in enumerate([*names, "test_batch"]):
        with open(folder / name, "wb") as fh:
            pickle.dump(_cifar_batch(per_batch, k), fh, protocol=2)
    meta = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_cases_per_batch": 3}
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=2)


def test_cifar10_official_format_round_trips(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "raw" / "cifar-10-batches-py")
    ds = load_dataset("cifar10", tmp_path / "raw", cache_dir=tmp_path / "cache", progress=False)
    assert ds.classes == CIFAR_CLASSES
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    first = _cifar_batch(3, 0)
    flat = first[b"data"]
    # image 1, channel 2 (blue), row 5, col 7 sits at 2*1024 + 5*32 + 7 in the flat record
    assert ds.train_x[1, 2, 5, 7] == flat[1, 2 * 1024 + 5 * 32 + 7]
    np.testing.assert_array_equal(ds.train_x[:3].reshape(3, -1), flat)
    assert ds.train_y[:3].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(ds.test_x.reshape(3, -1), _cifar_batch(3, 5)[b"data"])
    direct = load_dataset(
        "cifar10", tmp_path / "raw" / "cifar-10-batches-py", cache_dir=tmp_path / "c2"
    )
    np.testing.assert_array_equal(direct.train_x, ds.train_x)


def test_cifar10_missing_files_says_where_and_suggests_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"(?s)cifar-10-batches-py.*--download"):
        load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")


def test_cifar10_malformed_batch_is_data_error(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", folder, cache_dir=tmp_path / "cache")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_code_in_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    marker = tmp_path / "pwned"
    payload = {b"data": _Exploit(marker), b"labels": [0]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"refusing to unpickle .*system from .*data_batch_1"):
        load_dataset("cifar10", folder, cache_dir=tmp_path / "cache")
    assert not marker.exists()


def _cifar_tarball(tmp_path: Path) -> Path:
    _write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_download_cifar10_verifies_md5(tmp_path: Path) -> None:
    archive = _cifar_tarball(tmp_path)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    bad_dir = tmp_path / "bad"
    with pytest.raises(DataError, match="md5"):
        download_cifar10(bad_dir, url=archive.as_uri(), md5="0" * 32, progress=False)
    assert list(bad_dir.iterdir()) == []

    good_dir = tmp_path / "good"
    folder = download_cifar10(good_dir, url=archive.as_uri(), md5=md5, progress=False)
    assert folder == good_dir / "cifar-10-batches-py"
    ds = load_dataset("cifar10", good_dir, cache_dir=tmp_path / "cache")
    assert ds.train_x.shape == (15, 3, 32, 32)


def test_download_refuses_unsafe_archive(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="unsafe path"):
        download_cifar10(tmp_path / "dl", url=archive.as_uri(), md5=md5, progress=False)
    assert not (tmp_path / "escaped.txt").exists()


# ---------------------------------------------------------------- ImageFolder


def _png(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _tree(root: Path, counts: dict[str, dict[str, int]], size: int = 32) -> Path:
    """counts: {split-or-"": {class: n}}; writes solid-colour PNGs."""
    for split, classes in counts.items():
        for cls, n in classes.items():
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:03d}.png").write_bytes(_png(COLOURS[cls], size))
    return root


def _check_colours(ds: ImageDataset) -> None:
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        for img, label in zip(x, y, strict=True):
            expected = COLOURS[ds.classes[label]]
            assert tuple(img[:, 16, 16]) == expected


SPLIT_COUNTS = {"train": {"cat": 3, "dog": 2, "emu": 2}, "test": {"cat": 1, "dog": 2}}


def test_imagefolder_directory_with_splits(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", SPLIT_COUNTS)
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"not an image")
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    ds = load_dataset("imagefolder", root, cache_dir=tmp_path / "cache", progress=False)
    assert ds.classes == ("cat", "dog", "emu")
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert ds.test_y.tolist() == [0, 1, 1]
    assert ds.train_x.shape == (7, 3, 32, 32)
    _check_colours(ds)


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz")])
def test_imagefolder_archive_with_wrapper(tmp_path: Path, suffix: str, mode: Any) -> None:
    root = _tree(tmp_path / "tree", SPLIT_COUNTS)
    archive = tmp_path / f"data{suffix}"
    with tarfile.open(archive, mode) as tf:
        tf.add(root, arcname="wrapper")
        info = tarfile.TarInfo("__MACOSX/wrapper/train/cat/._000.png")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    ds = load_dataset("imagefolder", archive, cache_dir=tmp_path / "cache", progress=False)
    assert ds.classes == ("cat", "dog", "emu")
    assert (len(ds.train_y), len(ds.test_y)) == (7, 3)
    assert ds.source == str(archive.resolve())
    _check_colours(ds)


def test_imagefolder_without_splits_is_stratified_and_deterministic(tmp_path: Path) -> None:
    root = _tree(tmp_path / "flat", {"": {"cat": 10, "dog": 5, "emu": 5}})
    first = load_imagefolder(root, progress=False)
    second = load_imagefolder(root, progress=False)
    assert (len(first.train_y), len(first.test_y)) == (16, 4)
    assert np.bincount(first.test_y).tolist() == [2, 1, 1]
    np.testing.assert_array_equal(first.train_y, second.train_y)
    np.testing.assert_array_equal(first.test_x, second.test_x)
    _check_colours(first)


def test_imagefolder_resizes(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", SPLIT_COUNTS, size=20)
    ds = load_imagefolder(root, progress=False)
    assert ds.image_size == (32, 32)
    _check_colours(ds)
    small = load_dataset("imagefolder", root, image_size=8, cache_dir=tmp_path / "c")
    assert small.train_x.shape[2:] == (8, 8)


def test_imagefolder_parallel_decoding_matches_serial(tmp_path: Path) -> None:
    items = [(f"img{i}", _png((i, 2 * i, 3 * i), size=12)) for i in range(10)]
    results = []
    for workers in (1, 2):
        with ImageDecoder(16, progress=False, workers=workers, chunk_size=3) as decoder:
            for name, src in items:
                decoder.add(name, src)
            results.append(decoder.result())
    np.testing.assert_array_equal(results[0], results[1])
    assert results[0].shape == (10, 3, 16, 16)
    assert tuple(results[0][7, :, 5, 5]) == (7, 14, 21)


def test_imagefolder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_dataset("imagefolder", tmp_path / "empty", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("imagefolder", tmp_path / "missing", cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="data_dir"):
        load_dataset("imagefolder", cache_dir=tmp_path / "cache")
    only_train = _tree(tmp_path / "only_train", {"train": {"cat": 2}})
    with pytest.raises(DataError, match="test/"):
        load_imagefolder(only_train, progress=False)
    empty_test = _tree(tmp_path / "empty_test", {"train": {"cat": 2}})
    (empty_test / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="test"):
        load_imagefolder(empty_test, progress=False)
    broken = _tree(tmp_path / "broken", {"": {"cat": 5}})
    (broken / "cat" / "999.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"999\.png"):
        load_imagefolder(broken, progress=False)


# ---------------------------------------------------------------- cache


def test_cache_hit_and_corrupt_cache_rebuilt(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", SPLIT_COUNTS)
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", root, cache_dir=cache, progress=False)
    path = cache_file(cache, "imagefolder", root, 32)
    assert path.is_file()
    with np.load(path, allow_pickle=False) as npz:
        assert npz["classes"].dtype.kind == "U"
    # overwrite the cache with different metadata: a hit must return what the cache holds
    tampered = ImageDataset(
        name="imagefolder",
        classes=("a", "b", "c"),
        train_x=first.train_x,
        train_y=first.train_y,
        test_x=first.test_x,
        test_y=first.test_y,
        source="from cache",
    )
    save_cache(path, tampered)
    hit = load_dataset("imagefolder", root, cache_dir=cache, progress=False)
    assert hit.classes == ("a", "b", "c") and hit.source == "from cache"
    np.testing.assert_array_equal(hit.train_x, first.train_x)

    path.write_bytes(b"this is not a zip file")
    rebuilt = load_dataset("imagefolder", root, cache_dir=cache, progress=False)
    assert rebuilt.classes == ("cat", "dog", "emu")
    np.testing.assert_array_equal(rebuilt.test_x, first.test_x)
    with np.load(path, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["train_x"], first.train_x)
    assert [p.name for p in cache.iterdir()] == [path.name]


def test_cache_key_changes_with_source(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", SPLIT_COUNTS)
    cache = tmp_path / "cache"
    before = cache_file(cache, "imagefolder", root, 32)
    assert cache_file(cache, "imagefolder", root, 16) != before
    (root / "test" / "emu").mkdir()
    (root / "test" / "emu" / "000.png").write_bytes(_png(COLOURS["emu"]))
    assert cache_file(cache, "imagefolder", root, 32) != before
    ds = load_dataset("imagefolder", root, cache_dir=cache, progress=False)
    assert ds.test_y.tolist() == [0, 1, 1, 2]


# ---------------------------------------------------------------- augmentation


def _batch(n: int = 256, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) + 0.5


def test_augment_identity_and_reproducible() -> None:
    x = _batch()
    same = augment_batch(x, generator=torch.Generator().manual_seed(0), pad=0, flip=False)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    a = augment_batch(x, generator=torch.Generator().manual_seed(3))
    b = augment_batch(x, generator=torch.Generator().manual_seed(3))
    c = augment_batch(x, generator=torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_matches_manual_crop_and_flip() -> None:
    x, pad = _batch(), 4
    out = augment_batch(x, generator=torch.Generator().manual_seed(7), pad=pad)
    rows, cols, flips = crop_flip_params(
        len(x), generator=torch.Generator().manual_seed(7), pad=pad
    )
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    h, w = x.shape[2:]
    for i in range(len(x)):
        r, c = int(rows[i]), int(cols[i])
        window = padded[i, :, r : r + h, c : c + w]
        expected = window.flip(-1) if flips[i] else window
        assert torch.equal(out[i], expected), i
    assert 0.35 < flips.float().mean().item() < 0.65
    assert set(rows.tolist()) == set(range(2 * pad + 1))
    unflipped = [
        torch.equal(out[i], padded[i, :, rows[i] : rows[i] + h, cols[i] : cols[i] + w])
        for i in range(len(x))
    ]
    assert sum(not same for same in unflipped) == int(flips.sum())
    assert torch.equal(apply_crop_flip(x, rows, cols, flips, pad=pad), out)


def test_augment_brute_force_every_image_is_a_window() -> None:
    x, pad = _batch(64, 6), 2
    out = augment_batch(x, generator=torch.Generator().manual_seed(11), pad=pad)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    flipped = 0
    for i in range(len(x)):
        matches = [
            (r, c, f)
            for r in range(2 * pad + 1)
            for c in range(2 * pad + 1)
            for f in (False, True)
            if torch.equal(
                out[i],
                padded[i, :, r : r + 6, c : c + 6].flip(-1)
                if f
                else padded[i, :, r : r + 6, c : c + 6],
            )
        ]
        assert len(matches) == 1, i
        flipped += matches[0][2]
    assert 16 < flipped < 48


def test_augment_rejects_bad_arguments() -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="pad"):
        augment_batch(_batch(4), generator=gen, pad=-1)
    with pytest.raises(ConfigError, match=r"\[N, C, H, W\]"):
        augment_batch(torch.zeros(3, 8, 8), generator=gen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augment_same_on_cpu_and_gpu() -> None:
    x = _batch()
    cpu = augment_batch(x, generator=torch.Generator().manual_seed(5))
    gpu = augment_batch(x.cuda(), generator=torch.Generator().manual_seed(5))
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu, gpu.cpu())


# ---------------------------------------------------------------- real data


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.skipif(not REAL_CIFAR_JPEG.is_file(), reason=f"{REAL_CIFAR_JPEG} is absent")
def test_real_cifar10_jpeg_archive(tmp_path: Path) -> None:
    ds = load_dataset("imagefolder", REAL_CIFAR_JPEG, cache_dir=tmp_path, progress=False)
    assert ds.classes == CIFAR_CLASSES == tuple(sorted(CIFAR_CLASSES))
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert np.bincount(ds.train_y).tolist() == [5000] * 10
    assert np.bincount(ds.test_y).tolist() == [1000] * 10
    mean = ds.train_x.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, [125.3, 123.0, 113.9], atol=1.5)
    cached = load_dataset("imagefolder", REAL_CIFAR_JPEG, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(cached.test_x, ds.test_x)
