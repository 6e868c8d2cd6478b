"""The device JPEG path (kvclip/device_decode.py), run on the CPU: which images it takes, and
that its pixels are Pillow's up to resampling. nvJPEG itself needs a GPU (not tested here)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

from kvclip.device_decode import DeviceJpegDecoder, jpeg_header, orient
from kvclip.errors import ImageDecodeError
from kvclip.images import decode_image
from tests.unit.test_images import encoded, smooth_image

SIZE = 32


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillows_exif_transpose(orientation):
    stored = smooth_image(12, 7, seed=orientation)
    stored.info["exif"] = exif_bytes(orientation)
    stored.getexif()[0x0112] = orientation
    upright = ImageOps.exif_transpose(stored)
    assert torch.equal(orient(pil_to_tensor(stored), orientation), pil_to_tensor(upright))


def test_the_header_decides_which_images_the_device_takes():
    photo = smooth_image(64, 48)
    header = jpeg_header(encoded(photo, "JPEG", exif=exif_bytes(6)), 10_000, "a.jpg")
    assert header is not None and (header.width, header.height, header.orientation) == (64, 48, 6)
    assert jpeg_header(encoded(photo.convert("L"), "JPEG"), 10_000, "grey.jpg") is not None
    assert jpeg_header(encoded(photo, "PNG"), 10_000, "a.png") is None  # Pillow's
    assert jpeg_header(encoded(photo.convert("CMYK"), "JPEG"), 10_000, "cmyk.jpg") is None  # Pillow's
    assert jpeg_header(b"not an image", 10_000, "junk") is None  # Pillow's, which says why it is bad
    with pytest.raises(ImageDecodeError, match="big.jpg: 64x48 pixels exceeds the limit of 1000"):
        jpeg_header(encoded(photo, "JPEG"), 1000, "big.jpg")


def cuda_like(resize_mode: str = "shortest", device: str = "cuda"):
    return SimpleNamespace(device=torch.device(device), image_size=224, interpolation="bicubic",
                           preprocess=SimpleNamespace(resize_mode=resize_mode))


def test_only_a_cuda_encoder_that_resizes_by_the_short_side_decodes_on_the_device(tiny_encoder):
    decoder = DeviceJpegDecoder.for_encoder(cuda_like())
    assert decoder is not None and decoder.device == torch.device("cuda") and decoder.size == 224
    assert DeviceJpegDecoder.for_encoder(cuda_like(device="cpu")) is None
    assert DeviceJpegDecoder.for_encoder(cuda_like(resize_mode="squash")) is None
    assert DeviceJpegDecoder.for_encoder(tiny_encoder) is None  # the CPU test encoder: Pillow


@pytest.mark.parametrize(("size", "orientation"), [((64, 48), 1), ((40, 220), 1), ((1600, 1200), 1),
                                                   ((300, 200), 6), ((300, 200), 3)])
def test_the_tensor_path_gives_pillows_pixels_up_to_resampling(tiny_encoder, size, orientation):
    data = encoded(smooth_image(*size, seed=5), "JPEG", quality=92, exif=exif_bytes(orientation))
    decoder = DeviceJpegDecoder(torch.device("cpu"), SIZE)
    header = jpeg_header(data, 10**8, "x.jpg")
    assert header is not None
    (pixels,) = decoder([data], [header], ["x.jpg"])
    assert isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and pixels.shape == (3, SIZE, SIZE)
    reference = tiny_encoder.preprocess(decode_image(data, min_size=SIZE))  # the served Pillow path
    diff = (pixels.float() - reference.float()).abs()
    assert diff.mean() < 1 and diff.max() <= 8, (diff.mean(), diff.max())  # in 8-bit levels


def test_an_unreadable_jpeg_in_a_batch_fails_alone():
    good = encoded(smooth_image(64, 48), "JPEG")
    bad = good[:200] + bytes(len(good) - 200)  # the header is intact, the scan is not
    decoder = DeviceJpegDecoder(torch.device("cpu"), SIZE)
    headers = [jpeg_header(d, 10**8, "x") for d in (good, bad, good)]
    assert all(h is not None for h in headers)
    results = decoder([good, bad, good], headers, ["a.jpg", "b.jpg", "c.jpg"])  # type: ignore[arg-type]
    assert isinstance(results[0], torch.Tensor) and isinstance(results[2], torch.Tensor)
    assert isinstance(results[1], ImageDecodeError) and str(results[1]).startswith("b.jpg: not a readable JPEG")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_gives_the_cpu_decoders_pixels():
    datas = [encoded(smooth_image(640, 480, seed=s), "JPEG", quality=90, exif=exif_bytes(1 + s)) for s in range(4)]
    headers = [jpeg_header(d, 10**8, "x") for d in datas]
    names = [f"{i}.jpg" for i in range(4)]
    on_gpu = DeviceJpegDecoder(torch.device("cuda"), 224)(datas, headers, names)  # type: ignore[arg-type]
    on_cpu = DeviceJpegDecoder(torch.device("cpu"), 224)(datas, headers, names)  # type: ignore[arg-type]
    for gpu, cpu in zip(on_gpu, on_cpu):
        assert isinstance(gpu, torch.Tensor) and gpu.is_cuda and isinstance(cpu, torch.Tensor)
        assert (gpu.cpu().float() - cpu.float()).abs().mean() < 1  # IDCT and resampling kernels differ
