import pytest
import torch
import torch.nn.functional as F

from kvclip.blend import BlendParams, CacheTensors, blend
from kvclip.cache_builder.tune import Grid, balanced_exclusions, loo_exclusions, tune
from tests.clip_like import clip_like


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
    exclude = loo_exclusions(labels, torch.arange(len(labels)), 5, 0, queries)
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
    exclude = loo_exclusions(labels, torch.arange(len(labels)), 5, 0, queries)
    logits = blend(queries, cache, fixed, "tip", exclude)
    assert result.loo_top1["tip"] == float((logits.argmax(1) == labels).float().mean())


# --- leave-one-out without the label leak -----------------------------------------------------


@pytest.mark.parametrize("classes, per_class", [(10, 100), (100, 5)])
def test_uninformative_labels_tune_to_chance(classes, per_class):
    """Labels drawn independently of CLIP-like features (all affinities positive): no method can
    beat chance, and the tuned leave-one-out must say so. Naive LOO (only the query's own item
    left out) gives its class an item fewer, which the negative KL weights turn into a bonus.
    The search's max over the grid is optimistic by ~1/√N: 1000 queries keep it within 3 points
    at C = 10."""
    d = clip_like(classes, per_class, seed=1, informative_labels=False)
    assert float((d.keys @ d.keys.T).min()) > 0.3
    cache = CacheTensors.build(d.text_weights, d.keys, d.labels)
    result = tune(cache, d.queries, d.labels)
    assert set(result.loo_top1) == {"zeroshot", "tip", "tipx"}
    for method, accuracy in result.loo_top1.items():
        assert abs(accuracy - 1 / classes) <= 0.03, (method, accuracy)
    assert result.report()["protocol"].startswith("balanced leave-one-out")


def test_auto_picks_tip_where_tip_beats_tipx_held_out():
    d = clip_like(10, 16, seed=1, within_class=1.2, test_per_class=100)
    cache = CacheTensors.build(d.text_weights, d.keys, d.labels)
    result = tune(cache, d.queries, d.labels)

    def held_out(method):
        logits = blend(d.test_features, cache, result.params.get(method, BlendParams()), method)
        return float((logits.argmax(1) == d.test_labels).float().mean())

    assert held_out("tip") > held_out("tipx") and held_out("tip") > held_out("zeroshot") + 0.1
    assert result.best_method == "tip"


def test_duplicated_support_images_do_not_leak_their_label():
    """Every image twice: excluded by index only, each query meets its own copy (tip ~1.0)."""
    d = clip_like(10, 20, seed=2, informative_labels=False)
    keys, queries, labels = (torch.cat([t, t]) for t in (d.keys, d.queries, d.labels))
    result = tune(CacheTensors.build(d.text_weights, keys, labels), queries, labels)
    assert result.loo_top1["tip"] <= 0.2  # chance is 0.1; 200 distinct images make the max noisy
    assert result.report()["duplicates_excluded"] == len(labels)


def test_balanced_exclusions_leave_one_item_of_every_class_out():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # class 4 is empty, class 3 has one item
    ids = torch.tensor([0, 4, 9, 6])
    exclude = balanced_exclusions(labels, ids, 5, seed=3)
    assert exclude[torch.arange(4), ids].all()  # each query's own item
    per_class = exclude.long() @ F.one_hot(labels, 5)
    assert per_class[:, :4].eq(1).all() and per_class[:, 4].eq(0).all()
    assert torch.equal(exclude, balanced_exclusions(labels, ids, 5, seed=3))  # seeded
    assert not torch.equal(exclude, balanced_exclusions(labels, ids, 5, seed=4))


# --- grids -------------------------------------------------------------------------------------


def test_grid_holds_the_references_points_and_refines_around_the_best():
    grid = Grid()
    assert 5.5 in grid.betas and min(grid.betas) < 0.5 and max(grid.gammas) > 10 and 1.0 in grid.alphas
    betas = grid.around("betas", 5.5)
    assert min(betas) == 3.0 and max(betas) == 7.0 and 5.5 in betas and len(betas) == 2 * grid.refine_steps + 3
    assert grid.around("alphas", 0.0)[0] == 0.0 and max(grid.around("alphas", 0.0)) == 0.1
    assert max(grid.around("deltas", 1.0)) == 1.0 and max(grid.around("betas", 100.0)) > 100.0


def test_second_pass_never_scores_below_the_coarse_grid():
    d = clip_like(10, 12, seed=4, within_class=1.4)
    g = torch.Generator().manual_seed(5)
    captions = F.normalize(d.keys + 0.2 * torch.randn(d.keys.shape, generator=g) / 8, dim=-1)
    cache = CacheTensors.build(d.text_weights, d.keys, d.labels, captions)
    coarse = tune(cache, d.queries, d.labels, Grid(refine_steps=0))
    fine = tune(cache, d.queries, d.labels)
    assert all(fine.loo_top1[m] >= coarse.loo_top1[m] for m in coarse.loo_top1)
    assert fine.loo_top1["caps"] >= fine.loo_top1["tipx"] >= fine.loo_top1["tip"] >= fine.loo_top1["zeroshot"]
