"""Blend time per image against cache size: dense `blend` vs FAISS top-k (a benchmark, not a test).

    python scripts/bench_blend.py --sizes 1000,16000,100000
    python scripts/bench_blend.py --sizes 100000 --batch 1,32 --index flat,hnsw --method caps --json out.json

On a synthetic cache of N keys (random unit vectors, seeded) it times, per cache size and
queries-per-call batch:
  - dense: `kvclip.blend.blend`, the exact pass over every key;
  - each FAISS index kind: `kvclip.index.search_candidates` (k nearest keys) followed by
    `kvclip.blend.blend_candidates`, together and each on its own.
It also reports each index's build time and size, the memory of the cache tensors, and how
often the FAISS top-1 class agrees with the dense one on a fixed set of queries, both for
the full logits and for the cache term alone (the logits minus zero-shot), because with
random text weights the zero-shot term dominates the full logits and hides the
approximation.

Last, per cache size and index, the server's own search-path decision
(kvclip.service.search_path.judge, as `--search-path auto` runs it at load): dense and FAISS
timed alternately in --rounds rounds per batch, the median FAISS / dense ratio with its
spread over the rounds, and the path auto picks given the full-logit agreement and
--min-agreement. Caches below the server's --probe-min-keys are never measured by auto (dense).

Only the project's engine is exercised; nothing here re-implements a blend. Progress goes to
stderr, the report (markdown tables) to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kvclip.threads import cpu_thread_defaults

# As `kvclip serve` does, before torch and faiss load: passive OpenMP waits, threads = CPU quota.
# Without it faiss's spinning OpenMP threads steal the cores from the blend that follows a search.
SERVER_THREADS = cpu_thread_defaults()

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kvclip.blend import CACHE_METHODS, BlendParams, CacheTensors, blend, blend_candidates, zeroshot_logits  # noqa: E402
from kvclip.index import INDEX_KINDS, build_index, search_candidates  # noqa: E402
from kvclip.service.config import DEFAULT_MIN_AGREEMENT, DEFAULT_PROBE_MIN_KEYS  # noqa: E402
from kvclip.service.search_path import (  # noqa: E402
    FASTER_RATIO,
    ROUNDS,
    PathProbe,
    SearchDecision,
    SearchPolicy,
    judge,
    probe_queries,
)

# Representative values, not tuned ones; for_method() zeroes what a method ignores
# (delta for tip/tipx, gamma for tip).
BASE_PARAMS = BlendParams(alpha=1.0, beta=5.5, gamma=0.5, delta=0.3)
QUERY_NOISE = 0.5  # noise norm relative to the unit key a query copies: cosine ≈ 0.89
AGREEMENT_CHUNK = 64  # queries per dense call when measuring agreement, to bound memory


@dataclass
class TimingRow:
    size: int
    batch: int
    engine: str  # "dense" or an index kind
    search_ms: float | None
    blend_ms: float
    total_ms: float
    us_per_image: float
    speedup_vs_dense: float | None


@dataclass
class AutoRow:
    size: int
    index: str
    decision: SearchDecision


@dataclass
class IndexRow:
    size: int
    index: str
    build_s: float
    index_mb: float
    top1_agreement: float
    cache_top1_agreement: float


def parse_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_kinds(text: str) -> list[str]:
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    for kind in kinds:
        if kind not in INDEX_KINDS:
            raise argparse.ArgumentTypeError(f"unknown index kind {kind!r}; expected {INDEX_KINDS}")
    return kinds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=parse_ints, default=parse_ints("1000,16000,100000"),
                    help="cache sizes N (keys), comma-separated")
    ap.add_argument("--dim", type=int, default=512, help="feature dimension D")
    ap.add_argument("--classes", type=int, default=100, help="number of classes C")
    ap.add_argument("--batch", type=parse_ints, default=parse_ints("1,32"),
                    help="queries per call, comma-separated")
    ap.add_argument("--method", choices=CACHE_METHODS, default="caps")
    ap.add_argument("--k", type=int, default=64, help="FAISS candidates per index")
    ap.add_argument("--index", type=parse_kinds, default=parse_kinds("flat,hnsw"),
                    help=f"index kinds, comma-separated, from {','.join(INDEX_KINDS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per cell; default: enough for about --target-s seconds")
    ap.add_argument("--target-s", type=float, default=1.0, help="seconds per cell when --repeats is auto")
    ap.add_argument("--agreement-queries", type=int, default=256)
    ap.add_argument("--faiss-threads", type=int, default=None,
                    help="faiss OpenMP threads (default: faiss's own). faiss ships its own libgomp, whose "
                         "idle threads spin against torch's between a search and the blend")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=ROUNDS,
                    help="search-path decision: rounds of dense and FAISS timed alternately per batch")
    ap.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                    help="search-path decision: the server's --faiss-min-agreement")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    return ap.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def make_cache(size: int, dim: int, classes: int, with_captions: bool, generator: torch.Generator,
               device: torch.device) -> CacheTensors:
    """A synthetic cache: unit random keys, uniform labels, unit random text-weight columns.

    Caption keys are noisy copies of the image keys rather than independent vectors, because
    a real caption embeds the same image: the two FAISS searches should then find
    overlapping neighbours, as they do on real caches.
    """
    image_keys = unit_rows(torch.randn(size, dim, generator=generator))
    caption_keys = None
    if with_captions:
        noise = unit_rows(torch.randn(size, dim, generator=generator))
        caption_keys = unit_rows(image_keys + QUERY_NOISE * noise)
    label_ids = torch.randint(0, classes, (size,), generator=generator)
    text_weights = F.normalize(torch.randn(dim, classes, generator=generator), dim=0)
    return CacheTensors.build(text_weights, image_keys, label_ids, caption_keys, device=device)


def make_queries(cache: CacheTensors, count: int, generator: torch.Generator) -> torch.Tensor:
    """Noisy copies of random cache keys, so every query has a meaningful nearest neighbour
    (the server's probe queries, from this run's generator)."""
    return probe_queries(cache.image_keys, count, generator, QUERY_NOISE)


def cache_megabytes(cache: CacheTensors) -> float:
    tensors = [cache.text_weights, cache.image_keys, cache.caption_keys, cache.label_ids,
               cache.key_log_partitions, cache.class_counts]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20


def index_megabytes(index: faiss.Index | None) -> float:
    # The serialised size: exact for both kinds, and needs no per-kind formula.
    return 0.0 if index is None else faiss.serialize_index(index).nbytes / 2**20


def synchronizer(device: torch.device) -> Callable[[], None]:
    """CUDA kernels run asynchronously: a timing must wait for them to finish."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(fn: Callable[[], Any], sync: Callable[[], None], repeats: int | None, target_s: float) -> float:
    """Median seconds per call, after warm-up.

    The median of per-call times, not the mean, so that a stray scheduler hiccup on a small
    machine does not move a cell. With repeats=None the count is sized from the warm-up calls
    to fill about target_s.
    """
    for _ in range(2):  # warm-up: allocator, thread pools, lazy CUDA init
        fn()
        sync()
    if repeats is None:
        t0 = time.perf_counter()
        fn()
        sync()
        repeats = max(3, min(10_000, math.ceil(target_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dense_logits(features: torch.Tensor, cache: CacheTensors, params: BlendParams, method: str) -> torch.Tensor:
    # Chunked: a dense CapS call holds several queries x N intermediates at once.
    return torch.cat([blend(chunk, cache, params, method) for chunk in features.split(AGREEMENT_CHUNK)])


def top1_agreements(features: torch.Tensor, cache: CacheTensors, params: BlendParams, method: str,
                    image_index: faiss.Index, caption_index: faiss.Index | None, k: int) -> tuple[float, float]:
    """Share of queries whose FAISS top-1 matches dense: full logits, and cache term alone."""
    exact = dense_logits(features, cache, params, method)
    candidates = search_candidates(features, image_index, caption_index, k, params.delta)
    approx = blend_candidates(features, cache, params, method, candidates)
    zeroshot = zeroshot_logits(features, cache.text_weights)
    full = (exact.argmax(-1) == approx.argmax(-1)).float().mean().item()
    cache_only = ((exact - zeroshot).argmax(-1) == (approx - zeroshot).argmax(-1)).float().mean().item()
    return full, cache_only


def build_indexes(cache: CacheTensors, kind: str, with_captions: bool) -> tuple[faiss.Index, faiss.Index | None, float]:
    """Image index, and caption index when the method reads captions; seconds for both."""
    t0 = time.perf_counter()
    image_index = build_index(cache.image_keys.cpu().numpy(), kind)
    caption_index = None
    if with_captions and cache.caption_keys is not None:
        caption_index = build_index(cache.caption_keys.cpu().numpy(), kind)
    return image_index, caption_index, time.perf_counter() - t0


def bench_size(size: int, args: argparse.Namespace, params: BlendParams, device: torch.device,
               sync: Callable[[], None]) -> tuple[list[TimingRow], list[IndexRow], list[AutoRow], float]:
    """All cells of one cache size; indexes are built one kind at a time and freed after."""
    generator = torch.Generator().manual_seed(args.seed + size)
    with_captions = params.delta > 0.0
    cache = make_cache(size, args.dim, args.classes, with_captions, generator, device)
    queries = make_queries(cache, max(max(args.batch), args.agreement_queries), generator)

    dense_s: dict[int, float] = {}
    timing_rows: list[TimingRow] = []
    for batch in args.batch:
        features = queries[:batch]
        log(f"  N={size} batch={batch}: dense")
        seconds = time_call(lambda features=features: blend(features, cache, params, args.method), sync,
                            args.repeats, args.target_s)
        dense_s[batch] = seconds
        timing_rows.append(TimingRow(size, batch, "dense", None, seconds * 1e3, seconds * 1e3,
                                     seconds * 1e6 / batch, None))

    index_rows: list[IndexRow] = []
    auto_rows: list[AutoRow] = []
    for kind in args.index:
        log(f"  N={size}: building {kind} index{'es (image + caption)' if with_captions else ''}")
        image_index, caption_index, build_s = build_indexes(cache, kind, with_captions)
        log(f"  N={size}: {kind} built in {build_s:.1f} s; agreement on {args.agreement_queries} queries")
        agreement = top1_agreements(queries[: args.agreement_queries], cache, params, args.method,
                                    image_index, caption_index, args.k)
        index_rows.append(IndexRow(size, kind, build_s, index_megabytes(image_index) + index_megabytes(caption_index),
                                   *agreement))
        for batch in args.batch:
            log(f"  N={size} batch={batch}: {kind}")
            timing_rows.append(time_faiss(kind, size, batch, queries[:batch], cache, params, args,
                                          image_index, caption_index, sync, dense_s[batch]))
        if params.gamma == 0.0:  # the server never serves a KL term from candidates
            log(f"  N={size}: {kind} search-path decision, {args.rounds} rounds")
            probe = PathProbe(cache, image_index, caption_index, args.method, params, args.k, queries[: max(args.batch)])
            policy = SearchPolicy(faiss_k=args.k, batches=tuple(args.batch), min_agreement=args.min_agreement,
                                  rounds=args.rounds)
            auto_rows.append(AutoRow(size, kind, judge(probe, [args.method], kind, index_rows[-1].top1_agreement,
                                                       "probe", policy)))
        del image_index, caption_index
    return timing_rows, index_rows, auto_rows, cache_megabytes(cache)


def time_faiss(kind: str, size: int, batch: int, features: torch.Tensor, cache: CacheTensors, params: BlendParams,
               args: argparse.Namespace, image_index: faiss.Index, caption_index: faiss.Index | None,
               sync: Callable[[], None], dense_seconds: float) -> TimingRow:
    """Search alone, blend alone (on fixed candidates), and the two together as served."""
    search = lambda: search_candidates(features, image_index, caption_index, args.k, params.delta)  # noqa: E731
    candidates = search()
    search_s = time_call(search, sync, args.repeats, args.target_s)
    blend_s = time_call(lambda: blend_candidates(features, cache, params, args.method, candidates),
                        sync, args.repeats, args.target_s)
    total_s = time_call(lambda: blend_candidates(features, cache, params, args.method, search()),
                        sync, args.repeats, args.target_s)
    return TimingRow(size, batch, kind, search_s * 1e3, blend_s * 1e3, total_s * 1e3, total_s * 1e6 / batch,
                     dense_seconds / total_s)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def header_lines(args: argparse.Namespace, device: torch.device, params: BlendParams) -> list[str]:
    command = " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv])
    return [
        f"command: `{command}`",
        f"torch {torch.__version__}, faiss {faiss.__version__}, device {device} ({device_name(device)}), "
        f"torch threads {torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (set as kvclip serve does: {SERVER_THREADS or 'none'})",
        f"method {args.method}, params {params.as_dict()}, D={args.dim}, C={args.classes}, k={args.k} per index"
        f"{' (image + caption: up to 2k candidates)' if params.delta > 0 else ''}, "
        f"repeats {args.repeats or f'auto (~{args.target_s:g} s per cell)'}, seed {args.seed}",
        "times are medians per call; search runs on the CPU (faiss-cpu) whatever the device",
    ]


def hnsw_settings(dim: int) -> str:
    """The graph parameters build_index uses, read off a one-key index rather than restated."""
    index = build_index(np.zeros((1, dim), dtype=np.float32), "hnsw")
    hnsw = index.hnsw  # valid only while `index` is referenced
    return f"M={hnsw.nb_neighbors(1)}, efConstruction={hnsw.efConstruction}, efSearch={hnsw.efSearch}"


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def timing_table(rows: list[TimingRow]) -> list[str]:
    lines = ["| N | batch | engine | search ms | blend ms | total ms | µs/image | vs dense |",
             "|---:|---:|:---|---:|---:|---:|---:|---:|"]
    for r in rows:
        speedup = None if r.speedup_vs_dense is None else f"{r.speedup_vs_dense:.2f}x"
        lines.append(f"| {r.size} | {r.batch} | {r.engine} | {fmt(r.search_ms, '.3f')} | {r.blend_ms:.3f} | "
                     f"{r.total_ms:.3f} | {r.us_per_image:.1f} | {speedup or '—'} |")
    return lines


def index_table(rows: list[IndexRow], cache_mb: dict[int, float], agreement_queries: int) -> list[str]:
    lines = ["| N | cache tensors MB | index | build s | index MB | top-1 agree | cache-term top-1 agree |",
             "|---:|---:|:---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.size} | {cache_mb[r.size]:.1f} | {r.index} | {r.build_s:.2f} | {r.index_mb:.1f} | "
                     f"{r.top1_agreement:.3f} | {r.cache_top1_agreement:.3f} |")
    lines.append(f"\nagreement: FAISS vs dense argmax over {agreement_queries} queries; cache-term = logits "
                 "minus zero-shot, i.e. the part the top-k approximation changes")
    return lines


def auto_table(rows: list[AutoRow], min_agreement: float) -> list[str]:
    lines = ["| N | index | batch | dense ms/image | FAISS ms/image | FAISS / dense (min–max) | top-1 agree | auto picks |",
             "|---:|:---|---:|---:|---:|---:|---:|:---|"]
    for r in rows:
        d = r.decision
        pick = f"{d.path} ({d.reason})" if r.size >= DEFAULT_PROBE_MIN_KEYS else \
            f"dense (small: not measured; measured here: {d.path})"
        for t in d.timings or [None]:
            figures = "| — | — | — |" if t is None else (
                f"| {t.batch} | {t.dense_ms_per_image:.3f} | {t.faiss_ms_per_image:.3f} | "
                f"{t.faiss_over_dense:.2f} ({t.ratio_min:.2f}–{t.ratio_max:.2f}) |")
            lines.append(f"| {r.size} | {r.index} {figures} {d.agreement:.3f} | {pick} |")
    lines.append(f"\nauto: FAISS only when top-1 agreement >= {min_agreement} and FAISS takes at most "
                 f"{FASTER_RATIO} x dense's time at every batch (kvclip.service.search_path.judge); low agreement "
                 f"is decided without timing, and caches below {DEFAULT_PROBE_MIN_KEYS} keys are not measured")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    params = BASE_PARAMS.for_method(args.method)
    sync = synchronizer(device)
    if args.faiss_threads is not None:
        faiss.omp_set_num_threads(args.faiss_threads)

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    timing_rows: list[TimingRow] = []
    index_rows: list[IndexRow] = []
    auto_rows: list[AutoRow] = []
    cache_mb: dict[int, float] = {}
    for size in args.sizes:
        log(f"N={size}")
        rows, irows, arows, cache_mb[size] = bench_size(size, args, params, device, sync)
        timing_rows += rows
        index_rows += irows
        auto_rows += arows
    elapsed = time.perf_counter() - started

    lines = header_lines(args, device, params)
    if "hnsw" in args.index:
        lines.append(f"hnsw: {hnsw_settings(args.dim)} (kvclip.index defaults, unchanged)")
    lines += ["", "## Time per call", "", *timing_table(timing_rows), "",
              "## Indexes and agreement", "", *index_table(index_rows, cache_mb, args.agreement_queries),
              "", "## Search path (--search-path auto)", "",
              *(auto_table(auto_rows, args.min_agreement) if auto_rows else
                [f"{args.method} with γ = {params.gamma} has a KL term: the server always blends it densely"]),
              "", f"benchmark wall time {elapsed:.1f} s; 1-min load average {load_before:.2f} before, "
              f"{os.getloadavg()[0]:.2f} after (this run adds up to {torch.get_num_threads()}: "
              "more means other work shared the CPU and the times are inflated)"]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header_lines(args, device, params), "timings": [asdict(r) for r in timing_rows],
                       "indexes": [asdict(r) for r in index_rows], "cache_mb": cache_mb,
                       "search_path": [asdict(r) for r in auto_rows],
                       "wall_s": elapsed}, fh, indent=2)


if __name__ == "__main__":
    main()
