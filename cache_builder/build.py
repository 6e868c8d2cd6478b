"""Build a cache: a mode's support set -> captions -> synthetic images -> features -> tuning -> artifact.

`build_cache` picks the mode from the inputs (cache_builder/context.py), runs that mode's
function (cache_builder/modes.py: labelled, labels-only, pool), which ends with a support
set and its text weights, captions it (cache_builder/captioning.py), adds rendered images
when asked (cache_builder/synthetic_support.py), and then runs the one tail every mode
shares: encode -> tune -> publish.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from kvclip import artifact as store
from kvclip.blend import CACHE_METHODS, DEFAULT_TEMPERATURE, BlendParams, CacheTensors, blend, blend_candidates
from kvclip.cache_builder.caption_cache import build_captioner
from kvclip.cache_builder.captioners import Captioner, NoCaptioner
from kvclip.cache_builder.captioning import ItemCaptions, caption_support
from kvclip.cache_builder.context import DEFAULT_MODEL, MODES, BuildConfig, BuildContext, build_mode
from kvclip.cache_builder.duplicates import Duplicates, duplicates_report, find_duplicates
from kvclip.cache_builder.features import SupportFeatures, encode_captions, encode_support, has_captions
from kvclip.cache_builder.modes import MODE_SUPPORT, SupportSet
from kvclip.cache_builder.progress import BuildMonitor
from kvclip.cache_builder.sources import Selection, SupportItem
from kvclip.cache_builder.synthetic_support import check_synthesis, synthesis_config, with_synthetic
from kvclip.cache_builder.tune import Grid, query_ids, tune
from kvclip.index import build_index, search_candidates
from kvclip.manifest import (
    BuildReport,
    Calibration,
    CaptionerInfo,
    Counts,
    DuplicatesReport,
    FaissReport,
    GeneratorInfo,
    Manifest,
    ModelInfo,
    PoolReport,
    SynthesisReport,
    TunedParams,
    TuningReport,
)
from kvclip.models import Encoder

__all__ = ["DEFAULT_MODEL", "MODES", "POOL_TIP_PARAMS", "BuildConfig", "BuildResult", "build_cache", "build_mode"]
# Tip-Adapter's published training-free setting (α = 1, β = 5.5): what a pool build serves
# under method=auto, since its pseudo-labels cannot tune (docs/methods.md).
POOL_TIP_PARAMS = BlendParams(alpha=1.0, beta=5.5)
AGREEMENT_CHUNK = 64  # leave-one-out queries per dense pass in topk_agreement (bounds its memory)
log = logging.getLogger("kvclip.build")
NO_CALIBRATION = "none: the cache has no support items, so scores are softmax(logit) (T = 1)"
# Zero-shot agrees with a pool's pseudo-labels by construction, so a temperature fitted on them
# would claim certainty that no real label has confirmed.
POOL_CALIBRATION = "none: a pool build has pseudo-labels only, which cannot calibrate; T = 1, no threshold"


@dataclass
class BuildResult:
    version: str
    path: Path
    manifest: Manifest

    @property
    def report(self) -> BuildReport:
        return self.manifest.build_report


def build_cache(config: BuildConfig, encoder: Encoder | None = None,
                loader: Callable[[BuildConfig], Encoder] | None = None) -> BuildResult:
    """Run a whole build and publish it as the cache's next version (atomically).

    `config.monitor` sees the steps; a BuildCancelled from it stops the build before
    publishing, so a cancelled build leaves the cache as it was.
    """
    name = store.validate_cache_name(Path(config.out).name)
    ctx = BuildContext(config, name, build_mode(config), config.monitor or BuildMonitor(), encoder, loader)
    check_synthesis(config)
    ctx.monitor.check()
    support = MODE_SUPPORT[ctx.mode](ctx)
    captioner = (build_captioner(config, ctx.encoder.device) if support.selection.items or config.synthesize
                 else NoCaptioner())
    support = with_synthetic(ctx, caption_support(ctx, support, captioner))
    return publish_support(ctx, support, captioner)


def publish_support(ctx: BuildContext, support: SupportSet, captioner: Captioner) -> BuildResult:
    """The tail every mode shares: encode the captioned support set, tune, index, publish.
    `captioner` is the one the captioning step ran, recorded in the manifest."""
    config, items = ctx.config, support.selection.items
    # A zero-shot cache (labels only) has no captioner to run; recording "none" says so.
    captioner = captioner if items else NoCaptioner()
    features, caption_keys = encode_items(ctx, support)
    duplicates = None
    if items:
        with ctx.timed("duplicates"):
            found = find_duplicates([it.path for it in items], [it.label for it in items], features.query_features,
                                    drop=not config.keep_duplicates)
        warn_duplicates(found, items)
        duplicates = DuplicatesReport.model_validate(
            duplicates_report(found, [it.path for it in items], config.keep_duplicates))
        support, features, caption_keys = without_items(support, features, caption_keys, found.dropped)
        items = support.selection.items
    label_id = {label: i for i, label in enumerate(support.labels)}
    label_ids = torch.tensor([label_id[it.label] for it in items], dtype=torch.long)
    fitted = fit_cache(ctx, support, features, caption_keys, label_ids) if items else Fitted.zeroshot()
    artifact = store.CacheArtifact(
        labels=support.labels,
        text_weights=support.text_weights.numpy().astype(np.float32),
        image_keys=features.image_keys.numpy().astype(np.float32),
        label_ids=label_ids.numpy().astype(np.int64),
        query_features=features.query_features.numpy().astype(np.float32),
        caption_keys=None if caption_keys is None else caption_keys.numpy().astype(np.float32),
        items=[item_row(it, cap) for it, cap in zip(items, features.captions)],
        manifest=make_manifest(ctx, support, captioner, features, fitted, duplicates),
        image_index=fitted.image_index,
        caption_index=fitted.caption_index,
    )
    ctx.monitor.check()  # the last chance to stop: publishing is atomic and is never interrupted
    ctx.monitor.step("publishing", 1)
    version = store.publish(config.out, artifact, activate=config.activate, owner=config.owner)
    ctx.monitor.advance(1)
    return BuildResult(version, artifact.path, artifact.manifest)


def item_row(item: SupportItem, caption: str | None) -> dict:
    """items.jsonl: each support item with its provenance (a synthetic one's prompt)."""
    row = {"path": str(item.path), "label": item.label, "caption": caption, "origin": item.origin}
    if item.origin == "synthetic":
        row["prompt"] = item.caption
    return row


def make_manifest(
    ctx: BuildContext, support: SupportSet, captioner: Captioner, features: SupportFeatures, fitted: Fitted,
    duplicates: DuplicatesReport | None = None,
) -> Manifest:
    config, items = ctx.config, support.selection.items
    return Manifest(
        schema_version=store.SCHEMA_VERSION,
        name=ctx.name,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo.model_validate(ctx.encoder.info()),
        labels=support.labels,
        prompts=support.prompts,
        counts=Counts(classes=len(support.labels), items=len(items), dim=int(support.text_weights.shape[0]),
                      per_class=support.selection.per_class(), skipped=len(support.selection.skipped)),
        captioner=CaptionerInfo.model_validate(captioner.describe()),
        generator=None if support.synthesis is None else GeneratorInfo.model_validate(
            {**synthesis_config(ctx).describe(), "support": config.support}),
        shots=support.shots,
        views=config.views,
        seed=config.seed,
        temperature=DEFAULT_TEMPERATURE,
        params=fitted.params,
        tuning=fitted.tuning,
        faiss=fitted.faiss,
        build_report=build_report(ctx, support, features, duplicates),
        calibration=fitted.calibration,
    )


def without_items(
    support: SupportSet, features: SupportFeatures, caption_keys: torch.Tensor | None, dropped: list[int]
) -> tuple[SupportSet, SupportFeatures, torch.Tensor | None]:
    """The support set, its features and caption keys without the items at `dropped`."""
    if not dropped:
        return support, features, caption_keys
    gone = set(dropped)
    keep = [i for i in range(len(support.selection.items)) if i not in gone]
    index = torch.tensor(keep, dtype=torch.long)
    selection = dataclasses.replace(support.selection, items=[support.selection.items[i] for i in keep])
    features = dataclasses.replace(features, image_keys=features.image_keys[index],
                                   query_features=features.query_features[index],
                                   captions=[features.captions[i] for i in keep])
    return (dataclasses.replace(support, selection=selection), features,
            None if caption_keys is None else caption_keys[index])


def warn_duplicates(found: Duplicates, items: list[SupportItem]) -> None:
    for group in found.conflicts:
        log.warning("the same image carries different labels (%s): %s", group.kind,
                    ", ".join(f"{items[i].path} [{items[i].label}]" for i in group.members))
    if found.dropped:
        log.warning("dropped %d exact duplicate support images (--keep-duplicates keeps them)", len(found.dropped))


def encode_items(ctx: BuildContext, support: SupportSet) -> tuple[SupportFeatures, torch.Tensor | None]:
    """The "encoding" and "caption-keys" steps: image keys, query features (given by a pool
    build, which encoded them already), caption keys of the items' captions.

    No items (a zero-shot cache): 0 x D arrays and no caption keys.
    """
    config, items = ctx.config, support.selection.items
    if not items:
        empty = torch.empty(0, int(support.text_weights.shape[0]))
        return SupportFeatures(empty, empty.clone(), [], {"decode_s": 0.0, "encode_s": 0.0, "caption_s": 0.0}), None
    ctx.step("encoding", len(items))
    features = encode_support(ctx.encoder, items, ItemCaptions(), config.views, config.batch_size, config.seed,
                              config.progress, ctx.monitor, support.query_features,
                              open_image=lambda item: support.images.take(item.path))
    if not has_captions(features.captions):
        return features, None
    ctx.step("caption-keys", len(items))  # a text-tower pass of its own
    t0 = time.perf_counter()
    caption_keys = encode_captions(ctx.encoder, features.captions, monitor=ctx.monitor)
    features.timings["caption_keys_s"] = time.perf_counter() - t0
    return features, caption_keys


@dataclass
class Fitted:
    """Tuned parameters, their report, and the FAISS indexes with their agreement report."""

    params: TunedParams
    tuning: TuningReport
    faiss: FaissReport
    image_index: object | None = None
    caption_index: object | None = None
    calibration: Calibration = field(default_factory=lambda: Calibration(protocol=NO_CALIBRATION))

    @classmethod
    def zeroshot(cls) -> Fitted:
        """A cache without support items serves zero-shot only: nothing to tune or index."""
        return cls(
            params=TunedParams(best_method="zeroshot", methods={}),
            tuning=TuningReport(protocol="none: the cache has no support items (labels only)", n_queries=0,
                                loo_top1={}),
            faiss=FaissReport(index=None, k=None, n_queries=0, methods={}),
        )


def fit_cache(
    ctx: BuildContext,
    support: SupportSet,
    features: SupportFeatures,
    caption_keys: torch.Tensor | None,
    label_ids: torch.Tensor,
) -> Fitted:
    """The "tuning" and "indexing" steps.

    A pool build serves tip with POOL_TIP_PARAMS under auto (docs/methods.md: tuning on
    pseudo-labels cannot pick a method); the report and FAISS check describe those.
    """
    config, pool_build = ctx.config, support.pool is not None
    cache = CacheTensors.build(support.text_weights, features.image_keys, label_ids, caption_keys,
                               temperature=DEFAULT_TEMPERATURE, device=ctx.encoder.device)
    grid = Grid()
    ctx.step("tuning", len(grid.deltas_for(caption_keys is not None)))
    fixed = {"fixed": {"tip": POOL_TIP_PARAMS}, "fixed_best": "tip"} if pool_build else {}
    with ctx.timed("tune"):
        tuning = tune(cache, features.query_features, label_ids, grid, seed=config.seed, monitor=ctx.monitor,
                      target_precision=config.target_precision, **fixed)

    ctx.step("indexing", 1 if caption_keys is None else 2)
    image_index = build_index(features.image_keys.numpy(), config.index_kind)
    ctx.monitor.advance(1)
    caption_index = None
    if caption_keys is not None:
        ctx.monitor.check()
        caption_index = build_index(caption_keys.numpy(), config.index_kind)
        ctx.monitor.advance(1)
    ctx.monitor.check()
    faiss_report = topk_agreement(cache, features.query_features, label_ids, tuning.params,
                                  image_index, caption_index, config.faiss_k)
    report = tuning.report()
    if pool_build:
        report["protocol"] = ("balanced leave-one-out on the pool's zero-shot pseudo-labels (as for labelled "
                              "builds); zero-shot agrees with them by construction, so auto serves tip with "
                              f"fixed parameters {POOL_TIP_PARAMS.as_dict()}")
    calibration = Calibration(protocol=POOL_CALIBRATION) if pool_build \
        else Calibration.model_validate(tuning.calibration)
    return Fitted(TunedParams.model_validate(tuning.manifest_params()), TuningReport.model_validate(report),
                  FaissReport.model_validate({"index": config.index_kind, **faiss_report}),
                  image_index, caption_index, calibration)


def build_report(
    ctx: BuildContext, support: SupportSet, features: SupportFeatures, duplicates: DuplicatesReport | None = None
) -> BuildReport:
    config, selection = ctx.config, support.selection
    n = len(selection.items)
    encode_s = features.timings["encode_s"]
    return BuildReport(
        mode=ctx.mode,
        source=support.source,
        candidates=support.candidates,
        used=n,
        skipped=[vars(s) for s in selection.skipped],
        skipped_count=len(selection.skipped),
        short_classes={lb: c for lb, c in selection.per_class().items() if support.shots and c < support.shots},
        timings_s={**{k: round(v, 3) for k, v in ctx.timings.items()},
                   **{k: round(v, 3) for k, v in features.timings.items()},
                   "total": round(time.perf_counter() - ctx.started, 3)},
        throughput={"encoded_views_per_s": n * config.views / encode_s if encode_s else None,
                    "batch_images": config.batch_size, "batch_crops": config.batch_size * config.views},
        origin_per_class=origin_per_class(selection),
        **({} if support.pool is None else {"pool": PoolReport.model_validate(support.pool.report())}),
        duplicates=duplicates,
        **({} if support.synthesis is None else {"synthesis": SynthesisReport.model_validate(vars(support.synthesis))}),
    )


def origin_per_class(selection: Selection) -> dict[str, dict[str, int]]:
    counts = {label: {"real": 0, "synthetic": 0} for label in selection.labels}
    for item in selection.items:
        counts[item.label][item.origin] += 1
    return counts


def topk_agreement(
    cache: CacheTensors,
    query_features: torch.Tensor,
    label_ids: torch.Tensor,
    params: dict,
    image_index,
    caption_index,
    k: int,
    max_queries: int = 2000,
    chunk: int = AGREEMENT_CHUNK,
) -> dict:
    """How far the FAISS top-k blend is from the dense one, leave-one-out on the support set.

    Queries go `chunk` at a time: a dense pass holds queries x N intermediates (2000 queries
    over 100k keys would be 800 MB each)."""
    all_ids = query_ids(cache.num_items, max_queries, seed=0).to(cache.device)
    queries_all = query_features.to(cache.device, torch.float32)
    truth_all = label_ids.to(cache.device)
    report = {"k": k, "n_queries": len(all_ids), "methods": {}}
    for method in CACHE_METHODS:
        if method not in params:
            continue
        p = params[method].for_method(method)
        agree = right_dense = right_topk = 0
        max_diff = 0.0
        for ids in all_ids.split(chunk):
            n = len(ids)
            queries, truth = queries_all[ids], truth_all[ids]
            exclude = torch.zeros(n, cache.num_items, dtype=torch.bool, device=cache.device)
            exclude[torch.arange(n, device=cache.device), ids] = True
            dense = blend(queries, cache, p, method, exclude)
            candidates = search_candidates(queries, image_index, caption_index, k + 1, p.delta)
            # Self out of the candidates and of the estimate for the unretrieved items, as dense excludes it.
            approx = blend_candidates(queries, cache, p, method, candidates, left_out=ids.view(-1, 1))
            agree += int((dense.argmax(1) == approx.argmax(1)).sum())
            right_dense += int((dense.argmax(1) == truth).sum())
            right_topk += int((approx.argmax(1) == truth).sum())
            max_diff = max(max_diff, float((dense - approx).abs().max()))
        total = len(all_ids)
        report["methods"][method] = {
            "top1_agreement": agree / total,
            "max_abs_logit_diff": max_diff,
            "top1_dense": right_dense / total,
            "top1_topk": right_topk / total,
        }
    return report
