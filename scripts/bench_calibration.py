"""Time of the calibration fit a build runs per method (a benchmark, not a test).

    python scripts/bench_calibration.py --sizes 1600x100,4000x1000 --rounds 3 --against 0f4a29c

fit_score_map (three transforms, each chosen on 5 held-out folds, then refitted) on seeded
leave-one-out-like logits of N queries x C classes (labels drawn from the logits' own softmax at
T = 3, so the fit has a real minimum), on one thread. With --against REV it also loads
kvclip/calibration.py as it was at git revision REV and times both, alternating within each
round; the table gives seconds per fit (medians over rounds) and REV ÷ now per round, as the
median with its min and max, plus the largest gap between their in-sample NLLs.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

import kvclip.calibration as current

REPO = Path(__file__).resolve().parents[1]


def calibration_at(revision: str) -> ModuleType:
    """kvclip/calibration.py as it was at `revision`, imported under another name."""
    source = subprocess.run(["git", "show", f"{revision}:kvclip/calibration.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "calibration_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("calibration_then", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def sample(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * 6.0
    truth = torch.multinomial((logits / 3.0).softmax(dim=-1), 1, generator=g).flatten()
    return logits, truth


def seconds(module: ModuleType, logits: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(CPU seconds of one fit_score_map, the in-sample NLL of the map it chose)."""
    start = time.process_time()
    score_map, _ = module.fit_score_map(logits, truth)
    took = time.process_time() - start
    return took, module.map_nll(logits, truth, score_map)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1600x100,4000x1000", help="NxC, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", metavar="REV", help="also time kvclip/calibration.py at this git revision")
    args = parser.parse_args()
    torch.set_num_threads(1)
    systems = {"now": current}
    if args.against:
        systems[args.against] = calibration_at(args.against)
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
    print("| N x C | " + " | ".join(f"{name} s" for name in systems)
          + (f" | {args.against} ÷ now | NLL now − {args.against} |" if args.against else " |"))
    print("|---" * (len(systems) + 1 + (2 if args.against else 0)) + "|")
    for n, classes in sizes:
        logits, truth = sample(n, classes, seed=n + classes)
        times: dict[str, list[float]] = {name: [] for name in systems}
        nlls: dict[str, float] = {}
        for round_ in range(args.rounds):
            order = list(systems) if round_ % 2 == 0 else list(reversed(systems))
            for name in order:
                took, nlls[name] = seconds(systems[name], logits, truth)
                times[name].append(took)
        row = [f"{n} x {classes}"] + [f"{statistics.median(times[name]):.2f}" for name in systems]
        if args.against:
            ratios = [then / now for then, now in zip(times[args.against], times["now"])]
            row += [f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})",
                    f"{nlls['now'] - nlls[args.against]:.1e}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
