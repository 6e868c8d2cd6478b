"""Float16 keys (CacheTensors key_dtype, a GPU server's --key-precision auto) against float32.

Only the dot products with the keys run in float16: an affinity is off by at most ~2 float16
half-units near 1 (the product is rounded to float16, ≤ 2.4e-4, and so are both unit vectors
first), hence the 1e-3 bound on affinities. Every later step is float32, so a logit moves by
about (α + γ) n̄ times that; on these CLIP-like caches the served probabilities (softmax of
the logits) moved by ≤ 1.3e-3 when measured, and the bound below is 1e-2, with the top-1 label
the same for every query. CPU float16 matmuls are slow: the caches are small (290 keys).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvclip.blend import (
    DERIVED_ARRAYS,
    BlendParams,
    CacheTensors,
    affinities,
    blend,
    blend_candidates,
    kl_divergence,
)
from kvclip.index import build_index, search_candidates
from tests.clip_like import ClipLike, clip_like

METHODS = ("zeroshot", "tip", "tipx", "caps")
PARAMS = [BlendParams(alpha=1.0, beta=5.5, gamma=1.0, delta=0.3),
          BlendParams(alpha=10.0, beta=50.0, gamma=10.0, delta=0.7)]
AFFINITY_TOL = 1e-3
PROB_TOL = 1e-2


def data() -> tuple[ClipLike, torch.Tensor]:
    """290 keys, D = 128, 20 classes of unequal size (so balancing changes the sums), captions."""
    d = clip_like(20, [5 + c for c in range(20)], dim=128, seed=4, test_per_class=3)
    g = torch.Generator().manual_seed(8)
    captions = F.normalize(d.keys + 0.1 * torch.randn(d.keys.shape, generator=g), dim=-1)
    return d, captions


def caches(balanced: bool = True) -> tuple[ClipLike, CacheTensors, CacheTensors]:
    d, captions = data()
    built = [CacheTensors.build(d.text_weights, d.keys, d.labels, captions, balanced=balanced, key_dtype=dtype)
             for dtype in (torch.float32, torch.float16)]
    return d, built[0], built[1]


def assert_close_scores(want: torch.Tensor, got: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert float((want.softmax(-1) - got.softmax(-1)).abs().max()) < PROB_TOL
    assert torch.equal(want.argmax(-1), got.argmax(-1))


def test_the_keys_take_half_the_bytes_and_everything_else_stays_float32():
    _, c32, c16 = caches()
    assert c16.key_dtype == torch.float16 and c32.key_dtype == torch.float32
    for name in ("image_keys", "caption_keys"):
        full, half = getattr(c32, name), getattr(c16, name)
        assert half.element_size() * 2 == full.element_size()
        assert half.numel() * half.element_size() * 2 == full.numel() * full.element_size()
        assert torch.equal(half, full.half())
    assert c16.text_weights.dtype == c16.class_counts.dtype == torch.float32
    for name in DERIVED_ARRAYS:  # derived from the float32 keys before the cast: bit for bit the same
        assert getattr(c16, name).dtype == torch.float32 and torch.equal(getattr(c16, name), getattr(c32, name))


def test_affinities_are_float32_within_float16_rounding():
    d, c32, c16 = caches()
    for delta in (0.0, 0.5, 1.0):
        got = affinities(d.test_features, c16, delta)
        assert got.dtype == torch.float32
        assert float((got - affinities(d.test_features, c32, delta)).abs().max()) < AFFINITY_TOL


@pytest.mark.parametrize("temperature", [0.5, 20.0])
def test_the_kl_term_keeps_its_digits_when_signatures_are_flat(temperature):
    """The KL's query side p W_tᵀ / T shrinks with flatter signatures (entries ~6e-7 at T = 20):
    unscaled, float16 would hold it in subnormals (the KL off by 1.7e-2 of its row's range,
    measured); key_products scales each row first: 3e-4 of the range at T = 0.5 and at T = 20."""
    d, captions = data()
    built = [CacheTensors.build(d.text_weights, d.keys, d.labels, captions, temperature=temperature, key_dtype=dtype)
             for dtype in (torch.float32, torch.float16)]
    want, got = (kl_divergence(d.test_features, c) for c in built)
    span = want.amax(-1) - want.amin(-1)
    assert float(((want - got).abs().amax(-1) / span).max()) < 1e-3


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"a{p.alpha}-g{p.gamma}")
@pytest.mark.parametrize("method", METHODS)
def test_every_method_scores_as_with_float32_keys(method, params, balanced):
    d, c32, c16 = caches(balanced)
    assert_close_scores(blend(d.test_features, c32, params, method), blend(d.test_features, c16, params, method))
    # Leave-one-out, as the tuner and the FAISS agreement probe run it.
    queries = d.queries[:40]
    exclude = torch.zeros(40, c32.num_items, dtype=torch.bool)
    exclude[torch.arange(40), torch.arange(40)] = True
    assert_close_scores(blend(queries, c32, params, method, exclude), blend(queries, c16, params, method, exclude))


@pytest.mark.parametrize("method", METHODS)
def test_the_candidate_blend_runs_on_float16_keys(method):
    """The FAISS path: float32 indexes give the candidates, blend_candidates reads the float16 keys."""
    d, c32, c16 = caches()
    params = PARAMS[0]
    image_index, caption_index = build_index(d.keys.numpy()), build_index(c32.caption_keys.numpy())
    ids = search_candidates(d.test_features, image_index, caption_index, 32, params.delta)
    want = blend_candidates(d.test_features, c32, params, method, ids)
    assert_close_scores(want, blend_candidates(d.test_features, c16, params, method, ids))
    left_out = torch.arange(8).view(-1, 1)  # each query's own item out, as the agreement probe does
    assert_close_scores(blend_candidates(d.queries[:8], c32, params, method, ids[:8], left_out),
                        blend_candidates(d.queries[:8], c16, params, method, ids[:8], left_out))
    every = torch.arange(c16.num_items).repeat(len(d.test_features), 1)  # every item a candidate: dense
    assert_close_scores(blend(d.test_features, c16, params, method),
                        blend_candidates(d.test_features, c16, params, method, every))


def test_only_float32_and_float16_keys():
    d, captions = data()
    with pytest.raises(ValueError, match="key_dtype must be one of"):
        CacheTensors.build(d.text_weights, d.keys, d.labels, captions, key_dtype=torch.bfloat16)
