"""PIL image -> model input tensor, with work bounded by the output size.

CLIP's eval transform (open_clip, resize_mode "shortest") scales the *short* side to the input
size S and then keeps the central S x S square. Done as written, a 1 x 300000 PNG becomes
S x (S * 300000) pixels before the crop: gigabytes from a few hundred bytes, and a 12-megapixel
photo is resampled whole although most of it is cropped away.

BoundedPreprocess resamples only the source region that survives the crop, straight to S x S
(Pillow's `resize(box=...)`, whose filter still reads the pixels around the box), then hands
that to the model's own transform, for which it is already the right size (its resize and crop
do nothing to an S x S image). The result equals the transform applied to the whole image
(tests/unit/test_images.py checks it), with work proportional to S^2 and to the downscale factor.

Other resize modes ("squash", "longest") already resample the whole image straight to S and
keep it all; they go to the transform as they are.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


class BoundedPreprocess:
    """Wraps a model's deterministic transform (PIL image -> 3 x S x S tensor)."""

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        size: int,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
    ) -> None:
        self.transform = transform
        self.size = size
        self.resize_mode = resize_mode
        self.resample = _RESAMPLING.get(interpolation, Image.Resampling.BICUBIC)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(self.bound(image))

    def bound(self, image: Image.Image) -> Image.Image:
        """The S x S picture the transform would cut out of `image`, computed from that region only."""
        if self.resize_mode != "shortest" or image.size == (self.size, self.size):
            return image
        return image.resize((self.size, self.size), self.resample, box=center_crop_box(image.size, self.size))


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
