"""Calibration of the served scores on unseen images (a measurement, not a test).

    python scripts/calibration_fashion.py                      # 16 shots, seed 0: the issue's run
    python scripts/calibration_fashion.py --shots 4,8,16 --seeds 0,1,2

Builds a Fashion-MNIST cache per (shots, seed) with the tiny-random model (views 2, no captions,
as tests/integration/test_calibration_fashion.py does), encodes the first `--test` Fashion-MNIST
test images (never in a support set), and prints per method: top-1, the build's score map
(transform, T, log-mix share), ECE (15 bins), NLL and Brier of the served scores
(CacheArtifact.calibrated), and for comparison the NLL and ECE of one temperature fitted on
these test images themselves (the best plain temperature scaling can do).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvclip.artifact import load_cache
from kvclip.blend import blend
from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cache_builder.datasets import export_fashion_mnist
from kvclip.cache_builder.features import encode_image_files
from kvclip.cache_builder.sources import discover_folder
from kvclip.calibration import brier, ece, fit_temperature, nll, probabilities
from kvclip.models import load_encoder


def numbers(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shots", type=numbers, default=[16], help="comma-separated (default 16)")
    ap.add_argument("--seeds", type=numbers, default=[0], help="comma-separated build seeds (default 0)")
    ap.add_argument("--test", type=int, default=1000, help="Fashion-MNIST test images (default 1000)")
    args = ap.parse_args()
    encoder = load_encoder("tiny-random", "cpu")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        export_fashion_mnist(tmp / "test", "test", limit=args.test)
        items = discover_folder(tmp / "test")
        features, kept, _ = encode_image_files(encoder, [it.path for it in items], 128, False)
        for shots in args.shots:
            for seed in args.seeds:
                train, out = tmp / f"train-{shots}-{seed}", tmp / f"cache-{shots}-{seed}"
                export_fashion_mnist(train, "train", per_class=shots, seed=seed)
                build_cache(BuildConfig(out=out, data_dir=train, model="tiny-random", shots=shots, views=2, seed=seed,
                                        captioner="none", progress=False, batch_size=64, target_precision=0.8),
                            encoder)
                report(load_cache(out), features, [items[i].label for i in kept], shots, seed)


def report(artifact, features: torch.Tensor, labels: list[str], shots: int, seed: int) -> None:
    label_id = {label: i for i, label in enumerate(artifact.labels)}
    truth = torch.tensor([label_id[label] for label in labels])
    calibration = artifact.manifest.calibration.model_dump()
    print(f"shots {shots} seed {seed}: {len(truth)} test images, served method {artifact.best_method}")
    for method in artifact.methods:
        logits = blend(features, artifact.tensors("cpu"), artifact.params(method), method).double()
        served = artifact.calibrated(logits, method).double()
        served_nll = float(torch.nn.functional.nll_loss(served.clamp_min(1e-300).log(), truth))
        oracle = fit_temperature(logits, truth)
        mix = calibration.get("mixes", {}).get(method)
        print(f"  {method:<8} top1 {float((logits.argmax(1) == truth).double().mean()):.3f}  "
              f"{artifact.score_transform(method):<7} T {artifact.score_temperature(method):<8.4g} "
              f"mix {'-' if mix is None else f'{mix:.3f}':<5}  ECE {ece(served, truth):.3f}  NLL {served_nll:.3f}  "
              f"Brier {brier(served, truth):.3f}  | test-fitted T {oracle:.4g}: NLL {nll(logits, truth, oracle):.3f} "
              f"ECE {ece(probabilities(logits, oracle), truth):.3f}")


if __name__ == "__main__":
    main()
