"""The blend engine: zero-shot, Tip-Adapter, Tip-X and CapS logits on torch tensors.

One implementation, used by the tuner, the evaluator and the server. Every function works
row by row on the query axis, so a query's logits never depend on the other queries in its
batch (docs/methods.md, defect 3). Formulas are in ../docs/methods.md.

`exclude` (bool, queries x items) drops support items from a query's sums; the tuner uses
it for leave-one-out, where query i must not see support item i.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

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

    def for_method(self, method: str) -> "BlendParams":
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
    values: torch.Tensor  # N x C one-hot labels
    key_log_signatures: torch.Tensor  # N x C, log softmax(K_img W_t / T) over classes
    temperature: float = DEFAULT_TEMPERATURE

    @classmethod
    def build(
        cls,
        text_weights: torch.Tensor,
        image_keys: torch.Tensor,
        label_ids: torch.Tensor,
        caption_keys: torch.Tensor | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        device: torch.device | str | None = None,
    ) -> "CacheTensors":
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
        values = F.one_hot(label_ids, num_classes).to(torch.float32)
        return cls(
            text_weights=text_weights,
            image_keys=image_keys,
            caption_keys=caption_keys,
            values=values,
            key_log_signatures=log_signatures(image_keys, text_weights, temperature),
            temperature=temperature,
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

    def to(self, device: torch.device | str) -> "CacheTensors":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            text_weights=move(self.text_weights),
            image_keys=move(self.image_keys),
            caption_keys=move(self.caption_keys),
            values=move(self.values),
            key_log_signatures=move(self.key_log_signatures),
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


def cache_logits(
    affinity: torch.Tensor,
    values: torch.Tensor,
    beta: float,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """exp(−β (1 − A)) L, with excluded items contributing nothing."""
    weights = torch.exp(-beta * (1.0 - affinity))
    if exclude is not None:
        weights = weights.masked_fill(exclude, 0.0)
    return weights @ values


def log_signatures(x: torch.Tensor, text_weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(x W_t / T) over the C classes (never over feature dimensions)."""
    return torch.log_softmax((x @ text_weights) / temperature, dim=-1)


def kl_divergence(
    features: torch.Tensor, cache: CacheTensors, key_log_signatures: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(s(f) ‖ s(k_j)) by one matmul: queries x items against every support item, or
    against each query's own candidates when given their log signatures (queries x M x C)."""
    log_s_f = log_signatures(features, cache.text_weights, cache.temperature)
    s_f = log_s_f.exp()
    negative_entropy = (s_f * log_s_f).sum(dim=-1, keepdim=True)
    if key_log_signatures is None:
        return negative_entropy - s_f @ cache.key_log_signatures.T
    return negative_entropy - torch.einsum("qc,qmc->qm", s_f, key_log_signatures)


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
    """(−rescaled KL) L: the Tip-X signature term before its weight γ."""
    kl = kl_divergence(features, cache)
    weights = -rescale_rows(kl, affinity, exclude)
    if exclude is not None:
        weights = weights.masked_fill(exclude, 0.0)
    return weights @ cache.values


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
    if p.alpha != 0.0:
        logits = logits + p.alpha * cache_logits(affinity, cache.values, p.beta, exclude)
    if p.gamma != 0.0:
        logits = logits + p.gamma * kl_logits(features, cache, affinity, exclude)
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
    over the candidates only. With every item as a candidate this equals `blend`.
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
    values = cache.values[ids]  # queries x M x C
    if p.alpha != 0.0:
        weights = torch.exp(-p.beta * (1.0 - affinity)).masked_fill(invalid, 0.0)
        logits = logits + p.alpha * torch.einsum("qm,qmc->qc", weights, values)
    if p.gamma != 0.0:
        kl = kl_divergence(features, cache, cache.key_log_signatures[ids])
        weights = (-rescale_rows(kl, affinity, invalid)).masked_fill(invalid, 0.0)
        logits = logits + p.gamma * torch.einsum("qm,qmc->qc", weights, values)
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
