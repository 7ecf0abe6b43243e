"""The one image decoder (defcnn.images): orientation, bit depth, modes, bombs, corrupt files,
and the same pixels for `defcnn classify` and the ImageFolder loader."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defcnn.data.imagefolder import load_imagefolder
from defcnn.errors import ConfigError, DataError
from defcnn.images import IMAGE_EXTENSIONS, decode_image, find_images, load_images

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _pixel(chw: np.ndarray, y: int, x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in chw[:, y, x])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # 20 wide x 10 high, left half red; orientation 6 = "rotate 90 degrees clockwise to view",
    # so the viewed image is 10 wide x 20 high with the red half on top.
    image = Image.new("RGB", (20, 10), BLUE)
    image.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    pixels = decode_image(path, 20, 10)
    assert pixels.shape == (3, 20, 10)
    assert np.abs(np.subtract(_pixel(pixels, 3, 5), RED)).max() < 30
    assert np.abs(np.subtract(_pixel(pixels, 16, 5), BLUE)).max() < 30


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path, mode: str) -> None:
    # Pillow opens 16-bit PNGs as I;16 (older versions: I); it cannot write mode I as PNG,
    # so the I case goes through a TIFF holding the same 16-bit values.
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    if mode == "I;16":
        image, path = Image.fromarray(values), tmp_path / "deep.png"
    else:
        image, path = Image.fromarray(values.astype(np.int32)), tmp_path / "deep.tif"
    assert image.mode == mode
    image.save(path)
    pixels = decode_image(path, 1, 4)
    expected = [0, 100, 255, round(1000 / 257)]
    for channel in pixels:
        assert channel[0].tolist() == expected


def test_mode_i_beyond_sixteen_bits_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(path)
    with pytest.raises(DataError, match=r"wide\.tif.*16 bits"):
        decode_image(path, 1, 2)


def test_palette_image_becomes_its_colours(tmp_path: Path) -> None:
    image = Image.new("P", (4, 2), 0)
    image.putpalette([*RED, *BLUE] + [0] * 762)
    image.paste(1, (2, 0, 4, 2))
    path = tmp_path / "palette.gif"
    image.save(path)
    pixels = decode_image(path, 2, 4)
    assert _pixel(pixels, 0, 0) == RED and _pixel(pixels, 1, 3) == BLUE


def test_palette_transparency_is_composited_on_black(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([*RED, *BLUE] + [0] * 762)
    image.putpixel((1, 0), 1)
    path = tmp_path / "transparent.png"
    image.save(path, transparency=1)
    pixels = decode_image(path, 1, 2)
    assert _pixel(pixels, 0, 0) == RED and _pixel(pixels, 0, 1) == (0, 0, 0)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    pixels = decode_image(path, 8, 8)
    assert pixels.dtype == np.uint8 and pixels.shape == (3, 8, 8)
    assert np.abs(np.subtract(_pixel(pixels, 4, 4), RED)).max() < 10


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_black(tmp_path: Path, mode: str) -> None:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(200, 100, 50, 255), (200, 100, 50, 128), (255, 255, 255, 0)])
    image = image.convert(mode)
    path = tmp_path / f"{mode}.png"
    image.save(path)
    pixels = decode_image(path, 1, 3)
    opaque, half, clear = (_pixel(pixels, 0, x) for x in range(3))
    if mode == "RGBA":
        assert opaque == (200, 100, 50)
        assert np.abs(np.subtract(half, (100, 50, 25))).max() <= 1
    else:
        first = image.getpixel((0, 0))
        assert isinstance(first, tuple)
        grey = first[0]
        assert opaque == (grey, grey, grey)
        assert np.abs(np.subtract(half, (grey // 2,) * 3)).max() <= 1
    assert clear == (0, 0, 0)


@pytest.mark.parametrize("side", [12, 20])  # over the limit (Pillow warns), over twice (it raises)
def test_decompression_bombs_are_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"bomb\.png is too large"):
        decode_image(path, 4, 4)
    with pytest.raises(DataError, match="too large"):
        load_images([path], 4, 4)


def test_corrupt_and_truncated_files_are_a_data_error_naming_them(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)).save(buffer, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 not really a jpeg")
    for path in (truncated, garbage):
        with pytest.raises(DataError, match=path.name):
            decode_image(path, 8, 8)
    with pytest.raises(DataError, match=r"member\.png"):
        decode_image(buffer.getvalue()[:100], 8, 8, name="member.png")


def test_find_images_uses_the_shared_extensions(tmp_path: Path) -> None:
    for suffix in IMAGE_EXTENSIONS:
        Image.new("RGB", (2, 2)).save(tmp_path / f"a{suffix.upper()}")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"AppleDouble junk")
    found = find_images([tmp_path])
    assert sorted(p.suffix.lower() for p in found) == sorted(IMAGE_EXTENSIONS)
    assert load_images(found, 4, 4).shape == (len(IMAGE_EXTENSIONS), 3, 4, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        find_images([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="no such file"):
        find_images([tmp_path / "missing"])


def _awkward_images(folder: Path) -> list[Path]:
    """Files that exercise every conversion, at sizes that need resizing to 16 x 16."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (24, 20, 4), dtype=np.uint8), "RGBA")
    deep = Image.fromarray(rng.integers(0, 65536, (10, 12), dtype=np.uint16))
    rotated = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 8
    paths = [folder / "rgba.png", folder / "deep.png", folder / "rotated.jpg"]
    rgba.save(paths[0])
    deep.save(paths[1])
    rotated.save(paths[2], exif=exif)
    return paths


@pytest.mark.parametrize("archive", [False, True])
def test_classify_and_imagefolder_decode_a_file_to_the_same_pixels(
    tmp_path: Path, archive: bool
) -> None:
    root = tmp_path / "tree"
    test_files = _awkward_images(root / "test" / "only")
    train = root / "train" / "only"
    train.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(train / "plain.png")
    source: Path = root
    if archive:
        source = tmp_path / "tree.tar.gz"
        with tarfile.open(source, "w:gz") as tf:
            tf.add(root, arcname="tree")
    ds = load_imagefolder(source, image_size=16, progress=False)
    by_classify = load_images(test_files, 16, 16)  # what `defcnn classify` sends, in [0, 1]
    assert ds.test_x.shape == (3, 3, 16, 16)
    order = sorted(range(3), key=lambda i: test_files[i].name)  # the loader sorts by path
    for row, i in enumerate(order):
        np.testing.assert_array_equal(ds.test_x[row].astype(np.float32) / 255, by_classify[i])


def test_the_decoder_never_imports_torch() -> None:
    code = "import sys, defcnn.images; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
