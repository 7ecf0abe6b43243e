"""The one image decoder: files or bytes -> RGB uint8 [3, H, W], for training data sets
(`defcnn.data`'s ImageFolder loader) and for `defcnn classify` alike.

Torch-free (numpy and Pillow only), so the torch-free client uses it too. What it does to a
file, in order:

- EXIF orientation is applied (a phone photo shot upright is decoded upright);
- 16-bit greyscale (modes I;16* and I) is scaled to 8 bits by dividing by 257 and rounding,
  so 65535 -> 255 (Pillow's own conversion clips at 255 instead); 16-bit RGB PNGs are
  already reduced to 8 bits by Pillow when it opens them (their high byte);
- transparency (RGBA, LA, palette or greyscale with a transparent colour) is composited on
  black and the alpha dropped. Black, because a fully transparent pixel is usually stored as
  (0, 0, 0, 0), so this keeps what a plain conversion to RGB gave before, and opaque pixels
  never change;
- every other mode (palette, CMYK, greyscale, bilevel, ...) is converted to RGB by Pillow;
- a size other than the one asked for is resized bilinearly with Pillow, which antialiases
  when shrinking, like `defcnn.data._resize.resize_uint8` does for whole arrays.

Every failure is a DataError naming the file: unreadable, truncated or corrupt data, and
images over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`; its warning
is treated as the error, so an image over the limit is never decoded).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, ImageOps

from defcnn.errors import ConfigError, DataError

# The file types every loader accepts, lower case; matched against the last suffix.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")

Source = bytes | str | PurePath

_DECODE_ERRORS = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,  # Pillow's plugins raise it for broken chunks
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def is_image_name(name: str | PurePath) -> bool:
    """Whether a file name has one of IMAGE_EXTENSIONS (case-insensitive)."""
    return PurePath(name).suffix.lower() in IMAGE_EXTENSIONS


def _sixteen_to_eight(image: Image.Image, name: str) -> Image.Image:
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"cannot decode image {name}: mode {image.mode} values exceed 16 bits")
    grey = np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
    return Image.fromarray(grey, mode="L")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode in _SIXTEEN_BIT:
        image = _sixteen_to_eight(image, name)
    has_alpha = image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(src: Source, height: int, width: int, *, name: str | None = None) -> np.ndarray:
    """One image (encoded bytes or a file path) as RGB uint8 [3, height, width].

    `name` is what an error calls the image (default: the path); bytes should be given one.
    """
    label = name if name is not None else ("<bytes>" if isinstance(src, bytes) else str(src))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as opened:
                image = ImageOps.exif_transpose(opened)
                rgb = _to_rgb(image, label)
                if rgb.size != (width, height):
                    rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {label} is too large to decode safely: {exc}") from exc
    except Image.DecompressionBombWarning as exc:
        raise DataError(f"image {label} is too large to decode safely: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot decode image {label}: {exc}") from exc
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively (sorted) for IMAGE_EXTENSIONS, skipping
    hidden files and folders like the ImageFolder loader does. ConfigError when none is found."""
    paths = list(paths)
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and is_image_name(p)
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"no such file or folder: {path}")
    if not found:
        raise ConfigError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {[str(p) for p in paths]}"
        )
    return found


def load_images(paths: Iterable[str | Path], height: int, width: int) -> np.ndarray:
    """Images as one float32 [N, 3, height, width] batch in [0, 1]: the decoded uint8 pixels
    divided by 255, which is how the models are fed in training."""
    decoded = [decode_image(p, height, width) for p in paths]
    if not decoded:
        return np.empty((0, 3, height, width), dtype=np.float32)
    return np.stack(decoded).astype(np.float32) / 255.0
