"""Accuracy and calibration of every method of a cache on a labelled test set (never used for tuning)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvclip.artifact import CacheArtifact, check_model_matches, load_cache
from kvclip.blend import blend, blend_candidates
from kvclip.cache_builder.features import encode_image_files
from kvclip.cache_builder.sources import discover_folder, read_manifest
from kvclip.calibration import calibration_report
from kvclip.errors import DataError
from kvclip.index import search_candidates
from kvclip.manifest import TunedParams
from kvclip.models import Encoder, load_encoder


@dataclass
class EvalReport:
    n: int
    methods: dict[str, dict[str, float]]
    params: TunedParams  # the cache's tuned parameters
    cache: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    faiss: dict | None = None

    def as_dict(self) -> dict:
        out = {"n": self.n, "methods": self.methods, "params": self.params.model_dump(mode="json"), "cache": self.cache,
               "skipped": self.skipped}
        if self.faiss is not None:
            out["faiss"] = self.faiss
        return out


def evaluate(
    cache_dir: str | Path,
    data_dir: str | Path | None = None,
    manifest: str | Path | None = None,
    model: str | None = None,
    encoder: Encoder | None = None,
    device: str | None = None,
    batch_size: int = 128,
    limit: int | None = None,
    faiss_k: int | None = None,
    progress: bool = True,
    min_score: float | None = None,
) -> EvalReport:
    """Per method: top-1/top-5 and, for the served (calibrated) scores, ECE, NLL, Brier, the area
    under the risk–coverage curve, and coverage and accuracy at `min_score` (default: the
    cache's own threshold for the method, none when the build set no target precision)."""
    artifact = load_cache(cache_dir)
    if (data_dir is None) == (manifest is None):
        raise DataError("give either a test data folder or --manifest, not both or neither")
    items = read_manifest(manifest) if manifest else discover_folder(data_dir)
    unknown = sorted({it.label for it in items} - set(artifact.labels))
    if unknown:
        raise DataError(f"test labels not in the cache's label set: {', '.join(unknown[:10])}")
    items = items[:limit] if limit else items
    encoder = encoder or load_encoder(model or artifact.manifest.model.id, device)
    check_model_matches(encoder, artifact)

    features, kept, skipped = encode_image_files(encoder, [it.path for it in items], batch_size, progress)
    label_id = {label: i for i, label in enumerate(artifact.labels)}
    truth = torch.tensor([label_id[items[i].label] for i in kept], device=encoder.device)
    cache = artifact.tensors(encoder.device)
    features = features.to(encoder.device)
    methods, faiss = {}, ({"k": faiss_k, "methods": {}} if faiss_k else None)
    for method in artifact.methods:
        logits = blend(features, cache, artifact.params(method), method)
        threshold = artifact.default_min_score(method) if min_score is None else min_score
        methods[method] = _topk_accuracy(logits, truth) | calibration_report(
            logits, truth, artifact.score_map(method), threshold)
        if faiss is not None and method != "zeroshot":
            approx = _faiss_logits(artifact, cache, features, method, faiss_k)
            faiss["methods"][method] = {
                **_topk_accuracy(approx, truth),
                "top1_agreement": float((approx.argmax(1) == logits.argmax(1)).float().mean()),
            }
    cache_info = {"path": str(Path(cache_dir)), "version": artifact.version,
                  "model": artifact.manifest.model.id, "classes": len(artifact.labels),
                  "items": len(artifact.label_ids)}
    return EvalReport(len(kept), methods, artifact.manifest.params, cache_info, [vars(s) for s in skipped], faiss)


def _faiss_logits(artifact: CacheArtifact, cache, features, method: str, k: int) -> torch.Tensor:
    params = artifact.params(method).for_method(method)
    candidates = search_candidates(features, artifact.image_index, artifact.caption_index, k, params.delta)
    return blend_candidates(features, cache, params, method, candidates)


def _topk_accuracy(logits: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    if len(truth) == 0:
        return {"top1": 0.0, "top5": 0.0}
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {
        "top1": float((top[:, 0] == truth).float().mean()),
        "top5": float((top == truth.view(-1, 1)).any(dim=1).float().mean()),
    }
