"""A hostile-load run against `kvclip serve`: many clients, hot swaps, slow clients (a script, not a test).

    python scripts/load_hot_swap.py --seconds 60 --concurrency 64 --swap-every 5 --slow-clients 16 \
        --overload-max-queue 8 --overload-seconds 20

1. Builds a Fashion-MNIST cache (tiny-random model, two versions) and starts `kvclip serve`
   on 127.0.0.1 with --max-queue 256 (more than 64 one-image clients can fill: no 503s here).
2. Load: --concurrency closed-loop clients send one real test image per request for
   --seconds while the script activates v0001 / v0002 in turn every --swap-every seconds.
   Every answer is counted by status; a 503 must carry Retry-After and an X-Request-ID.
3. Slow clients: --slow-clients raw sockets trickle a request one byte every 0.5 s while
   normal requests go on; each slow connection must be answered 408 or closed within
   --header-timeout-s plus a margin, and normal requests must keep being answered.
4. Overload: a second server with --max-queue (and --max-images) --overload-max-queue takes
   the same --concurrency clients for --overload-seconds, without swaps: the encoder queue
   fills, so requests meet the 503 path; each 503 must carry Retry-After and X-Request-ID,
   and its message says which limit refused it. `--overload-max-queue 0` skips the phase.
It prints requests, errors by status, 503s with Retry-After, p50/p99 latency, swaps done,
the server's RSS before and after, the slow-client outcomes, and the overload phase's counts.
The clients are httpx with its default pool expiry (5 s), below the server's
--keep-alive-timeout-s: an httpx.ReadError here is a dropped connection, not a keep-alive race
(scripts/keepalive_race.py shows that race).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from serving import REPO, free_port, start_server


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def kvclip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kvclip.cli", *args], check=True, cwd=REPO,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)


def prepare(tmp: Path) -> list[bytes]:
    print("# exporting Fashion-MNIST and building two cache versions ...", file=sys.stderr)
    kvclip("export-dataset", "fashion-mnist", "--out", str(tmp / "train"), "--per-class", "8")
    kvclip("export-dataset", "fashion-mnist", "--out", str(tmp / "test"), "--split", "test", "--limit", "64")
    for seed in ("0", "1"):
        kvclip("build", str(tmp / "train"), "--out", str(tmp / "caches" / "fashion"), "--model", "tiny-random",
               "--shots", "8", "--views", "2", "--captioner", "none", "--seed", seed, "--quiet")
    return [p.read_bytes() for p in sorted((tmp / "test").rglob("*.png"))]


def start(tmp: Path, port: int, *flags: str) -> subprocess.Popen:
    """`kvclip serve` over tmp/caches with extra `flags`, once /readyz answers 200."""
    return start_server(tmp / "caches", port, "--model", "tiny-random", "--log-level", "WARNING", *flags)


async def load(url: str, images: list[bytes], concurrency: int, seconds: float, swap_every: float) -> dict:
    statuses: Counter = Counter()
    latencies: list[float] = []
    retry_after_503 = 0
    refused_by: Counter = Counter()  # which limit a 503 names
    swaps = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker(k: int) -> None:
            nonlocal retry_after_503
            i = k
            while time.monotonic() < stop_at:
                start_t = time.perf_counter()
                try:
                    r = await client.post("/v1/classify", params={"cache": "fashion"},
                                          files=[("file", (f"{i}.png", images[i % len(images)], "image/png"))])
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    continue
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start_t)
                elif r.status_code == 503:
                    retry_after_503 += bool(r.headers.get("retry-after") and r.headers.get("x-request-id"))
                    refused_by[refusal(r)] += 1
                i += concurrency

        async def swapper() -> None:
            nonlocal swaps
            version = 1
            while swap_every > 0 and time.monotonic() < stop_at - swap_every:
                await asyncio.sleep(swap_every)  # the swap schedule itself; nothing waits on it
                r = await client.post("/v1/caches/fashion/activate", json={"version": f"v000{version}"})
                swaps += r.status_code == 200
                version = 2 if version == 1 else 1

        await asyncio.gather(swapper(), *(worker(k) for k in range(concurrency)))
    latencies.sort()
    return {"statuses": statuses, "retry_after_503": retry_after_503, "refused_by": refused_by, "swaps": swaps,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None}


def refusal(response: httpx.Response) -> str:
    """Which limit a 503 names (service/batcher.py, service/admission.py), from its JSON error."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return "not a JSON error"
    for words, limit in (("waiting for the encoder", "--max-queue"), ("decoded", "--max-decode-backlog"),
                         ("waited", "--max-queue-wait-s")):
        if words in message:
            return limit
    return message[:60]


def slow_client(port: int, limit_s: float) -> str:
    """Trickle a request line one byte per 0.5 s; how the server ended it."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    start_t = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        sock.settimeout(0.5)
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
                data = sock.recv(256)
            except TimeoutError:
                continue
            except OSError:
                return f"closed after {time.monotonic() - start_t:.1f} s"
            if data:
                status = data.split(b"\r\n", 1)[0].decode(errors="replace")
                return f"{status} after {time.monotonic() - start_t:.1f} s"
            return f"closed after {time.monotonic() - start_t:.1f} s"
    return "completed (not cut off)"


async def slow_phase(url: str, port: int, images: list[bytes], clients: int, header_timeout: float) -> dict:
    loop = asyncio.get_running_loop()
    slow = [loop.run_in_executor(None, slow_client, port, header_timeout + 30) for _ in range(clients)]
    answered = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while not all(f.done() for f in slow):
            r = await client.post("/v1/classify", params={"cache": "fashion"},
                                  files=[("file", ("x.png", images[0], "image/png"))])
            answered += r.status_code == 200
    outcomes = Counter(s.split(" after ")[0] for s in await asyncio.gather(*slow))
    return {"outcomes": dict(outcomes), "normal_answered_meanwhile": answered}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--swap-every", type=float, default=5)
    ap.add_argument("--slow-clients", type=int, default=16)
    ap.add_argument("--header-timeout-s", type=float, default=10)
    ap.add_argument("--overload-max-queue", type=int, default=8, help="the overload phase's --max-queue (0: skip it)")
    ap.add_argument("--overload-seconds", type=float, default=20)
    args = ap.parse_args()
    overload = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        images = prepare(tmp)
        port = free_port()
        server = start(tmp, port, "--max-queue", "256", "--header-timeout-s", str(args.header_timeout_s))
        url = f"http://127.0.0.1:{port}"
        try:
            before = rss_mib(server.pid)
            result = asyncio.run(load(url, images, args.concurrency, args.seconds, args.swap_every))
            after = rss_mib(server.pid)
            slow = asyncio.run(slow_phase(url, port, images, args.slow_clients, args.header_timeout_s))
            alive = httpx.get(f"{url}/healthz", timeout=10).status_code
        finally:
            server.terminate()
            server.wait(60)
        if args.overload_max_queue:
            limit = str(args.overload_max_queue)
            server = start(tmp, port, "--max-queue", limit, "--max-images", limit,
                           "--header-timeout-s", str(args.header_timeout_s))
            try:
                overload = asyncio.run(load(url, images, args.concurrency, args.overload_seconds, 0))
            finally:
                server.terminate()
                server.wait(60)
    total = sum(result["statuses"].values())
    print(f"load: {args.concurrency} clients for {args.seconds:.0f} s, a hot swap every {args.swap_every:.0f} s")
    print(f"  requests {total}; by status {dict(result['statuses'])}")
    print(f"  503s with Retry-After and X-Request-ID: {result['retry_after_503']} of {result['statuses'].get(503, 0)}")
    print(f"  latency of 200s: p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms")
    print(f"  hot swaps done: {result['swaps']}")
    print(f"  server RSS: {before:.0f} MiB before, {after:.0f} MiB after")
    print(f"slow clients: {args.slow_clients} trickling 1 byte / 0.5 s, --header-timeout-s {args.header_timeout_s:g}")
    print(f"  outcomes {slow['outcomes']}; normal requests answered meanwhile: {slow['normal_answered_meanwhile']}")
    print(f"  /healthz afterwards: {alive}")
    if overload is not None:
        print(f"overload: {args.concurrency} clients for {args.overload_seconds:.0f} s against "
              f"--max-queue {args.overload_max_queue}, no swaps")
        print(f"  requests {sum(overload['statuses'].values())}; by status {dict(overload['statuses'])}")
        print(f"  503s with Retry-After and X-Request-ID: {overload['retry_after_503']} of "
              f"{overload['statuses'].get(503, 0)}; refused by {dict(overload['refused_by'])}")
        if overload["p50_ms"] is not None:
            print(f"  latency of 200s: p50 {overload['p50_ms']:.0f} ms, p99 {overload['p99_ms']:.0f} ms")


if __name__ == "__main__":
    main()
