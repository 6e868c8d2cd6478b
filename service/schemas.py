"""Pydantic models at the HTTP edge: what requests may carry and what responses promise."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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
    params: dict = Field(description="tuned parameters per method")
    report: dict = Field(description="the build report")
    created: str | None = None


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
