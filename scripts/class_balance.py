"""Unequal class sizes against the answers, dense and over FAISS candidates (a measurement, not a test).

    python scripts/class_balance.py                  # 40 and 100 classes, k = 64
    python scripts/class_balance.py --classes 100 --k 32,64,256

CLIP-like synthetic features (tests/clip_like.py: all affinities positive, near-flat signatures),
half the classes with 8 support items and half with 32, a balanced test set of 25 images per
class, as tests/unit/test_class_balance.py builds them. For tip and tipx with the parameters the
tuner chooses (balanced leave-one-out) and with the published ones (α = 1, β = 5.5, γ = 1 for
tipx), it prints the share of test images predicted as a big class (their true share is 0.5)
with the dense blend and with the blend over each query's k nearest keys (an exact flat FAISS
index, kvclip.blend.blend_candidates), the top-1 agreement between the two and the test accuracy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvclip.blend import BlendParams, CacheTensors, blend, blend_candidates
from kvclip.cache_builder.tune import tune
from kvclip.index import build_index, search_candidates
from tests.clip_like import clip_like

PUBLISHED = {"tip": BlendParams(alpha=1.0, beta=5.5), "tipx": BlendParams(alpha=1.0, beta=5.5, gamma=1.0)}


def numbers(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def summary(logits: torch.Tensor, big: torch.Tensor, truth: torch.Tensor) -> str:
    """The share of answers that are a big class, and the accuracy."""
    predicted = logits.argmax(1)
    return f"big share {float(big[predicted].float().mean()):.3f} acc {float((predicted == truth).float().mean()):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=numbers, default=[40, 100], help="comma-separated (default 40,100)")
    ap.add_argument("--k", type=numbers, default=[64], help="FAISS candidates per query, comma-separated")
    ap.add_argument("--seed", type=int, default=2)
    args = ap.parse_args()
    for classes in args.classes:
        sizes = [8 if c % 2 == 0 else 32 for c in range(classes)]
        d = clip_like(classes, sizes, seed=args.seed, within_class=1.5, test_per_class=25)
        cache = CacheTensors.build(d.text_weights, d.keys, d.labels)
        tuned = tune(cache, d.queries, d.labels).params
        index = build_index(d.keys.numpy(), "flat")
        big = torch.tensor(sizes) == 32
        print(f"C = {classes}: {cache.num_items} support items (8 or 32 per class), {len(d.test_labels)} test images")
        for method in ("tip", "tipx"):
            for name, params in (("tuned", tuned[method]), ("published", PUBLISHED[method])):
                p = params.for_method(method)
                dense = blend(d.test_features, cache, p, method)
                line = (f"  {method:<4} {name:<9} α {p.alpha:<7.4g} β {p.beta:<6.3g} γ {p.gamma:<5.3g} "
                        f"dense: {summary(dense, big, d.test_labels)}")
                for k in args.k:
                    approx = blend_candidates(d.test_features, cache, p, method,
                                              search_candidates(d.test_features, index, None, k, 0.0))
                    agree = float((approx.argmax(1) == dense.argmax(1)).float().mean())
                    line += f" | k={k}: {summary(approx, big, d.test_labels)} agree {agree:.3f}"
                print(line)


if __name__ == "__main__":
    main()
