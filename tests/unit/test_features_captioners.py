import pytest
import torch

from kvclip.cache_builder.captioners import CocaCaptioner, NoCaptioner, SidecarCaptioner, make_captioner
from kvclip.cache_builder.features import encode_support, random_view_transform
from kvclip.cache_builder.sources import SupportItem
from kvclip.errors import DataError
from kvclip.images import load_image
from tests.conftest import write_images


def test_random_views_really_differ(tiny_encoder, tmp_path):
    (path,) = write_images(tmp_path, 1, size=64)
    image = load_image(path)
    augment = random_view_transform(tiny_encoder)
    torch.manual_seed(0)
    views = torch.stack([augment(image) for _ in range(6)])
    assert len({v.sum().item() for v in views}) == 6
    feats = tiny_encoder.encode_images(views)
    assert (feats[0] - feats[1:]).abs().max() > 1e-3


def test_keys_average_views_and_are_repeatable(tiny_encoder, tmp_path):
    paths = write_images(tmp_path, 3, size=64)
    items = [SupportItem(p, "x") for p in paths]
    one = encode_support(tiny_encoder, items, NoCaptioner(), views=4, batch_size=2, seed=7, progress=False)
    two = encode_support(tiny_encoder, items, NoCaptioner(), views=4, batch_size=3, seed=7, progress=False)
    other = encode_support(tiny_encoder, items, NoCaptioner(), views=4, seed=8, progress=False)
    assert torch.allclose(one.image_keys, two.image_keys, atol=1e-5)
    assert not torch.allclose(one.image_keys, other.image_keys, atol=1e-4)
    assert not torch.allclose(one.image_keys, one.query_features, atol=1e-3)
    plain = tiny_encoder.encode_images(torch.stack([tiny_encoder.preprocess(load_image(p)) for p in paths]))
    assert torch.allclose(one.query_features, plain, atol=1e-5)


def test_given_query_features_are_used_not_encoded_again(tiny_encoder, tmp_path):
    paths = write_images(tmp_path, 3, size=64)
    items = [SupportItem(p, "x") for p in paths]
    encoded = []

    class Counting:  # the encoder, recording how many images each call encodes
        preprocess = tiny_encoder.preprocess

        def encode_images(self, pixels):
            encoded.append(pixels.shape[0])
            return tiny_encoder.encode_images(pixels)

        def __getattr__(self, name):
            return getattr(tiny_encoder, name)

    given = torch.randn(3, tiny_encoder.encode_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1])
    support = encode_support(Counting(), items, NoCaptioner(), views=4, batch_size=2, seed=7, progress=False,
                             query_features=given)
    assert torch.equal(support.query_features, given)
    assert encoded == [2 * 4, 1 * 4]  # the random views only
    plain = encode_support(tiny_encoder, items, NoCaptioner(), views=4, batch_size=2, seed=7, progress=False)
    assert torch.equal(support.image_keys, plain.image_keys)  # the views' random stream is unchanged


def test_sidecar_captions_from_manifest_or_text_file(tmp_path):
    paths = write_images(tmp_path, 2)
    paths[1].with_suffix(".txt").write_text("  a grey square  \n")
    items = [SupportItem(paths[0], "a", "from the manifest"), SupportItem(paths[1], "a")]
    assert SidecarCaptioner().caption(items) == ["from the manifest", "a grey square"]
    with pytest.raises(DataError, match=r"img_000\.txt.*--captioner none"):
        SidecarCaptioner().caption([SupportItem(paths[0], "a")])


def test_unknown_captioner_is_an_error():
    with pytest.raises(DataError, match="unknown captioner"):
        make_captioner("blip")


def test_coca_captioner_generates_text_with_tiny_model(tmp_path):
    paths = write_images(tmp_path, 2)
    coca = CocaCaptioner("tiny-coca-random", device=torch.device("cpu"), generation_type="top_k", seq_len=8)
    captions = coca.caption([SupportItem(p, "x") for p in paths], [load_image(p) for p in paths])
    assert len(captions) == 2 and all(isinstance(c, str) and c and "<" not in c for c in captions)
    assert coca.describe()["model"] == "tiny-coca-random"


def test_tiny_coca_weights_are_finite_and_repeatable():
    """open_clip leaves CoCa's decoder projection uninitialised (torch.empty); the random test
    model must not inherit whatever memory held (it made captioning flaky)."""
    first = CocaCaptioner("tiny-coca-random", device=torch.device("cpu")).model.state_dict()
    second = CocaCaptioner("tiny-coca-random", device=torch.device("cpu")).model.state_dict()
    assert all(torch.isfinite(t).all() for t in first.values())
    assert all(torch.equal(first[k], second[k]) for k in first)
    projection = first["text_decoder.text_projection"]
    expected_std = projection.shape[0] ** -0.5  # seeded like open_clip's text projection
    assert abs(float(projection.std()) - expected_std) < 0.25 * expected_std
