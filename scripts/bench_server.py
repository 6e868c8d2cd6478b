"""Server throughput and latency over real HTTP, next to the raw encoder (a benchmark, not a test).

    python scripts/bench_server.py --arch ViT-B-32 --concurrency 1,8,32 --seconds 30

What it does:
  1. makes a seeded, randomly initialised checkpoint of --arch (timing does not depend on
     the weights; kvclip's loader never invents random weights, so it loads this file through
     the normal ARCH:/path route),
  2. builds a small cache with it from real Fashion-MNIST images,
  3. starts `kvclip serve` as a separate process on 127.0.0.1,
  4. for each concurrency c: c client tasks post one real image per request (ImageNet-size
     JPEGs from the foolbox wheel, see scripts/fetch_test_data.sh) for --seconds; reports
     images/s and p50/p95/p99 latency, and the mean encoder batch the server formed (from
     /metrics),
  5. times the raw encoder in-process (model.encode_image on ready pixels, no HTTP, no
     decoding) at the same batch sizes, after the server is stopped, on the same machine.
Client and server share the machine's cores, as they would behind a local proxy.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import open_clip
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serving import free_port  # noqa: E402
from serving import start_server as serve  # noqa: E402

from kvclip.cache_builder.build import BuildConfig, build_cache  # noqa: E402
from kvclip.cache_builder.datasets import export_fashion_mnist  # noqa: E402
from kvclip.images import decode_image  # noqa: E402
from kvclip.models import default_device, load_encoder  # noqa: E402
from kvclip.service.metrics import metric_value  # noqa: E402
from tests.foolbox_data import read_foolbox_images  # noqa: E402


def random_checkpoint(arch: str, folder: Path) -> str:
    """A seeded random-weights open_clip checkpoint file; returns the model name for it."""
    path = folder / f"{arch}-random.pt"
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    torch.save(model.state_dict(), path)
    return f"{arch}:{path}"


def bench_cache(arch: str, tmp: Path, device) -> str:
    """A random `arch` checkpoint and a small cache `bench` under tmp/caches; returns the model name."""
    print(f"# making a random {arch} checkpoint and a cache ...", file=sys.stderr)
    model = random_checkpoint(arch, tmp)
    export_fashion_mnist(tmp / "support", "train", per_class=4, seed=0)
    build_cache(BuildConfig(out=tmp / "caches" / "bench", data_dir=tmp / "support", model=model,
                            shots=4, views=1, captioner="none", device=str(device), progress=False))
    return model


def start_server(model: str, caches: Path, port: int, args) -> subprocess.Popen:
    flags = ["--model", model, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
             "--max-queue", "4096", "--log-level", "WARNING", *(["--device", args.device] if args.device else [])]
    return serve(caches, port, *flags)


async def load_run(url: str, images: list[bytes], concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` clients, each sending its next request when the last returns."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def worker(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < stop_at:
                data = images[i % len(images)]
                i += concurrency
                t0 = time.perf_counter()
                r = await client.post("/v1/classify", params={"cache": "bench", "top_k": 5},
                                      files=[("file", (f"{i}.jpg", data, "image/jpeg"))])
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        before = (await client.get("/metrics")).text
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
        after = (await client.get("/metrics")).text
    batches = metric_value(after, "kvclip_batch_images_count") - metric_value(before, "kvclip_batch_images_count")
    batch_images = metric_value(after, "kvclip_batch_images_sum") - metric_value(before, "kvclip_batch_images_sum")
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "images_per_s": len(latencies) / wall, "p50_ms": q[49] * 1000, "p95_ms": q[94] * 1000,
            "p99_ms": q[98] * 1000, "mean_batch": batch_images / max(batches, 1)}


def raw_encoder_rate(encoder, pixels: torch.Tensor, batch: int, seconds: float) -> float:
    """Images/s of encode_images on ready pixel batches of `batch` images (no HTTP, no decode)."""
    x = pixels[:batch].repeat((batch + len(pixels) - 1) // len(pixels), 1, 1, 1)[:batch]
    encoder.encode_images(x)  # warm-up
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        encoder.encode_images(x)
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=30.0, help="load per concurrency level")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    device = torch.device(args.device) if args.device else default_device()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = bench_cache(args.arch, tmp, device)
        images = [img.data for img in read_foolbox_images("imagenet")]
        port = free_port()
        server = start_server(model, tmp / "caches", port, args)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(load_run(url, images, min(levels), 3.0))  # warm-up
            rows = [asyncio.run(load_run(url, images, c, args.seconds)) for c in levels]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

        encoder = load_encoder(model, device)
        pixels = torch.stack([encoder.preprocess(decode_image(b)) for b in images])
        for row in rows:
            batch = max(1, round(row["mean_batch"]))
            row["raw_batch"] = batch
            row["raw_images_per_s"] = raw_encoder_rate(encoder, pixels, batch, min(args.seconds, 15.0))
        full = raw_encoder_rate(encoder, pixels, args.max_batch, min(args.seconds, 15.0))

    print(f"arch {args.arch} (random weights)  device {device}  dtype {encoder.dtype}  "
          f"torch threads {torch.get_num_threads()}  cores {os.cpu_count()}  max_batch {args.max_batch}  "
          f"max_wait_ms {args.max_wait_ms}  {args.seconds:.0f} s per level, 1 ImageNet JPEG per request")
    print(f"raw encoder at batch {args.max_batch}: {full:.1f} images/s\n")
    print("| concurrency | requests | errors | images/s | p50 ms | p95 ms | p99 ms | mean batch "
          "| raw encoder images/s (same batch) | server / raw |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['images_per_s']:.1f} | "
              f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | "
              f"{r['raw_images_per_s']:.1f} (batch {r['raw_batch']}) | "
              f"{r['images_per_s'] / r['raw_images_per_s']:.2f} |")


if __name__ == "__main__":
    main()
