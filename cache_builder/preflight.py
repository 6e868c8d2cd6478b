"""The builder commands' argument checks, run before torch and open_clip are imported.

Importing them takes seconds; a typo in a flag, a folder that is not there or a missing
caption should fail in well under one. Everything here is standard library plus the
torch-free halves of kvclip (vocabulary, model_names, sources' folder listing); tests
check that an error raised here leaves torch unimported (tests/e2e/test_fast_argument_errors.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kvclip.cache_builder.sources import (
    discover_folder,
    discover_images,
    order_labels,
    read_labels_file,
    read_manifest,
    sidecar_caption,
)
from kvclip.errors import UsageError
from kvclip.model_names import check_model_name
from kvclip.vocabulary import (
    CACHE_NAME_RE,
    MAX_GUIDANCE,
    MAX_POOL_PER_CLASS,
    MAX_SD_STEPS,
    MAX_SYNTHESIZE,
    MAX_VIEWS,
)


def positive(value: int | None, flag: str, most: int | None = None) -> None:
    """An optional count flag that, when given, must be 1 or more (and at most `most`)."""
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be at least 1, not {value}")
    if value is not None and most is not None and value > most:
        raise UsageError(f"{flag} must be at most {most}, not {value}")


def parse_shots(text: str) -> int | None:
    """--shots K|all: None for all."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"--shots must be a positive integer or 'all', not {text!r}")
    return value


def existing(path: Path | None, flag: str, folder: bool) -> None:
    if path is None:
        return
    if folder and not path.is_dir():
        raise UsageError(f"{flag} {path}: no such folder")
    if not folder and not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")


def check_build(args: argparse.Namespace) -> None:
    """`kvclip build`: counts, names, the files and folders given, the model name, and with
    --captioner sidecar a caption for every image."""
    parse_shots(args.shots)
    positive(args.views, "--views", MAX_VIEWS)
    positive(args.batch_size, "--batch-size")
    positive(args.faiss_k, "--faiss-k")
    positive(args.pool_per_class, "--pool-per-class", MAX_POOL_PER_CLASS)
    check_synthesis_flags(args)
    if not CACHE_NAME_RE.match(args.out.name):
        raise UsageError(f"--out {args.out}: the folder's name is the cache name and must be letters, digits, "
                         "'.', '_' or '-' (starting with a letter or digit), at most 128 characters")
    existing(args.data_dir, "DATA_DIR", folder=True)
    existing(args.manifest, "--manifest", folder=False)
    for path, flag in ((args.labels, "--labels"), (args.templates, "--templates"),
                       (args.descriptions, "--descriptions")):
        existing(path, flag, folder=False)
    existing(args.pool, "--pool", folder=True)
    check_model_name(args.model)
    if args.captioner_model and args.captioner in ("coca", "auto"):  # an open_clip CoCa model name
        check_model_name(args.captioner_model, "--captioner-model")
    if args.pool is not None:
        discover_images(args.pool)
    if args.data_dir is not None or args.manifest is not None:
        items = read_manifest(args.manifest) if args.manifest else discover_folder(args.data_dir)
        if args.captioner == "sidecar":
            labels = set(order_labels(items, read_labels_file(args.labels) if args.labels else None))
            missing = [it for it in items if it.label in labels and sidecar_caption(it) is None]
            if missing:
                first = missing[0].path
                raise UsageError(
                    f"no caption for {first}: expected a non-empty {first.with_suffix('.txt')} (or a \"caption\" "
                    f"field in the manifest); {len(missing)} image(s) have none. --captioner sidecar needs one for "
                    "every image: use --captioner auto to caption those that have one, or --captioner none")


def check_synthesis_flags(args: argparse.Namespace) -> None:
    """--synthesize K and its companions (the builder checks the same: synthetic_support.py)."""
    if not 0 <= args.synthesize <= MAX_SYNTHESIZE:
        raise UsageError(f"--synthesize must be 0 to {MAX_SYNTHESIZE}, not {args.synthesize}")
    if args.synthesize == 0 and args.support == "synthetic":
        raise UsageError("--support synthetic needs --synthesize K (images rendered per class)")
    if args.synthesize and args.support == "real":
        raise UsageError("--support real uses no rendered images: drop --synthesize, or use synthetic or both")
    positive(args.steps, "--steps", MAX_SD_STEPS)
    if not 0.0 <= args.guidance <= MAX_GUIDANCE:
        raise UsageError(f"--guidance must be 0 to {MAX_GUIDANCE:g}, not {args.guidance}")


def check_eval(args: argparse.Namespace) -> None:
    """`kvclip eval`: the cache folder, exactly one test set, counts and the model name."""
    existing(args.cache, "--cache", folder=True)
    if (args.data is None) == (args.manifest is None):
        raise UsageError("give the test images as DATA_DIR (or --data DATA_DIR) or --manifest FILE, one of them")
    existing(args.data, "DATA_DIR", folder=True)
    existing(args.manifest, "--manifest", folder=False)
    positive(args.batch_size, "--batch-size")
    positive(args.limit, "--limit")
    positive(args.faiss_k, "--faiss-k")
    if args.model:
        check_model_name(args.model)


def check_export(args: argparse.Namespace) -> None:
    """`kvclip export-dataset`: a count of 0 would write nothing."""
    positive(args.per_class, "--per-class")
    positive(args.limit, "--limit")
