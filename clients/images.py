"""Turn what callers hold (paths, bytes, PIL images, numpy arrays, open files) into image files.

The server decodes the bytes it is sent, so PIL images and arrays are encoded to PNG here:
lossless, so an array classifies exactly like the PNG file it was read from.
"""
from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from kvclip.clients.errors import InputError

# PIL.Image.Image and numpy.ndarray are accepted too; they are not named here so that
# importing the client does not import PIL or numpy (a caller holding one has imported it).
ImageInput = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Any

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"),
)


@dataclass(frozen=True)
class ImageFile:
    """One image as it goes over the wire (a multipart file part)."""

    name: str
    data: bytes
    content_type: str

    def multipart(self) -> tuple[str, bytes, str]:
        return (self.name, self.data, self.content_type)


def image_files(images: ImageInput | Sequence[ImageInput]) -> list[ImageFile]:
    """One image or a list/tuple of them, in order; unnamed ones are called image[i]."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise InputError("no images given")
    return [image_file(item, index) for index, item in enumerate(items)]


def image_file(image: ImageInput, index: int = 0) -> ImageFile:
    default_name = f"image[{index}]"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
        return _file(path.name, data)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _file(default_name, bytes(image))
    if _is_instance(image, "PIL.Image", "Image"):
        return ImageFile(default_name, _pil_png(image), "image/png")
    if _is_instance(image, "numpy", "ndarray"):
        return ImageFile(default_name, _array_png(image), "image/png")
    if hasattr(image, "read"):
        data = image.read()
        if not isinstance(data, bytes):
            raise InputError(f"image {index}: the file object returned {type(data).__name__}; open it in binary mode ('rb')")
        name = getattr(image, "name", None)
        return _file(os.path.basename(name) if isinstance(name, str) and name else default_name, data)
    raise InputError(f"image {index}: cannot send a {type(image).__name__}; pass a path, bytes, a PIL image, "
                     "a numpy array or a binary file object")


def _file(name: str, data: bytes) -> ImageFile:
    if not data:
        raise InputError(f"image {name} is empty")
    return ImageFile(name, data, sniff_content_type(data))


def sniff_content_type(data: bytes) -> str:
    """The image type from the first bytes; the server decodes by content, not by this label."""
    for magic, content_type in _MAGIC:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _is_instance(obj: object, module: str, cls: str) -> bool:
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(obj, getattr(loaded, cls))


def _pil_png(image: Any) -> bytes:
    # PNG holds 1, L, LA, P, RGB, RGBA and 16-bit grey; anything else (CMYK, YCbCr, F) goes to RGB.
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _array_png(array: Any) -> bytes:
    import numpy as np

    try:  # the light (client-only) install has no Pillow; a caller holding an array may lack it
        from PIL import Image
    except ImportError as exc:
        raise InputError("sending numpy arrays needs Pillow to encode them as PNG: pip install pillow") from exc

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InputError(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4; got shape {array.shape}")
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1 or np.isnan(array).any()):
            raise InputError("a float image array must hold values in [0, 1]; scale it or pass uint8")
        pixels = np.rint(array * 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InputError(f"an integer image array must hold values in 0..255; got dtype {array.dtype} "
                             f"with range {array.min()}..{array.max()}")
        pixels = array.astype(np.uint8)
    else:
        raise InputError(f"unsupported image array dtype {array.dtype}; pass uint8, or floats in [0, 1]")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
    return out.getvalue()
