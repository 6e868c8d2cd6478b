"""What a build is given (BuildConfig) and what its steps share while it runs (BuildContext)."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from kvclip.cache_builder.progress import BuildMonitor
from kvclip.errors import DataError
from kvclip.models import Encoder, load_encoder
from kvclip.vocabulary import (
    DEFAULT_BUILD_BATCH_SIZE,
    DEFAULT_CAPTIONER,
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
)

MODES = ("labelled", "labels-only", "pool")


@dataclass
class BuildConfig:
    """A build's inputs. Labels, templates and descriptions come as files (the CLI) or as
    values (the server hands them over in memory); a str or Path is a file."""

    out: Path  # the cache folder; its name is the cache name
    data_dir: Path | None = None
    manifest: Path | None = None
    model: str = DEFAULT_MODEL
    shots: int | None = DEFAULT_SHOTS  # None: every image
    views: int = DEFAULT_VIEWS
    captioner: str = DEFAULT_CAPTIONER
    captioner_model: str | None = None
    templates: Path | str | Sequence[str] | None = None  # a templates file, or the templates
    descriptions: Path | str | Mapping[str, Sequence[str]] | None = None  # a JSON file, or {label: [sentence]}
    labels_file: Path | None = None
    seed: int = DEFAULT_SEED
    batch_size: int = DEFAULT_BUILD_BATCH_SIZE
    device: str | None = None
    index_kind: str = DEFAULT_INDEX_KIND
    faiss_k: int = DEFAULT_FAISS_K
    model_cache_dir: str | None = None
    activate: bool = True
    owner: str | None = None  # a server job id: the version stays pending until the server settles it
    confine_links: bool = False  # skip (and report) links leading out of data_dir / pool_dir: server builds
    progress: bool = True  # tqdm bars
    pool_dir: Path | None = None  # unlabelled images (searched recursively), with labels_file
    pool_per_class: int = DEFAULT_POOL_PER_CLASS  # pseudo-labelled images kept per class
    monitor: BuildMonitor | None = None  # progress and cancellation (cache_builder/progress.py)
    labels: Sequence[str] | None = None  # the label set itself, instead of labels_file
    keep_duplicates: bool = False  # keep exact duplicate support images (cache_builder/duplicates.py)
    # What the build report names as its source instead of the folder read (an HTTP build's
    # folder is a temporary work folder, gone once the job ends: it names the upload instead).
    source_name: str | None = None
    target_precision: float | None = None  # leave-one-out precision the default min_score is chosen for
    caption_cache: Path | None = None  # generated captions kept here (default: OUT/.caption-cache)
    caption_prompt: str | None = None  # openai: the instruction sent with each image
    caption_concurrency: int = 4  # openai: requests in flight
    # openai: the endpoint's key (never printed: repr=False); else $OPENAI_API_KEY when
    # caption_key_from_env (a server building for a remote caller sets it False).
    caption_api_key: str | None = field(default=None, repr=False)
    caption_key_from_env: bool = True
    synthesize: int = 0  # Stable Diffusion images rendered per class (cache_builder/synthesize.py)
    sd_model: str = DEFAULT_SD_MODEL
    guidance: float = DEFAULT_GUIDANCE
    sd_steps: int = DEFAULT_SD_STEPS
    support: str = "both"  # with synthesize: real, synthetic or both images as support items
    synthesis_dir: Path | None = None  # rendered images kept here (default: OUT/.synthetic)
    synthesis_batch_size: int = 4

    @property
    def has_labels(self) -> bool:
        return self.labels is not None or self.labels_file is not None


def build_mode(config: BuildConfig) -> str:
    """labelled, labels-only or pool, from the inputs given; anything else is an error."""
    if config.labels is not None and config.labels_file is not None:
        raise DataError("give labels or a labels file, not both")
    if config.data_dir is not None and config.manifest is not None:
        raise DataError("give a data folder or --manifest, not both")
    if config.target_precision is not None and not 0.0 < config.target_precision <= 1.0:
        raise DataError(f"--target-precision must be in (0, 1], not {config.target_precision}")
    if config.data_dir is not None or config.manifest is not None:
        if config.pool_dir is not None:
            raise DataError("--pool pseudo-labels unlabelled images for a --labels file; "
                            "it does not combine with a data folder or --manifest")
        return "labelled"
    if not config.has_labels:
        raise DataError("give a data folder, --manifest, --labels FILE alone (a zero-shot cache), "
                        "or --labels FILE with --pool DIR (pseudo-labelled support images)")
    if config.pool_dir is None:
        return "labels-only"
    if config.pool_per_class < 1:
        raise DataError(f"--pool-per-class must be at least 1, not {config.pool_per_class}")
    return "pool"


@dataclass
class BuildContext:
    """One running build: its config, mode, monitor, step timings, and the encoder.

    The encoder is loaded when a step first needs it (after reading, so bad inputs fail
    before a model loads), unless the caller gave one; `loader` is asked first when given.
    """

    config: BuildConfig
    name: str
    mode: str
    monitor: BuildMonitor
    given_encoder: Encoder | None = None
    loader: Callable[[BuildConfig], Encoder] | None = None  # e.g. a warm worker's loaded model
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @cached_property
    def encoder(self) -> Encoder:
        config = self.config
        if self.given_encoder is not None:
            return self.given_encoder
        if self.loader is not None:
            return self.loader(config)
        return load_encoder(config.model, config.device, config.model_cache_dir)

    def step(self, name: str, total: int) -> None:
        """A new progress step; a cancel asked for so far stops the build here."""
        self.monitor.check()
        self.monitor.step(name, total)

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t0
