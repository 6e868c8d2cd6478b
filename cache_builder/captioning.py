"""The "captioning" step: each real support item gets its caption once, before the synthesizing
step (whose CapS prompts are made from them) and the encoding step (whose caption keys are).

A captioner that generates (coca, hf:, openai:, auto with a model) is a step of its own, with
done/total over the support images, so a job shows where a slow captioner is; captions from
files need no step. The captions travel on the items (SupportItem.caption), and encoding reads
them back through ItemCaptions, so nothing is captioned twice and the caption cache counts
each image once.
"""
from __future__ import annotations

import dataclasses

from kvclip.cache_builder.captioners import Captioner
from kvclip.cache_builder.context import BuildContext
from kvclip.cache_builder.modes import SupportSet


def caption_support(ctx: BuildContext, support: SupportSet, captioner: Captioner) -> SupportSet:
    """`support` with every item's caption set by `captioner` (None: no caption)."""
    items = support.selection.items
    if not items:
        return support
    if not captioner.needs_images:
        captions = captioner.caption(items, None)
    else:
        captions = []
        ctx.step("captioning", len(items))
        with ctx.timed("captioning"):
            size = ctx.config.batch_size
            for start in range(0, len(items), size):
                ctx.monitor.check()
                chunk = items[start : start + size]
                # peek, not take: the encoding step takes the decoded images after this one
                captions.extend(captioner.caption(chunk, [support.images.peek(item.path) for item in chunk]))
                ctx.monitor.advance(len(chunk))
    captioned = [dataclasses.replace(item, caption=text) for item, text in zip(items, captions)]
    return dataclasses.replace(support, selection=dataclasses.replace(support.selection, items=captioned))


class ItemCaptions:
    """The encoding step's captioner: each item's caption as the captioning step (or, for a
    synthetic image, its prompt) set it."""

    name = "given"
    needs_images = False

    def caption(self, items, images=None):
        return [item.caption for item in items]

    def describe(self) -> dict:
        return {"name": self.name}
