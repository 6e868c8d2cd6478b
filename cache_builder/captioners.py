"""Captioners: one caption per support image, for CapS caption keys.

  auto     (the default) per image: its sidecar caption when it has one; else, when a
           captioner model is given (--captioner-model), a CoCa caption; else no caption.
           A cache has caption keys (and serves caps) only when every image has a caption;
           with none, or some missing, it has image keys only (tip, tipx). Never an error.
  sidecar  the manifest's "caption", else the text file next to the image (cat.jpg -> cat.txt);
           an image without one is an error
  coca     open_clip CoCa generation from the image
  none     no captions: image keys only (plain Tip-Adapter / Tip-X)
  hf:MODEL     a Hugging Face image-to-text model (cache_builder/hf_captioner.py)
  openai:URL   an OpenAI-compatible vision chat endpoint (cache_builder/openai_captioner.py)

Generative captioners are wrapped in a caption cache (cache_builder/caption_cache.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import open_clip
import torch
from PIL import Image

from kvclip.cache_builder.sources import SupportItem, sidecar_caption
from kvclip.errors import DataError, ModelLoadError
from kvclip.models import create_open_clip_model, default_device
from kvclip.vocabulary import CAPTIONERS, DEFAULT_COCA_MODEL


class Captioner(Protocol):
    name: str
    needs_images: bool  # False: captions come from files, before any image is decoded

    def caption(self, items: Sequence[SupportItem], images: Sequence[Image.Image] | None) -> list[str | None]: ...

    def describe(self) -> dict: ...


class NoCaptioner:
    name = "none"
    needs_images = False

    def caption(self, items, images=None):
        return [None] * len(items)

    def describe(self) -> dict:
        return {"name": self.name}


class SidecarCaptioner:
    name = "sidecar"
    needs_images = False

    def caption(self, items, images=None):
        return [self._one(item) for item in items]

    @staticmethod
    def _one(item: SupportItem) -> str:
        text = sidecar_caption(item)
        if text is None:
            raise DataError(
                f"no caption for {item.path}: expected a non-empty {item.path.with_suffix('.txt')} (or a "
                "\"caption\" field in the manifest); use --captioner auto or --captioner none to build "
                "without captions"
            )
        return text

    def describe(self) -> dict:
        return {"name": self.name}


class AutoCaptioner:
    """Sidecar captions where present, CoCa captions for the rest when a model is given, else none.

    describe() counts where the captions came from, so the build report says what `auto` did;
    a generator wrapped in the caption cache adds how many generated captions it had already.
    """

    name = "auto"

    def __init__(self, generator: Captioner | None = None) -> None:
        self.generator = generator
        self.needs_images = generator is not None  # generation reads the decoded images
        self.counts = {"sidecar": 0, "generated": 0, "uncaptioned": 0}

    def caption(self, items, images=None):
        captions: list[str | None] = [sidecar_caption(item) for item in items]
        missing = [i for i, text in enumerate(captions) if text is None]
        self.counts["sidecar"] += len(items) - len(missing)
        if missing and self.generator is not None and images is not None:
            generated = self.generator.caption([items[i] for i in missing], [images[i] for i in missing])
            for i, text in zip(missing, generated):
                captions[i] = text
            self.counts["generated"] += len(missing)
        else:
            self.counts["uncaptioned"] += len(missing)
        return captions

    def describe(self) -> dict:
        info: dict = {"name": self.name, **self.counts}
        if self.generator is not None:
            info.update({k: v for k, v in self.generator.describe().items() if k != "name"})
        return info


class CocaCaptioner:
    """Generates captions with an open_clip CoCa model (beam search by default)."""

    name = "coca"
    needs_images = True

    def __init__(self, model: str = DEFAULT_COCA_MODEL, device: torch.device | None = None,
                 generation_type: str = "beam_search", seq_len: int = 30, seed: int = 0) -> None:
        self.model_name = model
        self.seed = seed
        self.device = device or default_device()
        self.generation_type = generation_type
        self.seq_len = seq_len
        self.model, self.preprocess, _ = create_open_clip_model(model, self.device)
        if not hasattr(self.model, "generate"):
            raise ModelLoadError(f"captioner model {model!r} is not a CoCa model (it cannot generate text)")
        self.model.eval()

    @torch.inference_mode()
    def caption(self, items, images=None):
        if images is None:
            raise ValueError("the coca captioner needs the images")
        dtype = next(self.model.parameters()).dtype
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device, dtype)
        # Sampling generation types draw from torch's RNG: seed it so a build's captions repeat
        # whatever ran before in the process.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            tokens = self.model.generate(pixels, generation_type=self.generation_type, seq_len=self.seq_len)
        return [_clean(open_clip.decode(row)) for row in tokens]

    def describe(self) -> dict:
        return {"name": self.name, "model": self.model_name, "generation": self.generation_type,
                "seq_len": self.seq_len}


def _clean(text: str) -> str:
    text = text.split("<end_of_text>")[0].replace("<start_of_text>", "")
    return " ".join(text.split()).rstrip(" .") or "an image"


def make_captioner(name: str, model: str | None = None, device: torch.device | None = None,
                   prompt: str | None = None, concurrency: int = 4, api_key: str | None = None,
                   key_from_env: bool = True) -> Captioner:
    """`api_key` and `key_from_env` (may $OPENAI_API_KEY be used) are for openai:URL only."""
    kind, _, target = name.partition(":")
    if kind == "hf" and target:
        from kvclip.cache_builder.hf_captioner import HFCaptioner

        return HFCaptioner(target, device)
    if kind == "openai" and target:
        from kvclip.cache_builder.openai_captioner import DEFAULT_CAPTION_PROMPT, OpenAICaptioner

        return OpenAICaptioner(target, model, api_key=api_key, prompt=prompt or DEFAULT_CAPTION_PROMPT,
                               concurrency=concurrency, key_from_env=key_from_env)
    if name == "auto":
        return AutoCaptioner(CocaCaptioner(model, device) if model else None)
    if name == "none":
        return NoCaptioner()
    if name == "sidecar":
        return SidecarCaptioner()
    if name == "coca":
        return CocaCaptioner(model or DEFAULT_COCA_MODEL, device)
    raise DataError(f"unknown captioner {name!r}; expected one of {', '.join(CAPTIONERS)}, "
                    "hf:MODEL or openai:URL")
