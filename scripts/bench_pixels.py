"""Host-side preprocessing per image: float32 pixels normalised on the host (kvclip before)
against 8-bit pixels normalised by the encoder (now). A benchmark, not a test.

    python scripts/bench_pixels.py --size 640x480 --images 32 --rounds 10

Both paths start from the same decoded Pillow images and resample the same centre-crop
region (BoundedPreprocess.bound); each round times, interleaved on the same images:
  float  the model's whole open_clip transform (ToTensor, Normalize on the host) and a
         torch.stack of the batch: what the host did and copied before;
  uint8  BoundedPreprocess (Encoder.preprocess: uint8 pixels) and the batch's concatenation
         (Encoder.pixel_batch on a CPU encoder; pinned on CUDA): what it does now (the /255,
         -mean, /std move to the encoder's device).
It prints per-image microseconds per round, the median of the per-round ratios float/uint8
with their min and max, and the bytes per image each path hands to the host-to-device copy.
On a CPU-only machine the normalisation still runs on the CPU (inside encode_images); what
moves off the host's decode threads is only measurable on a GPU host.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import open_clip
import torch
from PIL import Image

from kvclip.preprocess import BoundedPreprocess


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the decoded images")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--input-size", type=int, default=224, help="the model's input size S (ViT-B/32: 224)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(1)
    size = args.input_size
    pre = BoundedPreprocess(open_clip.image_transform(size, is_train=False), size)  # as Encoder.preprocess
    images = [photo(width, height, seed) for seed in range(args.images)]
    print(f"{args.images} images of {width}x{height}, model input {size}px, "
          f"{args.rounds} interleaved rounds, 1 torch thread")

    def float_path() -> torch.Tensor:
        return torch.stack([pre.transform(pre.bound(im)) for im in images])

    def uint8_path() -> torch.Tensor:  # Encoder.pixel_batch on a CPU encoder: a concatenation
        return torch.stack([pre(im) for im in images])

    paths = {"float": float_path, "uint8": uint8_path}
    rows = []
    for r in range(args.rounds):
        timings = {}
        for name in (("float", "uint8") if r % 2 == 0 else ("uint8", "float")):
            start = time.perf_counter()
            paths[name]()
            timings[name] = (time.perf_counter() - start) / len(images) * 1e6
        rows.append(timings)
        print(f"round {r + 1:2d}: float {timings['float']:8.1f} us/img   uint8 {timings['uint8']:8.1f} us/img   "
              f"ratio {timings['float'] / timings['uint8']:5.2f}")
    ratios = [t["float"] / t["uint8"] for t in rows]
    print(f"float / uint8: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")
    per_image = {name: fn()[0].numel() * fn()[0].element_size() for name, fn in paths.items()}
    print(f"bytes per image to copy to the device: float {per_image['float']}, uint8 {per_image['uint8']} "
          f"({per_image['float'] / per_image['uint8']:.0f}x less)")


if __name__ == "__main__":
    main()
