"""Closed-loop HTTP clients for the benchmark scripts (httpx only: no torch).

`concurrency` clients each send their next request when the last returns, for `seconds` (one
request each at least); a request carries `per_request` JPEGs. bench_server.py runs them in
its own process, or, with --client-processes, splits them over several processes running this
file, so that one Python event loop does not cap the rate a GPU server can reach:

    python scripts/load_clients.py URL IMAGES_DIR --concurrency 64 --seconds 10 --first 0 --stride 256

As a script it loads its images (IMAGES_DIR/*.jpg, sorted), opens its connections, prints
`ready`, waits for a line on stdin (so that every process starts at once), runs, and prints one
JSON line: requests, images, wall seconds, each request's latency, the first errors.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass
class LoopResult:
    requests: int = 0
    images: int = 0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the first few failed requests, "STATUS BODY"


async def closed_loop(client: httpx.AsyncClient, images: list[bytes], concurrency: int, seconds: float, *,
                      path: str, params: dict, per_request: int = 1, first: int = 0,
                      stride: int | None = None) -> LoopResult:
    """Client k (of `concurrency`) starts at image (first + k) * per_request and steps by
    `stride` clients (default: concurrency), so clients split over processes send different images."""
    stride = concurrency if stride is None else stride
    result = LoopResult()
    stop_at = time.perf_counter() + seconds

    async def one_client(k: int) -> None:
        i = first + k
        while i == first + k or time.perf_counter() < stop_at:
            files = [("file", (f"{i}-{j}.jpg", images[(i * per_request + j) % len(images)], "image/jpeg"))
                     for j in range(per_request)]
            i += stride
            t0 = time.perf_counter()
            r = await client.post(path, params=params, files=files)
            if r.status_code == 200:
                result.latencies_s.append(time.perf_counter() - t0)
                result.requests += 1
                result.images += per_request
            elif len(result.errors) < 5:
                result.errors.append(f"{r.status_code} {r.text[:200]}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(k) for k in range(concurrency)))
    result.wall_s = time.perf_counter() - t0
    return result


def client_limits(concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)


async def _serve_one_process(args: argparse.Namespace) -> LoopResult:
    images = [p.read_bytes() for p in sorted(Path(args.images_dir).glob("*.jpg"))]
    if not images:
        raise SystemExit(f"{args.images_dir}: no *.jpg")
    async with httpx.AsyncClient(base_url=args.url, limits=client_limits(args.concurrency), timeout=300) as client:
        # One connection per client opened before the start, as the single-process loop has from its warm-up.
        await asyncio.gather(*(client.get("/healthz") for _ in range(args.concurrency)))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        return await closed_loop(client, images, args.concurrency, args.seconds, path=args.path,
                                 params=json.loads(args.params), per_request=args.per_request,
                                 first=args.first, stride=args.stride)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("images_dir")
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--path", default="/v1/classify")
    ap.add_argument("--params", default="{}", help="query parameters, as JSON")
    ap.add_argument("--per-request", type=int, default=1)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--stride", type=int, default=None)
    result = asyncio.run(_serve_one_process(ap.parse_args()))
    print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
