"""Pydantic models at the HTTP edge: what requests may carry and what responses promise."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator

from kvclip.cache_builder.sources import check_labels
from kvclip.errors import DataError, ModelLoadError
from kvclip.manifest import BuildReport, TunedParams
from kvclip.model_names import check_model_name, parse_model_spec
from kvclip.prompts import check_templates
from kvclip.service.search_path import AgreementSource, Reason, SearchPath
from kvclip.vocabulary import (
    AUTO_METHOD,
    DEFAULT_CAPTIONER,
    DEFAULT_GUIDANCE,
    DEFAULT_POOL_PER_CLASS,
    DEFAULT_SD_MODEL,
    DEFAULT_SD_STEPS,
    DEFAULT_SEED,
    DEFAULT_SHOTS,
    DEFAULT_TOP_K,
    DEFAULT_VIEWS,
    MAX_GUIDANCE,
    MAX_LABELS,
    MAX_POOL_PER_CLASS,
    MAX_SD_STEPS,
    MAX_SYNTHESIZE,
    MAX_TOP_K,
    MAX_VIEWS,
    VERSION_PATTERN,
    JobState,
    RequestMethod,
    SupportKind,
    captioner_spec,
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
    origin: Literal["real", "synthetic"] = Field("real", description=(
        "real: an image the build was given; synthetic: one it rendered (build option synthesize)"))
    prompt: str | None = Field(None, description="synthetic only: the text-to-image prompt it was rendered from")
    generator: str | None = Field(None, description=(
        "synthetic only: the image generator's model (a server folder by its name only)"))


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


class PathTiming(BaseModel):
    batch: int = Field(description="queries per call")
    dense_ms_per_image: float = Field(description="dense blend, median over the rounds")
    faiss_ms_per_image: float = Field(description="FAISS search plus candidate blend, median over the rounds")
    faiss_over_dense: float = Field(description="median over interleaved rounds of FAISS time / dense time")
    ratio_min: float = Field(description="the lowest FAISS / dense ratio of the rounds")
    ratio_max: float = Field(description="the highest FAISS / dense ratio of the rounds")


class SearchPathInfo(BaseModel):
    """How the cache blends, chosen when it was loaded (service/search_path.py, docs/server.md "Search path")."""

    path: SearchPath = Field(description="dense: every key; faiss: each query's FAISS candidates")
    reason: Reason = Field(description=(
        "forced: --search-path; no_index: no FAISS index, or no method can use one; small: fewer keys than "
        "--probe-min-keys; too_large: more than --dense-max-keys; low_agreement: below --faiss-min-agreement; "
        "measured: the faster path on this device (timings)"))
    detail: str = Field(description="the decision in words, as logged at load")
    methods: list[str] = Field(description="methods served from FAISS candidates; the others blend densely")
    method: str | None = Field(description="the method the candidate path was measured with")
    index: str | None = Field(description="the cache's FAISS index kind (flat, hnsw), when loaded")
    agreement: float | None = Field(description="top-1 agreement of the candidate blend with dense")
    agreement_source: AgreementSource | None = Field(description=(
        "build: the manifest's leave-one-out report (same --faiss-k); probe: leave-one-out on the cache's keys at load"))
    timings: list[PathTiming] = Field(description="measured on the serving device, per probed batch size")


class CacheDetail(CacheSummary):
    labels: list[str]
    versions: list[str] = Field(description="versions on disk")
    current_version: str | None = Field(description="the version CURRENT names on disk")
    params: TunedParams = Field(description="tuned parameters per method (the manifest's params)")
    report: BuildReport = Field(description="the build report (the manifest's build_report)")
    created: str | None = Field(None, description="when the version was built (the manifest's created_at)")
    search: SearchPathInfo = Field(description="the search path the server chose for this cache at load")
    key_precision: Literal["float32", "float16"] = Field(description=(
        "dtype of the cache's key matrices on the serving device (--key-precision); the dense blend's dot "
        "products with them run in it, everything after them in float32; FAISS indexes stay float32"))


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
    captioner: str = Field(DEFAULT_CAPTIONER, max_length=2048, description=(
        "auto, sidecar, coca, none, hf:NAME (a transformers image-to-text model: NAME is a folder under the "
        "server's --models-dir) or openai:URL (an OpenAI-compatible vision chat endpoint, http or https)"))
    captioner_model: str | None = Field(None, min_length=1, max_length=256, validate_default=True, description=(
        "coca, or auto: the open_clip CoCa model name (no file paths); openai:URL: the endpoint's model name "
        "(required there)"))
    caption_prompt: str | None = Field(None, min_length=1, max_length=4000,
                                       description="openai:URL only: the instruction sent with each image")
    caption_concurrency: int = Field(4, ge=1, le=32, description="openai:URL only: requests in flight")
    caption_api_key: SecretStr | None = Field(None, min_length=1, max_length=1024, exclude=True, description=(
        "openai:URL only: the endpoint's API key. Write-only: never stored in job records, reports or logs; "
        "the server never sends its own $OPENAI_API_KEY to an endpoint a request names"))
    synthesize: int = Field(0, ge=0, le=MAX_SYNTHESIZE, description=(
        "Stable Diffusion images rendered per class as support items (CapS prompts from the captions of the "
        "class's real images; SuS-SD prompts from descriptions for a labels-only build)"))
    sd_model: str = Field(DEFAULT_SD_MODEL, min_length=1, max_length=1024, description=(
        "with synthesize: a diffusers Stable Diffusion folder under the server's --models-dir, by its name there"))
    guidance: float = Field(DEFAULT_GUIDANCE, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
                            description="with synthesize: classifier-free guidance scale")
    steps: int = Field(DEFAULT_SD_STEPS, ge=1, le=MAX_SD_STEPS, description="with synthesize: denoising steps per image")
    support: SupportKind = Field("both", validate_default=True,
                                 description="with synthesize: real, synthetic or both images as support items")
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

    @field_validator("captioner")
    @classmethod
    def _captioner(cls, captioner: str) -> str:
        captioner_spec(captioner)  # the CLI's rules: a known name, hf:MODEL, openai:http(s)://HOST...
        kind, _, target = captioner.partition(":")
        if kind == "hf":
            model_folder_name(target)
        return captioner

    @field_validator("sd_model")
    @classmethod
    def _sd_model(cls, name: str) -> str:
        return model_folder_name(name)

    # Options that mean something only with another one: checked on the later field (fields
    # validate in order), so the error names it. validate_default: a missing one is checked too.
    @field_validator("captioner_model")
    @classmethod
    def _captioner_model(cls, model: str | None, info: ValidationInfo) -> str | None:
        kind = _captioner_kind(info)
        if model is None:
            if kind == "openai":
                raise ValueError("captioner openai:URL needs captioner_model (the endpoint's model name)")
        elif kind in ("coca", "auto"):
            check_coca_name(model)
        elif kind not in ("openai", None):
            raise ValueError("captioner_model is for captioner coca, auto or openai:URL only")
        return model

    @field_validator("caption_prompt", "caption_api_key")
    @classmethod
    def _openai_only(cls, value: object, info: ValidationInfo) -> object:
        if value is not None and _captioner_kind(info) not in ("openai", None):
            raise ValueError(f"{info.field_name} is for captioner openai:URL only")
        return value

    @field_validator("support")
    @classmethod
    def _support(cls, support: str, info: ValidationInfo) -> str:
        synthesize = info.data.get("synthesize")
        if synthesize == 0 and support == "synthetic":
            raise ValueError("support 'synthetic' needs synthesize >= 1 (images rendered per class)")
        if synthesize and support == "real":
            raise ValueError("support 'real' uses no rendered images: set synthesize 0, or support synthetic or both")
        return support


def _captioner_kind(info: ValidationInfo) -> str | None:
    """auto, coca, hf, openai, ... of the request's captioner; None when it was itself invalid."""
    captioner = info.data.get("captioner")
    return None if captioner is None else captioner.partition(":")[0]


def model_folder_name(name: str) -> str:
    """A model named over HTTP: a relative folder name under the server's --models-dir
    (e.g. blip-base, or a hub id such as Salesforce/blip-image-captioning-base laid out as
    folders), never a server path of the caller's choosing. build_requests.py resolves it."""
    parts = name.split("/")
    if (not name.strip() or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts)
            or any(not ch.isprintable() for ch in name)):
        raise ValueError(f"model {name!r} must be a folder name under the server's --models-dir "
                         "(relative, no '..', no empty parts)")
    return name


def check_coca_name(name: str) -> None:
    """An open_clip CoCa model name, not a file or folder on the server."""
    try:
        if parse_model_spec(name).kind in ("file", "local-dir"):
            raise ValueError(f"captioner_model {name!r} names a path on the server; over HTTP use an open_clip "
                             "ARCH:TAG or hf-hub:ORG/REPO name")
        check_model_name(name, "captioner_model")
    except ModelLoadError as exc:
        raise ValueError(str(exc)) from exc


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
