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

The host stops at 8-bit pixels. open_clip's transform ends with ToTensor (8-bit PIL pixels
/ 255) and Normalize (mean, std); BoundedPreprocess runs the transform's steps before those
(resize, crop, RGB: the rounding to 8 bits happens here, in Pillow, on both paths) and hands
out uint8 3 x S x S tensors; `normalize` is the last two steps, which the encoder runs on its
device (kvclip/models.py), with the same float32 arithmetic, so the model input is the same
to the bit: a quarter of the bytes cross to the device, and the host does no float work.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from kvclip.portable_preprocess import RESAMPLING, ConvertMode, PortablePreprocess, bound, to_channels_first


class BoundedPreprocess:
    """A model's deterministic transform, as PIL image -> 3 x S x S uint8 tensor (the pixels
    before ToTensor and Normalize; `mean` and `std` are that Normalize's, for `normalize`)."""

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        size: int,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
    ) -> None:
        self.transform = transform  # the reference: bound, then this, equals normalize(self(image))
        self.geometry, self.mean, self.std = split_transform(transform)
        self.size = size
        self.resize_mode = resize_mode
        self.resample = RESAMPLING.get(interpolation, Image.Resampling.BICUBIC)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(to_channels_first(self.geometry(self.bound(image)), self.size))

    def portable(self) -> PortablePreprocess:
        """The same pixels, as numpy, from an object that pickles without torch or open_clip,
        for decode worker processes (kvclip/portable_preprocess.py): open_clip's
        MaybeConvertMode becomes ConvertMode, and the steps that leave the bound S x S picture
        as it is are dropped. Other steps stay, and unpickling them imports torchvision there."""
        steps = [ConvertMode(step.mode) if type(step).__name__ == "MaybeConvertMode" else step
                 for step in self.geometry.transforms if not self._leaves_bound_picture(step)]
        return PortablePreprocess(self.size, self.resize_mode, self.resample, steps)

    def _leaves_bound_picture(self, step: object) -> bool:
        """Whether `step` returns a bound S x S picture unchanged ("shortest" mode only: other
        modes hand the transform the whole image)."""
        if self.resize_mode != "shortest" or type(step) not in (T.Resize, T.CenterCrop):  # subclasses may do more
            return False
        if isinstance(step, T.Resize):
            sizes = [step.size] if isinstance(step.size, int) else list(step.size)
            return step.max_size is None and sizes in ([self.size], [self.size, self.size])
        return isinstance(step, T.CenterCrop) and tuple(step.size) == (self.size, self.size)

    def bound(self, image: Image.Image) -> Image.Image:
        """The S x S picture the transform would cut out of `image`, computed from that region only."""
        return bound(image, self.size, self.resize_mode, self.resample)


def split_transform(transform: Callable[[Image.Image], torch.Tensor]) -> tuple[T.Compose, tuple[float, ...], tuple[float, ...]]:
    """(the steps before ToTensor, Normalize's mean, its std) of an open_clip eval transform.

    Any other shape of transform is refused: its float steps could not move to the device
    unchanged.
    """
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        raise ValueError(f"expected a transform ending in ToTensor, Normalize (open_clip's eval transform), got {transform!r}")
    norm = steps[-1]
    return T.Compose(steps[:-2]), tuple(float(m) for m in norm.mean), tuple(float(s) for s in norm.std)


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ... x 3 x H x W pixels -> float32, as ToTensor then Normalize compute it (mean and
    std: float32, 3 x 1 x 1, on the pixels' device)."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels (BoundedPreprocess), got {pixels.dtype}")
    return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)


def channel_tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-channel constants shaped to broadcast over ... x 3 x H x W."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)
