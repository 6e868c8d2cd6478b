"""The preprocess that decode worker processes run (service/decode_pool.py): PIL image ->
uint8 3 x S x S numpy pixels, importing Pillow and numpy only.

A worker that unpickles it imports no torch or torchvision: it starts in a fraction of a
second instead of several, and holds tens of MB instead of torch's several hundred.

BoundedPreprocess (kvclip/preprocess.py) makes one with `portable()`. It applies the same
bound (the S x S region that the crop keeps, kvclip/preprocess.py says why). Then it applies
the model transform's steps that still change an S x S picture. For open_clip's "shortest"
eval transform only the RGB conversion is left: its Resize(S) and CenterCrop(S) leave an
S x S picture as it is (Pillow's resize to the same size is a copy; the crop box is the
whole picture).

Other steps (other resize modes', unknown ones) are kept as they are. Unpickling them imports
torchvision in the worker: it starts slower, with the same pixels.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
              "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


class ConvertMode:
    """open_clip's MaybeConvertMode for PIL images (the only input here): convert to `mode`.
    Written here because the worker must unpickle it without importing open_clip."""

    def __init__(self, mode: str = "RGB") -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert(self.mode)


def center_crop_box(size: tuple[int, int], out: int) -> tuple[float, float, float, float]:
    """The source box that "resize the short side to `out`, then centre-crop out x out" keeps.

    The arithmetic is torchvision's (Resize with an int size, then CenterCrop), so the box maps
    onto the same output pixel grid.
    """
    width, height = size
    if width <= height:
        new_w, new_h = out, int(out * height / width)
    else:
        new_w, new_h = int(out * width / height), out
    left, top = int(round((new_w - out) / 2.0)), int(round((new_h - out) / 2.0))
    scale_x, scale_y = width / new_w, height / new_h
    return (left * scale_x, top * scale_y, (left + out) * scale_x, (top + out) * scale_y)


def bound(image: Image.Image, size: int, resize_mode: str, resample: Image.Resampling) -> Image.Image:
    """The S x S picture a "shortest" transform would cut out of `image`, computed from that
    region only; other resize modes get the image as it is."""
    if resize_mode != "shortest" or image.size == (size, size):
        return image
    return image.resize((size, size), resample, box=center_crop_box(image.size, size))


def to_channels_first(picture: Image.Image, size: int) -> np.ndarray:
    """The picture's 8-bit pixels as a contiguous 3 x S x S array (torchvision's pil_to_tensor
    layout), or ValueError when the transform left another shape."""
    pixels = np.asarray(picture)
    if pixels.dtype != np.uint8 or pixels.shape != (size, size, 3):
        shape = (pixels.shape[-1], *pixels.shape[:2]) if pixels.ndim == 3 else pixels.shape
        raise ValueError(f"preprocessing made a {tuple(shape)} {pixels.dtype} picture, not 3 x {size} x {size} uint8")
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


@dataclass
class PortablePreprocess:
    """PIL image -> uint8 3 x S x S numpy pixels, as BoundedPreprocess gives them as a tensor."""

    size: int
    resize_mode: str
    resample: Image.Resampling
    steps: Sequence[Callable[[Image.Image], Image.Image]] = field(default_factory=list)

    def __call__(self, image: Image.Image) -> np.ndarray:
        picture = bound(image, self.size, self.resize_mode, self.resample)
        for step in self.steps:
            picture = step(picture)
        return to_channels_first(picture, self.size)
