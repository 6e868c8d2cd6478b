"""Build throughput against the raw encoder, at the same batch size (a benchmark, not a test).

    python scripts/bench_build.py --arch ViT-B-32 --images 64 --views 10 --batch-size 16

Times `encode_support` (decode + random views + encode, the builder's hot loop) on real
Fashion-MNIST images, and the bare `model.encode_image` on ready-made pixel tensors of the
same crop batch. Weights are random (timing does not depend on them), made explicitly here;
kvclip's loader itself never hands out random weights for a real architecture.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip
import torch

from kvclip.cache_builder.captioners import NoCaptioner
from kvclip.cache_builder.datasets import export_fashion_mnist
from kvclip.cache_builder.features import encode_support
from kvclip.cache_builder.sources import discover_folder
from kvclip.models import Encoder, default_device, load_encoder, parse_model_spec


def random_encoder(arch: str, device: torch.device) -> Encoder:
    if arch == "tiny-random":
        return load_encoder(arch, device)
    precision = "fp16" if device.type == "cuda" else "fp32"
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, precision=precision, device=device)
    return Encoder(parse_model_spec(f"{arch}:random-for-timing"), model, preprocess,
                   open_clip.get_tokenizer(arch), device, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16, help="images per batch (x views crops)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = torch.device(args.device) if args.device else default_device()
    encoder = random_encoder(args.arch, device)
    crops = args.batch_size * args.views
    print(f"arch {args.arch}  device {device}  dtype {encoder.dtype}  threads {torch.get_num_threads()}  "
          f"images {args.images}  views {args.views}  batch {args.batch_size} images = {crops} crops")

    with tempfile.TemporaryDirectory() as tmp:
        export_fashion_mnist(Path(tmp), "train", per_class=max(1, args.images // 10))
        items = discover_folder(tmp)[: args.images]
        encode_support(encoder, items[: args.batch_size], NoCaptioner(), args.views, args.batch_size, progress=False)  # warm-up
        t0 = time.perf_counter()
        result = encode_support(encoder, items, NoCaptioner(), args.views, args.batch_size, progress=False)
        build_s = time.perf_counter() - t0
    n_views = len(items) * args.views
    pixels = torch.randint(0, 256, (crops, 3, encoder.image_size, encoder.image_size), dtype=torch.uint8)
    encoder.encode_images(pixels)  # warm-up
    batches = max(1, n_views // crops)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        encoder.encode_images(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    raw_s = time.perf_counter() - t0
    raw_rate = batches * crops / raw_s
    build_rate = n_views / build_s
    print(f"builder (decode+augment+encode views, plus the plain view): {build_rate:9.1f} views/s  "
          f"= {len(items) / build_s:8.2f} images/s with {args.views} views")
    print(f"  of which decode+augment {result.timings['decode_s']:.2f}s, encode {result.timings['encode_s']:.2f}s")
    print(f"raw encoder, same {crops}-crop batches:                      {raw_rate:9.1f} views/s")
    print(f"builder / raw: {build_rate / raw_rate:.2f}")


if __name__ == "__main__":
    main()
