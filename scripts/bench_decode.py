"""Decode + preprocess per image for large photos: the old path against the bounded one (a benchmark, not a test).

    python scripts/bench_decode.py --size 4000x3000 --images 8 --rounds 10

Photo-like JPEGs (smooth colour fields plus sensor-like noise, seeded, quality 90) are made in
memory. Each round times, interleaved on the same images:
  full     decode the whole JPEG, then open_clip's eval transform on the whole picture
           (what kvclip did before: decode_image + the model transform);
  bounded  decode at the reduced DCT scale the model needs (decode_image(min_size=S)), then
           BoundedPreprocess, which resamples only the centre-crop region (8-bit pixels out; the
           encoder normalises on its device, so the difference is taken after normalising them).
It prints per-image milliseconds per round and the median of the per-round ratios full/bounded
with their min and max, and how far the two paths' model inputs differ.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import open_clip
import torch
from PIL import Image

from kvclip.images import decode_image
from kvclip.preprocess import BoundedPreprocess, channel_tensor, normalize


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 200), max(2, width // 200), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--input-size", type=int, default=224, help="the model's input size S (ViT-B/32: 224)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(1)
    transform = open_clip.image_transform(args.input_size, is_train=False)
    bounded = BoundedPreprocess(transform, args.input_size)
    photos = [photo_jpeg(width, height, seed) for seed in range(args.images)]
    print(f"{args.images} JPEGs of {width}x{height} ({sum(map(len, photos)) / len(photos) / 1e6:.1f} MB each), "
          f"model input {args.input_size}px, {args.rounds} interleaved rounds, 1 torch thread")

    def full(data: bytes) -> torch.Tensor:
        return transform(decode_image(data))

    def fast(data: bytes) -> torch.Tensor:
        return bounded(decode_image(data, min_size=args.input_size))

    def fast_input(data: bytes) -> torch.Tensor:  # bounded's uint8 pixels as the model sees them
        return normalize(fast(data), channel_tensor(bounded.mean, torch.device("cpu")),
                         channel_tensor(bounded.std, torch.device("cpu")))

    diff = max(float((full(p) - fast_input(p)).abs().mean()) for p in photos[:2])
    rows = []
    for r in range(args.rounds):
        timings = {}
        for name, fn in ((("full", full), ("bounded", fast)) if r % 2 == 0 else (("bounded", fast), ("full", full))):
            start = time.perf_counter()
            for data in photos:
                fn(data)
            timings[name] = (time.perf_counter() - start) / len(photos) * 1000
        rows.append(timings)
        print(f"round {r + 1:2d}: full {timings['full']:7.1f} ms/img   bounded {timings['bounded']:6.1f} ms/img   "
              f"ratio {timings['full'] / timings['bounded']:5.2f}")
    ratios = [t["full"] / t["bounded"] for t in rows]
    print(f"full / bounded: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}); "
          f"median ms/img full {statistics.median(t['full'] for t in rows):.1f}, "
          f"bounded {statistics.median(t['bounded'] for t in rows):.1f}")
    print(f"mean |difference| of the model inputs (normalised units): {diff:.4f}")


if __name__ == "__main__":
    main()
