"""kvclip's vocabularies, defaults and limits: the one place the builder, the server, Ray and
the client read them from.

Standard library only, so the light client install (no torch, open_clip, faiss, fastapi) and
`kvclip --help` can import it. The Literal types are the source; the tuples are derived from
them, so pydantic models and argparse `choices` cannot drift apart.
"""
from __future__ import annotations

import re
from importlib import metadata
from typing import Final, Literal, get_args
from urllib.parse import urlsplit

# --- the package's version: pyproject.toml holds it once --------------------------------
DISTRIBUTION = "kvclip"
# A source tree that was never installed (python -m from a bare checkout) has no metadata.
UNKNOWN_VERSION = "0+unknown"


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


VERSION = package_version()

# --- methods ----------------------------------------------------------------------------
Method = Literal["zeroshot", "tip", "tipx", "caps"]
CacheMethod = Literal["tip", "tipx", "caps"]  # the methods that read the support cache
RequestMethod = Literal["auto", "zeroshot", "tip", "tipx", "caps"]  # what a classify request may ask
METHODS: tuple[str, ...] = get_args(Method)
CACHE_METHODS: tuple[str, ...] = get_args(CacheMethod)
REQUEST_METHODS: tuple[str, ...] = get_args(RequestMethod)
AUTO_METHOD: Final = "auto"  # the cache's tuned best method
ZEROSHOT_METHOD: Final = "zeroshot"

# --- captioners -------------------------------------------------------------------------
# auto: a sidecar caption where there is one, a generated one where a captioner model is
# given, else none (cache_builder/captioners.py says exactly what; README "Building a cache").
Captioner = Literal["auto", "sidecar", "coca", "none"]
CAPTIONERS: tuple[str, ...] = get_args(Captioner)
DEFAULT_CAPTIONER: Final = "auto"
CAPTIONER_PREFIXES: tuple[str, ...] = ("hf", "openai")  # hf:MODEL, openai:URL


def captioner_spec(text: str) -> str:
    """A captioner name (CAPTIONERS) or PREFIX:TARGET (hf:MODEL, openai:URL); argparse `type`.

    An openai: URL must be http(s) with a host and no user:password (the endpoint is recorded
    in the manifest and job reports; a key belongs in $OPENAI_API_KEY or caption_api_key)."""
    kind, colon, target = text.partition(":")
    if text in CAPTIONERS or (colon and kind == "hf" and target.strip()):
        return text
    if colon and kind == "openai" and target:
        check_endpoint(target)
        return text
    raise ValueError(f"expected one of {', '.join(CAPTIONERS)}, hf:MODEL or openai:URL, not {text!r}")


def check_endpoint(url: str) -> str:
    """An OpenAI-compatible base URL: http or https, a host, no credentials in it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"openai:URL needs an http:// or https:// URL with a host, not {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("openai:URL must not carry user:password (it is recorded in the manifest); "
                         "give the key as $OPENAI_API_KEY (kvclip build) or caption_api_key (HTTP)")
    return url


DEFAULT_COCA_MODEL = "coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k"

# --- synthetic support images (Stable Diffusion; cache_builder/synthesize.py) -------------
SupportKind = Literal["real", "synthetic", "both"]
SUPPORT_KINDS: tuple[str, ...] = get_args(SupportKind)
DEFAULT_SD_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_GUIDANCE = 9.5  # CapS-Adapter's scripts
DEFAULT_SD_STEPS = 85
MAX_SYNTHESIZE = 1000  # rendered images per class: beyond it a build runs for days
MAX_SD_STEPS = 1000  # the schedulers' training schedule has 1000 steps
MAX_GUIDANCE = 100.0

# --- FAISS index kinds ------------------------------------------------------------------
IndexKind = Literal["flat", "hnsw"]
INDEX_KINDS: tuple[str, ...] = get_args(IndexKind)
DEFAULT_INDEX_KIND: Final = "flat"

# --- file verification at load (kvclip/digests.py) ----------------------------------------
VerifyMode = Literal["changed", "full"]  # changed: hash files whose identity changed; full: every file
VERIFY_MODES: tuple[str, ...] = get_args(VerifyMode)
DIGESTS_FILE: Final = ".digests.json"  # the server's record, in its caches folder

# --- build jobs -------------------------------------------------------------------------
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
TERMINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})
JOB_ID_PATTERN = r"^[0-9a-f]{1,64}$"
JOB_ID_RE = re.compile(JOB_ID_PATTERN)

# --- cache and version names ------------------------------------------------------------
CACHE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
VERSION_PATTERN = r"^v(\d{4,})$"  # v0001, v0002, ... (more digits past v9999)
CACHE_NAME_RE = re.compile(CACHE_NAME_PATTERN)
VERSION_RE = re.compile(VERSION_PATTERN)


def version_name(number: int) -> str:
    """The folder name of version `number`: 1 -> v0001."""
    return f"v{number:04d}"


# --- build defaults (kvclip build, POST /v1/caches/{name}/builds, kvclip caches build) -----
DEFAULT_MODEL = "ViT-B-32:openai"
DEFAULT_SHOTS = 16  # support images per class
DEFAULT_VIEWS = 10  # random augmented views averaged per image key
MAX_VIEWS = 64
DEFAULT_SEED = 0
DEFAULT_POOL_PER_CLASS = 16  # pseudo-labelled pool images kept per class
MAX_POOL_PER_CLASS = 100_000
MAX_LABELS = 100_000
DEFAULT_BUILD_BATCH_SIZE = 32  # images per encoder batch while building (x views crops)
DEFAULT_EVAL_BATCH_SIZE = 128
DEFAULT_FAISS_K = 64  # candidates per query on the FAISS top-k path
# Plain-view cosine at or above which two support images are near duplicates (a resized or
# re-compressed copy): reported by the build, and left out with each other in leave-one-out.
# Why 0.98: docs/methods.md ("Duplicates").
NEAR_DUPLICATE_COSINE = 0.98
# Published benchmark shots and seeds (CoOp / Tip-Adapter protocol): `kvclip bench` defaults.
BENCH_SHOTS = (1, 2, 4, 8, 16)
BENCH_SEEDS = (1, 2, 3)

# --- classify defaults and limits -------------------------------------------------------
DEFAULT_TOP_K = 5
MAX_TOP_K = 1000
# Most pixels in one decoded image, for the builder and the server alike (decompression
# bombs): about 6300 x 6300, far above any CLIP input and below Pillow's own bomb limit.
MAX_PIXELS = 40_000_000
