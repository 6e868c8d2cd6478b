"""Which search path a loaded cache blends on: dense (every key) or FAISS candidates (top-k).

Chosen once per cache version, at load, on the serving device. The candidate path is an
approximation, and often not even faster: exhaustive FAISS ("flat") plus the candidate blend
was slower than dense at 100k keys at batch 1 and 32 (docs/server.md, Benchmarks); only an
HNSW index beat dense. So under `auto` FAISS serves only when, on this device,
it is measured faster than dense at every probed batch (1 and the server's --max-batch) AND
its top-1 agreement with dense reaches --faiss-min-agreement. Otherwise dense, and the FAISS
indexes are dropped (memory). The decision and its figures are served in GET /v1/caches/{name}.

Only methods without a KL term (γ = 0: tip, and caps or tipx tuned to γ = 0) can use candidates
at all (service/classify.py); the others always blend densely.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from kvclip.artifact import CacheArtifact
from kvclip.blend import BlendParams, CacheTensors, blend, blend_candidates
from kvclip.errors import ArtifactError
from kvclip.index import search_candidates
from kvclip.service.config import (
    DEFAULT_DENSE_MAX_KEYS,
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_PROBE_MIN_KEYS,
    ServerConfig,
)
from kvclip.vocabulary import DEFAULT_FAISS_K

log = logging.getLogger("kvclip.search_path")

SearchPath = Literal["dense", "faiss"]
# Why a path was chosen; docs/server.md "Search path" explains each.
Reason = Literal["forced", "no_index", "small", "too_large", "low_agreement", "measured"]
AgreementSource = Literal["build", "probe"]  # the manifest's leave-one-out report, or a probe at load

FASTER_RATIO = 0.9  # FAISS must take at most this share of dense's time: near parity the exact path wins
ROUNDS = 3  # rounds of dense and FAISS timed alternately
MIN_RUN_S = 0.05  # per timing: torch.utils.benchmark repeats the call for at least this long
PROBE_QUERIES = 256  # leave-one-out agreement probe, when the build's report does not cover --faiss-k
_TIMING = threading.Lock()  # caches loaded in parallel are timed one at a time, not against each other


@dataclass(frozen=True)
class PathProbe:
    """What one timing needs: the cache on its device and its indexes, the method served, probe queries."""

    tensors: CacheTensors
    image_index: Any  # faiss.Index (CacheArtifact keeps it untyped: faiss loads lazily)
    caption_index: Any
    method: str
    params: BlendParams  # for_method(method) applied
    k: int
    queries: torch.Tensor  # max batch x D, on the cache's device


# (probe, path, batch) -> seconds per call of that path on `batch` queries.
Measure = Callable[[PathProbe, SearchPath, int], float]


@dataclass(frozen=True)
class SearchPolicy:
    """The server's search-path settings (service/config.py: --search-path and friends)."""

    mode: Literal["auto", "dense", "faiss"] = "auto"
    faiss_k: int = DEFAULT_FAISS_K
    batches: tuple[int, ...] = (1, 32)  # probed batch sizes: a lone request and a full batch
    probe_min_keys: int = DEFAULT_PROBE_MIN_KEYS  # fewer keys: dense, not measured
    dense_max_keys: int = DEFAULT_DENSE_MAX_KEYS  # more keys: never dense under auto (memory)
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    rounds: int = ROUNDS  # of dense and FAISS timed alternately, per batch size
    measure: Measure | None = None  # None: time_path (tests inject their own)
    # --key-precision: the dtype of the dense path's keys (service/registry.py, key_dtype). Here because
    # the dense path that the choice measures runs on them, and every cache load already gets this policy.
    key_precision: Literal["auto", "float32", "float16"] = "auto"

    @classmethod
    def from_config(cls, config: ServerConfig) -> SearchPolicy:
        return cls(mode=config.search_path, faiss_k=config.faiss_k,  # type: ignore[arg-type]  # checked by config
                   batches=tuple(sorted({1, config.max_batch})), probe_min_keys=config.probe_min_keys,
                   dense_max_keys=config.dense_max_keys, min_agreement=config.faiss_min_agreement,
                   key_precision=config.key_precision)  # type: ignore[arg-type]  # checked by config

    @property
    def index_min_items(self) -> int:
        """kvclip.artifact.load_cache's bound: FAISS indexes are read only for caches above it."""
        if self.mode == "dense":
            return 2**63 - 1
        if self.mode == "faiss":
            return 0
        return min(self.probe_min_keys, self.dense_max_keys + 1) - 1


@dataclass(frozen=True)
class PathTiming:
    batch: int
    dense_ms_per_image: float
    faiss_ms_per_image: float
    faiss_over_dense: float  # median over the rounds of FAISS time / dense time
    ratio_min: float  # the spread of that ratio over the rounds
    ratio_max: float


@dataclass(frozen=True)
class SearchDecision:
    path: SearchPath
    reason: Reason
    detail: str  # one sentence for people, as logged
    methods: list[str] = field(default_factory=list)  # served from FAISS candidates (path "faiss"); others dense
    method: str | None = None  # the method the candidate path was measured with
    index: str | None = None  # the FAISS index kind, when the cache has one
    agreement: float | None = None  # top-1 agreement of the candidate blend with dense
    agreement_source: AgreementSource | None = None
    timings: list[PathTiming] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


DENSE_ONLY = SearchDecision("dense", "no_index", "no FAISS index loaded")


def candidate_methods(artifact: CacheArtifact) -> list[str]:
    """The cache's methods that the candidate path can serve (γ = 0, and a caption index when δ > 0)."""
    found = []
    for method in artifact.methods:
        if method == "zeroshot":
            continue
        p = artifact.params(method).for_method(method)
        if p.gamma == 0.0 and (p.delta == 0.0 or artifact.caption_index is not None):
            found.append(method)
    return found


def choose(artifact: CacheArtifact, tensors: CacheTensors, policy: SearchPolicy) -> SearchDecision:
    """The search path of one loaded cache (see the module docstring)."""
    n = artifact.num_items
    methods = candidate_methods(artifact) if artifact.image_index is not None else []
    kind = artifact.manifest.faiss.index if artifact.image_index is not None else None
    if policy.mode == "dense":
        return SearchDecision("dense", "forced", "--search-path dense")
    if policy.mode == "auto" and n < policy.probe_min_keys and n <= policy.dense_max_keys:
        return SearchDecision("dense", "small", f"{n} keys is fewer than --probe-min-keys {policy.probe_min_keys}: "
                              "dense is exact and at least as fast")
    if not methods:
        if n > policy.dense_max_keys and policy.mode == "auto":
            raise ArtifactError(f"{n} keys is more than --dense-max-keys {policy.dense_max_keys} and the cache has "
                                "no FAISS index for its methods; rebuild it (kvclip build makes one) or raise the limit")
        why = "no FAISS index" if artifact.image_index is None else "no method can use candidates (γ ≠ 0)"
        return SearchDecision("dense", "no_index", why)
    if policy.mode == "faiss":
        return SearchDecision("faiss", "forced", "--search-path faiss", methods, index=kind)
    if n > policy.dense_max_keys:
        return SearchDecision("faiss", "too_large", f"{n} keys is more than --dense-max-keys "
                              f"{policy.dense_max_keys}", methods, index=kind)
    method = artifact.best_method if artifact.best_method in methods else methods[0]
    agreement, source = top1_agreement(artifact, tensors, methods, policy.faiss_k)
    probe = PathProbe(tensors, artifact.image_index, artifact.caption_index, method,
                      artifact.params(method).for_method(method), policy.faiss_k,
                      probe_queries(tensors.image_keys, max(policy.batches)))
    return judge(probe, methods, kind, agreement, source, policy)


def judge(probe: PathProbe, methods: list[str], kind: str | None, agreement: float, source: AgreementSource,
          policy: SearchPolicy) -> SearchDecision:
    """auto's verdict on a cache that may use either path: FAISS when it agrees with dense at least
    --faiss-min-agreement and is measured faster at every probed batch; timed only if it agrees."""
    found = SearchDecision("dense", "low_agreement", f"FAISS top-1 agreement {agreement:.3f} ({source}) is below "
                           f"--faiss-min-agreement {policy.min_agreement}", method=probe.method, index=kind,
                           agreement=agreement, agreement_source=source)
    if agreement < policy.min_agreement:
        return found
    with _TIMING:
        timings = measure_paths(probe, policy.batches, policy.measure or time_path, policy.rounds)
    faster = faiss_faster(timings)
    figures = ", ".join(f"batch {t.batch}: FAISS {t.faiss_ms_per_image:.3g} vs dense {t.dense_ms_per_image:.3g} "
                        f"ms/image" for t in timings)
    verdict = "faster" if faster else "not faster"
    return dataclasses.replace(found, path="faiss" if faster else "dense", reason="measured",
                               detail=f"FAISS ({kind}) measured {verdict} than dense ({figures}); "
                                      f"agreement {agreement:.3f}",
                               methods=methods if faster else [], timings=timings)


def faiss_faster(timings: list[PathTiming]) -> bool:
    return all(t.faiss_over_dense <= FASTER_RATIO for t in timings)


def top1_agreement(artifact: CacheArtifact, tensors: CacheTensors, methods: list[str],
                   k: int) -> tuple[float, AgreementSource]:
    """The lowest top-1 agreement with dense over `methods`: the build's report (leave-one-out on the
    support images' plain views) when it was measured with this k, else a leave-one-out probe of
    the cache's own image keys on this device (the tuner's query features are not loaded)."""
    report = artifact.manifest.faiss
    if report.k == k and all(m in report.methods for m in methods):
        return min(report.methods[m].top1_agreement for m in methods), "build"
    from kvclip.cache_builder.build import topk_agreement  # the builder's own measure, not a second one

    params = {m: artifact.params(m) for m in methods}
    probed = topk_agreement(tensors, tensors.image_keys, tensors.label_ids, params, artifact.image_index,
                            artifact.caption_index, k, max_queries=PROBE_QUERIES)
    return min(r["top1_agreement"] for r in probed["methods"].values()), "probe"


def probe_queries(keys: torch.Tensor, count: int, generator: torch.Generator | None = None,
                  noise: float = 0.5) -> torch.Tensor:
    """Noisy copies of random keys (seed 0 by default; noise 0.5: cosine about 0.9 to the copied
    key), so each query has real neighbours: a graph search costs more or less with them."""
    generator = generator or torch.Generator().manual_seed(0)
    picks = torch.randint(0, keys.shape[0], (count,), generator=generator)
    offsets = F.normalize(torch.randn(count, keys.shape[1], generator=generator), dim=-1)
    return F.normalize(keys.cpu()[picks] + noise * offsets, dim=-1).to(keys.device)


def measure_paths(probe: PathProbe, batches: tuple[int, ...], measure: Measure,
                  rounds: int = ROUNDS) -> list[PathTiming]:
    """Dense and FAISS timed alternately, `rounds` times per batch size, so a burst of other load
    hits both; medians over the rounds, and the spread of the ratio."""
    timings = []
    for batch in batches:
        dense, faiss, ratios = [], [], []
        for _ in range(rounds):
            d, f = measure(probe, "dense", batch), measure(probe, "faiss", batch)
            dense.append(d)
            faiss.append(f)
            ratios.append(f / d)
        timings.append(PathTiming(batch, statistics.median(dense) * 1e3 / batch,
                                  statistics.median(faiss) * 1e3 / batch, statistics.median(ratios),
                                  min(ratios), max(ratios)))
    return timings


def time_path(probe: PathProbe, path: SearchPath, batch: int) -> float:
    """Seconds per call of `path` on `batch` probe queries, as classify.score runs it (median of
    torch.utils.benchmark's blocks, which synchronises CUDA)."""
    from torch.utils import benchmark  # lazily: it is only needed when a cache is measured

    features = probe.queries[:batch]

    def dense() -> torch.Tensor:
        return blend(features, probe.tensors, probe.params, probe.method)

    def candidates() -> torch.Tensor:
        ids = search_candidates(features, probe.image_index, probe.caption_index, probe.k, probe.params.delta)
        return blend_candidates(features, probe.tensors, probe.params, probe.method, ids)

    timer = benchmark.Timer(stmt="fn()", globals={"fn": dense if path == "dense" else candidates},
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=MIN_RUN_S).median


def decide(name: str, artifact: CacheArtifact, tensors: CacheTensors,
           policy: SearchPolicy) -> tuple[CacheArtifact, SearchDecision]:
    """Choose the path of a freshly loaded cache, log it, and drop the indexes dense will never search."""
    decision = choose(artifact, tensors, policy)
    log.info("cache %s %s: search path %s (%s): %s", name, artifact.version, decision.path, decision.reason,
             decision.detail)
    if decision.path == "dense" and artifact.image_index is not None:
        artifact = dataclasses.replace(artifact, image_index=None, caption_index=None)
    return artifact, decision
