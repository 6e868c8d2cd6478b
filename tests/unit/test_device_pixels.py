"""8-bit pixels from the host, normalised by the encoder on its device: the model input is the
float transform's, to the bit (kvclip/preprocess.py, kvclip/models.py Encoder)."""
from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from kvclip.cache_builder.features import random_view_transform
from kvclip.models import Encoder, pins_host_memory
from kvclip.preprocess import split_transform
from tests.unit.test_images import smooth_image

SIZES = [(32, 32), (40, 220), (260, 48), (1200, 900), (7, 500)]


def float_path_features(encoder: Encoder, images) -> torch.Tensor:
    """What the encoder computed before: the model's whole transform on the host (float32,
    normalised), then the model."""
    pixels = torch.stack([encoder.preprocess.transform(encoder.preprocess.bound(im)) for im in images])
    with torch.inference_mode():
        return F.normalize(encoder.model.encode_image(pixels.to(encoder.dtype)).float(), dim=-1)


def test_uint8_pixels_give_the_float_transforms_features(tiny_encoder):
    images = [smooth_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    pixels = tiny_encoder.pixel_batch([tiny_encoder.preprocess(im) for im in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(images), 3, 32, 32)
    features = tiny_encoder.encode_images(pixels)
    # The same arithmetic (x / 255, - mean, / std in float32) on the same 8-bit pixels.
    assert (features - float_path_features(tiny_encoder, images)).abs().max() <= 1e-6


def test_mean_and_std_are_the_models_own(tiny_encoder):
    """A model whose config normalises otherwise: the encoder follows its transform."""
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    transform = open_clip.image_transform(32, is_train=False, mean=mean, std=std)
    encoder = Encoder(tiny_encoder.spec, tiny_encoder.model, transform, tiny_encoder.tokenizer,
                      torch.device("cpu"), None)
    assert encoder.mean == mean and encoder.std == std
    images = [smooth_image(64, 48, seed=9)]
    features = encoder.encode_images(encoder.pixel_batch([encoder.preprocess(im) for im in images]))
    assert (features - float_path_features(encoder, images)).abs().max() <= 1e-6
    assert (features - tiny_encoder.encode_images(tiny_encoder.pixel_batch([tiny_encoder.preprocess(images[0])]))
            ).abs().max() > 1e-3


def test_random_views_are_the_float_views(tiny_encoder):
    """The builder's augmented views: uint8 now, the same crops and flips from the same seed."""
    image = smooth_image(80, 60, seed=2)
    old = T.Compose([*random_view_transform(tiny_encoder).transforms[:-1], T.ToTensor(),
                     T.Normalize(tiny_encoder.mean, tiny_encoder.std)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        views = tiny_encoder.pixel_batch([random_view_transform(tiny_encoder)(image) for _ in range(4)])
        torch.manual_seed(3)
        reference = torch.stack([old(image) for _ in range(4)])
    assert views.dtype == torch.uint8
    with torch.inference_mode():
        expected = F.normalize(tiny_encoder.model.encode_image(reference).float(), dim=-1)
    assert (tiny_encoder.encode_images(views) - expected).abs().max() <= 1e-6


@pytest.mark.parametrize("pixels", [torch.rand(2, 3, 32, 32), torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
                                    torch.zeros(3, 32, 32, dtype=torch.uint8)])
def test_encode_images_refuses_anything_but_uint8_batches_of_its_size(tiny_encoder, pixels):
    with pytest.raises(ValueError, match="uint8 pixels"):
        tiny_encoder.encode_images(pixels)


def test_pixel_batch_stacks_images_and_concatenates_parts(tiny_encoder):
    one = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    part = torch.full((2, 3, 32, 32), 9, dtype=torch.uint8)
    batch = tiny_encoder.pixel_batch([one, part])
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.uint8
    assert batch[:, 0, 0, 0].tolist() == [7, 9, 9]
    assert not batch.is_pinned()  # CPU: nothing to copy asynchronously
    with pytest.raises(ValueError, match="at least one"):
        tiny_encoder.pixel_batch([])


def test_batches_are_pinned_for_cuda_only():
    assert pins_host_memory(torch.device("cuda"))
    assert pins_host_memory(torch.device("cuda:1"))
    assert not pins_host_memory(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_pinned(tiny_encoder):
    encoder = Encoder(tiny_encoder.spec, tiny_encoder.model, tiny_encoder.preprocess.transform,
                      tiny_encoder.tokenizer, torch.device("cuda"), None)
    assert encoder.pixel_batch([torch.zeros(3, 32, 32, dtype=torch.uint8)]).is_pinned()


def test_transforms_that_do_not_end_in_to_tensor_and_normalize_are_refused():
    with pytest.raises(ValueError, match="ToTensor, Normalize"):
        split_transform(T.Compose([T.Resize(32), T.ToTensor()]))
    with pytest.raises(ValueError, match="ToTensor, Normalize"):
        split_transform(lambda image: torch.zeros(3, 32, 32))
