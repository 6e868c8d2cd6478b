"""Safe image decoding: bytes or files -> RGB PIL images, with limits against bombs."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from kvclip.errors import ImageDecodeError
from kvclip.vocabulary import MAX_PIXELS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The formats kvclip decodes (Pillow's names; JPEG includes the MPO files many phone cameras write).
# Pillow opens ~40 more, some through external programs (EPS runs Ghostscript): hostile bytes
# should only ever meet these decoders.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = MAX_PIXELS


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image", min_size: int | None = None
) -> Image.Image:
    """Decode fully (truncation shows up here, not later), turn upright (EXIF orientation) and
    convert to RGB. Formats outside IMAGE_FORMATS are refused before any decoder runs."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            check_pixels(image.size, max_pixels, name)
            if min_size is not None and image.format in ("JPEG", "MPO"):
                # JPEG decodes at 1/2, 1/4 or 1/8 scale straight from the DCT, several times faster
                # than a full decode; draft keeps both sides at least min_size, and the model
                # needs no more (its input is min_size square, from the short side).
                image.draft("RGB", (min_size, min_size))
            image.load()
            # Phone photos store pixels sideways plus an Orientation tag; the model must see them upright.
            return ImageOps.exif_transpose(image).convert("RGB")
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"{name}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
        ) from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from exc


def check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    """ImageDecodeError when a picture of `size` (from its header) is over the pixel limit."""
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(f"{name}: {width}x{height} pixels exceeds the limit of {max_pixels}")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None) -> Image.Image:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return decode_image(data, max_pixels=max_pixels, name=str(path), min_size=min_size)
