"""`hf:MODEL`: captions from a Hugging Face image-to-text model (BLIP, GIT, ...) through
transformers' image-to-text pipeline, batched, fp16 on CUDA."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from kvclip.cache_builder.sources import SupportItem
from kvclip.errors import ModelLoadError
from kvclip.models import default_device

DEFAULT_MAX_NEW_TOKENS = 30


class HFCaptioner:
    name = "hf"
    needs_images = True

    def __init__(self, model: str, device: torch.device | None = None, batch_size: int = 16,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        from transformers import pipeline  # heavy: only builds that caption with it import it

        self.model_name = model
        self.device = device or default_device()
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.pipe = pipeline("image-to-text", model=model, device=self.device, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            where = "folder" if Path(model).exists() else "hub id (offline, or not in the local Hugging Face cache?)"
            raise ModelLoadError(f"cannot load captioner hf:{model} ({where}): {exc}") from exc

    @torch.inference_mode()
    def caption(self, items: Sequence[SupportItem], images: Sequence[Image.Image] | None = None) -> list[str | None]:
        if images is None:
            raise ValueError("the hf captioner needs the images")
        out = self.pipe(list(images), batch_size=self.batch_size,
                        generate_kwargs={"max_new_tokens": self.max_new_tokens})
        return [clean(rows[0]["generated_text"]) for rows in out]

    def describe(self) -> dict:
        return {"name": self.name, "model": self.model_name, "max_new_tokens": self.max_new_tokens}


def clean(text: str) -> str:
    return " ".join(text.split()).rstrip(" .") or "an image"
