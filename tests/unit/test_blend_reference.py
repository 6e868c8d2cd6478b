"""kvclip.blend against a plain, loop-based transcription of docs/methods.md.

The reference below is written straight from the formulas in methods.md (shared docs), not
from kvclip/blend.py:

    logits_zs = 100 f W_t
    A_j       = (1 - delta) f . k_img_j + delta f . k_cap_j        (delta = 0 for tip / tipx)
    s(x)      = softmax(x W_t / T) over the C classes
    KL_j      = sum_c s(f)_c (log s(f)_c - log s(k_img_j)_c)
    KL row rescaled linearly onto [min_j A_j, max_j A_j] of the same query, then negated
    logits    = logits_zs + gamma (-rescaled KL) L + alpha exp(-beta (1 - A)) L
    balanced: each class's two sums times n_bar / n_c, n_bar = N / (non-empty classes)

Only the support items that are "active" for a query (not excluded / among its candidates)
enter the sums and the min / max of the rescaling. n_c counts a query's active items of
class c after exclusion, but the whole cache's (less any left-out items) for candidates. For
candidates, each class's items that are neither candidates nor left out add to the Tip sum
their number times exp(-beta (1 - their mean affinity)), and to the KL sum their own rescaled
KL, through the candidates' min / max (docs/methods.md, "Exactness and FAISS").
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from kvclip.blend import BlendParams, CacheTensors, blend, blend_candidates, kl_divergence
from tests.clip_like import clip_like

METHODS = ("zeroshot", "tip", "tipx", "caps")
TOL = 1e-4

D, C, N, Q = 32, 7, 40, 12


# --------------------------------------------------------------------------------------
# Reference (python floats, explicit loops)
# --------------------------------------------------------------------------------------


def _dot(x, y):
    return sum(float(a) * float(b) for a, b in zip(x, y))


def ref_signature(x, text_weights, temperature):
    """softmax(x W_t / T) over the C classes, as a list of python floats."""
    d, c = text_weights.shape
    z = []
    for cls in range(c):
        acc = 0.0
        for k in range(d):
            acc += float(x[k]) * float(text_weights[k, cls])
        z.append(acc / temperature)
    m = max(z)
    e = [math.exp(v - m) for v in z]
    tot = sum(e)
    return [v / tot for v in e]


def ref_kl(p, q):
    return sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q))


def ref_logits(
    features,
    text_weights,
    image_keys,
    labels,
    caption_keys,
    params: BlendParams,
    method: str,
    temperature: float = 0.5,
    active=None,
    balanced: bool = True,
    class_sizes: str = "active",
    unretrieved: bool = False,
    left_out=None,
):
    """Q x C float64 logits. `active[i]` is the list of support ids used by query i;
    `class_sizes` "active" or "cache" says which items n_c counts when `balanced`;
    `unretrieved` adds the candidate blend's estimate for the items outside `active[i]`, and
    `left_out[i]` lists items that take no part at all (nor count in n_c)."""
    f_all = np.asarray(features, dtype=np.float64)
    w = np.asarray(text_weights, dtype=np.float64)
    k_img = np.asarray(image_keys, dtype=np.float64)
    k_cap = None if caption_keys is None else np.asarray(caption_keys, dtype=np.float64)
    labels = [int(v) for v in labels]
    q_count, n_items, n_cls = f_all.shape[0], k_img.shape[0], w.shape[1]

    alpha, beta, gamma, delta = params.alpha, params.beta, params.gamma, params.delta
    if method == "tip":
        gamma, delta = 0.0, 0.0
    elif method == "tipx":
        delta = 0.0

    key_sigs = [ref_signature(k_img[j], w, temperature) for j in range(n_items)]
    out = np.zeros((q_count, n_cls), dtype=np.float64)
    for i in range(q_count):
        f = f_all[i]
        for cls in range(n_cls):
            out[i, cls] = 100.0 * _dot(f, w[:, cls])
        if method == "zeroshot":
            continue
        gone = set() if left_out is None else set(left_out[i])
        items = [j for j in (range(n_items) if active is None else sorted(set(active[i]))) if j not in gone]
        aff = {}
        for j in range(n_items):
            a = (1.0 - delta) * _dot(f, k_img[j])
            if delta != 0.0:
                a += delta * _dot(f, k_cap[j])
            aff[j] = a
        sums = [0.0] * n_cls
        for j in items:
            sums[labels[j]] += alpha * math.exp(-beta * (1.0 - aff[j]))
        if unretrieved:
            for cls in range(n_cls):
                rest = [j for j in range(n_items) if labels[j] == cls and j not in items and j not in gone]
                if rest:
                    mean_aff = sum(aff[j] for j in rest) / len(rest)
                    sums[cls] += alpha * len(rest) * math.exp(-beta * (1.0 - mean_aff))
        if gamma != 0.0:
            sf = ref_signature(f, w, temperature)
            kl = {j: ref_kl(sf, key_sigs[j]) for j in items}
            kl_min, kl_max = min(kl.values()), max(kl.values())
            a_min, a_max = min(aff[j] for j in items), max(aff[j] for j in items)
            others = [j for j in range(n_items) if j not in items and j not in gone] if unretrieved else []
            for j in others:
                kl[j] = ref_kl(sf, key_sigs[j])
            # The candidates set the range; the unretrieved items go through the same linear map.
            for j in items + others:
                scaled = a_min + (kl[j] - kl_min) / (kl_max - kl_min) * (a_max - a_min)
                sums[labels[j]] += gamma * (-scaled)
        counted = items if class_sizes == "active" else [j for j in range(n_items) if j not in gone]
        size = [sum(1 for j in counted if labels[j] == cls) for cls in range(n_cls)]
        mean_size = n_items / len(set(labels))
        for cls in range(n_cls):
            if not balanced:
                out[i, cls] += sums[cls]
            elif size[cls]:
                out[i, cls] += sums[cls] * mean_size / size[cls]
    return out


def ref_kl_row(feature, text_weights, image_keys, temperature=0.5):
    w = np.asarray(text_weights, dtype=np.float64)
    sf = ref_signature(np.asarray(feature, dtype=np.float64), w, temperature)
    return [
        ref_kl(sf, ref_signature(np.asarray(k, dtype=np.float64), w, temperature))
        for k in image_keys
    ]


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def _unit_rows(x):
    return x / x.norm(dim=1, keepdim=True)


def make_data(seed, d=D, c=C, n=N, q=Q):
    """Clustered CLIP-like data so that affinities, signatures and KLs are far from trivial."""
    g = torch.Generator().manual_seed(seed)
    protos = _unit_rows(torch.randn(c, d, generator=g, dtype=torch.float64))
    text_weights = _unit_rows(protos + 0.4 * torch.randn(c, d, generator=g, dtype=torch.float64)).T
    labels = torch.arange(n) % c
    labels = labels[torch.randperm(n, generator=g)]
    image_keys = _unit_rows(protos[labels] + 0.6 * torch.randn(n, d, generator=g, dtype=torch.float64))
    caption_keys = _unit_rows(
        protos[labels] + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
    )
    # Half the queries near a class prototype, a few close to support keys, a few random.
    q_lab = torch.randint(0, c, (q,), generator=g)
    feats = protos[q_lab] + 0.6 * torch.randn(q, d, generator=g, dtype=torch.float64)
    near = min(3, q)
    feats[:near] = image_keys[:near] + 0.04 * torch.randn(near, d, generator=g, dtype=torch.float64)
    feats[-2:] = torch.randn(2, d, generator=g, dtype=torch.float64)
    features = _unit_rows(feats)
    return (
        features.float().contiguous(),
        text_weights.float().contiguous(),
        image_keys.float().contiguous(),
        labels.long(),
        caption_keys.float().contiguous(),
    )


def make_cache(tw, keys, labels, caps, temperature=0.5):
    return CacheTensors.build(tw, keys, labels, caps, temperature=temperature)


PARAMS = [
    BlendParams(alpha=1.0, beta=1.0, gamma=0.0, delta=0.0),
    BlendParams(alpha=1.0, beta=5.5, gamma=1.0, delta=0.3),
    BlendParams(alpha=20.0, beta=20.0, gamma=0.5, delta=0.5),
    BlendParams(alpha=50.0, beta=50.0, gamma=2.0, delta=0.7),
    BlendParams(alpha=3.0, beta=8.0, gamma=1.5, delta=1.0),
    BlendParams(alpha=0.0, beta=1.0, gamma=3.0, delta=0.25),
]


def _has_cache_term(method, params):
    if method == "zeroshot":
        return False
    if method == "tip":
        return params.alpha != 0
    return params.alpha != 0 or params.gamma != 0


def _maxdiff(got, ref):
    return float(np.max(np.abs(got.detach().cpu().double().numpy() - ref)))


# --------------------------------------------------------------------------------------
# 1. blend vs reference, every method
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 0.2])
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"a{p.alpha}-b{p.beta}-g{p.gamma}-d{p.delta}")
@pytest.mark.parametrize("method", METHODS)
def test_blend_matches_reference(method, params, temperature):
    feats, tw, keys, labels, caps = make_data(seed=11)
    cache = make_cache(tw, keys, labels, caps, temperature)
    got = blend(feats, cache, params, method)
    assert got.shape == (Q, C)
    ref = ref_logits(feats, tw, keys, labels, caps, params, method, temperature)
    assert _maxdiff(got, ref) <= TOL


@pytest.mark.parametrize("method", METHODS)
def test_methods_really_differ(method):
    """Guard: the parameter settings above exercise every term (the test can fail)."""
    feats, tw, keys, labels, caps = make_data(seed=11)
    p = BlendParams(alpha=3.0, beta=8.0, gamma=1.5, delta=0.6)
    refs = {m: ref_logits(feats, tw, keys, labels, caps, p, m) for m in METHODS}
    for other in METHODS:
        if other != method:
            assert np.max(np.abs(refs[method] - refs[other])) > 1e-2


# --------------------------------------------------------------------------------------
# 2. exclude mask (leave-one-out)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", PARAMS[1:], ids=lambda p: f"a{p.alpha}-b{p.beta}-g{p.gamma}-d{p.delta}")
@pytest.mark.parametrize("method", METHODS)
def test_exclude_leave_one_out(method, params):
    _, tw, keys, labels, caps = make_data(seed=23)
    cache = make_cache(tw, keys, labels, caps)
    # Queries are support keys themselves; each excludes its own item (and query 0 also
    # excludes a couple of neighbours, so more than one item per row can be dropped).
    ids = [0, 5, 9, 17, 22, 31, 39]
    feats = keys[ids].clone()
    exclude = torch.zeros(len(ids), N, dtype=torch.bool)
    for row, j in enumerate(ids):
        exclude[row, j] = True
    exclude[0, 1] = True
    exclude[0, 2] = True
    active = [[j for j in range(N) if not exclude[r, j]] for r in range(len(ids))]

    got = blend(feats, cache, params, method, exclude=exclude)
    ref = ref_logits(feats, tw, keys, labels, caps, params, method, active=active)
    assert _maxdiff(got, ref) <= TOL

    if _has_cache_term(method, params):
        # The exclusion must matter (otherwise this test could not fail).
        ref_all = ref_logits(feats, tw, keys, labels, caps, params, method)
        assert np.max(np.abs(ref_all - ref)) > 1e-2


@pytest.mark.parametrize("method", ["tipx", "caps"])
def test_exclude_removes_item_from_kl_range(method):
    """With alpha = 0 only the KL term remains; the self item (KL = 0, the row's KL min and
    A = 1, the row's affinity max) must drop out of both min/max ranges when excluded."""
    _, tw, keys, labels, caps = make_data(seed=5)
    cache = make_cache(tw, keys, labels, caps)
    params = BlendParams(alpha=0.0, beta=1.0, gamma=1.0, delta=0.4)
    feats = keys[:6].clone()
    exclude = torch.zeros(6, N, dtype=torch.bool)
    exclude[torch.arange(6), torch.arange(6)] = True
    active = [[j for j in range(N) if j != r] for r in range(6)]
    got = blend(feats, cache, params, method, exclude=exclude)
    ref = ref_logits(feats, tw, keys, labels, caps, params, method, active=active)
    assert _maxdiff(got, ref) <= TOL


# --------------------------------------------------------------------------------------
# 3. blend_candidates
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"a{p.alpha}-b{p.beta}-g{p.gamma}-d{p.delta}")
@pytest.mark.parametrize("method", METHODS)
def test_candidates_all_ids_equal_blend(method, params):
    feats, tw, keys, labels, caps = make_data(seed=31)
    cache = make_cache(tw, keys, labels, caps)
    rng = random.Random(7)
    rows = []
    for _ in range(Q):
        ids = list(range(N))
        rng.shuffle(ids)
        ids += [-1] * 3 + [rng.randrange(N) for _ in range(4)]
        rng.shuffle(ids)
        rows.append(ids)
    cand = torch.tensor(rows, dtype=torch.long)
    got = blend_candidates(feats, cache, params, method, cand)
    full = blend(feats, cache, params, method)
    assert float((got - full).abs().max()) <= TOL
    ref = ref_logits(feats, tw, keys, labels, caps, params, method, class_sizes="cache")
    assert _maxdiff(got, ref) <= TOL


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"a{p.alpha}-b{p.beta}-g{p.gamma}-d{p.delta}")
@pytest.mark.parametrize("method", METHODS)
def test_candidates_subset_matches_reference(method, params):
    feats, tw, keys, labels, caps = make_data(seed=37)
    cache = make_cache(tw, keys, labels, caps)
    rng = random.Random(3)
    m = 12
    rows, active = [], []
    for i in range(Q):
        k = rng.randrange(4, 10)  # at least 4 distinct ids per query, different per query
        # queries 0..2 lie close to support keys 0..2: leave their nearest key out
        pool = [j for j in range(N) if j != i] if i < 3 else list(range(N))
        ids = rng.sample(pool, k)
        active.append(ids)
        row = ids + [rng.choice(ids)] * 2  # duplicates
        row += [-1] * (m - len(row))
        rng.shuffle(row)
        rows.append(row)
    cand = torch.tensor(rows, dtype=torch.long)
    got = blend_candidates(feats, cache, params, method, cand)
    ref = ref_logits(feats, tw, keys, labels, caps, params, method, active=active, class_sizes="cache",
                     unretrieved=True)
    assert _maxdiff(got, ref) <= TOL
    if _has_cache_term(method, params):
        ref_all = ref_logits(feats, tw, keys, labels, caps, params, method)
        assert np.max(np.abs(ref_all - ref)) > 1e-3
        # The estimate for the unretrieved items matters where the kernel is wide (at β = 20 it is ~1e-5).
        ref_bare = ref_logits(feats, tw, keys, labels, caps, params, method, active=active, class_sizes="cache")
        assert params.alpha == 0 or params.beta > 10 or np.max(np.abs(ref_bare - ref)) > 1e-3
    # Leaving items out removes them from candidates, estimate and class sizes alike.
    gone = [[(i * 5 + t) % N for t in range(3)] for i in range(Q)]
    got = blend_candidates(feats, cache, params, method, cand, left_out=torch.tensor(gone))
    ref = ref_logits(feats, tw, keys, labels, caps, params, method, active=active, class_sizes="cache",
                     unretrieved=True, left_out=gone)
    assert _maxdiff(got, ref) <= TOL


@pytest.mark.parametrize("method", METHODS)
def test_candidates_none_valid_give_finite_logits(method):
    """No candidate left (all -1 or left out): the KL term has no range to rescale by and adds 0."""
    feats, tw, keys, labels, caps = make_data(seed=47)
    cache = make_cache(tw, keys, labels, caps)
    params = BlendParams(alpha=4.0, beta=10.0, gamma=1.5, delta=0.4)
    got = blend_candidates(feats, cache, params, method, torch.full((Q, 5), -1))
    assert torch.isfinite(got).all()
    no_kl = blend_candidates(feats, cache, BlendParams(alpha=4.0, beta=10.0, delta=0.4), method,
                             torch.full((Q, 5), -1))
    assert float((got - no_kl).abs().max()) <= TOL


@pytest.mark.parametrize("method", METHODS)
def test_candidates_of_all_other_items_with_self_left_out_equal_leave_one_out(method):
    feats, tw, keys, labels, caps = make_data(seed=43)
    cache = make_cache(tw, keys, labels, caps)
    params = BlendParams(alpha=4.0, beta=10.0, gamma=1.5, delta=0.4)
    own = torch.arange(Q)
    exclude = torch.zeros(Q, N, dtype=torch.bool)
    exclude[own, own] = True
    every = torch.arange(N).repeat(Q, 1)
    got = blend_candidates(feats, cache, params, method, every, left_out=own.view(-1, 1))
    assert float((got - blend(feats, cache, params, method, exclude)).abs().max()) <= TOL


# --------------------------------------------------------------------------------------
# 4. batch independence
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_batch_independence(method):
    feats, tw, keys, labels, caps = make_data(seed=41)
    cache = make_cache(tw, keys, labels, caps)
    params = BlendParams(alpha=4.0, beta=10.0, gamma=1.5, delta=0.4)
    g = torch.Generator().manual_seed(99)
    query = feats[3:4].clone()
    alone = blend(query, cache, params, method)

    batch_a = _unit_rows(torch.randn(64, D, generator=g))
    batch_a[17] = query[0]
    batch_b = _unit_rows(keys[torch.randint(0, N, (64,), generator=g)] + 0.05 * torch.randn(64, D, generator=g))
    batch_b[50] = query[0]

    in_a = blend(batch_a, cache, params, method)[17:18]
    in_b = blend(batch_b, cache, params, method)[50:51]
    assert torch.allclose(alone, in_a, atol=1e-5, rtol=0)
    assert torch.allclose(alone, in_b, atol=1e-5, rtol=0)
    ref = ref_logits(query, tw, keys, labels, caps, params, method)
    assert _maxdiff(alone, ref) <= TOL


# --------------------------------------------------------------------------------------
# 5. signatures over classes; KL of identical signatures is 0
# --------------------------------------------------------------------------------------


def test_reference_kl_zero_for_identical_key():
    _, tw, keys, _, _ = make_data(seed=53)
    kl = ref_kl_row(keys[7], tw, keys)
    assert abs(kl[7]) < 1e-12
    assert all(v > 1e-6 for j, v in enumerate(kl) if j != 7)


@pytest.mark.parametrize("method", ["tipx", "caps"])
def test_support_key_as_query_kl_term(method):
    """Query = support key j (alone in its class). Its KL is 0, the row minimum, so its
    rescaled KL is min_j A_j and the KL term of j's class is -gamma * min A (times n_bar / 1,
    the class balance of a one-item class). With delta = 0
    its affinity (1.0) is the row maximum."""
    _, tw, keys, labels, caps = make_data(seed=59)
    j = 4
    labels = labels.clone()
    # make j the only member of its class
    own = int(labels[j])
    labels[(labels == own) & (torch.arange(N) != j)] = (own + 1) % C
    assert int((labels == own).sum()) == 1
    cache = make_cache(tw, keys, labels, caps)
    delta = 0.0 if method == "tipx" else 0.5
    params = BlendParams(alpha=0.0, beta=1.0, gamma=2.0, delta=delta)
    feats = keys[j : j + 1].clone()

    kl = ref_kl_row(feats[0], tw, keys)
    assert abs(kl[j]) < 1e-9 and min(kl) == kl[j]
    aff = [
        (1 - delta) * _dot(feats[0].double(), keys[i].double()) + delta * _dot(feats[0].double(), caps[i].double())
        for i in range(N)
    ]
    if method == "tipx":
        assert max(aff) == pytest.approx(1.0, abs=1e-6)

    got = blend(feats, cache, params, method) - blend(feats, cache, params, "zeroshot")
    mean_size = N / len(set(labels.tolist()))
    assert float(got[0, own]) == pytest.approx(-2.0 * min(aff) * mean_size, abs=TOL)
    ref = ref_logits(feats, tw, keys, labels, caps, params, method)
    assert _maxdiff(blend(feats, cache, params, method), ref) <= TOL


@pytest.mark.parametrize("method", ["tipx", "caps"])
def test_signature_is_over_classes_not_features(method):
    """A support key k that differs from the query f only outside the span of W_t's columns
    has x W_t identical to f's, so KL(f, k) = 0 over the classes (but not over the D feature
    dimensions). It is then the row's KL minimum and its rescaled KL is min A (times n_bar,
    the balance of its one-item class)."""
    g = torch.Generator().manual_seed(61)
    feats_, tw, keys, labels, caps = make_data(seed=61)
    w = tw.double()
    basis, _ = torch.linalg.qr(w)  # D x C orthonormal basis of span(W_t)
    p = basis @ torch.randn(C, generator=g, dtype=torch.float64)
    p = 0.7 * p / p.norm()
    u = torch.randn(D, generator=g, dtype=torch.float64)
    u = u - basis @ (basis.T @ u)
    u = u / u.norm() * math.sqrt(1 - 0.7**2)
    f = (p + u).float()
    k = (p - u).float()
    j = 9
    keys = keys.clone()
    keys[j] = k
    own = int(labels[j])
    labels = labels.clone()
    labels[(labels == own) & (torch.arange(N) != j)] = (own + 1) % C
    cache = make_cache(tw, keys, labels, caps)
    delta = 0.0 if method == "tipx" else 0.3
    params = BlendParams(alpha=0.0, beta=1.0, gamma=1.0, delta=delta)
    feats = f[None]

    kl = ref_kl_row(f, tw, keys)
    assert abs(kl[j]) < 1e-9
    # over the D feature dims the two distributions differ (the reference-code defect)
    sf = torch.softmax(f.double() / 0.5, 0)
    sk = torch.softmax(k.double() / 0.5, 0)
    assert float((sf * (sf.log() - sk.log())).sum()) > 1e-3

    aff = [
        (1 - delta) * _dot(f.double(), keys[i].double()) + delta * _dot(f.double(), caps[i].double())
        for i in range(N)
    ]
    got = blend(feats, cache, params, method) - blend(feats, cache, params, "zeroshot")
    mean_size = N / len(set(labels.tolist()))
    assert float(got[0, own]) == pytest.approx(-min(aff) * mean_size, abs=TOL)
    ref = ref_logits(feats, tw, keys, labels, caps, params, method)
    assert _maxdiff(blend(feats, cache, params, method), ref) <= TOL


def test_signature_depends_on_class_count():
    """Dropping one class column of W_t changes s(x) and so the KL term (beyond just removing
    a logit column) in the way the reference predicts."""
    feats, tw, keys, labels, caps = make_data(seed=67)
    keep = labels != C - 1
    tw6, keys6, labels6, caps6 = tw[:, : C - 1].contiguous(), keys[keep], labels[keep], caps[keep]
    params = BlendParams(alpha=1.0, beta=5.0, gamma=2.0, delta=0.5)
    for method in ("tipx", "caps"):
        cache6 = make_cache(tw6, keys6, labels6, caps6)
        got6 = blend(feats, cache6, params, method)
        ref6 = ref_logits(feats, tw6, keys6, labels6, caps6, params, method)
        assert got6.shape == (Q, C - 1)
        assert _maxdiff(got6, ref6) <= TOL


# --------------------------------------------------------------------------------------
# 6. class balance: plain sums on request, equal classes unchanged
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_unbalanced_cache_is_plain_sums(method):
    feats, tw, keys, labels, caps = make_data(seed=71)  # 40 items over 7 classes: sizes 5 and 6
    cache = CacheTensors.build(tw, keys, labels, caps, balanced=False)
    params = BlendParams(alpha=3.0, beta=8.0, gamma=1.5, delta=0.6)
    ref = ref_logits(feats, tw, keys, labels, caps, params, method, balanced=False)
    assert _maxdiff(blend(feats, cache, params, method), ref) <= TOL
    if method != "zeroshot":  # the sizes differ, so balancing must change the logits
        assert _maxdiff(blend(feats, make_cache(tw, keys, labels, caps), params, method), ref) > 1e-2


@pytest.mark.parametrize("method", ["tip", "tipx", "caps"])
def test_equal_class_sizes_keep_plain_sums_and_balanced_loo_scales_them_uniformly(method):
    """n̄ / n_c is 1 for equal classes; balanced leave-one-out leaves n − 1 items in every class,
    so the cache terms are the plain sums times n / (n − 1) for every class: the same argmax."""
    feats, tw, keys, _, caps = make_data(seed=73)
    labels = torch.arange(N) % 8  # 5 items in each of 8 classes
    tw8 = torch.cat([tw, tw[:, :1]], dim=1)
    params = BlendParams(alpha=3.0, beta=8.0, gamma=1.5, delta=0.6)
    balanced, plain = make_cache(tw8, keys, labels, caps), CacheTensors.build(tw8, keys, labels, caps, balanced=False)
    assert torch.equal(blend(feats, balanced, params, method), blend(feats, plain, params, method))

    exclude = torch.zeros(8, N, dtype=torch.bool)
    for row in range(8):
        exclude[row, [8 * (row % 5) + c for c in range(8)]] = True  # one item of every class
    zs = blend(feats[:8], plain, params, "zeroshot")
    got = blend(feats[:8], balanced, params, method, exclude) - zs
    want = blend(feats[:8], plain, params, method, exclude) - zs
    assert torch.allclose(got, want * 5 / 4, atol=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1))


# --------------------------------------------------------------------------------------
# 7. KL precision and batch independence at CLIP's scale (C = 100, near-flat signatures)
# --------------------------------------------------------------------------------------


def test_kl_matches_float64_elementwise_at_clip_scale():
    """All affinities positive and signatures near-flat, as with CLIP: KL ~1e-3 is a small
    difference of terms ~log C. The KL term at γ = 5 must match float64 to 1e-4 in float32."""
    d = clip_like(100, 4, seed=3, test_per_class=1)
    feats = d.test_features[:8]
    assert float((d.keys @ d.keys.T).min()) > 0.3
    cache = make_cache(d.text_weights, d.keys, d.labels, None)
    w = d.text_weights.double().numpy()
    key_sigs = [ref_signature(k, w, 0.5) for k in d.keys.double().numpy()]
    kl = kl_divergence(feats, cache).tolist()
    for row, f in enumerate(feats.double().numpy()):
        sf = ref_signature(f, w, 0.5)
        ref = [ref_kl(sf, sk) for sk in key_sigs]
        assert max(abs(a - b) for a, b in zip(kl[row], ref)) <= 1e-6
    params = BlendParams(alpha=0.0, beta=1.0, gamma=5.0)
    ref = ref_logits(feats, d.text_weights, d.keys, d.labels, None, params, "tipx")
    assert _maxdiff(blend(feats, cache, params, "tipx"), ref) <= TOL


@pytest.mark.parametrize("method", ["tipx", "caps"])
def test_alone_equals_batch_of_64_at_clip_scale(method):
    d = clip_like(100, 16, seed=5, test_per_class=1)
    g = torch.Generator().manual_seed(6)
    caps = _unit_rows(d.keys + 0.1 * torch.randn(d.keys.shape, generator=g))
    cache = make_cache(d.text_weights, d.keys, d.labels, caps)
    params = BlendParams(alpha=1.0, beta=5.5, gamma=5.0, delta=0.3)
    batch = d.test_features[:64]
    together = blend(batch, cache, params, method)
    for row in (0, 17, 63):
        alone = blend(batch[row : row + 1], cache, params, method)
        assert torch.allclose(alone, together[row : row + 1], rtol=1e-5, atol=0)
