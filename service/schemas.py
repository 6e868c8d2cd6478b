"""Pydantic models at the HTTP edge: what requests may carry and what responses promise."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvclip.cache_builder.sources import check_labels
from kvclip.errors import DataError
from kvclip.manifest import BuildReport, TunedParams
from kvclip.prompts import check_templates

MethodName = Literal["auto", "zeroshot", "tip", "tipx", "caps"]


class ClassifyParams(BaseModel):
    """Options of POST /v1/classify (query string, form fields or JSON body)."""

    model_config = ConfigDict(extra="forbid")

    cache: str = Field(description="name of the cache to classify against")
    top_k: int = Field(5, ge=1, le=1000, description="labels returned per image (at most the cache's classes)")
    method: MethodName = Field("auto", description="'auto' uses the cache's tuned method")
    explain: bool = Field(False, description="also return the nearest support items")
    partial: bool = Field(
        False, description="classify the readable images and report unreadable ones per image, instead of failing the request with 400"
    )


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


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="softmax probability over the cache's labels")
    logit: float


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

    version: str = Field(pattern=r"^v\d{4,}$", examples=["v0002"])


class ReloadResponse(BaseModel):
    loaded: dict[str, str]
    unchanged: list[str]
    removed: list[str]
    failed: dict[str, str]


class ReadyResponse(BaseModel):
    ready: bool
    model: str | None
    device: str | None
    caches: dict[str, str]
    errors: dict[str, str]


class BuildOptions(BaseModel):
    """Options of POST /v1/caches/{name}/builds: the JSON body, or the multipart `options` field."""

    model_config = ConfigDict(extra="forbid")

    labels: list[str] | None = Field(None, min_length=1, max_length=100_000, description=(
        "the label set and its order; required without data (labels-only or pool builds)"))
    templates: list[str] | None = Field(None, min_length=1, description="prompt templates, each with {}")
    descriptions: dict[str, list[str]] | None = Field(None, description="per-label sentences averaged into its weights")
    shots: int | Literal["all"] = Field(16, description="support images per class, or 'all'")
    views: int = Field(10, ge=1, le=64, description="random views averaged per image key")
    captioner: Literal["sidecar", "none", "coca"] = "sidecar"
    seed: int = 0
    data_dir: str | None = Field(None, description="server folder DATA/<label>/<image> under --build-roots")
    pool_dir: str | None = Field(None, description="server folder of unlabelled images under --build-roots")
    pool_per_class: int = Field(16, ge=1, le=100_000, description="pool images kept per class")
    activate: bool = Field(True, description="make the new version current when the build succeeds")

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


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


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
