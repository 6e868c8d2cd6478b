"""Blend time per image against the number of classes at a fixed cache size (a benchmark, not a test).

    python scripts/bench_blend_classes.py --keys 100000 --classes 10,100,1000 --rounds 5

For each method and query batch, caches of N keys with C = 10, 100, 1000 classes (random unit
keys and text weights, seeded) are blended densely with kvclip.blend.blend, interleaved in
rounds. Class sums go through index_add_ over label ids, so the work is O(queries x N) plus
O(queries x C); the table gives µs per image and, per round, the ratio of the largest C to the
smallest, as medians with their min and max.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kvclip.blend import BlendParams, CacheTensors, blend

PARAMS = {"tip": BlendParams(alpha=1.0, beta=5.5), "tipx": BlendParams(alpha=1.0, beta=5.5, gamma=1.0),
          "caps": BlendParams(alpha=1.0, beta=5.5, gamma=1.0, delta=0.3)}


def make_cache(n: int, dim: int, classes: int, seed: int) -> CacheTensors:
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    captions = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    text = F.normalize(torch.randn(dim, classes, generator=g), dim=0)
    labels = torch.arange(n) % classes
    return CacheTensors.build(text, keys, labels, captions)


def per_image_us(cache: CacheTensors, queries: torch.Tensor, method: str, repeats: int) -> float:
    blend(queries, cache, PARAMS[method], method)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        blend(queries, cache, PARAMS[method], method)
    return (time.perf_counter() - start) / repeats / queries.shape[0] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", default="10,100,1000")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--methods", default="tip,tipx,caps")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    classes = [int(c) for c in args.classes.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    methods = args.methods.split(",")
    torch.manual_seed(0)
    caches = {c: make_cache(args.keys, args.dim, c, seed=c) for c in classes}
    queries = {b: F.normalize(torch.randn(b, args.dim), dim=-1) for b in batches}
    print(f"N={args.keys} keys, D={args.dim}, {args.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    print("| method | batch | " + " | ".join(f"C={c} µs/img" for c in classes) +
          f" | C={classes[-1]} / C={classes[0]} (median, min–max) |")
    print("|---|---:|" + "---:|" * len(classes) + "---|")
    with torch.inference_mode():
        for method in methods:
            for b in batches:
                rounds = []
                for r in range(args.rounds):
                    order = classes if r % 2 == 0 else classes[::-1]
                    rounds.append({c: per_image_us(caches[c], queries[b], method, args.repeats) for c in order})
                ratios = [t[classes[-1]] / t[classes[0]] for t in rounds]
                cells = " | ".join(f"{statistics.median(t[c] for t in rounds):.0f}" for c in classes)
                print(f"| {method} | {b} | {cells} | {statistics.median(ratios):.2f} "
                      f"({min(ratios):.2f}–{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
