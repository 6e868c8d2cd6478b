"""Build a cache: source -> sampled support -> captions -> features -> tuning -> artifact.

Three modes, by the inputs given (docs/methods.md):
  labelled     a data folder or manifest of labelled images
  labels-only  a labels file alone: a zero-shot cache with no support items
  pool         a labels file and a folder of unlabelled images, pseudo-labelled by zero-shot
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from kvclip.cache_builder.captioners import Captioner, NoCaptioner, make_captioner
from kvclip.cache_builder.features import SupportFeatures, encode_captions, encode_support, has_captions
from kvclip.cache_builder.pool import PoolSelection, encode_pool, pseudo_label
from kvclip.cache_builder.progress import BuildMonitor
from kvclip.cache_builder.sources import (
    Selection,
    Skipped,
    SupportItem,
    check_labels,
    discover_folder,
    discover_images,
    order_labels,
    planned_support,
    read_labels_file,
    read_manifest,
    select_support,
)
from kvclip.cache_builder.tune import Grid, query_ids, tune
from kvclip import artifact as store
from kvclip.blend import CACHE_METHODS, DEFAULT_TEMPERATURE, BlendParams, CacheTensors, blend, blend_candidates
from kvclip.errors import DataError
from kvclip.index import build_index, search_candidates
from kvclip.models import Encoder, load_encoder
from kvclip.prompts import DEFAULT_TEMPLATES, load_descriptions, load_templates, text_classifier

log = logging.getLogger("kvclip.build")
DEFAULT_MODEL = "ViT-B-32:openai"
MODES = ("labelled", "labels-only", "pool")
# Tip-Adapter's published training-free setting (α = 1, β = 5.5): what a pool build serves
# under method=auto, since its pseudo-labels cannot tune (docs/methods.md).
POOL_TIP_PARAMS = BlendParams(alpha=1.0, beta=5.5)

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
    progress: bool = True  # tqdm bars
    pool_dir: Path | None = None  # unlabelled images (searched recursively), with labels_file
    pool_per_class: int = 16  # pseudo-labelled images kept per class
    monitor: BuildMonitor | None = None  # progress and cancellation (cache_builder/progress.py)


@dataclass
class BuildResult:
    version: str
    path: Path
    manifest: dict = field(default_factory=dict)

    @property
    def report(self) -> dict:
        return self.manifest["build_report"]


@dataclass
class Inputs:
    """What the reading step found."""

    mode: str
    labels: list[str]
    templates: list[str]
    descriptions: dict[str, list[str]] | None
    candidates: int  # images listed (labelled: of the cache's labels; pool: files found)
    selection: Selection  # the support set (empty until pseudo-labelling in pool mode)
    pool_paths: list[Path] = field(default_factory=list)


def build_mode(config: BuildConfig) -> str:
    """labelled, labels-only or pool, from the inputs given; anything else is an error."""
    if config.data_dir is not None and config.manifest is not None:
        raise DataError("give a data folder or --manifest, not both")
    if config.data_dir is not None or config.manifest is not None:
        if config.pool_dir is not None:
            raise DataError("--pool pseudo-labels unlabelled images for a --labels file; "
                            "it does not combine with a data folder or --manifest")
        return "labelled"
    if config.labels_file is None:
        raise DataError("give a data folder, --manifest, --labels FILE alone (a zero-shot cache), "
                        "or --labels FILE with --pool DIR (pseudo-labelled support images)")
    if config.pool_dir is None:
        return "labels-only"
    if config.pool_per_class < 1:
        raise DataError(f"--pool-per-class must be at least 1, not {config.pool_per_class}")
    return "pool"


def build_cache(config: BuildConfig, encoder: Encoder | None = None) -> BuildResult:
    """Run a whole build and publish it as the cache's next version (atomically).

    `config.monitor` sees the steps; a BuildCancelled from it stops the build before
    publishing, so a cancelled build leaves the cache as it was.
    """
    started = time.perf_counter()
    monitor = config.monitor or BuildMonitor()
    name = store.validate_cache_name(Path(config.out).name)
    mode = build_mode(config)
    monitor.check()
    inputs = read_inputs(config, mode, monitor)
    _warn_skipped(inputs.selection.skipped)

    encoder = encoder or load_encoder(config.model, config.device, config.model_cache_dir)
    timings: dict[str, float] = {}
    pool_features = None
    if mode == "pool":
        monitor.check()
        monitor.step("pseudo-labelling", len(inputs.pool_paths))
        t0 = time.perf_counter()
        pool_features = encode_pool(encoder, inputs.pool_paths, config.batch_size * config.views,
                                    config.progress, monitor)
        timings["pseudo_label"] = time.perf_counter() - t0
        _warn_skipped(pool_features.skipped)

    def classes_done(n: int) -> None:
        monitor.advance(n)
        monitor.check()

    monitor.check()
    monitor.step("text", len(inputs.labels))
    t0 = time.perf_counter()
    text_weights = text_classifier(encoder.encode_texts, inputs.labels, inputs.templates, inputs.descriptions,
                                   on_classes=classes_done).cpu()
    timings["text"] = time.perf_counter() - t0

    pool = None
    if pool_features is not None:  # text weights pick the pool's support items (cache_builder/pool.py)
        pool = pseudo_label(pool_features, text_weights, inputs.labels, config.pool_per_class)
        for label in pool.empty_classes:
            log.warning("no pool image was pseudo-labelled %r: the class keeps its zero-shot text weights", label)
        inputs.selection = Selection(inputs.labels, pool.items, pool_features.skipped,
                                     {lb: p.assigned for lb, p in zip(inputs.labels, pool.picks)})

    items = inputs.selection.items
    # A zero-shot cache (labels only) has no captioner to run; recording "none" says so.
    captioner = make_captioner(config.captioner, config.captioner_model, encoder.device) if items else NoCaptioner()
    label_id = {label: i for i, label in enumerate(inputs.labels)}
    label_ids = torch.tensor([label_id[it.label] for it in items], dtype=torch.long)
    support, caption_keys = encode_items(config, encoder, captioner, items, int(text_weights.shape[0]), monitor,
                                         None if pool is None else pool.features)
    if items:
        fitted = fit_cache(config, encoder, text_weights, support, caption_keys, label_ids, monitor, timings,
                           pool_build=mode == "pool")
    else:
        fitted = Fitted.zeroshot()

    report = build_report(config, inputs, support, pool, timings, started)
    manifest = {
        "schema_version": store.SCHEMA_VERSION,
        "name": name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": encoder.info(),
        "labels": inputs.labels,
        "prompts": {"templates": inputs.templates, "descriptions": inputs.descriptions},
        "counts": {"classes": len(inputs.labels), "items": len(items), "dim": int(text_weights.shape[0]),
                   "per_class": inputs.selection.per_class(), "skipped": len(inputs.selection.skipped)},
        "captioner": captioner.describe(),
        "shots": {"labelled": config.shots, "pool": config.pool_per_class}.get(mode, 0),
        "views": config.views,
        "seed": config.seed,
        "temperature": DEFAULT_TEMPERATURE,
        "params": fitted.params,
        "tuning": fitted.tuning,
        "faiss": fitted.faiss,
        "build_report": report,
    }
    artifact = store.CacheArtifact(
        labels=inputs.labels,
        text_weights=text_weights.numpy().astype(np.float32),
        image_keys=support.image_keys.numpy().astype(np.float32),
        label_ids=label_ids.numpy().astype(np.int64),
        query_features=support.query_features.numpy().astype(np.float32),
        caption_keys=None if caption_keys is None else caption_keys.numpy().astype(np.float32),
        items=[{"path": str(it.path), "label": it.label, "caption": cap} for it, cap in zip(items, support.captions)],
        manifest=manifest,
        image_index=fitted.image_index,
        caption_index=fitted.caption_index,
    )
    monitor.check()  # the last chance to stop: publishing is atomic and is never interrupted
    monitor.step("publishing", 1)
    version = store.publish(config.out, artifact, activate=config.activate)
    monitor.advance(1)
    return BuildResult(version, artifact.path, artifact.manifest)


def _warn_skipped(skipped: list[Skipped]) -> None:
    for entry in skipped:
        log.warning("skipped %s: %s", entry.path, entry.reason)


def read_inputs(config: BuildConfig, mode: str, monitor: BuildMonitor) -> Inputs:
    """The "reading" step: labels, prompts, and the images each mode starts from.

    The step is announced once its size is known: in labelled mode, the images to check.
    """
    templates = load_templates(config.templates) if config.templates else list(DEFAULT_TEMPLATES)
    descriptions = load_descriptions(config.descriptions) if config.descriptions else None
    if mode == "labelled":
        items = read_manifest(config.manifest) if config.manifest else discover_folder(config.data_dir)
        wanted = read_labels_file(config.labels_file) if config.labels_file else None
        labels = order_labels(items, wanted)
        known = set(labels)
        candidates = [it for it in items if it.label in known]
        monitor.step("reading", planned_support(candidates, labels, config.shots))
        selection = select_support(candidates, labels, config.shots, config.seed, config.progress, monitor)
        return Inputs(mode, labels, templates, descriptions, len(items), selection)
    labels = read_labels_file(config.labels_file)
    check_labels(labels)
    pool_paths = discover_images(config.pool_dir) if mode == "pool" else []
    monitor.step("reading", 0)
    return Inputs(mode, labels, templates, descriptions, len(pool_paths), Selection(labels, []), pool_paths)


def encode_items(
    config: BuildConfig,
    encoder: Encoder,
    captioner: Captioner,
    items: list[SupportItem],
    dim: int,
    monitor: BuildMonitor,
    query_features: torch.Tensor | None = None,
) -> tuple[SupportFeatures, torch.Tensor | None]:
    """The "encoding" and "captioning" steps: image keys, query features (given by a pool
    build, which encoded them already), caption keys.

    No items (a zero-shot cache): 0 x D arrays and no caption keys.
    """
    if not items:
        empty = torch.empty(0, dim)
        return SupportFeatures(empty, empty.clone(), [], {"decode_s": 0.0, "encode_s": 0.0, "caption_s": 0.0}), None
    monitor.check()
    monitor.step("encoding", len(items))
    support = encode_support(encoder, items, captioner, config.views, config.batch_size, config.seed,
                             config.progress, monitor, query_features)
    if not has_captions(support.captions):
        return support, None
    monitor.check()
    monitor.step("captioning", len(items))  # caption keys: a text-tower pass of its own
    t0 = time.perf_counter()
    caption_keys = encode_captions(encoder, support.captions, monitor=monitor)
    support.timings["caption_keys_s"] = time.perf_counter() - t0
    return support, caption_keys


@dataclass
class Fitted:
    """Tuned parameters, their report, and the FAISS indexes with their agreement report."""

    params: dict
    tuning: dict
    faiss: dict
    image_index: object | None = None
    caption_index: object | None = None

    @classmethod
    def zeroshot(cls) -> "Fitted":
        """A cache without support items serves zero-shot only: nothing to tune or index."""
        return cls(
            params={"best_method": "zeroshot", "methods": {}},
            tuning={"protocol": "none: the cache has no support items (labels only)", "n_queries": 0,
                    "loo_top1": {}},
            faiss={"index": None, "k": None, "n_queries": 0, "methods": {}},
        )


def fit_cache(
    config: BuildConfig,
    encoder: Encoder,
    text_weights: torch.Tensor,
    support: SupportFeatures,
    caption_keys: torch.Tensor | None,
    label_ids: torch.Tensor,
    monitor: BuildMonitor,
    timings: dict[str, float],
    pool_build: bool = False,
) -> Fitted:
    """The "tuning" and "indexing" steps.

    A pool build serves tip with POOL_TIP_PARAMS under auto (docs/methods.md: tuning on
    pseudo-labels cannot pick a method); the report and FAISS check describe those.
    """
    cache = CacheTensors.build(text_weights, support.image_keys, label_ids, caption_keys,
                               temperature=DEFAULT_TEMPERATURE, device=encoder.device)
    grid = Grid()
    monitor.check()
    monitor.step("tuning", len(grid.deltas_for(caption_keys is not None)))
    t0 = time.perf_counter()
    fixed = {"fixed": {"tip": POOL_TIP_PARAMS}, "fixed_best": "tip"} if pool_build else {}
    tuning = tune(cache, support.query_features, label_ids, grid, seed=config.seed, monitor=monitor, **fixed)
    timings["tune"] = time.perf_counter() - t0

    monitor.check()
    monitor.step("indexing", 1 if caption_keys is None else 2)
    image_index = build_index(support.image_keys.numpy(), config.index_kind)
    monitor.advance(1)
    caption_index = None
    if caption_keys is not None:
        monitor.check()
        caption_index = build_index(caption_keys.numpy(), config.index_kind)
        monitor.advance(1)
    monitor.check()
    faiss_report = topk_agreement(cache, support.query_features, label_ids, tuning.params,
                                  image_index, caption_index, config.faiss_k)
    report = tuning.report()
    if pool_build:
        report["protocol"] = ("balanced leave-one-out on the pool's zero-shot pseudo-labels (as for labelled "
                              "builds); zero-shot agrees with them by construction, so auto serves tip with "
                              f"fixed parameters {POOL_TIP_PARAMS.as_dict()}")
    return Fitted(tuning.manifest_params(), report, {"index": config.index_kind, **faiss_report},
                  image_index, caption_index)


def build_report(
    config: BuildConfig,
    inputs: Inputs,
    support: SupportFeatures,
    pool: PoolSelection | None,
    timings: dict[str, float],
    started: float,
) -> dict:
    selection = inputs.selection
    n = len(selection.items)
    per_class_cap = {"labelled": config.shots, "pool": config.pool_per_class}.get(inputs.mode)
    encode_s = support.timings["encode_s"]
    source = {"labelled": config.manifest or config.data_dir, "labels-only": config.labels_file,
              "pool": config.pool_dir}[inputs.mode]
    report = {
        "mode": inputs.mode,
        "source": str(source),
        "candidates": inputs.candidates,
        "used": n,
        "skipped": [vars(s) for s in selection.skipped],
        "skipped_count": len(selection.skipped),
        "short_classes": {lb: c for lb, c in selection.per_class().items() if per_class_cap and c < per_class_cap},
        "timings_s": {**{k: round(v, 3) for k, v in timings.items()},
                      **{k: round(v, 3) for k, v in support.timings.items()},
                      "total": round(time.perf_counter() - started, 3)},
        "throughput": {"encoded_views_per_s": n * config.views / encode_s if encode_s else None,
                       "batch_images": config.batch_size, "batch_crops": config.batch_size * config.views},
    }
    if pool is not None:
        report["pool"] = pool.report()
    return report


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
