"""The blend engine: zero-shot, Tip-Adapter, Tip-X and CapS logits on torch tensors.

One implementation, used by the tuner, the evaluator and the server. Every function works
row by row on the query axis, so a query's logits never depend on the other queries in its
batch (docs/methods.md, defect 3). Formulas are in ../docs/methods.md.

`exclude` (bool, queries x items) drops support items from a query's sums; the tuner uses
it for leave-one-out, where query i must not see support item i.

Class balance: both cache terms are sums over items, so by default each class's sum is
scaled by n̄ / n_c (n̄ the mean size of the non-empty classes, n_c the class's items that
take part): a per-class mean, times a constant. Equal class sizes give exactly the old sums.
The FAISS top-k blend (blend_candidates) keeps every item in those sums: candidates exactly,
the rest through per-class key sums.

Key precision: the N x D key matrices may be float16 (a GPU server's default: half their memory).
Only the dot products with them run in that dtype (key_products); everything after them (exp,
logsumexp, KL, rescaling, the class sums) and every other tensor stays float32.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

# CACHE_METHODS is re-exported for the tuner, which imports it from here.
from kvclip.vocabulary import CACHE_METHODS as CACHE_METHODS
from kvclip.vocabulary import METHODS

ZEROSHOT_SCALE = 100.0
DEFAULT_TEMPERATURE = 0.5
KEY_DTYPES = (torch.float32, torch.float16)  # CacheTensors' image and caption keys


@dataclass(frozen=True)
class BlendParams:
    """Hyper-parameters of the blend; each method reads the ones it uses."""

    alpha: float = 1.0  # weight of the cache term against zero-shot CLIP
    beta: float = 1.0  # sharpness of the affinities
    gamma: float = 0.0  # weight of the KL (signature) term, Tip-X and CapS
    delta: float = 0.0  # share of caption keys in the affinity, CapS only

    def for_method(self, method: str) -> BlendParams:
        """The parameters that `method` actually uses, the others zeroed."""
        check_method(method)
        if method == "zeroshot":
            return BlendParams(alpha=0.0, beta=self.beta, gamma=0.0, delta=0.0)
        if method == "tip":
            return replace(self, gamma=0.0, delta=0.0)
        if method == "tipx":
            return replace(self, delta=0.0)
        return self

    def as_dict(self) -> dict[str, float]:
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "delta": self.delta}


@dataclass
class CacheTensors:
    """What the blend needs from a cache, resident on one device: float32, but for the keys, which
    are in `key_dtype` (float32 or float16; the module docstring)."""

    text_weights: torch.Tensor  # D x C, columns L2-normalised
    image_keys: torch.Tensor  # N x D, rows L2-normalised, key_dtype
    caption_keys: torch.Tensor | None  # N x D, rows L2-normalised, key_dtype, or None without captions
    label_ids: torch.Tensor  # N int64: each item's class (sums per class are index_add_, O(N), not N x C)
    key_log_partitions: torch.Tensor  # N, log-mean-exp of each key's centred logits (see kl_divergence)
    class_counts: torch.Tensor  # C, support items per class (float32)
    # C x D: Σ_{j∈c} k_j per class, image and caption keys: f · it is a class's summed affinity,
    # which the candidate blend needs for the items it did not retrieve (blend_candidates).
    class_image_sums: torch.Tensor
    class_caption_sums: torch.Tensor | None
    class_log_partition_sums: torch.Tensor  # C: Σ_{j∈c} key_log_partitions_j, for the same reason
    temperature: float = DEFAULT_TEMPERATURE
    balanced: bool = True  # per-class mean of the cache terms (module docstring); False: plain sums

    @classmethod
    def build(
        cls,
        text_weights: torch.Tensor,
        image_keys: torch.Tensor,
        label_ids: torch.Tensor,
        caption_keys: torch.Tensor | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        device: torch.device | str | None = None,
        balanced: bool = True,
        derived: Mapping[str, torch.Tensor] | None = None,
        key_dtype: torch.dtype = torch.float32,
    ) -> CacheTensors:
        """`derived`: DERIVED_ARRAYS already computed (by `derived_arrays`, at this temperature:
        the caller checks that), taken as they are instead of computed again; a cache's artifact
        stores them (kvclip/artifact.py) because computing them is most of a server's load.

        `key_dtype`: the keys' dtype on `device`. The derived terms always come from the float32
        keys, before the cast, so a float16 cache's terms equal a float32 one's."""
        if key_dtype not in KEY_DTYPES:
            raise ValueError(f"key_dtype must be one of {', '.join(map(str, KEY_DTYPES))}, not {key_dtype}")
        # The keys go to the device in float32 only to derive the terms there; with the terms given
        # they stay where they are until the cast below, whose blocking copy converts on the host:
        # a GPU never holds a float32 copy of float16 keys.
        keys_at = device if derived is None else None
        text_weights = torch.as_tensor(text_weights, dtype=torch.float32, device=device)
        image_keys = torch.as_tensor(image_keys, dtype=torch.float32, device=keys_at)
        if caption_keys is not None:
            caption_keys = torch.as_tensor(caption_keys, dtype=torch.float32, device=keys_at)
            if caption_keys.shape != image_keys.shape:
                raise ValueError(
                    f"caption keys {tuple(caption_keys.shape)} do not match image keys "
                    f"{tuple(image_keys.shape)}"
                )
        label_ids = torch.as_tensor(label_ids, dtype=torch.long, device=device)
        num_classes = text_weights.shape[1]
        if image_keys.shape[1] != text_weights.shape[0]:
            raise ValueError(
                f"image keys have dimension {image_keys.shape[1]}, text weights {text_weights.shape[0]}"
            )
        if label_ids.numel() and (label_ids.min() < 0 or label_ids.max() >= num_classes):
            raise ValueError(f"label ids must lie in [0, {num_classes})")
        if derived is None:
            derived = derived_arrays(text_weights, image_keys, label_ids, caption_keys, temperature)
        else:
            derived = _checked_derived(derived, image_keys.shape[0], num_classes, image_keys.shape[1],
                                       caption_keys is not None, device)
        target = text_weights.device  # `device`, or where the text weights were
        return cls(
            text_weights=text_weights,
            image_keys=image_keys.to(device=target, dtype=key_dtype),  # no copy when both already match
            caption_keys=None if caption_keys is None else caption_keys.to(device=target, dtype=key_dtype),
            label_ids=label_ids,
            key_log_partitions=derived["key_log_partitions"],
            class_counts=torch.bincount(label_ids, minlength=num_classes).to(torch.float32),
            class_image_sums=derived["class_image_sums"],
            class_caption_sums=derived.get("class_caption_sums"),
            class_log_partition_sums=derived["class_log_partition_sums"],
            temperature=temperature,
            balanced=balanced,
        )

    @property
    def num_items(self) -> int:
        return self.image_keys.shape[0]

    @property
    def num_classes(self) -> int:
        return self.text_weights.shape[1]

    @property
    def device(self) -> torch.device:
        return self.text_weights.device

    @property
    def key_dtype(self) -> torch.dtype:
        return self.image_keys.dtype

    def to(self, device: torch.device | str) -> CacheTensors:
        return replace(
            self,
            text_weights=self.text_weights.to(device),
            image_keys=self.image_keys.to(device),
            caption_keys=None if self.caption_keys is None else self.caption_keys.to(device),
            label_ids=self.label_ids.to(device),
            key_log_partitions=self.key_log_partitions.to(device),
            class_counts=self.class_counts.to(device),
            class_image_sums=self.class_image_sums.to(device),
            class_caption_sums=None if self.class_caption_sums is None else self.class_caption_sums.to(device),
            class_log_partition_sums=self.class_log_partition_sums.to(device),
        )


DERIVED_ARRAYS = ("key_log_partitions", "class_image_sums", "class_caption_sums", "class_log_partition_sums")


def derived_arrays(
    text_weights: torch.Tensor,
    image_keys: torch.Tensor,
    label_ids: torch.Tensor,
    caption_keys: torch.Tensor | None,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """CacheTensors' terms computed from the keys (float32; no class_caption_sums without
    caption keys). Tensors as CacheTensors.build converts them."""
    num_classes = text_weights.shape[1]
    log_partitions = key_log_partitions(image_keys, text_weights, temperature)
    derived = {
        "key_log_partitions": log_partitions,
        "class_image_sums": class_key_sums(image_keys, label_ids, num_classes),
        "class_log_partition_sums": class_key_sums(log_partitions.view(-1, 1), label_ids, num_classes).view(-1),
    }
    if caption_keys is not None:
        derived["class_caption_sums"] = class_key_sums(caption_keys, label_ids, num_classes)
    return derived


def _checked_derived(
    derived: Mapping[str, torch.Tensor], items: int, classes: int, dim: int, captions: bool,
    device: torch.device | str | None,
) -> dict[str, torch.Tensor]:
    shapes = {"key_log_partitions": (items,), "class_image_sums": (classes, dim),
              "class_log_partition_sums": (classes,)}
    if captions:
        shapes["class_caption_sums"] = (classes, dim)
    checked = {}
    for name, shape in shapes.items():
        if name not in derived:
            raise ValueError(f"precomputed {name} missing")
        tensor = torch.as_tensor(derived[name], dtype=torch.float32, device=device)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"precomputed {name} is {tuple(tensor.shape)}, expected {shape}")
        checked[name] = tensor
    return checked


def class_key_sums(keys: torch.Tensor, label_ids: torch.Tensor, num_classes: int, chunk: int = 8192) -> torch.Tensor:
    """Σ_{j∈c} k_j per class (C x D; keys N x D), accumulated in float64 over chunks, stored as float32."""
    sums = torch.zeros(num_classes, keys.shape[1], dtype=torch.float64, device=keys.device)
    for start in range(0, keys.shape[0], chunk):
        sums.index_add_(0, label_ids[start:start + chunk], keys[start:start + chunk].double())
    return sums.to(torch.float32)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def zeroshot_logits(features: torch.Tensor, text_weights: torch.Tensor) -> torch.Tensor:
    """100 · f W_t."""
    return ZEROSHOT_SCALE * features @ text_weights


def key_products(queries: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """queries (Q x D, float32) times the keys, as float32: every key (Q x N), or each query's
    own keys[ids] (ids Q x M).

    With float16 keys the product runs in float16, each query row first scaled to a largest
    entry of 1 (per row, so no query depends on another) and scaled back after: the KL term's
    rows (p W_tᵀ / T, entries ~1e-4 at T = 0.5, ~1e-6 for flatter signatures) would otherwise
    fall among float16's subnormals, which keep fewer digits. What is lost is the rounding of
    the dot products: both sides are unit vectors (|cos| ≤ 1) and float16 keeps ~3 decimal
    digits (unit roundoff 4.9e-4), so an affinity is off by ≲ 5e-4, about a half-unit of
    float16 near 1: fine for ranking (measured: tests/unit/test_blend_fp16.py).
    """
    scale = None
    if keys.dtype != torch.float32:
        queries = queries.to(torch.float32)
        scale = queries.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        queries = (queries / scale).to(keys.dtype)
    product = queries @ keys.T if ids is None else torch.einsum("qd,qmd->qm", queries, keys[ids])
    return product if scale is None else product.to(torch.float32) * scale


def affinities(features: torch.Tensor, cache: CacheTensors, delta: float = 0.0) -> torch.Tensor:
    """(1 − δ) f K_imgᵀ + δ f K_capᵀ, queries x items (float32, whatever the keys' dtype)."""
    image_part = key_products(features, cache.image_keys)
    if delta == 0.0:
        return image_part
    if cache.caption_keys is None:
        raise ValueError("delta > 0 needs caption keys, and this cache has none")
    return (1.0 - delta) * image_part + delta * key_products(features, cache.caption_keys)


def class_sums(weights: torch.Tensor, label_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """W L for the one-hot label matrix L, queries x classes, without building L: each item's
    weight is added to its class (O(queries × N) work and no N x C matrix in memory).

    `label_ids` is N (every query sees the same items) or queries x M (each query its own)."""
    out = weights.new_zeros(weights.shape[0], num_classes)
    if label_ids.dim() == 1:
        return out.index_add_(1, label_ids, weights)
    return out.scatter_add_(1, label_ids, weights)


def cache_logits(
    affinity: torch.Tensor,
    label_ids: torch.Tensor,
    num_classes: int,
    beta: float,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """exp(−β (1 − A)) L, with excluded items contributing nothing (plain sums; see class_scale)."""
    weights = torch.exp(-beta * (1.0 - affinity))
    if exclude is not None:
        weights = weights.masked_fill(exclude, 0.0)
    return class_sums(weights, label_ids, num_classes)


def class_scale(cache: CacheTensors, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The factor n̄ / n_c that turns each class's sum into its mean times n̄: 1 x C, or
    queries x C when `exclude` removes items (n_c then counts each query's remaining items).

    n̄ = N / (non-empty classes) is fixed by the cache, so equal class sizes give a factor of
    exactly 1, and leave-one-out (n_c − 1 items) scores a mean on the same scale as serving.
    A class with no items left gets 0, as its empty sum does. All ones when not balanced.
    """
    if exclude is None:
        return scale_for_counts(cache, cache.class_counts.view(1, -1))
    return scale_for_counts(cache, class_sums((~exclude).to(torch.float32), cache.label_ids, cache.num_classes))


def scale_for_counts(cache: CacheTensors, counts: torch.Tensor) -> torch.Tensor:
    """n̄ / n_c for the items per class that take part (`counts`, 1 x C or queries x C); 0 for a
    class with none; all ones when the cache is not balanced (see class_scale)."""
    if not cache.balanced:
        return torch.ones(1, cache.num_classes, device=cache.device)
    mean_size = cache.num_items / max(1, int((cache.class_counts > 0).sum()))
    return torch.where(counts > 0, mean_size / counts.clamp_min(1.0), 0.0)


def centred_log_partition(logits: torch.Tensor) -> torch.Tensor:
    """log mean_c exp(z_c − z̄) per row, z̄ the row mean: logsumexp(z) − z̄ − log C, without
    the cancellation of those three terms (each ≈ log C for CLIP's near-flat signatures)."""
    z = logits - logits.mean(dim=-1, keepdim=True)
    small = torch.log1p(torch.expm1(z).mean(dim=-1))  # accurate while z is small, as it is for CLIP
    top = z.amax(dim=-1)
    shifted = top + torch.log(torch.exp(z - top.unsqueeze(-1)).mean(dim=-1))  # never overflows
    return torch.where(top < 20.0, small, shifted)


def key_log_partitions(
    image_keys: torch.Tensor, text_weights: torch.Tensor, temperature: float, chunk: int = 8192
) -> torch.Tensor:
    """centred_log_partition(K_img W_t / T), from float64 logits, stored as float32.

    Once per cache. The float32 logits' rounding (~3e-7) would enter every KL directly: the
    item term's matmul (kl_divergence) does not round the same way, so nothing cancels it,
    and the per-row rescaling magnifies it by range(A) / range(KL), often ~100.
    """
    weights = text_weights.double()
    parts = [centred_log_partition(rows.double() @ weights / temperature) for rows in image_keys.split(chunk)]
    return torch.cat(parts).to(torch.float32) if parts else image_keys.new_zeros(0)


def kl_divergence(
    features: torch.Tensor, cache: CacheTensors, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(s(f) ‖ s(k_j)), queries x items: against every support item, or against each
    query's own candidate items `ids` (queries x M).

    With u = f W_t / T and v_j = k_j W_t / T centred per row (ũ, ṽ_j) and lme the centred
    log partition, KL_j = [s(f)·ũ − lme(ũ)] − [s(f)·ṽ_j − lme(ṽ_j)]: the log C inside both
    log-partitions cancels analytically instead of in float32. s(f)·ṽ_j = p·v_j with
    p = s(f) − 1/C (computed as expm1(ũ − lme(ũ)) / C), so the item term is one matmul,
    (p W_tᵀ / T) k_jᵀ, and lme(ṽ_j) is precomputed per key. O(queries × N) memory.
    """
    own, direction = _query_kl_terms(features, cache)
    if ids is None:
        cross = key_products(direction, cache.image_keys) - cache.key_log_partitions
    else:
        cross = key_products(direction, cache.image_keys, ids) - cache.key_log_partitions[ids]
    return own - cross


def _query_kl_terms(features: torch.Tensor, cache: CacheTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """The query's parts of kl_divergence: s(f)·ũ − lme(ũ) (queries x 1) and p W_tᵀ / T (queries x D),
    so that KL_j = own − (direction · k_j − lme(ṽ_j)): linear in the key k_j."""
    logits = features @ cache.text_weights / cache.temperature
    centred = logits - logits.mean(dim=-1, keepdim=True)
    log_partition = centred_log_partition(logits).unsqueeze(-1)
    excess = torch.expm1(centred - log_partition) / cache.num_classes  # s(f) − 1/C
    own = (excess * centred).sum(dim=-1, keepdim=True) - log_partition
    return own, excess @ cache.text_weights.T / cache.temperature


def row_range(x: torch.Tensor, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's min and max (queries x 1 each) over the entries not excluded."""
    if exclude is None:
        return x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    inf = torch.finfo(x.dtype).max
    return x.masked_fill(exclude, inf).amin(dim=-1, keepdim=True), x.masked_fill(exclude, -inf).amax(dim=-1, keepdim=True)


def rescale_rows(
    x: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Map each row of x linearly onto the [min, max] range of the same row of target.

    Per row, so one query's result never depends on another's; excluded entries take no
    part in either range.
    """
    (x_min, x_max), (t_min, t_max) = row_range(x, exclude), row_range(target, exclude)
    span = (x_max - x_min).clamp_min(1e-12)
    return (x - x_min) / span * (t_max - t_min) + t_min


def kl_logits(
    features: torch.Tensor,
    cache: CacheTensors,
    affinity: torch.Tensor,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """(−rescaled KL) L: the Tip-X signature term before its weight γ (plain sums; see class_scale)."""
    kl = kl_divergence(features, cache)
    weights = -rescale_rows(kl, affinity, exclude)
    if exclude is not None:
        weights = weights.masked_fill(exclude, 0.0)
    return class_sums(weights, cache.label_ids, cache.num_classes)


def blend(
    features: torch.Tensor,
    cache: CacheTensors,
    params: BlendParams,
    method: str,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (queries x classes) of `method` for L2-normalised query features."""
    check_method(method)
    features = features.to(device=cache.device, dtype=torch.float32)
    logits = zeroshot_logits(features, cache.text_weights)
    if method == "zeroshot" or cache.num_items == 0:  # no support items: every cache sum is empty
        return logits
    p = params.for_method(method)
    affinity = affinities(features, cache, p.delta)
    scale = class_scale(cache, exclude)
    if p.alpha != 0.0:
        logits = logits + p.alpha * scale * cache_logits(affinity, cache.label_ids, cache.num_classes, p.beta,
                                                         exclude)
    if p.gamma != 0.0:
        logits = logits + p.gamma * scale * kl_logits(features, cache, affinity, exclude)
    return logits


def blend_candidates(
    features: torch.Tensor,
    cache: CacheTensors,
    params: BlendParams,
    method: str,
    candidates: torch.Tensor,
    left_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits where each query's candidate items (queries x M ids) enter the cache sums exactly
    and its other items through their class's key sums.

    The top-k approximation for caches too large for a dense pass: candidates come from a
    FAISS search (kvclip.index). Ids of -1 and repeated ids are ignored. Per class, the Tip term
    is the candidates' exact weights plus, for the class's items not retrieved, their number
    times the weight at their mean affinity; that mean is exact, since affinities are linear in
    the keys (f · Σ_{j∈c} k_j less the candidates'). The KL term is linear in each KL_j, and KL_j
    in the key, so its class sums are exact for every item, given the rescaling range, which
    only the candidates set. Without these estimates a class keeps only its retrieved part, at
    small β a smaller share of a big class than of a small one, and class balance (n̄ / n_c)
    would favour the small classes (docs/methods.md, "Exactness and FAISS").

    `left_out` (queries x E distinct ids, -1 padding) removes items from the whole sum, as
    `blend`'s `exclude` does (leave-one-out); the class sizes then count the rest.
    With every item a candidate this equals `blend`.
    """
    check_method(method)
    features = features.to(device=cache.device, dtype=torch.float32)
    logits = zeroshot_logits(features, cache.text_weights)
    if method == "zeroshot":
        return logits
    p = params.for_method(method)
    ids, invalid = _dedupe_candidates(candidates.to(device=cache.device, dtype=torch.long))
    out_ids, out_mask = None, None
    if left_out is not None:
        left_out = left_out.to(device=cache.device, dtype=torch.long)
        out_ids, out_mask = left_out.clamp_min(0), left_out < 0  # out_mask: padding
        invalid = invalid | ((ids.unsqueeze(-1) == left_out.unsqueeze(1)) & ~out_mask.unsqueeze(1)).any(dim=-1)
    affinity = candidate_affinities(features, cache, ids, p.delta)
    labels = cache.label_ids[ids]  # queries x M
    unretrieved = _Unretrieved(features, cache, labels, invalid, out_ids, out_mask)
    scale = scale_for_counts(cache, unretrieved.counts)
    if p.alpha != 0.0:
        weights = torch.exp(-p.beta * (1.0 - affinity)).masked_fill(invalid, 0.0)
        rest_affinity = unretrieved.affinity_sums(p.delta, affinity)
        mean_affinity = (rest_affinity / unretrieved.rest.clamp_min(1.0)).clamp(-1.0, 1.0)
        rest = torch.where(unretrieved.rest > 0, unretrieved.rest * torch.exp(-p.beta * (1.0 - mean_affinity)), 0.0)
        logits = logits + p.alpha * scale * (class_sums(weights, labels, cache.num_classes) + rest)
    if p.gamma != 0.0:
        kl = kl_divergence(features, cache, ids)
        (kl_min, kl_max), (a_min, a_max) = row_range(kl, invalid), row_range(affinity, invalid)
        ratio = (a_max - a_min) / (kl_max - kl_min).clamp_min(1e-12)  # rescale_rows' map: a_min + (kl − kl_min) · ratio
        # A query with no candidate left has no range to rescale by: its KL term is 0, as its empty sum was.
        some = (~invalid).any(dim=-1, keepdim=True)
        kl_min, a_min, ratio = (torch.where(some, x, 0.0) for x in (kl_min, a_min, ratio))
        weights = (-(a_min + (kl - kl_min) * ratio)).masked_fill(invalid, 0.0)
        rest = -(unretrieved.kl_sums(kl) - unretrieved.rest * kl_min) * ratio - unretrieved.rest * a_min
        rest = torch.where(unretrieved.rest > 0, rest, 0.0)
        logits = logits + p.gamma * scale * (class_sums(weights, labels, cache.num_classes) + rest)
    return logits


class _Unretrieved:
    """Per query and class, the items that are neither candidates nor left out: how many, and the
    sums over them of quantities linear in their keys, as a class's total less the candidates'
    and the left-out items' parts (the totals come from the cache's per-class key sums)."""

    def __init__(self, features: torch.Tensor, cache: CacheTensors, labels: torch.Tensor, invalid: torch.Tensor,
                 out_ids: torch.Tensor | None, out_mask: torch.Tensor | None) -> None:
        self.features, self.cache, self.labels, self.invalid = features, cache, labels, invalid
        self.out_ids, self.out_mask = out_ids, out_mask
        self.out_labels = None if out_ids is None else cache.label_ids[out_ids]
        self.counts = cache.class_counts.view(1, -1) - self._out_sums(None)  # items that take part
        self.rest = (self.counts - class_sums((~invalid).to(torch.float32), labels, cache.num_classes)).clamp_min(0.0)

    def _out_sums(self, values: torch.Tensor | None) -> torch.Tensor:
        """Σ over each query's left-out items of `values` (queries x E; None: count them)."""
        if self.out_ids is None or self.out_mask is None or self.out_labels is None:
            return torch.zeros(1, self.cache.num_classes, device=self.cache.device)
        values = torch.ones_like(self.out_mask, dtype=torch.float32) if values is None else values
        return class_sums(values.masked_fill(self.out_mask, 0.0), self.out_labels, self.cache.num_classes)

    def _rest(self, totals: torch.Tensor, candidate_values: torch.Tensor, out_values: torch.Tensor | None) -> torch.Tensor:
        retrieved = class_sums(candidate_values.masked_fill(self.invalid, 0.0), self.labels, self.cache.num_classes)
        return totals - retrieved - (0.0 if out_values is None else self._out_sums(out_values))

    def affinity_sums(self, delta: float, candidate_affinity: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        totals = self.features @ cache.class_image_sums.T
        if delta != 0.0:
            if cache.class_caption_sums is None:
                raise ValueError("delta > 0 needs caption keys, and this cache has none")
            totals = (1.0 - delta) * totals + delta * (self.features @ cache.class_caption_sums.T)
        out = None if self.out_ids is None else candidate_affinities(self.features, cache, self.out_ids, delta)
        return self._rest(totals, candidate_affinity, out)

    def kl_sums(self, candidate_kl: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        own, direction = _query_kl_terms(self.features, cache)
        totals = cache.class_counts.view(1, -1) * own - (direction @ cache.class_image_sums.T
                                                          - cache.class_log_partition_sums.view(1, -1))
        out = None if self.out_ids is None else kl_divergence(self.features, cache, self.out_ids)
        return self._rest(totals, candidate_kl, out)


def candidate_affinities(
    features: torch.Tensor, cache: CacheTensors, ids: torch.Tensor, delta: float = 0.0
) -> torch.Tensor:
    """Affinities (queries x M, float32) of each query with its own candidate items `ids`."""
    affinity = key_products(features, cache.image_keys, ids)
    if delta == 0.0:
        return affinity
    if cache.caption_keys is None:
        raise ValueError("delta > 0 needs caption keys, and this cache has none")
    caption_part = key_products(features, cache.caption_keys, ids)
    return (1.0 - delta) * affinity + delta * caption_part


def _dedupe_candidates(candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted ids with -1 and repeats marked invalid; invalid slots point at item 0."""
    ids, _ = candidates.sort(dim=-1)
    repeated = torch.zeros_like(ids, dtype=torch.bool)
    repeated[:, 1:] = ids[:, 1:] == ids[:, :-1]
    invalid = (ids < 0) | repeated
    return ids.clamp_min(0), invalid
