"""HTTP build jobs with a warm build worker vs a fresh process per job (a benchmark, not a test).

    python scripts/bench_build_start.py --rounds 5

Starts two `kvclip serve` processes side by side on the same model (`--build-worker warm` and
`--build-worker process`), then in interleaved rounds posts the same labels-only build to
each (POST /v1/caches/NAME/builds) and measures, per job, the time from the POST to
`succeeded` and the time the job spent in its `starting` step (importing torch and loading
the model). Prints each round, then medians and the median of the per-round ratios
process ÷ warm with their spread (min–max).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serving import free_port, start_server

LABELS = ["cat", "dog", "bird", "fish", "horse"]


def timed_build(url: str, cache: str) -> tuple[float, float]:
    """(seconds from POST to succeeded, seconds in the `starting` step), polling every 20 ms."""
    t0 = time.perf_counter()
    response = httpx.post(f"{url}/v1/caches/{cache}/builds", json={"labels": LABELS}, timeout=60)
    response.raise_for_status()
    job_id = response.json()["id"]
    started_at = left_start = None
    while True:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()
        now = time.perf_counter()
        if job["state"] == "running" and job["step"] == "starting" and started_at is None:
            started_at = now
        if started_at is not None and left_start is None and job["step"] != "starting":
            left_start = now
        if job["state"] in ("succeeded", "failed", "cancelled"):
            if job["state"] != "succeeded":
                raise SystemExit(f"job {job_id} {job['state']}: {job.get('error')}")
            end = time.perf_counter()
            return end - t0, (left_start or end) - (started_at or t0)
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="tiny-random")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        servers, urls = [], {}
        try:
            for kind in ("warm", "process"):
                (tmp / kind).mkdir()
                port = free_port()
                servers.append(start_server(tmp / kind, port, "--model", args.model, "--build-worker", kind,
                                            "--log-level", "WARNING"))
                urls[kind] = f"http://127.0.0.1:{port}"
            rows: dict[str, list[tuple[float, float]]] = {"warm": [], "process": []}
            for number in range(1, args.rounds + 1):
                order = ("warm", "process") if number % 2 else ("process", "warm")
                for kind in order:
                    rows[kind].append(timed_build(urls[kind], f"zs{number}"))
                (w, ws), (p, ps) = rows["warm"][-1], rows["process"][-1]
                print(f"round {number}: warm {w:.2f} s (starting {ws:.2f} s)   "
                      f"process {p:.2f} s (starting {ps:.2f} s)   ratio {p / w:.1f}x", flush=True)
        finally:
            for proc in servers:
                proc.terminate()
                proc.wait(30)
    ratios = [p[0] / w[0] for w, p in zip(rows["warm"], rows["process"])]
    for kind in ("warm", "process"):
        print(f"{kind:8s} median job {statistics.median(r[0] for r in rows[kind]):.2f} s, "
              f"median starting {statistics.median(r[1] for r in rows[kind]):.2f} s")
    print(f"process / warm, job time: median {statistics.median(ratios):.1f}x "
          f"(spread {min(ratios):.1f}-{max(ratios):.1f}x over {len(ratios)} rounds)")


if __name__ == "__main__":
    sys.exit(main())
