"""`kvclip bench`: the CoOp / Tip-Adapter few-shot protocol, through the normal build and eval paths.

A benchmark split file (CoOp's `split_zhou_<Dataset>.json`: {"train": [[path, label, classname],
...], "val": [...], "test": [...]}, paths relative to the image root) -> for every K shots and
seed: build a cache from K train images per class sampled with that seed (the builder's own
sampling, from a manifest of the train split), tuned on those support images only, evaluate
every method on the test split -> mean ± std over seeds per K, beside the published figures
(published.json, with their source). The val split is not used: nothing here is trained.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cache_builder.evaluate import evaluate
from kvclip.errors import DataError
from kvclip.models import Encoder, load_encoder
from kvclip.vocabulary import (
    BENCH_SEEDS,
    BENCH_SHOTS,
    DEFAULT_BUILD_BATCH_SIZE,
    DEFAULT_EVAL_BATCH_SIZE,
    DEFAULT_MODEL,
    DEFAULT_VIEWS,
)

AUTO = "auto"  # the cache's tuned best method: what a request with method=auto gets


@dataclass
class Split:
    labels: list[str]  # classnames in label-id order
    train: list[tuple[Path, str]]
    test: list[tuple[Path, str]]


@dataclass
class BenchRun:
    shots: int
    seed: int
    support: int  # support items the cache holds
    test: int  # test images evaluated
    top1: dict[str, float]  # per method and "auto", percent
    best_method: str
    loo_top1: dict[str, float]  # the tuner's leave-one-out on the support set, percent


@dataclass
class BenchReport:
    split_file: str
    root: str
    model: str
    shots: list[int]
    seeds: list[int]
    runs: list[BenchRun] = field(default_factory=list)
    published: dict = field(default_factory=dict)

    def summary(self) -> dict[int, dict[str, dict[str, float]]]:
        """{K: {method: {"mean", "std"}}} over the seeds (std: sample std; 0 for one seed)."""
        out: dict[int, dict[str, dict[str, float]]] = {}
        for k in self.shots:
            runs = [r for r in self.runs if r.shots == k]
            out[k] = {m: _mean_std([r.top1[m] for r in runs if m in r.top1]) for m in self.methods()}
        return out

    def methods(self) -> list[str]:
        seen: dict[str, None] = {}
        for run in self.runs:
            seen.update(dict.fromkeys(run.top1))
        return list(seen)

    def as_dict(self) -> dict:
        return {"split_file": self.split_file, "root": self.root, "model": self.model, "shots": self.shots,
                "seeds": self.seeds, "unit": "top-1 accuracy, percent, on the test split",
                "summary": {str(k): v for k, v in self.summary().items()},
                "runs": [vars(r) for r in self.runs], "published": self.published}


def published_figures() -> dict:
    """The published results `kvclip bench` prints beside its own, with their source."""
    return json.loads(resources.files("kvclip.cache_builder").joinpath("published.json").read_text("utf-8"))


def read_split(split_file: str | Path, root: str | Path | None = None) -> Split:
    """A CoOp split file; image paths are relative to `root` (default: the split file's folder)."""
    split_file = Path(split_file)
    root = Path(root) if root is not None else split_file.parent
    try:
        data = json.loads(split_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read split file {split_file}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in ("train", "test")):
        raise DataError(f'{split_file}: needs "train" and "test" lists of [path, label, classname] rows')
    names: dict[int, str] = {}
    parts = {}
    for part in ("train", "test"):
        rows = []
        for number, row in enumerate(data[part]):
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                    and isinstance(row[1], int) and isinstance(row[2], str)):
                raise DataError(f"{split_file}: {part}[{number}] is not [path, label, classname]")
            path, label, classname = row
            if names.setdefault(label, classname) != classname:
                raise DataError(f"{split_file}: label {label} is both {names[label]!r} and {classname!r}")
            rows.append((root / path, classname))
        parts[part] = rows
    if not parts["train"] or not parts["test"]:
        raise DataError(f"{split_file}: the train and test splits must not be empty")
    return Split([names[i] for i in sorted(names)], parts["train"], parts["test"])


def run_bench(
    split_file: str | Path,
    root: str | Path | None = None,
    shots: Sequence[int] = BENCH_SHOTS,
    seeds: Sequence[int] = BENCH_SEEDS,
    model: str = DEFAULT_MODEL,
    encoder: Encoder | None = None,
    device: str | None = None,
    views: int = DEFAULT_VIEWS,
    captioner: str = "none",
    batch_size: int = DEFAULT_BUILD_BATCH_SIZE,
    eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> BenchReport:
    """Build, tune (on the support set only) and evaluate one cache per (K, seed).

    The caches go to `work_dir` (kept), else to a temporary folder removed at the end."""
    split = read_split(split_file, root)
    encoder = encoder or load_encoder(model, device)
    report = BenchReport(str(split_file), str(root if root is not None else Path(split_file).parent),
                         encoder.info()["id"], list(shots), list(seeds), published=published_figures())
    with tempfile.TemporaryDirectory(prefix="kvclip-bench-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "labels.txt").write_text("\n".join(split.labels) + "\n", encoding="utf-8")
        _write_manifest(work / "train.jsonl", split.train)
        _write_manifest(work / "test.jsonl", split.test)
        for k in shots:
            for seed in seeds:
                report.runs.append(_run(work, k, seed, encoder, views, captioner, batch_size, eval_batch_size,
                                        progress))
    return report


def _run(work: Path, k: int, seed: int, encoder: Encoder, views: int, captioner: str, batch_size: int,
         eval_batch_size: int, progress: bool) -> BenchRun:
    out = work / "caches" / f"k{k}-seed{seed}"
    built = build_cache(BuildConfig(out=out, manifest=work / "train.jsonl", labels_file=work / "labels.txt",
                                    shots=k, seed=seed, views=views, captioner=captioner, batch_size=batch_size,
                                    progress=progress), encoder)
    result = evaluate(out, manifest=work / "test.jsonl", encoder=encoder, batch_size=eval_batch_size,
                      progress=progress)
    top1 = {m: 100 * acc["top1"] for m, acc in result.methods.items()}
    best = built.manifest.params.best_method
    top1[AUTO] = top1[best]
    return BenchRun(k, seed, built.manifest.counts.items, result.n, top1, best,
                    {m: 100 * v for m, v in built.manifest.tuning.loo_top1.items()})


def _write_manifest(path: Path, rows: Sequence[tuple[Path, str]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for image, label in rows:
            fh.write(json.dumps({"path": str(image.resolve()), "label": label}) + "\n")


def _mean_std(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def format_table(report: BenchReport) -> str:
    """Every method's mean ± std over the seeds per K, then the published figures and their source."""
    methods = report.methods()
    lines = [f"split {report.split_file}  model {report.model}  seeds {','.join(map(str, report.seeds))}"
             f"  test images {report.runs[0].test if report.runs else 0}  (top-1 %, mean ± std over seeds)",
             f"{'shots':>5}  " + "  ".join(f"{m:>13}" for m in methods)]
    figures = report.published.get("figures", [])
    for k, row in report.summary().items():
        lines.append(f"{k:>5}  " + "  ".join(f"{row[m]['mean']:>6.2f} ± {row[m]['std']:<4.2f}" for m in methods))
        # the published figures for this K, under the same method columns
        for model, dataset in dict.fromkeys((f["model"], f["dataset"]) for f in figures if f["shots"] == k):
            values = {f["method"]: f["top1"] for f in figures if (f["shots"], f["model"], f["dataset"]) ==
                      (k, model, dataset)}
            lines.append(f"{'':>5}  " + "  ".join(f"{values[m]:>6.2f}       " if m in values else f"{'—':>6}       "
                                                   for m in methods) + f"  published: {model}, {dataset}")
    if figures:
        lines.append(f"published figures: {report.published['source']}")
    return "\n".join(lines)
