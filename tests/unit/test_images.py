"""Safe decoding (formats, EXIF orientation) and preprocessing whose cost is bounded by the output."""
from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from kvclip.errors import ImageDecodeError
from kvclip.images import decode_image
from kvclip.preprocess import BoundedPreprocess, channel_tensor, normalize

SIZE = 32


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A low-frequency picture: resampling differences stay small on it, as on photos."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    upright = smooth_image(48, 24)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    data = encoded(stored, "PNG", exif=exif.tobytes())
    decoded = decode_image(data)
    assert decoded.size == upright.size
    assert np.array_equal(np.asarray(decoded), np.asarray(upright))


def test_exif_rotated_jpeg_scores_like_its_transposed_pixels():
    upright = smooth_image(64, 40, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    decoded = np.asarray(decode_image(data), dtype=np.float32)
    assert decoded.shape[:2] == (40, 64)
    assert np.abs(decoded - np.asarray(upright, dtype=np.float32)).mean() < 3  # JPEG noise only


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "TGA", "ICO"])
def test_formats_outside_the_allowed_list_are_refused(fmt):
    data = encoded(smooth_image(16, 16).convert("RGB"), fmt)
    with pytest.raises(ImageDecodeError, match="supported format.*JPEG"):
        decode_image(data, name="upload")


def test_eps_is_never_handed_to_ghostscript():
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageDecodeError, match="supported format"):
        decode_image(data)


class Recorder:
    """The model transform with a first step recording the size it was handed."""

    def __init__(self) -> None:
        self.transform = open_clip.image_transform(SIZE, is_train=False)
        self.transforms = [self._record, *self.transform.transforms]
        self.sizes: list[tuple[int, int]] = []

    def _record(self, image: Image.Image) -> Image.Image:
        self.sizes.append(image.size)
        return image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)


def normalized(preprocess: BoundedPreprocess, pixels: torch.Tensor) -> torch.Tensor:
    """The float input the model sees, as the encoder computes it on its device."""
    return normalize(pixels, channel_tensor(preprocess.mean, pixels.device), channel_tensor(preprocess.std, pixels.device))


def test_an_elongated_image_reaches_the_transform_cropped():
    recorder = Recorder()
    line = Image.new("RGB", (300_000, 1), (200, 10, 10))  # decodes from a few hundred bytes of PNG
    preprocess = BoundedPreprocess(recorder, SIZE)
    pixels = preprocess(line)
    assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == torch.uint8
    assert recorder.sizes == [(SIZE, SIZE)]  # the transform's upscale costs O(S^2), not O(S^2 * 300000)
    reference = recorder.transform(Image.new("RGB", (SIZE, SIZE), (200, 10, 10)))
    assert torch.allclose(normalized(preprocess, pixels), reference, atol=1e-6)


@pytest.mark.parametrize("size", [(40, 220), (260, 48), (4000, 3000), (1200, 6000), (33, 31), (7, 5000)])
def test_bounded_preprocess_equals_the_model_transform_on_the_whole_image(size):
    image = smooth_image(*size)
    recorder = Recorder()
    preprocess = BoundedPreprocess(recorder, SIZE)
    bounded = normalized(preprocess, preprocess(image))
    assert recorder.sizes == [(SIZE, SIZE)]
    reference = recorder.transform(image)
    # One 8-bit level is 1/255/std ≈ 0.015 in normalised units: the same pixels up to rounding.
    assert (bounded - reference).abs().max() <= 0.02


def test_squash_mode_keeps_the_whole_picture():
    recorder = Recorder()
    image = smooth_image(400, 40)
    BoundedPreprocess(recorder, SIZE, resize_mode="squash")(image)
    assert recorder.sizes == [(400, 40)]


def test_the_encoder_preprocess_is_bounded(tiny_encoder):
    """The builder and the server both preprocess through Encoder.preprocess."""
    line = Image.new("RGB", (1, 300_000), (10, 200, 10))
    pixels = tiny_encoder.preprocess(line)
    size = tiny_encoder.image_size
    assert pixels.shape == (3, size, size)
    assert isinstance(tiny_encoder.preprocess, BoundedPreprocess)
    square = Image.new("RGB", (size, size), (10, 200, 10))
    assert torch.allclose(normalized(tiny_encoder.preprocess, pixels), tiny_encoder.preprocess.transform(square),
                          atol=1e-6)


def test_large_jpegs_decode_at_reduced_scale_when_the_model_needs_less():
    photo = smooth_image(2400, 1800, seed=3)  # a photo's shape; the rule is the same at 12 megapixels
    data = encoded(photo, "JPEG", quality=90)
    reduced = decode_image(data, min_size=SIZE * 7)  # 224 for SIZE=32: a ViT-B/32 input
    assert reduced.size == (300, 225)  # 1/8 scale: the smallest DCT scale with both sides >= 224
    assert decode_image(data, min_size=300).size == (600, 450)  # 1/8 would leave 225 < 300: 1/4
    assert decode_image(data).size == (2400, 1800)  # without a size, the full picture
    assert decode_image(encoded(photo, "PNG"), min_size=224).size == (2400, 1800)  # only JPEG has DCT scaling
    bounded = BoundedPreprocess(Recorder(), SIZE)
    full = normalized(bounded, bounded(decode_image(data)))
    assert (normalized(bounded, bounded(decode_image(data, min_size=SIZE))) - full).abs().mean() < 0.05  # the same picture


def test_reduced_scale_decoding_keeps_exif_orientation():
    upright = smooth_image(1600, 1200, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif.tobytes())
    assert decode_image(data, min_size=100).size == (200, 150)
