"""JPEG bytes -> model-input pixels on the encoder's device: batched nvJPEG decode
(torchvision.io.decode_jpeg with device="cuda"), resize and centre crop there.

Which images take this path (`DeviceJpegDecoder.accepts`, from the header alone, before any
decoding): the encoder runs on CUDA (`for_encoder`), the model's resize mode is "shortest",
and Pillow reads the bytes as a JPEG in RGB or grayscale. Every other image (PNG, WebP, CMYK
JPEGs, any image on a CPU encoder) is decoded by Pillow (kvclip/images.py) and preprocessed
on the host (kvclip/preprocess.py). The pixel limit and EXIF orientation are the same on both
paths; the pictures agree up to resampling (Pillow's bicubic, after a reduced-scale DCT
decode of large JPEGs, against torchvision's antialiased bicubic on the full decode):
tests/unit/test_device_decode.py runs this path on the CPU against Pillow's.

nvJPEG cannot be measured on this project's CI (no GPU); see docs/server.md, "The GPU path".
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from kvclip.errors import ImageDecodeError
from kvclip.images import check_pixels

if TYPE_CHECKING:
    from kvclip.models import Encoder

_EXIF_ORIENTATION = 0x0112
_DEVICE_MODES = ("RGB", "L")  # nvJPEG's RGB output; CMYK/YCCK JPEGs stay with Pillow
_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                  "nearest": InterpolationMode.NEAREST}


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    orientation: int  # EXIF Orientation, 1 (upright) to 8


def jpeg_header(data: bytes, max_pixels: int, name: str) -> JpegHeader | None:
    """The header of a JPEG this path can decode; None for anything else (Pillow's then).
    ImageDecodeError when the picture is over the pixel limit."""
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))  # reads the header only
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    if image.mode not in _DEVICE_MODES:
        return None
    check_pixels(image.size, max_pixels, name)
    try:
        orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError):  # a broken EXIF block: let Pillow's path judge the file
        return None
    return JpegHeader(image.width, image.height, orientation if 1 <= orientation <= 8 else 1)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """C x H x W pixels stored with an EXIF orientation -> upright (Pillow's exif_transpose)."""
    if orientation in (5, 6, 7, 8):  # stored sideways: swap the axes first
        image = image.transpose(-1, -2)
    flips = {2: [-1], 3: [-1, -2], 4: [-2], 5: [], 6: [-1], 7: [-1, -2], 8: [-2]}.get(orientation, [])
    return image.flip(flips) if flips else image


def resize_crop(image: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """uint8 3 x H x W -> 3 x size x size: the short side to `size`, then the central square
    (torchvision's Resize(size) and CenterCrop(size), as open_clip's eval transform)."""
    mode = _INTERPOLATION.get(interpolation, InterpolationMode.BICUBIC)
    resized = TF.resize(image, [size], interpolation=mode, antialias=True)
    return TF.center_crop(resized, [size, size])


class DeviceJpegDecoder:
    """Decodes a batch of JPEGs in one decode_jpeg call on `device` and preprocesses them there."""

    def __init__(self, device: torch.device, size: int, interpolation: str = "bicubic") -> None:
        self.device = device
        self.size = size
        self.interpolation = interpolation

    @classmethod
    def for_encoder(cls, encoder: Encoder) -> DeviceJpegDecoder | None:
        """The decoder for an encoder on CUDA whose model resizes by the short side; None otherwise."""
        if encoder.device.type != "cuda" or encoder.preprocess.resize_mode != "shortest":
            return None
        return cls(encoder.device, encoder.image_size, encoder.interpolation)

    def accepts(self, data: bytes, max_pixels: int, name: str) -> JpegHeader | None:
        """The header when this decoder takes the image (see the module docstring)."""
        return jpeg_header(data, max_pixels, name)

    def __call__(self, datas: Sequence[bytes], headers: Sequence[JpegHeader],
                 names: Sequence[str]) -> list[torch.Tensor | ImageDecodeError]:
        """One 3 x S x S uint8 tensor on the device per JPEG, or the error that image raised."""
        raw = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
        try:
            decoded: list[torch.Tensor | ImageDecodeError] = list(self._decode(raw))
        except RuntimeError:  # the batched call returns nothing when one image fails: find it
            decoded = [self._decode_one(one, name) for one, name in zip(raw, names)]
        return [image if isinstance(image, ImageDecodeError) else
                resize_crop(orient(image, header.orientation), self.size, self.interpolation)
                for image, header in zip(decoded, headers)]

    def _decode(self, raw: list[torch.Tensor]) -> list[torch.Tensor]:
        # Orientation is applied by `orient`: decode_jpeg applies it on the CPU only. The work
        # goes on the device's default stream, which the device thread's encoder batch also
        # uses, so it is ordered before the batch that reads these pixels without events.
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device)

    def _decode_one(self, raw: torch.Tensor, name: str) -> torch.Tensor | ImageDecodeError:
        try:
            return self._decode([raw])[0]
        except RuntimeError as exc:
            return ImageDecodeError(f"{name}: not a readable JPEG ({exc})")
