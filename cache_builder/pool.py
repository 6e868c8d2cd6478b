"""A support set from unlabelled images: zero-shot CLIP pseudo-labels the user's own pool.

SuS-X builds a support set by retrieving, per label, the images that best match it; here
the candidates are a folder of the user's unlabelled images. Each image goes to the class of
its zero-shot argmax, and each class keeps its most confident images (docs/methods.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvclip.blend import zeroshot_logits
from kvclip.cache_builder.decoded import DecodedImages
from kvclip.cache_builder.features import encode_image_files
from kvclip.cache_builder.progress import BuildMonitor
from kvclip.cache_builder.sources import Skipped, SupportItem
from kvclip.errors import DataError
from kvclip.models import Encoder


@dataclass(frozen=True)
class Picked:
    """One class's pseudo-labelled images: pool rows, most confident first."""

    indices: list[int]
    confidences: list[float]  # probs[row, class] of those rows
    assigned: int = 0  # rows whose argmax is the class, before keeping the top k


@dataclass
class PoolFeatures:
    paths: list[Path]  # the readable pool images
    features: torch.Tensor  # len(paths) x D, plain view
    skipped: list[Skipped] = field(default_factory=list)
    found: int = 0  # image files in the pool, readable or not


@dataclass
class PoolSelection:
    labels: list[str]
    items: list[SupportItem]  # pseudo-labelled support, grouped by class in label order
    picks: list[Picked]  # per class, in label order
    pool: PoolFeatures

    @property
    def features(self) -> torch.Tensor:
        """The plain-view features of `items`, in their order (encoded while pseudo-labelling)."""
        return self.pool.features[[row for pick in self.picks for row in pick.indices]]

    @property
    def empty_classes(self) -> list[str]:
        return [label for label, pick in zip(self.labels, self.picks) if not pick.indices]

    def report(self) -> dict:
        """The build report's "pool" entry."""
        per_class = {}
        for label, pick in zip(self.labels, self.picks):
            conf = pick.confidences
            per_class[label] = {
                "count": len(conf),
                "assigned": pick.assigned,
                "mean_confidence": round(sum(conf) / len(conf), 6) if conf else None,
                "min_confidence": round(min(conf), 6) if conf else None,
            }
        return {"images": self.pool.found, "usable": len(self.pool.paths),
                "skipped": [vars(s) for s in self.pool.skipped], "empty_classes": self.empty_classes,
                "per_class": per_class}


def select_confident(probs: torch.Tensor, k: int) -> list[Picked]:
    """Per class (column of `probs`, rows = images): of the rows whose argmax is that class,
    the k with the highest probability for it. Ties keep the lower row first."""
    if k < 1:
        raise ValueError("k must be at least 1")
    if probs.ndim != 2:
        raise ValueError(f"probs must be images x classes, not {tuple(probs.shape)}")
    assigned = probs.argmax(dim=1)
    picks = []
    for cls in range(probs.shape[1]):
        rows = (assigned == cls).nonzero().flatten()
        confidence = probs[rows, cls]
        order = confidence.argsort(descending=True, stable=True)[:k]
        picks.append(Picked(rows[order].tolist(), confidence[order].tolist(), len(rows)))
    return picks


def encode_pool(
    encoder: Encoder,
    paths: Sequence[Path],
    batch_size: int = 128,
    progress: bool = True,
    monitor: BuildMonitor | None = None,
    keep: DecodedImages | None = None,
) -> PoolFeatures:
    """Plain-view features of the pool; unreadable files are skipped; none readable is an error."""
    features, kept, skipped = encode_image_files(encoder, paths, batch_size, progress, monitor, keep)
    if not kept:
        example = f" (e.g. {skipped[0].path}: {skipped[0].reason})" if skipped else ""
        raise DataError(f"the pool has no usable image: all {len(paths)} files were skipped{example}")
    return PoolFeatures([Path(paths[i]) for i in kept], features, skipped, len(paths))


def pseudo_label(pool: PoolFeatures, text_weights: torch.Tensor, labels: Sequence[str], k: int) -> PoolSelection:
    """Assign pool images to labels by zero-shot softmax(100 · f W_t); keep k per class."""
    logits = zeroshot_logits(pool.features.float(), text_weights.to(pool.features.device, torch.float32))
    picks = select_confident(logits.softmax(dim=-1), k)
    items = [SupportItem(pool.paths[row], label) for label, pick in zip(labels, picks) for row in pick.indices]
    return PoolSelection(list(labels), items, picks, pool)
