"""`kvclip build`, `kvclip eval`, `kvclip bench` and `kvclip export-dataset`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvclip.build_summary import report_lines, tuning_lines
from kvclip.errors import UsageError
from kvclip.extras import CAPS, SERVER
from kvclip.model_names import MODEL_SYNTAX
from kvclip.vocabulary import (
    BENCH_SEEDS,
    BENCH_SHOTS,
    CAPTIONERS,
    DEFAULT_BUILD_BATCH_SIZE,
    DEFAULT_CAPTIONER,
    DEFAULT_COCA_MODEL,
    DEFAULT_EVAL_BATCH_SIZE,
    DEFAULT_FAISS_K,
    DEFAULT_GUIDANCE,
    DEFAULT_INDEX_KIND,
    DEFAULT_MODEL,
    DEFAULT_POOL_PER_CLASS,
    DEFAULT_SD_MODEL,
    DEFAULT_SD_STEPS,
    DEFAULT_SEED,
    DEFAULT_SHOTS,
    DEFAULT_VIEWS,
    INDEX_KINDS,
    SUPPORT_KINDS,
    captioner_spec,
)

if TYPE_CHECKING:  # the manifest imports torch; `kvclip --help` must not
    from kvclip.manifest import DuplicatesReport


def add_commands(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser(
        "build", help="build a cache version from labelled images, labels alone, or labels and unlabelled images",
        description="Give DATA_DIR, or --manifest, or --labels FILE alone (a zero-shot cache with no support "
                    "images), or --labels FILE --pool DIR (support images pseudo-labelled from a folder of "
                    "unlabelled images).")
    build.add_argument("data_dir", nargs="?", type=Path, metavar="DATA_DIR",
                       help="DATA_DIR/<label>/<image> folder (or --data DATA_DIR)")
    build.add_argument("--data", type=Path, dest="data_flag", metavar="DATA_DIR", help="the same as DATA_DIR")
    build.add_argument("--manifest", type=Path, help='JSONL rows {"path", "label", "caption"?} instead of a folder')
    build.add_argument("--out", type=Path, required=True, help="cache folder; its name is the cache name")
    build.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"{MODEL_SYNTAX} (default {DEFAULT_MODEL})")
    build.add_argument("--model-cache-dir", help="where open_clip looks for / stores downloaded weights")
    build.add_argument("--shots", default=str(DEFAULT_SHOTS),
                       help=f"support images per class, or 'all' (default {DEFAULT_SHOTS})")
    build.add_argument("--views", type=int, default=DEFAULT_VIEWS,
                       help=f"random augmented views averaged per image key (default {DEFAULT_VIEWS})")
    build.add_argument("--captioner", default=DEFAULT_CAPTIONER, type=captioner_spec, metavar="CAPTIONER",
                       help="captions for CapS: auto (default) uses an image's caption file (cat.jpg -> cat.txt) "
                            "or manifest caption where there is one and, with --captioner-model, generates the "
                            "rest; sidecar requires one for every image; coca generates all; hf:MODEL (a "
                            "transformers image-to-text model: folder or hub id) or openai:URL (an "
                            "OpenAI-compatible vision chat endpoint) caption every image; none builds image keys "
                            "only. caps is served only when every image has a caption")
    build.add_argument("--captioner-model",
                       help=f"CoCa model for --captioner coca (default {DEFAULT_COCA_MODEL}); with auto, "
                            "generates the captions caption files do not give; model name for "
                            "--captioner openai:URL (default $KVCLIP_CAPTION_MODEL)")
    build.add_argument("--caption-prompt", help="--captioner openai:URL: the instruction sent with each image")
    build.add_argument("--caption-concurrency", type=int, default=4,
                       help="--captioner openai:URL: requests in flight (default 4)")
    build.add_argument("--caption-cache", type=Path,
                       help="folder of the caption cache (default OUT/.caption-cache): a rebuild does not "
                            "caption the same image with the same captioner again")
    build.add_argument("--templates", type=Path, help="prompt templates: JSON list or one per line, each with {}")
    build.add_argument("--descriptions", type=Path, help="JSON {label: [sentences]} averaged into the class weights")
    build.add_argument("--labels", type=Path,
                       help="labels file, one per line: the label set and its order; alone (no DATA_DIR, "
                            "--manifest or --pool) it builds a zero-shot cache")
    build.add_argument("--pool", type=Path,
                       help="with --labels: a folder of unlabelled images (searched recursively) that zero-shot "
                            "CLIP pseudo-labels into the support set")
    build.add_argument("--pool-per-class", type=int, default=DEFAULT_POOL_PER_CLASS,
                       help="with --pool: most confident pseudo-labelled images kept per class "
                            f"(default {DEFAULT_POOL_PER_CLASS})")
    build.add_argument("--keep-duplicates", action="store_true",
                       help="keep exact duplicate support images (same bytes or features; dropped by default, "
                            "one copy per label kept); near duplicates are always kept and reported")
    build.add_argument("--synthesize", type=int, default=0, metavar="K",
                       help="render K Stable Diffusion images per class as support items: prompts 'A photo of "
                            "{class}. {caption}' from captions of the class's real images (CapS), or from its "
                            "--descriptions for a --labels-only build (SuS-SD)")
    build.add_argument("--sd-model", default=DEFAULT_SD_MODEL,
                       help=f"diffusers Stable Diffusion folder or hub id (default {DEFAULT_SD_MODEL})")
    build.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                       help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})")
    build.add_argument("--steps", type=int, default=DEFAULT_SD_STEPS,
                       help=f"denoising steps per image (default {DEFAULT_SD_STEPS})")
    build.add_argument("--support", choices=SUPPORT_KINDS, default="both",
                       help="with --synthesize: real, synthetic or both images as support items (default both)")
    build.add_argument("--synthesis-dir", type=Path,
                       help="rendered images are kept here (default OUT/.synthetic): a restarted build does not "
                            "render them again")
    build.add_argument("--seed", type=int, default=DEFAULT_SEED)
    build.add_argument("--target-precision", type=float,
                       help="choose each method's default min_score (abstain below it) for this leave-one-out "
                            "precision, e.g. 0.9 (default: no threshold)")
    build.add_argument("--batch-size", type=int, default=DEFAULT_BUILD_BATCH_SIZE,
                       help="images per encoder batch (x views crops)")
    build.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    build.add_argument("--index", default=DEFAULT_INDEX_KIND, choices=INDEX_KINDS, help="FAISS index kind")
    build.add_argument("--faiss-k", type=int, default=DEFAULT_FAISS_K, help="k of the top-k path whose agreement is reported")
    build.add_argument("--no-activate", action="store_true", help="publish without making it CURRENT")
    build.add_argument("--json", action="store_true", help="print the build report as JSON")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(run=run_build, extra=SERVER)

    ev = sub.add_parser(
        "eval", help="accuracy of every method of a cache on labelled test images",
        description="Classify labelled test images (DATA_DIR/<label>/<image>, or --manifest) with every method "
                    "the cache serves and print top-1 and top-5 accuracy per method. The model must be the "
                    "one that built the cache (its weights' sha256 is checked).")
    ev.add_argument("data_dir", nargs="?", type=Path, metavar="DATA_DIR",
                    help="test DATA_DIR/<label>/<image> folder (or --data DATA_DIR)")
    ev.add_argument("--cache", type=Path, required=True, help="cache folder (CACHES/NAME), as given to build --out")
    ev.add_argument("--data", type=Path, dest="data_flag", metavar="DATA_DIR", help="the same as DATA_DIR")
    ev.add_argument("--manifest", type=Path, help='test manifest, JSONL rows {"path", "label"}, instead of a folder')
    ev.add_argument("--model", help=f"{MODEL_SYNTAX} (default: the model recorded in the cache)")
    ev.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    ev.add_argument("--batch-size", type=int, default=DEFAULT_EVAL_BATCH_SIZE,
                    help=f"test images per encoder batch (default {DEFAULT_EVAL_BATCH_SIZE})")
    ev.add_argument("--limit", type=int, help="evaluate the first N images only")
    ev.add_argument("--faiss-k", type=int, help="also evaluate the FAISS top-k path with this k")
    ev.add_argument("--min-score", type=float,
                    help="report coverage and accuracy at this threshold (default: the cache's own)")
    ev.add_argument("--json", action="store_true", help="print the report as JSON (accuracies to 6 digits)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(run=run_eval, extra=SERVER)

    bench = sub.add_parser(
        "bench", help="the CoOp / Tip-Adapter few-shot protocol on a benchmark split, beside published figures",
        description="Reads a CoOp split file (split_zhou_<Dataset>.json: train/val/test lists of "
                    "[path, label, classname], paths relative to --root), and for every K and seed builds a "
                    "cache from K train images per class (tuned on those only), evaluates every method on the "
                    "test split, and prints mean ± std over seeds per K beside the published figures.")
    bench.add_argument("split_file", type=Path, help="split_zhou_<Dataset>.json")
    bench.add_argument("--root", type=Path, help="the folder the split's image paths are relative to "
                                                 "(default: the split file's folder)")
    bench.add_argument("--shots", default=",".join(map(str, BENCH_SHOTS)),
                       help=f"comma-separated K (default {','.join(map(str, BENCH_SHOTS))})")
    bench.add_argument("--seeds", default=",".join(map(str, BENCH_SEEDS)),
                       help=f"comma-separated sampling seeds (default {','.join(map(str, BENCH_SEEDS))})")
    bench.add_argument("--model", default=DEFAULT_MODEL, help="as for build (Tip-Adapter's figures are RN50:openai)")
    bench.add_argument("--model-cache-dir", help="where open_clip looks for / stores downloaded weights")
    bench.add_argument("--views", type=int, default=DEFAULT_VIEWS, help=f"as for build (default {DEFAULT_VIEWS})")
    bench.add_argument("--captioner", default="none", choices=CAPTIONERS,
                       help="as for build (default none: the splits have no captions; coca adds caps)")
    bench.add_argument("--batch-size", type=int, default=DEFAULT_BUILD_BATCH_SIZE)
    bench.add_argument("--eval-batch-size", type=int, default=DEFAULT_EVAL_BATCH_SIZE)
    bench.add_argument("--device")
    bench.add_argument("--work-dir", type=Path, help="keep the caches here (default: a temporary folder, removed)")
    bench.add_argument("--json", action="store_true", help="print every run, the summary and the published figures")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(run=run_bench, extra=SERVER)

    de = sub.add_parser("describe", help="CuPL-style class descriptions from an OpenAI-compatible chat endpoint",
                        description="Asks the endpoint's model CuPL's questions about each label and writes the "
                                    "answers as JSON {label: [sentences]}, the format of kvclip build "
                                    "--descriptions. Answers are cached: a repeated run asks only new questions.")
    de.add_argument("--labels", type=Path, required=True, help="labels file, one per line")
    de.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    de.add_argument("--model", help="model name (default $KVCLIP_CAPTION_MODEL)")
    de.add_argument("--out", type=Path, required=True, help="descriptions JSON file to write")
    de.add_argument("--per-question", type=int, default=2, help="answers sampled per question (default 2)")
    de.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    de.add_argument("--cache", type=Path, help="answer cache folder (default: next to --out, .describe-cache)")
    de.set_defaults(run=run_describe, extra=CAPS)

    ex = sub.add_parser(
        "export-dataset", help="write an installed real dataset as DATA_DIR/<label>/<file>",
        description="Write Fashion-MNIST (Debian's dataset-fashion-mnist package) as PNG files in "
                    "OUT/<label>/<split>_<index>.png, a data folder for kvclip build and kvclip eval.")
    ex.add_argument("dataset", choices=("fashion-mnist",), help="the dataset to write")
    ex.add_argument("--out", type=Path, required=True, help="folder to write OUT/<label>/<file> into")
    ex.add_argument("--split", choices=("train", "test"), default="train", help="which split (default train)")
    ex.add_argument("--per-class", type=int, help="a seeded sample of N images per class")
    ex.add_argument("--limit", type=int, help="at most N images (with --per-class: of that sample)")
    ex.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the --per-class sample")
    ex.set_defaults(run=run_export, extra=SERVER)


def _data_dir(args: argparse.Namespace) -> Path | None:
    """DATA_DIR given as the positional or as --data (not both)."""
    if args.data_dir is not None and args.data_flag is not None and args.data_dir != args.data_flag:
        raise UsageError("give the data folder once: DATA_DIR or --data DATA_DIR")
    return args.data_dir if args.data_dir is not None else args.data_flag


def run_build(args: argparse.Namespace) -> int:
    from kvclip.cache_builder import preflight  # torch-free; PIL is not in the light install

    args.data_dir = _data_dir(args)
    preflight.check_build(args)  # before torch loads: an argument error takes milliseconds
    from kvclip.cache_builder.build import BuildConfig, build_cache

    shots = preflight.parse_shots(args.shots)
    config = BuildConfig(
        out=args.out, data_dir=args.data_dir, manifest=args.manifest, model=args.model, shots=shots,
        views=args.views, captioner=args.captioner, captioner_model=args.captioner_model,
        templates=args.templates, descriptions=args.descriptions, labels_file=args.labels,
        seed=args.seed, batch_size=args.batch_size, device=args.device, index_kind=args.index,
        faiss_k=args.faiss_k, model_cache_dir=args.model_cache_dir, activate=not args.no_activate,
        progress=not args.quiet, pool_dir=args.pool, pool_per_class=args.pool_per_class,
        keep_duplicates=args.keep_duplicates,
        target_precision=args.target_precision,
        caption_cache=args.caption_cache, caption_prompt=args.caption_prompt,
        caption_concurrency=args.caption_concurrency, synthesize=args.synthesize, sd_model=args.sd_model,
        guidance=args.guidance, sd_steps=args.steps, support=args.support, synthesis_dir=args.synthesis_dir,
    )
    result = build_cache(config)
    m = result.manifest
    if args.json:
        print(json.dumps({"version": result.version, "path": str(result.path), **m.to_json()}, indent=2))
        return 0
    report = m.build_report
    print(f"published {m.name} {result.version} at {result.path} ({report.mode})")
    print(f"  model {m.model.id}  classes {m.counts.classes}  items {m.counts.items}")
    for line in report_lines(report.model_dump(mode="json"), m.captioner.model_dump(mode="json")):
        print(line)
    if report.duplicates is not None:
        print_duplicates(report.duplicates)
    best = m.params.methods.get(m.params.best_method)
    for line in tuning_lines(m.tuning.loo_top1, m.params.best_method, best.model_dump() if best else {},
                             pool_build=report.mode == "pool"):
        print(line)
    return 0


def print_duplicates(duplicates: DuplicatesReport) -> None:
    """Cross-class groups (the same image labelled twice) first and loudest, then the others."""
    for group in duplicates.groups:
        items = ", ".join(f"{it.path} [{it.label}]{' (dropped)' if it.dropped else ''}" for it in group.items)
        if group.cross_class:
            print(f"  WARNING: the same image carries different labels ({group.kind}): {items}")
        else:
            print(f"  {group.kind} duplicates (cosine >= {group.min_cosine:.4f}): {items}")
    if duplicates.groups:
        kept = "kept (--keep-duplicates)" if duplicates.kept else f"dropped {duplicates.dropped}"
        print(f"  duplicates: {duplicates.exact_groups} exact groups ({kept}), {duplicates.near_groups} near groups "
              f"(cosine >= {duplicates.near_cosine}, kept), {duplicates.cross_class_groups} across labels")


def run_eval(args: argparse.Namespace) -> int:
    from kvclip.cache_builder import preflight

    args.data = _data_dir(args)
    preflight.check_eval(args)
    from kvclip.cache_builder.evaluate import evaluate

    report = evaluate(args.cache, args.data, args.manifest, model=args.model, device=args.device,
                      batch_size=args.batch_size, limit=args.limit, faiss_k=args.faiss_k,
                      progress=not args.quiet, min_score=args.min_score)
    if args.json:
        print(json.dumps(rounded(report.as_dict()), indent=2))
        return 0
    print(f"cache {report.cache['path']} {report.cache['version']}  model {report.cache['model']}"
          f"  images {report.n}  skipped {len(report.skipped)}")
    print(f"{'method':<10} {'top1':>7} {'top5':>7} {'ece':>7} {'nll':>7} {'brier':>7} {'aurc':>7}"
          f" {'min_score':>9} {'coverage':>8} {'acc@min':>7}  params")
    tuned = {m: p.model_dump() for m, p in report.params.methods.items()}
    for method, acc in report.methods.items():
        at = acc["accuracy"]
        threshold = "-" if acc["min_score"] is None else f"{acc['min_score']:.4f}"
        print(f"{method:<10} {acc['top1']:>7.4f} {acc['top5']:>7.4f} {acc['ece']:>7.4f} {acc['nll']:>7.4f}"
              f" {acc['brier']:>7.4f} {acc['aurc']:>7.4f} {threshold:>9} {acc['coverage']:>8.4f}"
              f" {'-' if at is None else format(at, '.4f'):>7}  {tuned.get(method, '')}")
    print(f"tuned best method: {report.params.best_method}")
    if report.faiss:
        for method, acc in report.faiss["methods"].items():
            print(f"faiss k={report.faiss['k']} {method:<6} top1 {acc['top1']:.4f} agreement {acc['top1_agreement']:.4f}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    shots = _int_list(args.shots, "--shots", minimum=1)
    seeds = _int_list(args.seeds, "--seeds", minimum=0)
    from kvclip.cache_builder.bench import format_table
    from kvclip.cache_builder.bench import run_bench as bench
    from kvclip.models import load_encoder

    encoder = load_encoder(args.model, args.device, args.model_cache_dir)
    report = bench(args.split_file, args.root, shots, seeds, encoder=encoder, views=args.views,
                   captioner=args.captioner, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                   work_dir=args.work_dir, progress=not args.quiet)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_table(report))
    return 0


def _int_list(text: str, flag: str, minimum: int) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < minimum or len(set(values)) != len(values):
        raise UsageError(f"{flag} must be distinct comma-separated integers >= {minimum}, not {text!r}")
    return values


def run_describe(args: argparse.Namespace) -> int:
    import os

    from kvclip.cache_builder.caption_cache import CaptionCache
    from kvclip.cache_builder.describe import DescribeConfig, describe_classes, write_descriptions
    from kvclip.cache_builder.openai_captioner import MODEL_ENV
    from kvclip.cache_builder.sources import check_labels, read_labels_file

    model = args.model or os.environ.get(MODEL_ENV)
    if not model:
        raise UsageError(f"kvclip describe needs --model or {MODEL_ENV}")
    labels = read_labels_file(args.labels)
    check_labels(labels)
    config = DescribeConfig(endpoint=args.endpoint, model=model, per_question=args.per_question,
                            concurrency=args.concurrency)
    cache = CaptionCache(args.cache or args.out.parent / ".describe-cache")
    descriptions = describe_classes(labels, config, cache)
    write_descriptions(descriptions, args.out)
    print(f"wrote {sum(map(len, descriptions.values()))} descriptions of {len(labels)} classes to {args.out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from kvclip.cache_builder import preflight

    preflight.check_export(args)
    from kvclip.cache_builder.datasets import export_fashion_mnist

    count = export_fashion_mnist(args.out, args.split, args.per_class, args.limit, args.seed)
    print(f"wrote {count} images to {args.out}")
    return 0


def rounded(value: Any, digits: int = 6) -> Any:
    """Floats to `digits` significant digits, so float32 results read 0.04, not 0.03999999910593033."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value
