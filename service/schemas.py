"""Pydantic models at the HTTP edge: what requests may carry and what responses promise."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvclip.cache_builder.sources import check_labels
from kvclip.errors import DataError
from kvclip.manifest import BuildReport, TunedParams
from kvclip.prompts import check_templates
from kvclip.vocabulary import (
    AUTO_METHOD,
    DEFAULT_CAPTIONER,
    DEFAULT_POOL_PER_CLASS,
    DEFAULT_SEED,
    DEFAULT_SHOTS,
    DEFAULT_TOP_K,
    DEFAULT_VIEWS,
    MAX_LABELS,
    MAX_POOL_PER_CLASS,
    MAX_TOP_K,
    MAX_VIEWS,
    VERSION_PATTERN,
    Captioner,
    JobState,
    RequestMethod,
)

MethodName = RequestMethod


class ClassifyParams(BaseModel):
    """Options of POST /v1/classify (query string, form fields or JSON body)."""

    model_config = ConfigDict(extra="forbid")

    cache: str = Field(description="name of the cache to classify against")
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="labels returned per image (at most the cache's classes)")
    method: MethodName = Field(AUTO_METHOD, description="'auto' uses the cache's tuned method")
    explain: bool = Field(False, description="also return the nearest support items")
    partial: bool = Field(
        False, description="classify the readable images and report unreadable ones per image, instead of failing the request with 400"
    )
    min_score: float | None = Field(None, ge=0.0, le=1.0, description=(
        "abstain ('none of these') when the top score is below it; default: the cache's threshold "
        "for the method (set at build by --target-precision), else never"))


class Base64Image(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="the encoded image file (JPEG, PNG, ...), base64")
    name: str | None = Field(None, max_length=256, description="echoed back in the result")


class ClassifyJson(BaseModel):
    """JSON body of POST /v1/classify; parameters here override the query string."""

    model_config = ConfigDict(extra="forbid")

    images: list[Base64Image] = Field(min_length=1)
    cache: str | None = None
    top_k: int | None = None
    method: MethodName | None = None
    explain: bool | None = None
    partial: bool | None = None
    min_score: float | None = None


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. unknown_cache, bad_image, overloaded")
    message: str
    details: list[dict] | None = Field(None, description="the images or fields at fault")


class ErrorResponse(BaseModel):
    """The body of every error answer (service/errors.py)."""

    error: ErrorDetail


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="calibrated probability over the cache's labels (the temperature fitted at build)")
    logit: float = Field(description="the raw blended logit of the method")


class Neighbor(BaseModel):
    item: int = Field(description="index of the support item in the cache")
    label: str
    caption: str | None
    name: str | None = Field(description="file name of the support image")
    affinity: float


class ImageError(BaseModel):
    code: str
    message: str


class ImageResult(BaseModel):
    index: int
    name: str
    labels: list[LabelScore] = Field(default_factory=list)
    neighbors: list[Neighbor] | None = None
    error: ImageError | None = None
    abstained: bool = Field(False, description=(
        "the top score is below min_score: none of the labels is likely; the labels are still given"))


class ClassifyResponse(BaseModel):
    cache: str
    version: str
    method: str
    model: str
    results: list[ImageResult]


class CacheSummary(BaseModel):
    name: str
    version: str
    model: str
    classes: int
    items: int
    methods: list[str]
    best_method: str
    captions: bool


class CacheDetail(CacheSummary):
    labels: list[str]
    versions: list[str] = Field(description="versions on disk")
    current_version: str | None = Field(description="the version CURRENT names on disk")
    params: TunedParams = Field(description="tuned parameters per method (the manifest's params)")
    report: BuildReport = Field(description="the build report (the manifest's build_report)")
    created: str | None = Field(None, description="when the version was built (the manifest's created_at)")


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=VERSION_PATTERN, examples=["v0002"])


class ReloadResponse(BaseModel):
    loaded: dict[str, str]
    unchanged: list[str]
    removed: list[str]
    failed: dict[str, str]


class ReadyResponse(BaseModel):
    """GET /readyz: 200 when ready, 503 (with Retry-After) before or when loading failed."""

    ready: bool
    model: str | None = Field(description="the model id, once loaded")
    device: str | None
    caches: dict[str, str] = Field(description="cache name -> version served")
    errors: dict[str, str] = Field(description="'model' or a cache name -> why it did not load")


class BuildOptions(BaseModel):
    """Options of POST /v1/caches/{name}/builds: the JSON body, or the multipart `options` field."""

    model_config = ConfigDict(extra="forbid")

    labels: list[str] | None = Field(None, min_length=1, max_length=MAX_LABELS, description=(
        "the label set and its order; required without data (labels-only or pool builds)"))
    templates: list[str] | None = Field(None, min_length=1, description="prompt templates, each with {}")
    descriptions: dict[str, list[str]] | None = Field(None, description="per-label sentences averaged into its weights")
    shots: int | Literal["all"] = Field(DEFAULT_SHOTS, description="support images per class, or 'all'")
    views: int = Field(DEFAULT_VIEWS, ge=1, le=MAX_VIEWS, description="random views averaged per image key")
    captioner: Captioner = DEFAULT_CAPTIONER
    seed: int = DEFAULT_SEED
    data_dir: str | None = Field(None, description="server folder DATA/<label>/<image> under --build-roots")
    pool_dir: str | None = Field(None, description="server folder of unlabelled images under --build-roots")
    pool_per_class: int = Field(DEFAULT_POOL_PER_CLASS, ge=1, le=MAX_POOL_PER_CLASS,
                                description="pool images kept per class")
    activate: bool = Field(True, description="make the new version current when the build succeeds")
    keep_duplicates: bool = Field(False, description=(
        "keep exact duplicate support images (same bytes or features); by default they are dropped, "
        "one copy per label kept, and listed in the build report's duplicates"))
    target_precision: float | None = Field(None, gt=0.0, le=1.0, description=(
        "choose each method's default min_score for this leave-one-out precision (default: no threshold)"))

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        cleaned = [label.strip() for label in labels]
        if any(not label for label in cleaned):
            raise ValueError("labels cannot be empty")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("labels must be unique")
        try:  # the builder's own rules, so a build is never refused only after it started
            check_labels(cleaned)
        except DataError as exc:
            raise ValueError(str(exc)) from exc
        return cleaned

    @field_validator("templates")
    @classmethod
    def _templates(cls, templates: list[str] | None) -> list[str] | None:
        if templates is not None and any("{}" not in t for t in templates):
            raise ValueError("every template needs a {} where the label goes")
        if templates is not None:
            try:
                check_templates(templates)
            except DataError as exc:
                raise ValueError(str(exc)) from exc
        return templates

    @field_validator("shots")
    @classmethod
    def _shots(cls, shots: int | str) -> int | str:
        if shots != "all" and shots < 1:
            raise ValueError("shots must be at least 1, or 'all'")
        return shots


class JobInfo(BaseModel):
    id: str
    cache: str
    state: JobState
    step: str | None = Field(description="the build step running now")
    done: int = Field(description="units of the current step done")
    total: int = Field(description="units of the current step (0: not counted)")
    elapsed_s: float
    eta_s: float | None = Field(description="seconds left in the current step, from its rate so far")
    created_at: str
    finished_at: str | None
    cancel_requested: bool
    version: str | None = Field(description="the version the build published")
    activated: bool
    error: str | None
    report: BuildReport | None = Field(description="the build report, when it succeeded")
    options: dict


class JobList(BaseModel):
    jobs: list[JobInfo]
