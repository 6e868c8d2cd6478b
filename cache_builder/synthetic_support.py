"""The "synthesizing" step: add Stable Diffusion support images to a mode's support set.

The captioning step (cache_builder/captioning.py) has captioned the real support images
already; their captions make the CapS prompts. Then `--support` picks real, synthetic or
both as the support items.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from kvclip.cache_builder.context import BuildConfig, BuildContext
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
from kvclip.vocabulary import MAX_GUIDANCE, MAX_SD_STEPS, MAX_SYNTHESIZE, SUPPORT_KINDS


def synthesis_config(ctx: BuildContext) -> SynthesisConfig:
    c = ctx.config
    return SynthesisConfig(per_class=c.synthesize, model=c.sd_model, guidance=c.guidance, steps=c.sd_steps,
                           seed=c.seed, batch_size=c.synthesis_batch_size)


def check_synthesis(config: BuildConfig) -> None:
    """The synthesis options, before anything is read or loaded."""
    if config.support not in SUPPORT_KINDS:
        raise DataError(f"--support must be one of {', '.join(SUPPORT_KINDS)}, not {config.support!r}")
    if not 0 <= config.synthesize <= MAX_SYNTHESIZE:
        raise DataError(f"--synthesize must be 0 to {MAX_SYNTHESIZE}, not {config.synthesize}")
    if config.synthesize == 0:
        if config.support == "synthetic":
            raise DataError("--support synthetic needs --synthesize K (images rendered per class)")
        return
    if config.support == "real":
        raise DataError("--support real uses no rendered images: drop --synthesize, or use synthetic or both")
    if not 1 <= config.sd_steps <= MAX_SD_STEPS:
        raise DataError(f"--steps must be 1 to {MAX_SD_STEPS}, not {config.sd_steps}")
    if not 0.0 <= config.guidance <= MAX_GUIDANCE:  # also refuses NaN
        raise DataError(f"--guidance must be 0 to {MAX_GUIDANCE:g}, not {config.guidance}")


def with_synthetic(ctx: BuildContext, support: SupportSet) -> SupportSet:
    config = ctx.config  # check_synthesis(config) passed when the build started
    if config.synthesize == 0:
        return support
    real = support.selection.items
    captions = captions_by_class(real, [item.caption for item in real])
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


def grouped(labels: list[str], items: list[SupportItem]) -> list[SupportItem]:
    """Items grouped by class in label order (stable within a class: real images first)."""
    order = {label: i for i, label in enumerate(labels)}
    return sorted(items, key=lambda item: order[item.label])
