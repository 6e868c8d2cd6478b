"""Out-of-set detection by the top calibrated score (a measurement, not a test).

    python scripts/ood_auroc.py                       # builds a Fashion-MNIST cache (tiny-random)
    python scripts/ood_auroc.py --cache caches/fashion --in-set 1000 --model ViT-B-32:openai

In-set: Fashion-MNIST test images (never in the support set). Out-of-set: the real ImageNet,
CIFAR-10 and CIFAR-100 test images of the foolbox wheel (tests/foolbox_data.py; fetched by
scripts/fetch_test_data.sh). Every image goes the server's way: decode, the model's
preprocess, encode, the cache's blend for the method, the build's calibration
(CacheArtifact.calibrated). Prints the AUROC of the top score (in-set positive; also for softmax of the raw logits), the mean
top score of each group, and the share of each group that abstains at the cache's min_score.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvclip.artifact import CacheArtifact, load_cache
from kvclip.blend import blend
from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cache_builder.datasets import export_fashion_mnist
from kvclip.cache_builder.features import encode_image_files
from kvclip.calibration import auroc
from kvclip.models import Encoder, load_encoder
from tests.foolbox_data import export_foolbox

OUT_OF_SET = ("imagenet", "cifar10", "cifar100")


def top_scores(encoder: Encoder, artifact: CacheArtifact, method: str, paths: list[Path]) -> torch.Tensor:
    """Per image: the top calibrated score and, for comparison, the top of softmax(raw logits)."""
    features, _, _ = encode_image_files(encoder, paths, 64, False)
    logits = blend(features.to(encoder.device), artifact.tensors(encoder.device), artifact.params(method), method)
    tops = [artifact.calibrated(logits, method).max(dim=-1).values, logits.softmax(dim=-1).max(dim=-1).values]
    return torch.stack(tops, dim=1).cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, help="a Fashion-MNIST cache (default: build one, 16 shots, in a temp dir)")
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--in-set", type=int, default=1000, help="Fashion-MNIST test images (default 1000)")
    ap.add_argument("--target-precision", type=float, default=0.8, help="for the cache this script builds")
    ap.add_argument("--device")
    args = ap.parse_args()
    torch.manual_seed(0)
    encoder = load_encoder(args.model, args.device)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        cache_dir = args.cache
        if cache_dir is None:
            export_fashion_mnist(tmp / "train", "train", per_class=16, seed=0)
            cache_dir = tmp / "caches" / "fashion"
            build_cache(BuildConfig(out=cache_dir, data_dir=tmp / "train", model=args.model, shots=16, views=2,
                                    captioner="none", progress=False, target_precision=args.target_precision),
                        encoder)
        artifact = load_cache(cache_dir)
        method = artifact.best_method if args.method == "auto" else args.method
        export_fashion_mnist(tmp / "test", "test", limit=args.in_set)
        inside = top_scores(encoder, artifact, method, sorted((tmp / "test").rglob("*.png")))
        outside = {subset: top_scores(encoder, artifact, method, export_foolbox(tmp / subset, subset))
                   for subset in OUT_OF_SET}
    raw_inside, inside = inside[:, 1], inside[:, 0]
    raw_outside = torch.cat([scores[:, 1] for scores in outside.values()])
    outside = {subset: scores[:, 0] for subset, scores in outside.items()}
    every_outside = torch.cat(list(outside.values()))
    floor = artifact.default_min_score(method)
    print(f"cache {cache_dir} {artifact.version}  model {args.model}  method {method}  "
          f"T {artifact.score_temperature(method):.4g} ({artifact.score_transform(method)})  "
          f"min_score {'-' if floor is None else f'{floor:.4f}'}")
    groups = {"fashion-mnist (in-set)": inside, **outside}
    for name, scores in groups.items():
        abstain = "-" if floor is None else f"{float((scores < floor).double().mean()):.3f}"
        print(f"  {name:<24} n {len(scores):5d}  mean top score {float(scores.mean()):.4f}  abstains {abstain}")
    for subset, scores in outside.items():
        print(f"AUROC in-set vs {subset}: {auroc(inside, scores):.4f}")
    print(f"AUROC in-set vs all out-of-set ({len(every_outside)} images): {auroc(inside, every_outside):.4f}"
          f"  (softmax of the raw logits: {auroc(raw_inside, raw_outside):.4f})")


if __name__ == "__main__":
    main()
