"""FAISS indexes over cache keys, and the top-k candidate search for large caches.

The dense blend is exact and fastest while a cache fits on the device. For larger caches
the blend runs over each query's nearest keys only (kvclip.blend.blend_candidates); this
module finds them. Keys are L2-normalised, so inner product is cosine affinity.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kvclip.vocabulary import INDEX_KINDS

if TYPE_CHECKING:  # faiss and torch load lazily: `kvclip --help` and the client commands start fast
    import faiss
    import torch


def build_index(keys: np.ndarray, kind: str = "flat") -> faiss.Index:
    """An inner-product index over N x D float32 keys: exact ("flat") or HNSW graph."""
    import faiss

    keys = np.ascontiguousarray(keys, dtype=np.float32)
    dim = keys.shape[1]
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = 128
        index = hnsw
    else:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")
    index.add(keys)
    return index


def write_index(index: faiss.Index, path: str | Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


def read_index(path: str | Path) -> faiss.Index:
    import faiss

    return faiss.read_index(str(path))


def search_candidates(
    features: torch.Tensor,
    image_index: faiss.Index,
    caption_index: faiss.Index | None,
    k: int,
    delta: float = 0.0,
) -> torch.Tensor:
    """Ids of each query's k nearest image keys, plus k nearest caption keys when δ > 0.

    Returns queries x M long ids (-1 where an index had fewer than k items); duplicates
    between the two lists are left for blend_candidates to drop.
    """
    import torch

    queries = np.ascontiguousarray(features.detach().to("cpu", torch.float32).numpy())
    k = min(k, image_index.ntotal)
    parts = []
    if delta < 1.0:
        parts.append(image_index.search(queries, k)[1])
    if delta > 0.0:
        if caption_index is None:
            raise ValueError("delta > 0 needs a caption index, and this cache has none")
        parts.append(caption_index.search(queries, k)[1])
    return torch.from_numpy(np.concatenate(parts, axis=1)).to(features.device)
