"""Synthetic support images: Stable Diffusion renders K images per class (docs/methods.md).

Prompts follow CapS-Adapter, "A photo of {class}. {caption}", cycling over captions of the
class's real support images; a build without real images (labels only) prompts as SuS-X's
SuS-SD does, with the class's descriptions, or the class name alone. Each rendered image is
kept in a work folder under a key of (prompt, seed, model, guidance, steps), so a killed
build restarts without rendering again. Black or NSFW-flagged outputs are rendered again with
another seed, a bounded number of times, and reported.
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kvclip.cache_builder.progress import BuildMonitor
from kvclip.cache_builder.sources import SupportItem
from kvclip.errors import ModelLoadError
from kvclip.prompts import class_text
from kvclip.vocabulary import DEFAULT_GUIDANCE, DEFAULT_SD_MODEL, DEFAULT_SD_STEPS

DEFAULT_RETRIES = 2  # renders again per image after a black or NSFW-flagged output
WORK_DIR_NAME = ".synthetic"  # under the cache folder
BLACK_MAX = 8  # an output whose brightest pixel is at most this is black (a safety checker's blank)


@dataclass
class SynthesisConfig:
    per_class: int
    model: str = DEFAULT_SD_MODEL
    guidance: float = DEFAULT_GUIDANCE
    steps: int = DEFAULT_SD_STEPS
    seed: int = 0
    batch_size: int = 4
    retries: int = DEFAULT_RETRIES

    def describe(self) -> dict:
        return {"name": "stable-diffusion", **asdict(self)}


@dataclass
class SynthesisReport:
    rendered: int = 0  # images rendered by this build
    reused: int = 0  # found in the work folder from an earlier (killed or repeated) build
    retried: int = 0  # renders repeated after a black or NSFW-flagged output
    failed: list[dict] = field(default_factory=list)  # {label, prompt, reason}: no usable image


def synthesis_prompts(label: str, k: int, captions: Sequence[str] = (), descriptions: Sequence[str] = ()) -> list[str]:
    """K prompts for one class: CapS with captions of its real images, else SuS-SD style."""
    name = class_text(label)
    extras = [c.strip() for c in captions if c and c.strip()] or [d.strip() for d in descriptions if d.strip()]
    if not extras:
        return [f"A photo of a {name}."] * k
    return [f"A photo of {name}. {_sentence(extras[i % len(extras)])}" for i in range(k)]


def _sentence(text: str) -> str:
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def image_seed(seed: int, label: str, index: int, attempt: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}:{label}:{index}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def work_key(prompt: str, seed: int, config: SynthesisConfig) -> str:
    parts = [prompt, seed, config.model, config.guidance, config.steps]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


@dataclass
class Job:
    label: str
    index: int
    prompt: str
    path: Path
    attempt: int = 0


class Renderer:
    """diffusers' StableDiffusionPipeline, loaded from a folder or hub id; fp16 on CUDA."""

    def __init__(self, model: str, device: torch.device) -> None:
        from diffusers import StableDiffusionPipeline  # heavy: only synthetic builds import it

        self.device = device
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            self.pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load Stable Diffusion model {model!r}: {exc}") from exc
        self.pipe = self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, prompts: list[str], seeds: list[int], guidance: float, steps: int) -> list[tuple[Image.Image, bool]]:
        """(image, flagged NSFW) per prompt; each image from its own seeded generator."""
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        out = self.pipe(prompts, guidance_scale=guidance, num_inference_steps=steps, generator=generators)
        flags = out.nsfw_content_detected or [False] * len(prompts)
        return list(zip(out.images, [bool(f) for f in flags]))


def is_black(image: Image.Image) -> bool:
    return int(np.asarray(image).max()) <= BLACK_MAX


def synthesize(
    labels: Sequence[str],
    prompts: Mapping[str, Sequence[str]],
    config: SynthesisConfig,
    work_dir: Path,
    renderer_factory,
    monitor: BuildMonitor | None = None,
) -> tuple[list[SupportItem], SynthesisReport]:
    """Render (or find in `work_dir`) each class's images; synthetic support items grouped by
    class in label order, their prompts as captions. `renderer_factory()` is called only when
    something needs rendering, so a resumed build with everything kept loads no model."""
    monitor = monitor or BuildMonitor()
    work_dir.mkdir(parents=True, exist_ok=True)
    report = SynthesisReport()
    jobs, done = [], {}
    for label in labels:
        for index, prompt in enumerate(prompts[label]):
            path = work_dir / f"{work_key(prompt, image_seed(config.seed, label, index), config)}.png"
            job = Job(label, index, prompt, path)
            if path.is_file():
                done[(label, index)] = job
                report.reused += 1
                monitor.advance(1)
            else:
                jobs.append(job)
    renderer = renderer_factory() if jobs else None
    while jobs:
        monitor.check()
        batch, jobs = jobs[: config.batch_size], jobs[config.batch_size :]
        seeds = [image_seed(config.seed, j.label, j.index, j.attempt) for j in batch]
        results = renderer([j.prompt for j in batch], seeds, config.guidance, config.steps)
        for job, (image, flagged) in zip(batch, results):
            if flagged or is_black(image):
                reason = "flagged NSFW" if flagged else "black image"
                if job.attempt < config.retries:
                    job.attempt += 1
                    report.retried += 1
                    jobs.append(job)
                    continue
                report.failed.append({"label": job.label, "prompt": job.prompt,
                                      "reason": f"{reason} after {job.attempt + 1} renders"})
                monitor.advance(1)
                continue
            temp = job.path.with_suffix(".tmp.png")
            image.save(temp)
            temp.replace(job.path)  # whole files only: a kill mid-write leaves no half image behind
            done[(job.label, job.index)] = job
            report.rendered += 1
            monitor.advance(1)
    items = [SupportItem(done[key].path, label, done[key].prompt, origin="synthetic")
             for label in labels for key in sorted(k for k in done if k[0] == label)]
    return items, report


def captions_by_class(items: Sequence[SupportItem], captions: Sequence[str | None]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for item, caption in zip(items, captions):
        if caption:
            out[item.label].append(caption)
    return out
