"""The cache manifest (manifest.json) as one typed model: written by the builder, validated
by `kvclip.artifact.load_cache`, and served over HTTP (service/schemas.py) from the same
classes, so OpenAPI documents what a manifest holds.

Schema version 1 is the on-disk form since the first builder; these models read it exactly
as it was written (tests/fixtures/v1_caches holds manifests from that builder). A change
that old readers cannot ignore bumps SCHEMA_VERSION and migrates older manifests on read.

Unknown keys are allowed and kept (``extra="allow"``), not refused: a newer builder may add
a report or a field that this reader does not know, and an older server should still serve
the cache rather than refuse it; keeping (not dropping) them means a manifest re-written or
served by this code loses nothing. Only a change of meaning needs a new schema version.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvclip.blend import DEFAULT_TEMPERATURE, BlendParams

SCHEMA_VERSION = 1
BuildMode = Literal["labelled", "labels-only", "pool"]
ScoreTransform = Literal["logit", "log-gap", "log-mix"]  # kvclip.calibration.TRANSFORMS


def _absent_when_none(value: object) -> bool:
    return value is None


def _optional(description: str | None = None) -> Any:
    """A field older or simpler manifests leave out: written only when it has a value."""
    return Field(None, description=description, exclude_if=_absent_when_none)


class _Part(BaseModel):
    """Every manifest model: extra keys allowed and kept (see the module docstring)."""

    model_config = ConfigDict(extra="allow")


class ModelInfo(_Part):
    """The model that built the cache; a server compares it with its own (check_model_matches)."""

    id: str
    kind: str | None = None
    arch: str | None = None
    weights_sha256: str | None = None
    precision: str | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


class PromptSet(_Part):
    templates: list[str]
    descriptions: dict[str, list[str]] | None = None


class Counts(_Part):
    classes: int
    items: int = Field(description="support items (0: a zero-shot cache)")
    dim: int = Field(description="feature dimension")
    per_class: dict[str, int]
    skipped: int = Field(description="unreadable images skipped")


class CaptionerInfo(_Part):
    name: str = Field(description="auto, sidecar, coca, none, hf:MODEL or openai:URL")
    model: str | None = _optional("coca, hf and openai, or auto with a captioner model; as are generation and seq_len")
    generation: str | None = _optional("coca only, as is seq_len")
    seq_len: int | None = _optional()
    endpoint: str | None = _optional("openai only, as is prompt")
    prompt: str | None = _optional()
    max_new_tokens: int | None = _optional("hf only")
    # auto only: how many support items got each kind of caption (caps needs uncaptioned == 0).
    sidecar: int | None = _optional()
    generated: int | None = _optional()
    uncaptioned: int | None = _optional()
    # generative captioners (and auto's generator): how many of the generated captions came
    # from the caption cache (cache_builder/caption_cache.py) instead of the model.
    cached: int | None = _optional()


class MethodParams(_Part):
    """One method's tuned blend parameters (kvclip.blend.BlendParams)."""

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.0
    delta: float = 0.0

    @classmethod
    def of(cls, params: BlendParams) -> MethodParams:
        return cls(**params.as_dict())

    def blend_params(self) -> BlendParams:
        known = {f.name for f in dataclasses.fields(BlendParams)}
        return BlendParams(**{k: v for k, v in self.model_dump().items() if k in known})


class TunedParams(_Part):
    best_method: str = Field("zeroshot", description="what method=auto serves")
    methods: dict[str, MethodParams] = Field(default_factory=dict, description="tuned parameters per method")


class Calibration(_Part):
    """Served-score calibration (kvclip/calibration.py), fitted on the balanced leave-one-out logits."""

    protocol: str = ""
    temperatures: dict[str, float] = Field(default_factory=dict, description=(
        "per method: the T of its served scores; a method not listed has T = 1"))
    transforms: dict[str, ScoreTransform] = Field(default_factory=dict, description=(
        "per method: 'logit' (score = softmax(logit / T), the default), 'log-gap' "
        "(score = softmax(-log(1 + max(logit) - logit) / T)) or 'log-mix' (score = softmax(((1 - m) "
        "* -log(1 + max(logit) - logit) + m * log(1 + logit - min(logit))) / T), m in mixes)"))
    mixes: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(default_factory=dict, description=(
        "per log-mix method: the share m of the log(1 + logit - min(logit)) feature"))
    target_precision: float | None = Field(None, description="--target-precision of the build, if any")
    min_score: dict[str, float] = Field(default_factory=dict, description=(
        "per method: the default threshold below which a result abstains (from target_precision)"))
    loo: dict[str, dict[str, float | None]] = Field(default_factory=dict, description=(
        "per method: leave-one-out NLL and ECE before (T = 1) and after, coverage and accuracy at min_score"))

    def temperature(self, method: str) -> float:
        return self.temperatures.get(method, 1.0)

    def transform(self, method: str) -> ScoreTransform:
        return self.transforms.get(method, "logit")

    def mix(self, method: str) -> float:
        return self.mixes.get(method, 0.0)


class GridReport(_Part):
    alphas: list[float]
    betas: list[float]
    gammas: list[float]
    deltas: list[float]


class TuningReport(_Part):
    protocol: str
    n_queries: int
    loo_top1: dict[str, float] = Field(description="leave-one-out top-1 accuracy per method")
    grid: GridReport | None = _optional("the grid searched; absent without support items")


class FaissAgreement(_Part):
    top1_agreement: float
    max_abs_logit_diff: float
    top1_dense: float
    top1_topk: float


class FaissReport(_Part):
    index: str | None = Field(description="FAISS index kind; None without support items")
    k: int | None
    n_queries: int
    methods: dict[str, FaissAgreement] = Field(default_factory=dict)


class SkippedFile(_Part):
    path: str
    reason: str


class PoolClass(_Part):
    count: int = Field(description="pool images kept for the class")
    assigned: int = Field(description="pool images whose zero-shot argmax is the class")
    mean_confidence: float | None
    min_confidence: float | None


class PoolReport(_Part):
    images: int = Field(description="image files in the pool")
    usable: int
    skipped: list[SkippedFile]
    empty_classes: list[str]
    per_class: dict[str, PoolClass]


class GeneratorInfo(_Part):
    """The image generator of a build with synthetic support images (cache_builder/synthesize.py)."""

    name: str = Field(description="stable-diffusion")
    model: str
    per_class: int = Field(description="images rendered per class")
    guidance: float
    steps: int
    seed: int
    batch_size: int
    retries: int = Field(description="renders again per image after a black or NSFW-flagged output")
    support: str = Field(description="real, synthetic or both: which images became support items")


class FailedRender(_Part):
    label: str
    prompt: str
    reason: str


class SynthesisReport(_Part):
    rendered: int = Field(description="images rendered by this build")
    reused: int = Field(description="images found in the work folder from an earlier build")
    retried: int = Field(description="renders repeated after a black or NSFW-flagged output")
    failed: list[FailedRender] = Field(description="images given up on: no usable render")


class Throughput(_Part):
    encoded_views_per_s: float | None
    batch_images: int
    batch_crops: int


class DuplicateItem(_Part):
    path: str
    label: str
    dropped: bool = Field(description="left out of the cache (an exact copy of a kept item of its label)")


class DuplicateGroup(_Part):
    kind: Literal["exact", "near"] = Field(description=(
        "exact: same file bytes or plain-view features equal to 1e-6; near: plain-view cosine >= near_cosine"))
    cross_class: bool = Field(description="the copies carry different labels: the same image labelled twice")
    same_bytes: bool = Field(description="every copy has the same file bytes")
    min_cosine: float = Field(description="lowest plain-view cosine of the group's linked pairs")
    items: list[DuplicateItem]


class DuplicatesReport(_Part):
    near_cosine: float = Field(description="plain-view cosine from which images are near duplicates")
    kept: bool = Field(description="exact duplicates kept (--keep-duplicates)")
    exact_groups: int
    near_groups: int
    cross_class_groups: int = Field(description="groups whose copies carry different labels")
    dropped: int = Field(description="support items dropped as exact duplicates")
    groups: list[DuplicateGroup] = Field(description="cross-class groups first")


class BuildReport(_Part):
    mode: BuildMode
    source: str
    candidates: int = Field(description="images listed (labelled: of the cache's labels; pool: files found)")
    used: int
    skipped: list[SkippedFile]
    skipped_count: int
    short_classes: dict[str, int] = Field(description="classes with fewer support items than asked for")
    timings_s: dict[str, float]
    throughput: Throughput
    pool: PoolReport | None = _optional("pool builds only")
    duplicates: DuplicatesReport | None = _optional("duplicate support images; absent without support items")
    origin_per_class: dict[str, dict[str, int]] | None = _optional(
        "support items per class by origin (real, synthetic)")
    synthesis: SynthesisReport | None = _optional("builds with --synthesize only")


class Manifest(_Part):
    """manifest.json of one cache version. `version` and `files` are set by publish."""

    schema_version: int = SCHEMA_VERSION
    name: str
    created_at: str
    model: ModelInfo
    labels: list[str]
    prompts: PromptSet
    counts: Counts
    captioner: CaptionerInfo
    generator: GeneratorInfo | None = _optional("builds with synthetic support images only")
    shots: int | None = Field(description="shots per class asked for (None: all; 0: labels only)")
    views: int
    seed: int
    temperature: float = DEFAULT_TEMPERATURE
    derived_temperature: float | None = _optional(
        "the temperature the derived serving arrays (key_log_partitions.npy, ...) were computed with; "
        "absent in versions published without them")
    params: TunedParams
    tuning: TuningReport
    faiss: FaissReport
    build_report: BuildReport
    calibration: Calibration | None = _optional("absent in manifests from before calibration: T = 1, no threshold")
    version: str | None = None
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of every other file of the version")

    def to_json(self) -> dict:
        """The on-disk form (manifest.json), extra keys included."""
        return self.model_dump(mode="json")
