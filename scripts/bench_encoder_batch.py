"""The raw encoder's rate by batch size: how much of a server's gap to A (scripts/bench_server.py)
its batch sizes explain. A benchmark, not a test.

    python scripts/bench_encoder_batch.py --batches 4,8,14,32 --rounds 4 --seconds 6

A at batch b is bench_server's A: decode + preprocess b small JPEGs in turn, then one encoder
batch, in this process, with the thread settings `kvclip serve` gives itself. The batch sizes
run interleaved in rounds; the table gives the median images/s and, for each size, the median
(min–max) of the per-round ratios to --reference (default: the largest size). Compare a
server's mean batch (bench_server prints it) with these: a server at concurrency c whose
batches settle at c/2 cannot beat A(c/2) / A(c).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_server as bench  # sets the thread defaults before torch loads

from kvclip.models import load_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, random weights")
    ap.add_argument("--batches", default="4,8,14,32")
    ap.add_argument("--reference", type=int, default=None, help="the batch size ratios are taken to")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0, help="per batch size and round")
    args = ap.parse_args()
    sizes = [int(b) for b in args.batches.split(",")]
    reference = args.reference or max(sizes)
    if reference not in sizes:
        ap.error(f"--reference {reference} is not one of --batches")
    with tempfile.TemporaryDirectory() as tmp:
        encoder = load_encoder(bench.random_checkpoint(args.arch, Path(tmp)), "cpu")
    images = bench.small_jpegs()
    for size in sizes:  # warm-up
        bench.raw_rate(encoder, images, size, 1.0)
    rounds: list[dict[int, float]] = []
    for r in range(args.rounds):
        order = sizes[r % len(sizes):] + sizes[:r % len(sizes)]
        rounds.append({size: bench.raw_rate(encoder, images, size, args.seconds)["images_per_s"] for size in order})
        print(f"# round {r + 1}/{args.rounds}: " + "  ".join(f"b={s} {rounds[-1][s]:.2f}" for s in sizes),
              file=sys.stderr)
    print(f"arch {args.arch} (random weights), CPU, {args.rounds} rounds of {args.seconds:g} s per batch size")
    print(f"| batch | images/s (median) | ÷ batch {reference} |")
    print("|---|---|---|")
    for size in sizes:
        median = statistics.median(row[size] for row in rounds)
        print(f"| {size} | {median:.2f} | {bench.ratio_spread(rounds, size, reference)} |")


if __name__ == "__main__":
    main()
