"""Garbage-collector pauses in `kvclip serve` under load with hot swaps: its frozen start-up
heap (gc.freeze, service/cli.py) against the same server not frozen (a script, not a test).

    python scripts/bench_gc_pauses.py --rounds 2 --seconds 24 --concurrency 8

Builds a Fashion-MNIST cache (tiny-random model, two versions), then per round starts the
server twice, frozen and not (in alternating order), and for --seconds sends --concurrency
closed-loop clients of one JPEG each while activating v0001 / v0002 in turn every second.
A probe put on the server's path (a sitecustomize module; "not frozen" turns its gc.freeze
into a no-op) times every generation-2 collection once the server listens. Prints per run:
those collections (count, longest, total), requests, p50 / p99 / max latency; then the
medians over rounds of the not-frozen / frozen ratios of p99 and max latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from load_clients import client_limits, closed_loop
from load_hot_swap import prepare
from serving import free_port, start_server, stop_process

PROBE = """
import atexit, gc, json, os, time
_state = {"start": 0.0, "serving": False, "pauses_ms": []}
def _timer(phase, info):
    if phase == "start":
        _state["start"] = time.perf_counter()
    elif info["generation"] == 2 and _state["serving"]:
        _state["pauses_ms"].append((time.perf_counter() - _state["start"]) * 1e3)
gc.callbacks.append(_timer)
_freeze = gc.freeze
def _serving_from_here():  # kvclip serve freezes right before it listens
    _state["serving"] = True
    if os.environ["GC_PROBE_FREEZE"] == "1":
        _freeze()
gc.freeze = _serving_from_here
@atexit.register
def _report():
    if _state["serving"]:
        with open(os.environ["GC_PROBE_OUT"], "w") as out:
            json.dump({"pauses_ms": _state["pauses_ms"], "frozen": gc.get_freeze_count()}, out)
"""


async def load(url: str, images: list[bytes], concurrency: int, seconds: float) -> list[float]:
    """Latencies of --concurrency clients for `seconds` while versions swap every second."""
    async with httpx.AsyncClient(base_url=url, limits=client_limits(concurrency + 1), timeout=120) as client:
        async def swaps() -> None:
            versions = ["v0001", "v0002"]
            stop_at = time.monotonic() + seconds
            while time.monotonic() < stop_at:
                r = await client.post("/v1/caches/fashion/activate", json={"version": versions[0]})
                r.raise_for_status()
                versions.reverse()
                await asyncio.sleep(1)

        result, _ = await asyncio.gather(
            closed_loop(client, images, concurrency, seconds, path="/v1/classify", params={"cache": "fashion"}),
            swaps())
    if result.errors:
        raise SystemExit(f"requests failed: {result.errors}")
    return sorted(result.latencies_s)


def run(tmp: Path, images: list[bytes], frozen: bool, args: argparse.Namespace) -> dict:
    out = tmp / "gc.json"
    port = free_port()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp / "probe"), os.environ.get("PYTHONPATH")])),
           "GC_PROBE_FREEZE": "1" if frozen else "0", "GC_PROBE_OUT": str(out)}
    server = start_server(tmp / "caches", port, "--model", "tiny-random", "--build-worker", "thread",
                          "--log-level", "WARNING", env=env)
    try:
        latencies = asyncio.run(load(f"http://127.0.0.1:{port}", images, args.concurrency, args.seconds))
    finally:
        stop_process(server)
    probe = json.loads(out.read_text())
    at = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3  # noqa: E731
    return {"frozen objects": probe["frozen"], "gen-2": len(probe["pauses_ms"]),
            "longest ms": max(probe["pauses_ms"], default=0.0), "total ms": sum(probe["pauses_ms"]),
            "requests": len(latencies), "p50 ms": at(0.5), "p99 ms": at(0.99), "max ms": latencies[-1] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvclip-gc-") as name:
        tmp = Path(name)
        (tmp / "probe").mkdir()
        (tmp / "probe" / "sitecustomize.py").write_text(PROBE)
        images = prepare(tmp)
        ratios: dict[str, list[float]] = {"p99 ms": [], "max ms": []}
        for round_ in range(args.rounds):
            order = [True, False] if round_ % 2 == 0 else [False, True]
            results = {frozen: run(tmp, images, frozen, args) for frozen in order}
            for frozen in order:
                row = results[frozen]
                print(f"round {round_ + 1} {'frozen    ' if frozen else 'not frozen'} "
                      + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            for key in ratios:
                ratios[key].append(results[False][key] / results[True][key])
        for key, values in ratios.items():
            spread = f" (min {min(values):.2f}, max {max(values):.2f})" if len(values) > 1 else ""
            print(f"not frozen / frozen, {key}: median {statistics.median(values):.2f}{spread}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
