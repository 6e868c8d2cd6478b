"""Server start-up and memory with many caches, this checkout against a baseline commit (a benchmark).

    python scripts/bench_startup.py --caches 50 --keys 16000 --classes 100 --rounds 3

Publishes K synthetic caches (N unit image and caption keys, C classes, D=512, flat FAISS
indexes, seeded: scripts/bench_cache_memory.py's) once, then starts real `kvclip serve`
processes (--build-worker process, so no build worker loads a second model meanwhile) and
times each from process start to /readyz answering 200 with every cache loaded:
  old  the baseline commit's code (default: where this branch left main), from `git archive`;
  new  this checkout, on a first start (no digest record: every served file is hashed) and
       on a second start (the record CACHES/.digests.json from the first).
Each server serves 1 cache, then K, in every round; the systems alternate order by round.
The files stay in the page cache throughout (a restart on the same node), so disk reads are
not measured. Memory is the server's resident set once ready: VmRSS, split into anonymous
memory (private) and file-backed pages (the memory-mapped keys: shared by processes serving
the same version, and reclaimable); per cache = (RSS at K - RSS at 1) / (K - 1).
Printed: medians over rounds, and for ratios the median with the range over rounds.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cache_memory import publish_caches
from serving import REPO, free_port, start_server

FOLDERS = ("cache_builder", "clients", "deploy", "service")  # pyproject's package-dir: kvclip.<folder>
DIGESTS = ".digests.json"


def export_baseline(ref: str, out: Path) -> Path:
    """The baseline's code laid out as the installed package (kvclip/ with its halves inside),
    as scripts/typecheck.sh does: PYTHONPATH=that folder runs it instead of this checkout."""
    tree = out / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    src = out / "src"
    shutil.copytree(tree / "kvclip", src / "kvclip")
    for folder in FOLDERS:
        shutil.copytree(tree / folder, src / "kvclip" / folder)
    return src


def memory_mib(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "RssAnon", "RssFile")}


def start(caches: Path, count: int, model: str, code: Path | None) -> tuple[float, dict[str, float]]:
    """Seconds from process start to ready with `count` caches, and the server's memory then."""
    port = free_port()
    env, cwd = ({"PYTHONPATH": str(code)}, code) if code else ({}, REPO)
    began = time.monotonic()
    proc = start_server(caches, port, "--model", model, "--device", "cpu", "--build-worker", "process",
                        env=env, cwd=cwd, interval_s=0.02, quiet=True, timeout_s=1800)
    elapsed = time.monotonic() - began
    try:
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).json()
        if len(ready["caches"]) != count:
            raise SystemExit(f"{len(ready['caches'])} of {count} caches loaded: {ready.get('errors')}")
        return elapsed, {**memory_mib(proc.pid), "caches": count}
    finally:
        proc.terminate()
        proc.wait(60)


def settle(root: Path, seconds: float = 2.5) -> None:
    """Wait until the newest file is older than the digest record's racy window (kvclip/digests.py:
    files changed within it of being hashed are not remembered)."""
    newest = max(os.stat(p).st_ctime for p in root.rglob("*") if p.is_file())
    time.sleep(max(0.0, newest + seconds - time.time()))


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caches", type=int, default=50)
    ap.add_argument("--keys", type=int, default=16_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="tiny-random", help="the server's model (the caches record tiny-random's "
                    "name; another model needs --model matching it)")
    ap.add_argument("--baseline", default=None, help="commit to compare with (default: git merge-base HEAD main)")
    args = ap.parse_args()
    baseline = args.baseline or subprocess.run(["git", "-C", str(REPO), "merge-base", "HEAD", "main"], check=True,
                                               capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        old_code = export_baseline(baseline, tmp_path / "baseline")
        many, one = tmp_path / "many", tmp_path / "one"
        publish_caches(many, args.caches, args.keys, args.classes, args.dim)
        one.mkdir()
        (one / "c000").symlink_to(many / "c000")  # the same files: a symlink leaves their ctime alone
        settle(many)
        roots = {1: one, args.caches: many}
        times: dict[tuple[str, int], list[float]] = {}
        memory: dict[tuple[str, int], list[dict[str, float]]] = {}

        def run(system: str, count: int, code: Path | None) -> None:
            seconds, mib = start(roots[count], count, args.model, code)
            times.setdefault((system, count), []).append(seconds)
            memory.setdefault((system, count), []).append(mib)
            print(f"  {system:<10} K={count:<3} ready in {seconds:6.2f} s, RSS {mib['VmRSS']:7.1f} MiB", flush=True)

        def new_system() -> None:
            for count, root in roots.items():
                (root / DIGESTS).unlink(missing_ok=True)
                run("new first", count, None)
                run("new second", count, None)

        def old_system() -> None:
            for count in roots:
                run("old", count, old_code)

        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            for system in ((old_system, new_system) if r % 2 == 0 else (new_system, old_system)):
                system()

    report(times, memory, args, baseline)


def report(times: dict[tuple[str, int], list[float]], memory: dict[tuple[str, int], list[dict[str, float]]],
           args: argparse.Namespace, baseline: str) -> None:
    k = args.caches
    print(f"\n{k} caches of {args.keys} keys x {args.classes} classes, D={args.dim}, model {args.model}, "
          f"{args.rounds} rounds; old = {baseline[:10]}")
    print(f"| start | K=1 s | K={k} s | K={k} / K=1 | old K={k} / this |")
    print("|---|---:|---:|---:|---:|")
    old_k = times[("old", k)]
    for system in ("old", "new first", "new second"):
        one_s, many_s = times[(system, 1)], times[(system, k)]
        ratio = spread([b / a for a, b in zip(one_s, many_s)], lambda v: f"{v:.2f}x")
        speedup = spread([o / m for o, m in zip(old_k, many_s)], lambda v: f"{v:.2f}x")
        print(f"| {system} | {statistics.median(one_s):.2f} | {statistics.median(many_s):.2f} | {ratio} | {speedup} |")
    print(f"\n| server memory (MiB) | RSS K=1 | RSS K={k} | per cache: total | anonymous | file-backed "
          f"| {k} caches |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for system in ("old", "new second"):
        ones, manys = memory[(system, 1)], memory[(system, k)]
        cells = [f"{statistics.median(m['VmRSS'] for m in ones):.0f}", f"{statistics.median(m['VmRSS'] for m in manys):.0f}",
                 *(f"{per_cache(ones, manys, key):.1f}" for key in ("VmRSS", "RssAnon", "RssFile")),
                 f"{per_cache(ones, manys, 'VmRSS') * k:.0f}"]
        print(f"| {system} | {' | '.join(cells)} |")


def per_cache(ones: list[dict[str, float]], manys: list[dict[str, float]], key: str) -> float:
    """Median over rounds of the memory one more cache adds."""
    count = int(manys[0]["caches"])
    return statistics.median((b[key] - a[key]) / (count - 1) for a, b in zip(ones, manys))


if __name__ == "__main__":
    main()
