import torch
import torch.nn.functional as F

from kvclip.cache_builder.tune import tune
from kvclip.blend import BlendParams, CacheTensors, blend


def _clustered(seed=0, n_per=8, classes=5, dim=32, text_noise=True):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(n_per)
    keys = F.normalize(centers[labels] + 0.15 * torch.randn(len(labels), dim, generator=g), dim=-1)
    queries = F.normalize(keys + 0.1 * torch.randn(len(labels), dim, generator=g), dim=-1)
    text = F.normalize(torch.randn(dim, classes, generator=g), dim=0)  # random text: useless zero-shot
    return CacheTensors.build(text, keys, labels), queries, labels


def test_tuned_methods_never_lose_to_zeroshot_and_lean_on_cache_when_text_is_random():
    cache, queries, labels = _clustered()
    result = tune(cache, queries, labels)
    loo = result.loo_top1
    assert set(loo) == {"zeroshot", "tip", "tipx"}  # no caption keys: no caps
    assert all(loo[m] >= loo["zeroshot"] for m in ("tip", "tipx"))
    assert loo["tip"] >= loo["zeroshot"] + 0.3
    assert result.params["tip"].alpha >= 10  # the cache dominates useless zero-shot logits
    assert result.best_method in ("tip", "tipx")


def test_leave_one_out_never_sees_the_query_itself():
    # Each support item is its own nearest key: without exclusion tip would be perfect.
    g = torch.Generator().manual_seed(1)
    keys = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    labels = torch.randint(0, 4, (40,), generator=g)  # labels unrelated to features
    cache = CacheTensors.build(F.normalize(torch.randn(16, 4, generator=g), dim=0), keys, labels)
    result = tune(cache, keys, labels)
    assert result.loo_top1["tip"] < 0.6
    params = result.params["tip"]
    cheating = blend(keys, cache, params.__class__(alpha=1000, beta=50), "tip")
    assert (cheating.argmax(1) == labels).float().mean() == 1.0


def test_caps_tunes_delta_when_caption_keys_help():
    cache, queries, labels = _clustered(seed=2)
    g = torch.Generator().manual_seed(3)
    # caption keys that sit close to the queries' classes: δ > 0 should win
    captions = F.normalize(queries + 0.05 * torch.randn(queries.shape, generator=g), dim=-1)
    captions = F.normalize(captions[torch.argsort(labels, stable=True)], dim=-1)
    cache = CacheTensors.build(cache.text_weights, cache.image_keys, labels, captions)
    result = tune(cache, queries, labels)
    assert result.loo_top1["caps"] >= result.loo_top1["tipx"] >= result.loo_top1["zeroshot"]
    # the reported accuracy is what blend itself gives with the stored parameters
    ids = torch.arange(len(labels))
    exclude = torch.zeros(len(ids), len(ids), dtype=torch.bool)
    exclude[ids, ids] = True
    logits = blend(queries, cache, result.params["caps"], "caps", exclude)
    assert abs(float((logits.argmax(1) == labels).float().mean()) - result.loo_top1["caps"]) < 1e-6


def test_fixed_parameters_replace_the_search_and_are_the_ones_reported():
    cache, queries, labels = _clustered()
    searched = tune(cache, queries, labels)
    fixed = BlendParams(alpha=1.0, beta=5.5)
    assert searched.params["tip"] != fixed
    result = tune(cache, queries, labels, fixed={"tip": fixed}, fixed_best="tip")
    assert result.params["tip"] == fixed and result.best_method == "tip"
    assert result.params["tipx"] == searched.params["tipx"]
    exclude = torch.eye(len(labels), dtype=torch.bool)
    logits = blend(queries, cache, fixed, "tip", exclude)
    assert result.loo_top1["tip"] == float((logits.argmax(1) == labels).float().mean())
