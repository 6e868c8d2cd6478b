"""The three ways a build gets its support set (docs/methods.md), one function each.

Each runs the steps only its mode has (reading; pool: pseudo-labelling) and the text step,
and returns a SupportSet for the shared tail in build.py (encode -> tune -> publish):

  labelled     a data folder or manifest of labelled images, sampled and checked
  labels-only  labels alone: a zero-shot cache with no support items
  pool         labels and a folder of unlabelled images, pseudo-labelled by zero-shot
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvclip.cache_builder.context import BuildConfig, BuildContext
from kvclip.cache_builder.decoded import DecodedImages
from kvclip.cache_builder.pool import PoolSelection, encode_pool, pseudo_label
from kvclip.cache_builder.sources import (
    Selection,
    Skipped,
    check_labels,
    discover_folder,
    discover_images,
    order_labels,
    planned_support,
    read_labels_file,
    read_manifest,
    select_support,
)
from kvclip.cache_builder.synthesize import SynthesisReport
from kvclip.errors import DataError
from kvclip.manifest import PromptSet
from kvclip.prompts import (
    DEFAULT_TEMPLATES,
    check_descriptions,
    check_templates,
    load_descriptions,
    load_templates,
    text_classifier,
)

log = logging.getLogger("kvclip.build")


@dataclass
class SupportSet:
    """What a mode hands the shared tail."""

    labels: list[str]
    prompts: PromptSet
    text_weights: torch.Tensor  # D x C, on the CPU
    selection: Selection  # the support items, grouped by class in label order
    source: str  # what the build read (the build report's "source")
    candidates: int  # images listed (labelled: of the cache's labels; pool: files found)
    shots: int | None  # per class asked for (None: all; 0: no support)
    images: DecodedImages = field(default_factory=DecodedImages)  # support images decoded already
    query_features: torch.Tensor | None = None  # plain-view features encoded already (pool)
    pool: PoolSelection | None = None
    synthesis: SynthesisReport | None = None  # when the build rendered support images


def labelled_support(ctx: BuildContext) -> SupportSet:
    """Sample up to `shots` readable images per class; the reading step checks each one decodes."""
    config = ctx.config
    prompts = read_prompts(config)
    links: list[Skipped] = []  # links out of the folder (server builds)
    within = config.data_dir if config.confine_links else None
    items = read_manifest(config.manifest) if config.manifest else discover_folder(config.data_dir, within, links)
    labels = order_labels(items, read_labels(config) if config.has_labels else None)
    known = set(labels)
    candidates = [it for it in items if it.label in known]
    ctx.monitor.step("reading", planned_support(candidates, labels, config.shots))
    images = DecodedImages()
    selection = select_support(candidates, labels, config.shots, config.seed, config.progress, ctx.monitor, images)
    selection.skipped[:0] = links
    warn_skipped(selection.skipped)
    return SupportSet(labels, prompts, text_weights(ctx, labels, prompts), selection,
                      config.source_name or str(config.manifest or config.data_dir), len(items), config.shots,
                      images)


def labels_only_support(ctx: BuildContext) -> SupportSet:
    """No support items: the cache serves zero-shot from its text weights alone."""
    config = ctx.config
    prompts = read_prompts(config)
    labels = read_labels(config)
    ctx.monitor.step("reading", 0)
    return SupportSet(labels, prompts, text_weights(ctx, labels, prompts), Selection(labels, []),
                      labels_source(config), 0, 0)


def pool_support(ctx: BuildContext) -> SupportSet:
    """Encode the pool, then keep each class's most confident zero-shot pseudo-labelled images."""
    config = ctx.config
    prompts = read_prompts(config)
    labels = read_labels(config)
    links: list[Skipped] = []
    paths = discover_images(config.pool_dir, config.pool_dir if config.confine_links else None, links)
    ctx.monitor.step("reading", 0)
    encoder = ctx.encoder  # loaded before the step starts, as for the text step
    ctx.step("pseudo-labelling", len(paths))
    images = DecodedImages()
    with ctx.timed("pseudo_label"):
        features = encode_pool(encoder, paths, config.batch_size * config.views, config.progress, ctx.monitor,
                               images)
    warn_skipped(links + features.skipped)
    weights = text_weights(ctx, labels, prompts)  # they pick the pool's support items (cache_builder/pool.py)
    pool = pseudo_label(features, weights, labels, config.pool_per_class)
    for label in pool.empty_classes:
        log.warning("no pool image was pseudo-labelled %r: the class keeps its zero-shot text weights", label)
    images.retain(item.path for item in pool.items)
    selection = Selection(labels, pool.items, links + features.skipped,
                          {lb: p.assigned for lb, p in zip(labels, pool.picks)})
    return SupportSet(labels, prompts, weights, selection, config.source_name or str(config.pool_dir), len(paths),
                      config.pool_per_class,
                      images, pool.features, pool)


MODE_SUPPORT: dict[str, Callable[[BuildContext], SupportSet]] = {
    "labelled": labelled_support, "labels-only": labels_only_support, "pool": pool_support,
}


def text_weights(ctx: BuildContext, labels: list[str], prompts: PromptSet) -> torch.Tensor:
    """The "text" step: the prompt-ensemble classifier W_t (D x C)."""
    encoder = ctx.encoder  # a model loads before the step starts, so its time is not the step's

    def classes_done(n: int) -> None:
        ctx.monitor.advance(n)
        ctx.monitor.check()

    ctx.step("text", len(labels))
    with ctx.timed("text"):
        return text_classifier(encoder.encode_texts, labels, prompts.templates, prompts.descriptions,
                               on_classes=classes_done).cpu()


def read_labels(config: BuildConfig) -> list[str]:
    """The label set, given in memory or as a labels file; checked by the builder's rules."""
    if config.labels is None:
        labels = read_labels_file(config.labels_file)
    else:
        labels = list(config.labels)
        if not labels:
            raise DataError("the label set is empty")
    check_labels(labels)
    return labels


def labels_source(config: BuildConfig) -> str:
    return str(config.labels_file) if config.labels is None else f"{len(config.labels)} labels given in memory"


def read_prompts(config: BuildConfig) -> PromptSet:
    """Templates and descriptions, given in memory or as files (a str or Path)."""
    templates = list(DEFAULT_TEMPLATES) if config.templates is None else \
        _file_or_values(config.templates, load_templates, _checked_templates)
    descriptions = None if config.descriptions is None else \
        _file_or_values(config.descriptions, load_descriptions, check_descriptions)
    return PromptSet(templates=templates, descriptions=descriptions)


def _file_or_values(given: object, read_file: Callable, check_values: Callable):
    return read_file(given) if isinstance(given, (str, os.PathLike)) else check_values(given)


def _checked_templates(templates: Sequence[str]) -> list[str]:
    if not templates:
        raise DataError("templates: no templates")
    check_templates(templates)
    return list(templates)


def warn_skipped(skipped: list[Skipped]) -> None:
    for entry in skipped:
        log.warning("skipped %s: %s", entry.path, entry.reason)
