"""The "synthesizing" step: add Stable Diffusion support images to a mode's support set.

Real support images are captioned first (through the build's caption cache, so the encoding
step finds those captions again) to make CapS prompts; then `--support` picks real,
synthetic or both as the support items.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from kvclip.cache_builder.caption_cache import build_captioner
from kvclip.cache_builder.context import BuildContext
from kvclip.cache_builder.modes import SupportSet
from kvclip.cache_builder.sources import Selection, SupportItem
from kvclip.cache_builder.synthesize import (
    WORK_DIR_NAME,
    Renderer,
    SynthesisConfig,
    captions_by_class,
    synthesis_prompts,
    synthesize,
)
from kvclip.errors import DataError
from kvclip.images import load_image
from kvclip.vocabulary import SUPPORT_KINDS


def synthesis_config(ctx: BuildContext) -> SynthesisConfig:
    c = ctx.config
    return SynthesisConfig(per_class=c.synthesize, model=c.sd_model, guidance=c.guidance, steps=c.sd_steps,
                           seed=c.seed, batch_size=c.synthesis_batch_size)


def with_synthetic(ctx: BuildContext, support: SupportSet) -> SupportSet:
    config = ctx.config
    if config.support not in SUPPORT_KINDS:
        raise DataError(f"--support must be one of {', '.join(SUPPORT_KINDS)}, not {config.support!r}")
    if config.synthesize < 0:
        raise DataError(f"--synthesize must be 0 or more, not {config.synthesize}")
    if config.synthesize == 0:
        if config.support == "synthetic":
            raise DataError("--support synthetic needs --synthesize K (images rendered per class)")
        return support
    if config.support == "real":
        raise DataError("--support real uses no rendered images: drop --synthesize, or use synthetic or both")
    real = support.selection.items
    with ctx.timed("caption_for_prompts"):
        captions = captions_by_class(real, real_captions(ctx, real)) if real else {}
    descriptions = support.prompts.descriptions or {}
    prompts = {label: synthesis_prompts(label, config.synthesize, captions.get(label, ()), descriptions.get(label, ()))
               for label in support.labels}
    synth = synthesis_config(ctx)
    ctx.step("synthesizing", config.synthesize * len(support.labels))
    with ctx.timed("synthesize"):
        made, report = synthesize(support.labels, prompts, synth, config.synthesis_dir or Path(config.out) /
                                  WORK_DIR_NAME, lambda: Renderer(config.sd_model, ctx.encoder.device), ctx.monitor)
    items = made if config.support == "synthetic" else grouped(support.labels, [*real, *made])
    selection = Selection(support.labels, items, support.selection.skipped, support.selection.available)
    # Pool builds hand over the pool images' plain-view features; the set changed, so encode them all again.
    return dataclasses.replace(support, selection=selection, synthesis=report, query_features=None)


def real_captions(ctx: BuildContext, items: list[SupportItem]) -> list[str | None]:
    captioner = build_captioner(ctx.config, ctx.encoder.device)
    if not captioner.needs_images:
        return captioner.caption(items, None)
    out: list[str | None] = []
    step = ctx.config.batch_size
    for start in range(0, len(items), step):
        ctx.monitor.check()
        chunk = items[start : start + step]
        out.extend(captioner.caption(chunk, [load_image(item.path) for item in chunk]))
    return out


def grouped(labels: list[str], items: list[SupportItem]) -> list[SupportItem]:
    """Items grouped by class in label order (stable within a class: real images first)."""
    order = {label: i for i, label in enumerate(labels)}
    return sorted(items, key=lambda item: order[item.label])
