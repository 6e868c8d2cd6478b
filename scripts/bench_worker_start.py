"""Build worker processes: forked from the preloaded forkserver vs spawned (a benchmark, not a test).

    python scripts/bench_worker_start.py --rounds 5 [--arch ViT-B-32]

Why kvclip spawns its build workers (service/jobs.py). Each round runs one labels-only build
job in a fresh worker process of each kind, in alternating order: `ProcessRunner` as kvclip
starts it (spawn) and the same runner forking from a forkserver that imported torch, open_clip
and the builder once (tests/service_helpers.py forkserver_context, what the tests use). It times
launch -> the job's result, which is what a job of `--build-worker process`, or the first job
after a killed warm worker is replaced, waits for. The forkserver starts in round 1 (its
imports count there), so round 1 is printed apart from the median of the later rounds. Then
one idle warm worker of each kind, model loaded: its memory, the forkserver's included (Rss;
Pss, where a page shared by n processes counts 1/n; private, what ending the process frees).
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.service_helpers

import torch
from bench_server import random_checkpoint

from kvclip.cache_builder.build import BuildConfig
from kvclip.service.build_worker import WorkerSpec
from kvclip.service.jobs import ProcessRunner, WarmRunner
from tests.service_helpers import forkserver_context

LABELS = ["cat", "dog", "bird", "fish", "horse"]
KINDS = ("forkserver", "spawn")


def contexts() -> dict[str, multiprocessing.context.BaseContext]:
    return {"forkserver": forkserver_context(), "spawn": multiprocessing.get_context("spawn")}


def spec(model: str, out: Path) -> WorkerSpec:
    config = BuildConfig(out=out, labels=LABELS, model=model, device="cpu", activate=False, progress=False)
    return WorkerSpec(config=config, nice=0, threads=1)


def one_job(runner: ProcessRunner | WarmRunner, job: WorkerSpec) -> float:
    """Seconds from launch to the job's last message (it must succeed)."""
    t0 = time.perf_counter()
    handle = runner.launch(job, "kvclip-build-bench")
    while True:
        message = handle.conn.recv()
        if message[0] != "progress":
            break
    elapsed = time.perf_counter() - t0
    if message[0] != "done":
        raise SystemExit(f"the job failed: {message}")
    handle.finish(message)
    return elapsed


def memory_mib(pid: int) -> dict[str, float]:
    """Rss, Pss and private (Private_Clean + Private_Dirty: what ending the process frees) in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split()[:2]
        fields[name.rstrip(":")] = int(value) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "private": fields["Private_Clean"] + fields["Private_Dirty"]}


def forkserver_pid() -> int | None:
    """The forkserver among this process's children (multiprocessing keeps its pid private)."""
    for tasks in Path(f"/proc/{multiprocessing.current_process().pid}/task").glob("*/children"):
        for child in tasks.read_text().split():
            if b"multiprocessing.forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--arch", default=None, help="open_clip architecture with random weights (default: tiny-random)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = random_checkpoint(args.arch, tmp) if args.arch else "tiny-random"
        starts = contexts()
        runners = {kind: ProcessRunner(context) for kind, context in starts.items()}
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for number in range(1, args.rounds + 1):
            for kind in KINDS if number % 2 else KINDS[::-1]:
                times[kind].append(one_job(runners[kind], spec(model, tmp / f"{kind}{number}")))
            print(f"round {number}: forkserver {times['forkserver'][-1]:.2f} s   spawn {times['spawn'][-1]:.2f} s",
                  flush=True)
        later = [s / f for f, s in zip(times["forkserver"][1:], times["spawn"][1:])]
        print(f"job in a fresh process, round 1: forkserver {times['forkserver'][0]:.2f} s (its own start included), "
              f"spawn {times['spawn'][0]:.2f} s")
        if later:
            print(f"rounds 2-{args.rounds}: forkserver median {statistics.median(times['forkserver'][1:]):.2f} s, "
                  f"spawn median {statistics.median(times['spawn'][1:]):.2f} s; spawn / forkserver median "
                  f"{statistics.median(later):.1f}x (spread {min(later):.1f}-{max(later):.1f}x)")
        memory = {}
        for kind, context in starts.items():
            warm = WarmRunner(preload=(model, "cpu", None), context=context)
            one_job(warm, spec(model, tmp / f"warm-{kind}"))  # the model is loaded once this returns
            [worker] = [p.pid for p in multiprocessing.active_children() if p.name == WarmRunner.NAME]
            pids = [worker] + ([forkserver_pid()] if kind == "forkserver" else [])
            memory[kind] = [memory_mib(pid) for pid in pids if pid]
            warm.close()
        for kind, rows in memory.items():
            names = "worker + forkserver" if len(rows) > 1 else "worker"
            cells = "   ".join(f"{key} {sum(r[key] for r in rows):.0f} ({' + '.join(f'{r[key]:.0f}' for r in rows)})"
                               for key in ("rss", "pss", "private"))
            print(f"idle warm worker, {kind}, MiB ({names}): {cells}")


if __name__ == "__main__":
    sys.exit(main())
