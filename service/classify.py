"""The classify data path: bytes -> image -> tensor (decode pool) -> feature (batcher) ->
logits (blend on the device thread) -> top-k labels and nearest support items.

Everything here is plain functions over plain dataclasses; service/api_classify.py wires
them to HTTP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvclip.blend import affinities, blend, blend_candidates, candidate_affinities
from kvclip.images import decode_image
from kvclip.index import search_candidates
from kvclip.service.registry import LoadedCache


@dataclass
class ImageInput:
    index: int  # position in the request
    name: str  # file name, or "image[i]"
    data: bytes
    refused: str | None = None  # set when the part was declared as something other than an image


@dataclass
class Prepared:
    index: int
    name: str
    pixels: torch.Tensor | None  # 3 x H x W, or None when the image was not usable
    error: str | None = None
    code: str = "bad_image"  # or "unsupported_media_type" for a refused part


@dataclass(frozen=True)
class ScoreOptions:
    method: str
    top_k: int
    explain_k: int  # 0: no neighbours
    dense_max_keys: int
    faiss_k: int


@dataclass
class Scored:
    labels: list[tuple[str, float, float]]  # (label, probability, logit), best first
    neighbors: list[dict] | None


def prepare(item: ImageInput, preprocess, max_pixels: int) -> Prepared:
    """Decode and preprocess one image; an unusable image becomes an error, not an exception."""
    if item.refused:
        return Prepared(item.index, item.name, None, item.refused, "unsupported_media_type")
    try:
        image = decode_image(item.data, max_pixels=max_pixels, name=item.name)
    except Exception as exc:  # ImageDecodeError, and anything a codec throws on hostile bytes
        return Prepared(item.index, item.name, None, str(exc))
    return Prepared(item.index, item.name, preprocess(image))


def score(features: torch.Tensor, cache: LoadedCache, options: ScoreOptions) -> list[Scored]:
    """Blend logits for `features` (k x D) against one cache snapshot; runs on the device thread."""
    tensors = cache.tensors
    features = features.to(device=tensors.device, dtype=torch.float32)
    params = cache.params(options.method)
    ids = None
    if _use_candidates(cache, options, params.gamma):
        ids = search_candidates(features, cache.artifact.image_index, cache.artifact.caption_index,
                                options.faiss_k, params.delta)
        logits = blend_candidates(features, tensors, params, options.method, ids)
    else:
        logits = blend(features, tensors, params, options.method)
    probs = logits.softmax(dim=-1)
    k = min(options.top_k, logits.shape[1])
    top_logits, top_i = logits.topk(k, dim=-1)
    top_p = probs.gather(1, top_i)
    neighbors = _neighbors(features, cache, params.delta, options.explain_k, ids) if options.explain_k else None
    labels = cache.labels
    # One device-to-host copy per tensor, not one per image.
    rows = zip(top_i.tolist(), top_p.tolist(), top_logits.tolist())
    return [
        Scored(labels=[(labels[i], p, lg) for i, p, lg in zip(ids, ps, lgs)],
               neighbors=None if neighbors is None else neighbors[row])
        for row, (ids, ps, lgs) in enumerate(rows)
    ]


def _use_candidates(cache: LoadedCache, options: ScoreOptions, gamma: float) -> bool:
    """Blend over FAISS candidates only where that approximates the dense blend faithfully.

    The Tip term exp(−β(1 − A)) is negligible far from the query, so the nearest keys carry it.
    The KL term (γ ≠ 0, Tip-X and CapS) gives every support item a weight rescaled over the
    whole cache, so a top-k subset changes the answer (docs/methods.md); those stay dense.
    """
    return (
        options.method != "zeroshot"
        and gamma == 0.0
        and cache.num_items > options.dense_max_keys
        and cache.artifact.image_index is not None
    )


def _neighbors(
    features: torch.Tensor, cache: LoadedCache, delta: float, k: int, ids: torch.Tensor | None
) -> list[list[dict]]:
    """The k support items with the highest affinity (the method's mix of image and caption keys)."""
    if cache.num_items == 0:
        return [[] for _ in range(features.shape[0])]
    if ids is None:
        affinity = affinities(features, cache.tensors, delta)
        values, items = affinity.topk(min(k, cache.num_items), dim=-1)
    else:  # large cache: rank the FAISS candidates only
        ids = ids.clamp_min(0)
        affinity = candidate_affinities(features, cache.tensors, ids, delta)
        values, slots = affinity.topk(min(k, ids.shape[1]), dim=-1)
        items = ids.gather(1, slots)
    rows = []
    for row_items, row_values in zip(items.tolist(), values.tolist()):
        seen, row = set(), []
        for item, value in zip(row_items, row_values):
            if item in seen:
                continue
            seen.add(item)
            meta = cache.artifact.items[item] if item < len(cache.artifact.items) else {}
            row.append({
                "item": item,
                "label": cache.labels[int(cache.artifact.label_ids[item])],
                "caption": meta.get("caption"),
                "name": str(meta.get("path", "")).rsplit("/", 1)[-1] or None,
                "affinity": value,
            })
        rows.append(row)
    return rows
