"""Model names: their syntax and the open_clip architectures they may name, without torch.

Standard library only, so a command checks its --model in milliseconds, before it imports
torch and open_clip (seconds): a typo fails at once. kvclip/models.py loads what they name.

  ARCH:TAG          open_clip pretrained tag, e.g. ViT-B-32:openai, ViT-B-32:laion2b_s34b_b79k
  ARCH:/path/file   a local open_clip checkpoint (.pt, .bin, .safetensors)
  hf-hub:ORG/REPO   an open_clip model on the Hugging Face hub (or its local cache)
  local-dir:/path   a folder with open_clip_config.json and weights
  tiny-random       a tiny, seeded, randomly initialised CLIP for tests and plumbing only
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kvclip.errors import InvalidModelName, ModelLoadError

TINY_RANDOM = "tiny-random"
TINY_COCA_RANDOM = "tiny-coca-random"
TINY_ARCHS = {TINY_RANDOM: "kvclip-tiny", TINY_COCA_RANDOM: "kvclip-tiny-coca"}
CONFIG_DIR = Path(__file__).parent / "model_configs"  # kvclip's own architectures (the tiny ones)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
MODEL_SYNTAX = ("ARCH:TAG (e.g. ViT-B-32:openai), ARCH:/path/to/checkpoint, hf-hub:ORG/REPO, "
                "local-dir:/path, or tiny-random (random weights, plumbing only)")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name."""

    name: str  # as the user wrote it; stored in cache manifests
    kind: str  # "tag" | "file" | "hf-hub" | "local-dir" | "tiny-random"
    arch: str  # open_clip architecture or schema-qualified name
    source: str | None  # pretrained tag, file path, hub id or folder


def parse_model_spec(name: str) -> ModelSpec:
    name = name.strip()
    if name in TINY_ARCHS:
        return ModelSpec(name, "tiny-random", TINY_ARCHS[name], None)
    for schema in ("hf-hub", "local-dir"):
        if name.startswith(schema + ":"):
            return ModelSpec(name, schema, name, name[len(schema) + 1 :])
    arch, sep, source = name.partition(":")
    if not sep or not source:
        raise InvalidModelName(
            f"model {name!r} names no weights. Use ARCH:PRETRAINED (e.g. ViT-B-32:openai), "
            "ARCH:/path/to/checkpoint, hf-hub:ORG/REPO, or tiny-random for plumbing tests."
        )
    looks_like_path = os.sep in source or source.endswith(CHECKPOINT_SUFFIXES) or Path(source).exists()
    return ModelSpec(name, "file" if looks_like_path else "tag", arch, source)


@lru_cache(maxsize=1)
def known_architectures() -> frozenset[str] | None:
    """open_clip's packaged architecture names and kvclip's own, read from the installed
    config files without importing open_clip; None when open_clip's files cannot be found
    (then the check is left to open_clip itself)."""
    spec = importlib.util.find_spec("open_clip")
    folders = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    names = {p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.json")}
    if not names:
        return None
    return frozenset(names | {p.stem for p in CONFIG_DIR.glob("*.json")})


def check_model_name(name: str, flag: str = "--model") -> ModelSpec:
    """The parsed name, or an InvalidModelName saying what is wrong with it and what is accepted.

    Checks the syntax, that ARCH is a known open_clip architecture, and that a checkpoint
    file or local-dir folder exists; whether a hub tag's weights can be had is found out
    when the model loads."""
    try:
        spec = parse_model_spec(name)
    except ModelLoadError as exc:
        raise InvalidModelName(f"{flag} {name!r} names no weights; use {MODEL_SYNTAX}") from exc
    if spec.kind in ("tag", "file"):
        known = known_architectures()
        if known is not None and spec.arch not in known:
            close = difflib.get_close_matches(spec.arch, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InvalidModelName(f"{flag} {name!r}: unknown open_clip architecture {spec.arch!r}{hint}; "
                                 f"use {MODEL_SYNTAX}")
    if spec.kind == "file" and not Path(spec.source or "").is_file():
        raise InvalidModelName(f"{flag} {name!r}: no checkpoint file {spec.source}")
    if spec.kind == "local-dir" and not Path(spec.source or "").is_dir():
        raise InvalidModelName(f"{flag} {name!r}: no folder {spec.source}")
    return spec
