"""Build a cache: source -> sampled support -> captions -> features -> tuning -> artifact."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from cache_builder.captioners import make_captioner
from cache_builder.features import encode_captions, encode_support
from cache_builder.sources import discover_folder, order_labels, read_labels_file, read_manifest, select_support
from cache_builder.tune import query_ids, tune
from kvclip import artifact as store
from kvclip.blend import CACHE_METHODS, DEFAULT_TEMPERATURE, CacheTensors, blend, blend_candidates
from kvclip.errors import DataError
from kvclip.index import build_index, search_candidates
from kvclip.models import Encoder, load_encoder
from kvclip.prompts import DEFAULT_TEMPLATES, load_descriptions, load_templates, text_classifier

log = logging.getLogger("kvclip.build")
DEFAULT_MODEL = "ViT-B-32:openai"


@dataclass
class BuildConfig:
    out: Path  # the cache folder; its name is the cache name
    data_dir: Path | None = None
    manifest: Path | None = None
    model: str = DEFAULT_MODEL
    shots: int | None = 16  # None: every image
    views: int = 10
    captioner: str = "sidecar"
    captioner_model: str | None = None
    templates: Path | None = None
    descriptions: Path | None = None
    labels_file: Path | None = None
    seed: int = 0
    batch_size: int = 32
    device: str | None = None
    index_kind: str = "flat"
    faiss_k: int = 64
    model_cache_dir: str | None = None
    activate: bool = True
    progress: bool = True


@dataclass
class BuildResult:
    version: str
    path: Path
    manifest: dict = field(default_factory=dict)

    @property
    def report(self) -> dict:
        return self.manifest["build_report"]


def build_cache(config: BuildConfig, encoder: Encoder | None = None) -> BuildResult:
    """Run a whole build and publish it as the cache's next version (atomically)."""
    started = time.perf_counter()
    name = store.validate_cache_name(Path(config.out).name)
    if (config.data_dir is None) == (config.manifest is None):
        raise DataError("give either a data folder or --manifest, not both or neither")

    items = read_manifest(config.manifest) if config.manifest else discover_folder(config.data_dir)
    wanted = read_labels_file(config.labels_file) if config.labels_file else None
    labels = order_labels(items, wanted)
    templates = load_templates(config.templates) if config.templates else list(DEFAULT_TEMPLATES)
    descriptions = load_descriptions(config.descriptions) if config.descriptions else None
    label_id = {label: i for i, label in enumerate(labels)}
    selection = select_support([it for it in items if it.label in label_id], labels,
                               config.shots, config.seed, config.progress)
    for skipped in selection.skipped:
        log.warning("skipped %s: %s", skipped.path, skipped.reason)

    encoder = encoder or load_encoder(config.model, config.device, config.model_cache_dir)
    captioner = make_captioner(config.captioner, config.captioner_model, encoder.device)
    t0 = time.perf_counter()
    text_weights = text_classifier(encoder.encode_texts, labels, templates, descriptions).cpu()
    text_s = time.perf_counter() - t0
    support = encode_support(encoder, selection.items, captioner, config.views,
                             config.batch_size, config.seed, config.progress)
    caption_keys = encode_captions(encoder, support.captions)
    label_ids = torch.tensor([label_id[it.label] for it in selection.items])

    cache = CacheTensors.build(text_weights, support.image_keys, label_ids, caption_keys,
                               temperature=DEFAULT_TEMPERATURE, device=encoder.device)
    t0 = time.perf_counter()
    tuning = tune(cache, support.query_features, label_ids, seed=config.seed)
    tune_s = time.perf_counter() - t0

    image_index = build_index(support.image_keys.numpy(), config.index_kind)
    caption_index = build_index(caption_keys.numpy(), config.index_kind) if caption_keys is not None else None
    faiss_report = topk_agreement(cache, support.query_features, label_ids, tuning.params,
                                  image_index, caption_index, config.faiss_k)

    n = len(selection.items)
    views_per_s = n * config.views / support.timings["encode_s"] if support.timings["encode_s"] else None
    report = {
        "source": str(config.manifest or config.data_dir),
        "candidates": len(items),
        "used": n,
        "skipped": [vars(s) for s in selection.skipped],
        "skipped_count": len(selection.skipped),
        "short_classes": {lb: c for lb, c in selection.per_class().items() if config.shots and c < config.shots},
        "timings_s": {"text": round(text_s, 3), **{k: round(v, 3) for k, v in support.timings.items()},
                      "tune": round(tune_s, 3), "total": round(time.perf_counter() - started, 3)},
        "throughput": {"encoded_views_per_s": views_per_s, "batch_images": config.batch_size,
                       "batch_crops": config.batch_size * config.views},
    }
    manifest = {
        "schema_version": store.SCHEMA_VERSION,
        "name": name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": encoder.info(),
        "labels": labels,
        "prompts": {"templates": templates, "descriptions": descriptions},
        "counts": {"classes": len(labels), "items": n, "dim": int(text_weights.shape[0]),
                   "per_class": selection.per_class(), "skipped": len(selection.skipped)},
        "captioner": captioner.describe(),
        "shots": config.shots,
        "views": config.views,
        "seed": config.seed,
        "temperature": DEFAULT_TEMPERATURE,
        "params": tuning.manifest_params(),
        "tuning": tuning.report(),
        "faiss": {"index": config.index_kind, **faiss_report},
        "build_report": report,
    }
    artifact = store.CacheArtifact(
        labels=labels,
        text_weights=text_weights.numpy().astype(np.float32),
        image_keys=support.image_keys.numpy().astype(np.float32),
        label_ids=label_ids.numpy().astype(np.int64),
        query_features=support.query_features.numpy().astype(np.float32),
        caption_keys=None if caption_keys is None else caption_keys.numpy().astype(np.float32),
        items=[{"path": str(it.path), "label": it.label, "caption": cap}
               for it, cap in zip(selection.items, support.captions)],
        manifest=manifest,
        image_index=image_index,
        caption_index=caption_index,
    )
    version = store.publish(config.out, artifact, activate=config.activate)
    return BuildResult(version, artifact.path, artifact.manifest)


def topk_agreement(
    cache: CacheTensors,
    query_features: torch.Tensor,
    label_ids: torch.Tensor,
    params: dict,
    image_index,
    caption_index,
    k: int,
    max_queries: int = 2000,
) -> dict:
    """How far the FAISS top-k blend is from the dense one, leave-one-out on the support set."""
    ids = query_ids(cache.num_items, max_queries, seed=0).to(cache.device)
    n = len(ids)
    queries = query_features.to(cache.device, torch.float32)[ids]
    truth = label_ids.to(cache.device)[ids]
    exclude = torch.zeros(n, cache.num_items, dtype=torch.bool, device=cache.device)
    exclude[torch.arange(n, device=cache.device), ids] = True
    report = {"k": k, "n_queries": n, "methods": {}}
    for method in CACHE_METHODS:
        if method not in params:
            continue
        p = params[method].for_method(method)
        dense = blend(queries, cache, p, method, exclude)
        candidates = search_candidates(queries, image_index, caption_index, k + 1, p.delta)
        candidates = candidates.masked_fill(candidates == ids.view(-1, 1), -1)  # leave self out
        approx = blend_candidates(queries, cache, p, method, candidates)
        report["methods"][method] = {
            "top1_agreement": float((dense.argmax(1) == approx.argmax(1)).float().mean()),
            "max_abs_logit_diff": float((dense - approx).abs().max()),
            "top1_dense": float((dense.argmax(1) == truth).float().mean()),
            "top1_topk": float((approx.argmax(1) == truth).float().mean()),
        }
    return report
