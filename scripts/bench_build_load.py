"""Classify latency at a steady load, idle and while a cache build runs (a benchmark, not a test).

    python scripts/bench_build_load.py --arch ViT-B-32 --seconds 60

What it does:
  1. makes a seeded random checkpoint of --arch (timing does not depend on the weights), a
     small cache, and starts `kvclip serve` on 127.0.0.1 (as scripts/bench_server.py does),
  2. measures the server's closed-loop throughput at concurrency 1, then offers an open-loop
     steady load at --load (default 0.5) of it: requests arrive at fixed intervals, one
     ImageNet-size JPEG each, whatever the answers' speed (so queueing shows in latency),
  3. phase "idle": that load for --seconds; p50/p95/p99,
  4. phase "build": uploads a Fashion-MNIST folder as a build job (POST /v1/caches/NAME/builds),
     waits until the job is encoding images (its heaviest step), and offers the same load for
     --seconds; p50/p95/p99,
  5. waits for the job, and reports its time under load and its step at the end of the window.
The build runs in its own process at the server's --build-nice; the goal is build p99 <= 2x
the idle p99.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import signal
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import bench_cache, free_port, load_run, start_server

from kvclip.cache_builder.datasets import export_fashion_mnist
from kvclip.models import default_device
from tests.foolbox_data import read_foolbox_images


async def open_loop(url: str, images: list[bytes], rate: float, seconds: float) -> dict:
    """Requests at fixed intervals of 1/rate s for `seconds`; latency of each."""
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=256)) as client:

        async def one(i: int) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            r = await client.post("/v1/classify", params={"cache": "bench"},
                                  files=[("file", (f"{i}.jpg", images[i % len(images)], "image/jpeg"))])
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

        tasks, start, i = [], time.perf_counter(), 0
        while (due := start + i / rate) < start + seconds:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
            i += 1
        await asyncio.gather(*tasks)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {"requests": len(latencies), "errors": errors, "p50_ms": q[49] * 1000, "p95_ms": q[94] * 1000,
            "p99_ms": q[98] * 1000, "max_ms": max(latencies) * 1000}


def zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--seconds", type=float, default=60.0, help="load per phase")
    ap.add_argument("--load", type=float, default=0.5, help="offered load as a share of measured capacity")
    ap.add_argument("--shots", type=int, default=16, help="build: images per class (10 classes)")
    ap.add_argument("--views", type=int, default=10, help="build: random views per image")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    device = default_device() if args.device is None else args.device

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = bench_cache(args.arch, tmp, device)
        export_fashion_mnist(tmp / "upload", "train", per_class=args.shots, seed=1)
        upload = zip_folder(tmp / "upload")
        images = [img.data for img in read_foolbox_images("imagenet")]
        port = free_port()
        server = start_server(model, tmp / "caches", port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            capacity = asyncio.run(load_run(url, images, 1, 10.0))["images_per_s"]
            rate = args.load * capacity
            print(f"# capacity at concurrency 1: {capacity:.2f} req/s; offering {rate:.2f} req/s", file=sys.stderr)
            idle = asyncio.run(open_loop(url, images, rate, args.seconds))
            options = {"shots": args.shots, "views": args.views, "captioner": "none"}
            job = httpx.post(f"{url}/v1/caches/upload/builds", data={"options": json.dumps(options)},
                             files={"data": ("data.zip", upload, "application/zip")}, timeout=300).json()
            # Load starts once the build encodes images, its heaviest step (not while the
            # worker process starts and loads its model).
            while (started := httpx.get(f"{url}/v1/jobs/{job['id']}").json())["step"] != "encoding":
                if started["state"] in ("succeeded", "failed", "cancelled"):
                    raise SystemExit(f"the build ended before encoding: {started}")
                time.sleep(0.2)
            during = asyncio.run(open_loop(url, images, rate, args.seconds))
            at_end = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
            while (final := httpx.get(f"{url}/v1/jobs/{job['id']}").json())["state"] not in (
                    "succeeded", "failed", "cancelled"):
                time.sleep(1)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    crops = 10 * args.shots * (args.views + 1)
    print(f"arch {args.arch} (random weights)  device {device}  offered load {rate:.2f} req/s "
          f"({args.load:.0%} of {capacity:.2f} req/s closed-loop capacity)  {args.seconds:.0f} s per phase")
    print(f"build: 10 classes x {args.shots} shots x ({args.views} views + 1 plain) = {crops} crops; "
          f"worker niced (server default --build-nice), 1 torch thread\n")
    print("| phase | requests | errors | p50 ms | p95 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    for name, row in (("idle", idle), ("build running", during)):
        print(f"| {name} | {row['requests']} | {row['errors']} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
              f"{row['p99_ms']:.0f} | {row['max_ms']:.0f} |")
    print(f"\np99 with a build / idle p99: {during['p99_ms'] / idle['p99_ms']:.2f} (goal <= 2)")
    print(f"build at the end of the loaded window: {at_end['state']}, step {at_end['step']} "
          f"{at_end['done']}/{at_end['total']}; finished {final['state']} in {final['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
