"""The blend engine: zero-shot, Tip-Adapter, Tip-X and CapS logits on torch tensors.

One implementation, used by the tuner, the evaluator and the server. Every function works
row by row on the query axis, so a query's logits never depend on the other queries in its
batch (docs/methods.md, defect 3). Formulas are in ../docs/methods.md.

`exclude` (bool, queries x items) drops support items from a query's sums; the tuner uses
it for leave-one-out, where query i must not see support item i.

Class balance: both cache terms are sums over items, so by default each class's sum is
scaled by n̄ / n_c (n̄ the mean size of the non-empty classes, n_c the class's items that
take part): a per-class mean, times a constant. Equal class sizes give exactly the old sums.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# CACHE_METHODS is re-exported for the tuner, which imports it from here.
from kvclip.vocabulary import CACHE_METHODS as CACHE_METHODS
from kvclip.vocabulary import METHODS

ZEROSHOT_SCALE = 100.0
DEFAULT_TEMPERATURE = 0.5


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
    """What the blend needs from a cache, resident on one device, float32."""

    text_weights: torch.Tensor  # D x C, columns L2-normalised
    image_keys: torch.Tensor  # N x D, rows L2-normalised
    caption_keys: torch.Tensor | None  # N x D, rows L2-normalised, or None without captions
    label_ids: torch.Tensor  # N int64: each item's class (sums per class are index_add_, O(N), not N x C)
    key_log_partitions: torch.Tensor  # N, log-mean-exp of each key's centred logits (see kl_divergence)
    class_counts: torch.Tensor  # C, support items per class (float32)
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
    ) -> CacheTensors:
        text_weights = torch.as_tensor(text_weights, dtype=torch.float32, device=device)
        image_keys = torch.as_tensor(image_keys, dtype=torch.float32, device=device)
        if caption_keys is not None:
            caption_keys = torch.as_tensor(caption_keys, dtype=torch.float32, device=device)
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
        return cls(
            text_weights=text_weights,
            image_keys=image_keys,
            caption_keys=caption_keys,
            label_ids=label_ids,
            key_log_partitions=key_log_partitions(image_keys, text_weights, temperature),
            class_counts=torch.bincount(label_ids, minlength=num_classes).to(torch.float32),
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

    def to(self, device: torch.device | str) -> CacheTensors:
        return replace(
            self,
            text_weights=self.text_weights.to(device),
            image_keys=self.image_keys.to(device),
            caption_keys=None if self.caption_keys is None else self.caption_keys.to(device),
            label_ids=self.label_ids.to(device),
            key_log_partitions=self.key_log_partitions.to(device),
            class_counts=self.class_counts.to(device),
        )


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def zeroshot_logits(features: torch.Tensor, text_weights: torch.Tensor) -> torch.Tensor:
    """100 · f W_t."""
    return ZEROSHOT_SCALE * features @ text_weights


def affinities(features: torch.Tensor, cache: CacheTensors, delta: float = 0.0) -> torch.Tensor:
    """(1 − δ) f K_imgᵀ + δ f K_capᵀ, queries x items."""
    image_part = features @ cache.image_keys.T
    if delta == 0.0:
        return image_part
    if cache.caption_keys is None:
        raise ValueError("delta > 0 needs caption keys, and this cache has none")
    return (1.0 - delta) * image_part + delta * (features @ cache.caption_keys.T)


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
    if not cache.balanced:
        return torch.ones(1, cache.num_classes, device=cache.device)
    counts = cache.class_counts.view(1, -1)
    mean_size = cache.num_items / max(1, int((counts > 0).sum()))
    if exclude is not None:
        counts = class_sums((~exclude).to(torch.float32), cache.label_ids, cache.num_classes)
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
    logits = features @ cache.text_weights / cache.temperature
    centred = logits - logits.mean(dim=-1, keepdim=True)
    log_partition = centred_log_partition(logits).unsqueeze(-1)
    excess = torch.expm1(centred - log_partition) / cache.num_classes  # s(f) − 1/C
    own = (excess * centred).sum(dim=-1, keepdim=True) - log_partition
    direction = excess @ cache.text_weights.T / cache.temperature  # queries x D
    if ids is None:
        cross = direction @ cache.image_keys.T - cache.key_log_partitions
    else:
        keys = cache.image_keys[ids]  # queries x M x D
        cross = torch.einsum("qd,qmd->qm", direction, keys) - cache.key_log_partitions[ids]
    return own - cross


def rescale_rows(
    x: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Map each row of x linearly onto the [min, max] range of the same row of target.

    Per row, so one query's result never depends on another's; excluded entries take no
    part in either range.
    """
    if exclude is None:
        x_min, x_max = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        t_min, t_max = target.amin(dim=-1, keepdim=True), target.amax(dim=-1, keepdim=True)
    else:
        inf = torch.finfo(x.dtype).max
        x_min = x.masked_fill(exclude, inf).amin(dim=-1, keepdim=True)
        x_max = x.masked_fill(exclude, -inf).amax(dim=-1, keepdim=True)
        t_min = target.masked_fill(exclude, inf).amin(dim=-1, keepdim=True)
        t_max = target.masked_fill(exclude, -inf).amax(dim=-1, keepdim=True)
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
) -> torch.Tensor:
    """Logits where only each query's candidate items (queries x M ids) enter the cache sums.

    The top-k approximation for caches too large for a dense pass: candidates come from a
    FAISS search (kvclip.index). Ids of -1 and repeated ids are ignored. Affinities of the
    candidates are exact; items outside them contribute nothing, and the KL term is rescaled
    over the candidates only. Class balance divides by the cache's class sizes, not by the
    candidates per class: the candidates stand in for the whole sum. With every item as a
    candidate this equals `blend`.
    """
    check_method(method)
    features = features.to(device=cache.device, dtype=torch.float32)
    logits = zeroshot_logits(features, cache.text_weights)
    if method == "zeroshot":
        return logits
    p = params.for_method(method)
    candidates = candidates.to(device=cache.device, dtype=torch.long)
    ids, invalid = _dedupe_candidates(candidates)
    affinity = candidate_affinities(features, cache, ids, p.delta)
    labels = cache.label_ids[ids]  # queries x M
    scale = class_scale(cache)
    if p.alpha != 0.0:
        weights = torch.exp(-p.beta * (1.0 - affinity)).masked_fill(invalid, 0.0)
        logits = logits + p.alpha * scale * class_sums(weights, labels, cache.num_classes)
    if p.gamma != 0.0:
        kl = kl_divergence(features, cache, ids)
        weights = (-rescale_rows(kl, affinity, invalid)).masked_fill(invalid, 0.0)
        logits = logits + p.gamma * scale * class_sums(weights, labels, cache.num_classes)
    return logits


def candidate_affinities(
    features: torch.Tensor, cache: CacheTensors, ids: torch.Tensor, delta: float = 0.0
) -> torch.Tensor:
    """Affinities (queries x M) of each query with its own candidate items `ids`."""
    affinity = torch.einsum("qd,qmd->qm", features, cache.image_keys[ids])
    if delta == 0.0:
        return affinity
    if cache.caption_keys is None:
        raise ValueError("delta > 0 needs caption keys, and this cache has none")
    caption_part = torch.einsum("qd,qmd->qm", features, cache.caption_keys[ids])
    return (1.0 - delta) * affinity + delta * caption_part


def _dedupe_candidates(candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted ids with -1 and repeats marked invalid; invalid slots point at item 0."""
    ids, _ = candidates.sort(dim=-1)
    repeated = torch.zeros_like(ids, dtype=torch.bool)
    repeated[:, 1:] = ids[:, 1:] == ids[:, :-1]
    invalid = (ids < 0) | repeated
    return ids.clamp_min(0), invalid
