"""`kvclip build`, `kvclip eval` and `kvclip export-dataset`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvclip.extras import CAPS, SERVER
from kvclip.vocabulary import (CAPTIONERS, DEFAULT_BUILD_BATCH_SIZE, DEFAULT_CAPTIONER, DEFAULT_COCA_MODEL,
                               DEFAULT_EVAL_BATCH_SIZE, DEFAULT_FAISS_K, DEFAULT_INDEX_KIND, DEFAULT_MODEL,
                               DEFAULT_GUIDANCE, DEFAULT_POOL_PER_CLASS, DEFAULT_SD_MODEL, DEFAULT_SD_STEPS,
                               DEFAULT_SEED, DEFAULT_SHOTS, DEFAULT_VIEWS, INDEX_KINDS, SUPPORT_KINDS, captioner_spec)


def add_commands(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser(
        "build", help="build a cache version from labelled images, labels alone, or labels and unlabelled images",
        description="Give DATA_DIR, or --manifest, or --labels FILE alone (a zero-shot cache with no support "
                    "images), or --labels FILE --pool DIR (support images pseudo-labelled from a folder of "
                    "unlabelled images).")
    build.add_argument("data_dir", nargs="?", type=Path, help="DATA_DIR/<label>/<image> folder")
    build.add_argument("--manifest", type=Path, help='JSONL rows {"path", "label", "caption"?} instead of a folder')
    build.add_argument("--out", type=Path, required=True, help="cache folder; its name is the cache name")
    build.add_argument("--model", default=DEFAULT_MODEL,
                       help="ARCH:TAG, ARCH:/path/checkpoint, hf-hub:ORG/REPO, or tiny-random (plumbing only)")
    build.add_argument("--model-cache-dir", help="where open_clip looks for / stores downloaded weights")
    build.add_argument("--shots", default=str(DEFAULT_SHOTS),
                       help=f"support images per class, or 'all' (default {DEFAULT_SHOTS})")
    build.add_argument("--views", type=int, default=DEFAULT_VIEWS,
                       help=f"random augmented views averaged per image key (default {DEFAULT_VIEWS})")
    build.add_argument("--captioner", default=DEFAULT_CAPTIONER, type=captioner_spec, metavar="CAPTIONER",
                       help=f"{', '.join(CAPTIONERS)}, hf:MODEL (a transformers image-to-text model: folder or "
                            "hub id) or openai:URL (an OpenAI-compatible vision chat endpoint)")
    build.add_argument("--captioner-model",
                       help=f"CoCa model for --captioner coca (default {DEFAULT_COCA_MODEL}); model name for "
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
    build.add_argument("--batch-size", type=int, default=DEFAULT_BUILD_BATCH_SIZE,
                       help="images per encoder batch (x views crops)")
    build.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    build.add_argument("--index", default=DEFAULT_INDEX_KIND, choices=INDEX_KINDS, help="FAISS index kind")
    build.add_argument("--faiss-k", type=int, default=DEFAULT_FAISS_K, help="k of the top-k path whose agreement is reported")
    build.add_argument("--no-activate", action="store_true", help="publish without making it CURRENT")
    build.add_argument("--json", action="store_true", help="print the build report as JSON")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(run=run_build, extra=SERVER)

    ev = sub.add_parser("eval", help="accuracy of every method of a cache on labelled test images")
    ev.add_argument("--cache", type=Path, required=True)
    ev.add_argument("--data", type=Path, help="test DATA_DIR/<label>/<image> folder")
    ev.add_argument("--manifest", type=Path, help="test manifest (JSONL) instead of a folder")
    ev.add_argument("--model", help="default: the model recorded in the cache")
    ev.add_argument("--device")
    ev.add_argument("--batch-size", type=int, default=DEFAULT_EVAL_BATCH_SIZE)
    ev.add_argument("--limit", type=int, help="evaluate the first N images only")
    ev.add_argument("--faiss-k", type=int, help="also evaluate the FAISS top-k path with this k")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(run=run_eval, extra=SERVER)

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

    ex = sub.add_parser("export-dataset", help="write an installed real dataset as DATA_DIR/<label>/<file>")
    ex.add_argument("dataset", choices=("fashion-mnist",))
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--split", choices=("train", "test"), default="train")
    ex.add_argument("--per-class", type=int, help="seeded sample of N per class")
    ex.add_argument("--limit", type=int, help="first N images of the split")
    ex.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ex.set_defaults(run=run_export, extra=SERVER)


def run_build(args: argparse.Namespace) -> int:
    from kvclip.cache_builder.build import BuildConfig, build_cache

    shots = None if args.shots == "all" else _positive_int(args.shots, "--shots")
    config = BuildConfig(
        out=args.out, data_dir=args.data_dir, manifest=args.manifest, model=args.model, shots=shots,
        views=args.views, captioner=args.captioner, captioner_model=args.captioner_model,
        templates=args.templates, descriptions=args.descriptions, labels_file=args.labels,
        seed=args.seed, batch_size=args.batch_size, device=args.device, index_kind=args.index,
        faiss_k=args.faiss_k, model_cache_dir=args.model_cache_dir, activate=not args.no_activate,
        progress=not args.quiet, pool_dir=args.pool, pool_per_class=args.pool_per_class,
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
    print(f"  model {m.model.id}  classes {m.counts.classes}  items {m.counts.items}"
          f"  skipped {report.skipped_count}")
    for skipped in report.skipped:
        print(f"  skipped {skipped.path}: {skipped.reason}")
    if report.synthesis is not None:
        synth = report.synthesis
        print(f"  synthetic: {synth.rendered} rendered, {synth.reused} reused, {synth.retried} retried, "
              f"{len(synth.failed)} failed; per class (real/synthetic): " +
              ", ".join(f"{lb} {c['real']}/{c['synthetic']}" for lb, c in (report.origin_per_class or {}).items()))
        for failed in synth.failed:
            print(f"  no image for {failed.label!r} ({failed.prompt}): {failed.reason}")
    if report.pool is not None:
        pool = report.pool
        print(f"  pool: {pool.usable} usable of {pool.images} images; per class: " +
              ", ".join(f"{lb} {c.count}" for lb, c in pool.per_class.items()))
        if pool.empty_classes:
            print(f"  no pool image for: {', '.join(pool.empty_classes)} (zero-shot text weights only)")
    if m.tuning.loo_top1:
        on = "pseudo-labels (zero-shot agrees by construction)" if report.mode == "pool" else "the support set"
        print(f"  leave-one-out top-1 on {on}: " +
              ", ".join(f"{k} {v:.3f}" for k, v in m.tuning.loo_top1.items()))
    best = m.params.methods.get(m.params.best_method)
    print(f"  best method {m.params.best_method}: {best.model_dump() if best else {}}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from kvclip.cache_builder.evaluate import evaluate

    report = evaluate(args.cache, args.data, args.manifest, model=args.model, device=args.device,
                      batch_size=args.batch_size, limit=args.limit, faiss_k=args.faiss_k,
                      progress=not args.quiet)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    print(f"cache {report.cache['path']} {report.cache['version']}  model {report.cache['model']}"
          f"  images {report.n}  skipped {len(report.skipped)}")
    print(f"{'method':<10} {'top1':>7} {'top5':>7}  params")
    tuned = {m: p.model_dump() for m, p in report.params.methods.items()}
    for method, acc in report.methods.items():
        print(f"{method:<10} {acc['top1']:>7.4f} {acc['top5']:>7.4f}  {tuned.get(method, '')}")
    print(f"tuned best method: {report.params.best_method}")
    if report.faiss:
        for method, acc in report.faiss["methods"].items():
            print(f"faiss k={report.faiss['k']} {method:<6} top1 {acc['top1']:.4f} agreement {acc['top1_agreement']:.4f}")
    return 0


def run_describe(args: argparse.Namespace) -> int:
    import os

    from kvclip.cache_builder.caption_cache import CaptionCache
    from kvclip.cache_builder.describe import DescribeConfig, describe_classes, write_descriptions
    from kvclip.cache_builder.openai_captioner import MODEL_ENV
    from kvclip.cache_builder.sources import check_labels, read_labels_file

    model = args.model or os.environ.get(MODEL_ENV)
    if not model:
        sys.exit(f"kvclip: error: kvclip describe needs --model or {MODEL_ENV}")
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
    from kvclip.cache_builder.datasets import export_fashion_mnist

    count = export_fashion_mnist(args.out, args.split, args.per_class, args.limit, args.seed)
    print(f"wrote {count} images to {args.out}")
    return 0


def _positive_int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        sys.exit(f"kvclip: error: {flag} must be a positive integer or 'all', not {text!r}")
    return value
