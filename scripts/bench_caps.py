"""CapS support-set throughput with tiny random models (a benchmark, not a test).

    python scripts/bench_caps.py [--json]

Measures, on this machine: hf: caption throughput (tiny BLIP) by batch size, Stable Diffusion
render throughput (tiny UNet/VAE/CLIP text encoder) by batch size and steps, and one
labelled build with --synthesize and an hf: captioner, split by step (build_report.timings_s).
The tiny models are those the tests build (tests/tiny_hf.py); the figures show the pipeline's
overheads and scaling, not the speed of real BLIP or SD v1-4.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the tiny model builders

import torch
from PIL import Image

from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cache_builder.hf_captioner import HFCaptioner
from kvclip.cache_builder.synthesize import Renderer
from tests.conftest import write_images
from tests.tiny_hf import save_tiny_blip, save_tiny_stable_diffusion


def caption_rates(blip: Path, device: torch.device, images: int = 32) -> dict[int, float]:
    pictures = [Image.new("RGB", (64, 64), (i * 7 % 255, 80, 160)) for i in range(images)]
    rates = {}
    for batch in (1, 4, 16):
        captioner = HFCaptioner(str(blip), device, batch_size=batch)
        captioner.caption([None] * 4, pictures[:4])  # warm-up
        t0 = time.perf_counter()
        captioner.caption([None] * images, pictures)
        rates[batch] = images / (time.perf_counter() - t0)
    return rates


def render_rates(sd: Path, device: torch.device, images: int = 8) -> dict[str, float]:
    renderer = Renderer(str(sd), device)
    renderer(["A photo of a cat."], [0], 9.5, 2)  # warm-up
    rates = {}
    for steps in (10, 25):
        for batch in (1, 4):
            t0 = time.perf_counter()
            for start in range(0, images, batch):
                n = min(batch, images - start)
                renderer(["A photo of a cat. A cat on a rug."] * n, list(range(start, start + n)), 9.5, steps)
            rates[f"steps={steps} batch={batch}"] = images / (time.perf_counter() - t0)
    return rates


def build_split(blip: Path, sd: Path, work: Path) -> dict[str, float]:
    data = work / "data"
    for i, label in enumerate(["cat", "dog", "bird", "fish"]):
        write_images(data / label, 4, seed=i, size=64)
    result = build_cache(BuildConfig(out=work / "caches" / "bench", data_dir=data, model="tiny-random", views=4,
                                     captioner=f"hf:{blip}", synthesize=4, sd_model=str(sd), sd_steps=10,
                                     progress=False, device="cpu"))
    return result.manifest.build_report.timings_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        blip, sd = save_tiny_blip(work / "blip"), save_tiny_stable_diffusion(work / "sd")
        figures = {"threads": torch.get_num_threads(), "caption_per_s": caption_rates(blip, device),
                   "render_per_s": render_rates(sd, device), "build_timings_s": build_split(blip, sd, work)}
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"torch threads {figures['threads']}")
    for batch, rate in figures["caption_per_s"].items():
        print(f"hf caption  batch {batch:>2}: {rate:7.1f} images/s")
    for key, rate in figures["render_per_s"].items():
        print(f"render {key}: {rate:7.2f} images/s")
    print("build (4 classes x 4 real + 4 synthetic, 4 views): " +
          ", ".join(f"{k} {v:.2f}s" for k, v in figures["build_timings_s"].items()))


if __name__ == "__main__":
    main()
