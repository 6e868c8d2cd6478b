"""Decode worker processes (--decode-processes): how long a pool takes to start and how much
each worker holds, with the torch-free portable preprocess against one whose steps import
torchvision (what every worker imported before kvclip/portable_preprocess.py). A benchmark,
not a test.

    python scripts/bench_decode_workers.py --workers 2 --rounds 3

Both kinds start interleaved in rounds: the model's own preprocess (open_clip's default
"shortest" transform: its workers import Pillow and numpy only), then the same preprocess in
"squash" mode, which keeps the torchvision steps. Start = pool created until every worker
has answered (ProcessDecodePool.warm); memory = each worker's resident set then.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-random", help="a model name as `kvclip serve --model` takes it")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    # Imported here, not at the top: spawned workers re-import this file as their __main__, and
    # a top-level torch import would load torch into every worker, whatever the preprocess.
    from kvclip.models import load_encoder
    from kvclip.service.decode_pool import ProcessDecodePool

    torch_free = load_encoder(args.model, device="cpu").preprocess
    with_torchvision = copy.copy(torch_free)
    with_torchvision.resize_mode = "squash"  # the whole image reaches the transform: its steps stay
    kinds = {"torch-free": torch_free, "with torchvision": with_torchvision}
    starts: dict[str, list[float]] = {name: [] for name in kinds}
    memory: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(args.rounds):
        for name, preprocess in kinds.items():
            began = time.perf_counter()
            pool = ProcessDecodePool(args.workers, preprocess)
            pids = pool.warm()
            starts[name].append(time.perf_counter() - began)
            memory[name].append(statistics.mean(resident_mib(pid) for pid in pids))
            pool.shutdown()
    print(f"# {args.workers} decode workers, {args.rounds} interleaved rounds (medians)")
    for name in kinds:
        print(f"{name:17s} warm start of {args.workers} workers: median {statistics.median(starts[name]):.2f} s; "
              f"RSS per worker median {statistics.median(memory[name]):.0f} MiB")
    ratios = [a / b for a, b in zip(starts["torch-free"], starts["with torchvision"])]
    print(f"start time torch-free / with torchvision: median {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
