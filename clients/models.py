"""Typed results, built from the server's JSON (service/schemas.py and the jobs API).

Parsing is lenient on purpose: fields a newer server adds are ignored and optional fields
it leaves out get their defaults, so a client keeps working across server versions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvclip.vocabulary import TERMINAL_JOB_STATES


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float  # calibrated probability over the cache's labels
    logit: float  # the method's raw blended logit

    @classmethod
    def from_json(cls, data: dict) -> LabelScore:
        return cls(label=data["label"], score=float(data["score"]), logit=float(data["logit"]))


@dataclass(frozen=True)
class Neighbor:
    """A support item close to the query (explain=True)."""

    item: int
    label: str
    caption: str | None
    name: str | None
    affinity: float
    origin: str = "real"  # or "synthetic": rendered by the build
    prompt: str | None = None  # synthetic: what it was rendered from
    generator: str | None = None  # synthetic: the generator's model

    @classmethod
    def from_json(cls, data: dict) -> Neighbor:
        return cls(item=int(data["item"]), label=data["label"], caption=data.get("caption"),
                   name=data.get("name"), affinity=float(data["affinity"]), origin=data.get("origin") or "real",
                   prompt=data.get("prompt"), generator=data.get("generator"))


@dataclass(frozen=True)
class ImageError:
    """Why one image was not classified (only with partial=True; otherwise the request fails)."""

    code: str
    message: str


@dataclass(frozen=True)
class ImageResult:
    index: int  # position in the request
    name: str
    labels: list[LabelScore] = field(default_factory=list)  # best first
    neighbors: list[Neighbor] | None = None
    error: ImageError | None = None
    abstained: bool = False  # top score below min_score: "none of these" (labels still given)

    @property
    def top(self) -> LabelScore | None:
        """The best label, or None for an image that could not be classified."""
        return self.labels[0] if self.labels else None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_json(cls, data: dict) -> ImageResult:
        neighbors = data.get("neighbors")
        error = data.get("error")
        return cls(
            index=int(data["index"]), name=data["name"],
            labels=[LabelScore.from_json(x) for x in data.get("labels") or []],
            neighbors=None if neighbors is None else [Neighbor.from_json(x) for x in neighbors],
            error=None if error is None else ImageError(code=error["code"], message=error["message"]),
            abstained=bool(data.get("abstained", False)),
        )


@dataclass(frozen=True)
class Classification:
    cache: str
    version: str
    method: str  # the method actually used ('auto' resolved to the cache's tuned method)
    model: str
    results: list[ImageResult]  # in request order

    @classmethod
    def from_json(cls, data: dict) -> Classification:
        return cls(cache=data["cache"], version=data["version"], method=data["method"],
                   model=data["model"], results=[ImageResult.from_json(x) for x in data["results"]])


@dataclass(frozen=True)
class PathTiming:
    """One probed batch size: ms per image of each path on the server's device."""

    batch: int
    dense_ms_per_image: float
    faiss_ms_per_image: float
    faiss_over_dense: float  # median over interleaved rounds of FAISS time / dense time
    ratio_min: float | None = None  # the spread of that ratio over the rounds
    ratio_max: float | None = None

    @classmethod
    def from_json(cls, data: dict) -> PathTiming:
        low, high = data.get("ratio_min"), data.get("ratio_max")
        return cls(batch=int(data["batch"]), dense_ms_per_image=float(data["dense_ms_per_image"]),
                   faiss_ms_per_image=float(data["faiss_ms_per_image"]),
                   faiss_over_dense=float(data["faiss_over_dense"]),
                   ratio_min=None if low is None else float(low), ratio_max=None if high is None else float(high))


@dataclass(frozen=True)
class SearchPath:
    """How the server blends a cache: dense or FAISS candidates, and why (chosen at load)."""

    path: str  # "dense" or "faiss"
    reason: str  # forced, no_index, small, too_large, low_agreement, measured
    detail: str
    methods: list[str] = field(default_factory=list)  # served from FAISS candidates
    method: str | None = None  # the method measured
    index: str | None = None
    agreement: float | None = None
    agreement_source: str | None = None  # "build" or "probe"
    timings: list[PathTiming] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> SearchPath:
        agreement = data.get("agreement")
        return cls(path=data["path"], reason=data["reason"], detail=data.get("detail", ""),
                   methods=list(data.get("methods") or []), method=data.get("method"), index=data.get("index"),
                   agreement=None if agreement is None else float(agreement),
                   agreement_source=data.get("agreement_source"),
                   timings=[PathTiming.from_json(t) for t in data.get("timings") or []])


@dataclass(frozen=True)
class CacheInfo:
    """A served cache. The detail fields are filled by `cache(name)` only, None in `caches()`."""

    name: str
    version: str
    model: str
    classes: int
    items: int
    methods: list[str]
    best_method: str
    captions: bool
    labels: list[str] | None = None
    versions: list[str] | None = None  # versions on disk
    current_version: str | None = None  # the version CURRENT names on disk
    params: dict | None = None  # tuned parameters per method
    report: dict | None = None  # the build report
    created: str | None = None
    search: SearchPath | None = None  # the search path the server chose
    key_precision: str | None = None  # "float16" or "float32": the keys on the server's device (older servers: None)

    @classmethod
    def from_json(cls, data: dict) -> CacheInfo:
        search = data.get("search")
        return cls(
            name=data["name"], version=data["version"], model=data["model"],
            classes=int(data["classes"]), items=int(data["items"]), methods=list(data["methods"]),
            best_method=data["best_method"], captions=bool(data["captions"]),
            labels=data.get("labels"), versions=data.get("versions"),
            current_version=data.get("current_version"), params=data.get("params"),
            report=data.get("report"), created=data.get("created"),
            search=None if search is None else SearchPath.from_json(search),
            key_precision=data.get("key_precision"),
        )


@dataclass(frozen=True)
class ReloadResult:
    loaded: dict[str, str]  # cache -> version newly loaded
    unchanged: list[str]
    removed: list[str]
    failed: dict[str, str]  # cache -> reason

    @classmethod
    def from_json(cls, data: dict) -> ReloadResult:
        return cls(loaded=dict(data.get("loaded", {})), unchanged=list(data.get("unchanged", [])),
                   removed=list(data.get("removed", [])), failed=dict(data.get("failed", {})))


@dataclass(frozen=True)
class Readiness:
    ready: bool
    model: str | None
    device: str | None
    caches: dict[str, str]  # cache -> served version
    errors: dict[str, str]  # what keeps the server (or a cache) from loading

    @classmethod
    def from_json(cls, data: dict) -> Readiness:
        return cls(ready=bool(data.get("ready")), model=data.get("model"), device=data.get("device"),
                   caches=dict(data.get("caches") or {}), errors=dict(data.get("errors") or {}))


@dataclass(frozen=True)
class Job:
    """A cache build running (or queued, or finished) on the server."""

    id: str
    cache: str
    state: str  # queued, running, succeeded, failed, cancelled
    step: str | None = None
    done: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    created_at: str | None = None
    finished_at: str | None = None
    version: str | None = None  # the version the build published
    activated: bool = False
    error: str | None = None
    report: dict | None = None
    options: dict = field(default_factory=dict)
    cancel_requested: bool = False

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_JOB_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"

    @classmethod
    def from_json(cls, data: dict) -> Job:
        eta = data.get("eta_s")
        return cls(
            id=str(data["id"]), cache=data.get("cache", ""), state=data["state"], step=data.get("step"),
            done=int(data.get("done") or 0), total=int(data.get("total") or 0),
            elapsed_s=float(data.get("elapsed_s") or 0.0), eta_s=None if eta is None else float(eta),
            created_at=data.get("created_at"), finished_at=data.get("finished_at"),
            version=data.get("version"), activated=bool(data.get("activated")), error=data.get("error"),
            report=data.get("report"), options=dict(data.get("options") or {}),
            cancel_requested=bool(data.get("cancel_requested")),
        )
