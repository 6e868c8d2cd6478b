import logging

import pytest
import torch

from kvclip.errors import ModelLoadError
from kvclip.models import load_encoder, parse_model_spec, state_dict_sha256


def random_pixels(n: int, size: int) -> torch.Tensor:
    """n preprocessed-looking images: uint8, 3 x size x size."""
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def test_model_names_parse():
    assert parse_model_spec("ViT-B-32:openai").kind == "tag"
    assert parse_model_spec("ViT-B-32:laion2b_s34b_b79k").source == "laion2b_s34b_b79k"
    spec = parse_model_spec("ViT-B-32:/models/clip.safetensors")
    assert (spec.kind, spec.arch, spec.source) == ("file", "ViT-B-32", "/models/clip.safetensors")
    assert parse_model_spec("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K").kind == "hf-hub"
    assert parse_model_spec("tiny-random").kind == "tiny-random"


def test_tiny_random_is_seeded_and_encodes(tiny_encoder):
    again = load_encoder("tiny-random", device="cpu")
    assert again.weights_sha256 == tiny_encoder.weights_sha256
    pixels = random_pixels(3, tiny_encoder.image_size)
    feats = tiny_encoder.encode_images(pixels)
    assert feats.dtype == torch.float32 and feats.shape[0] == 3
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(feats, again.encode_images(pixels))
    texts = tiny_encoder.encode_texts(["a cat", "a dog"])
    assert texts.shape == (2, feats.shape[1])


def test_offline_pretrained_tag_error_names_model_places_and_fix():
    with pytest.raises(ModelLoadError) as err:
        load_encoder("ViT-B-32:openai", device="cpu")
    text = str(err.value)
    assert "ViT-B-32:openai" in text and "Hugging Face cache" in text
    assert "--model ViT-B-32:/path/to/" in text and "HF_HUB_OFFLINE=1" in text


@pytest.mark.parametrize("name", ["ViT-B-32:openai", "hf-hub:someone/missing-model"])
def test_an_unreachable_hub_fails_at_once_without_retries(name, monkeypatch, caplog):
    """HF_HUB_OFFLINE unset on a machine without the hub: no minute of retries, one clear error."""
    from huggingface_hub import constants as hub

    from tests.server_process import free_port

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with caplog.at_level(logging.DEBUG), pytest.raises(ModelLoadError) as err:
        load_encoder(name, device="cpu")
    assert "could not be reached" in str(err.value) and "tiny-random" in str(err.value)
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert hub.HF_HUB_OFFLINE is False  # the flag is the library's again


@pytest.mark.parametrize("name, match", [
    ("ViT-B-32:/nowhere/clip.bin", "does not exist"),
    ("ViT-B-32:no_such_tag", "known tags: openai"),
    ("NoSuchArch:openai", "unknown open_clip architecture"),
    ("ViT-B-32", "names no weights"),
    ("hf-hub:someone/missing-model", "could not load the weights"),
])
def test_unloadable_weights_are_clear_errors_never_random(name, match):
    with pytest.raises(ModelLoadError, match=match):
        load_encoder(name, device="cpu")


def test_local_checkpoint_file_loads_the_same_weights(tmp_path, tiny_encoder):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.model.state_dict(), path)
    loaded = load_encoder(f"kvclip-tiny:{path}", device="cpu")
    assert state_dict_sha256(loaded.model) == tiny_encoder.weights_sha256
    assert loaded.weights_sha256 != tiny_encoder.weights_sha256  # the file's own checksum
    pixels = random_pixels(2, 32)
    assert torch.allclose(loaded.encode_images(pixels), tiny_encoder.encode_images(pixels))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_fp16():
    enc = load_encoder("tiny-random")
    assert enc.device.type == "cuda" and enc.dtype == torch.float16
    assert enc.encode_images(enc.pixel_batch([random_pixels(2, 32)])).dtype == torch.float32
