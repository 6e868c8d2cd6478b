"""Choose α, β, γ, δ by balanced leave-one-out on the support set: never on data reported as accuracy.

A training-free cache needs no refit for leave-one-out: query i is support image i (its
plain view) and the blend simply excludes support item i. Excluding only item i leaks the
label, though: the query's own class would be the one class with an item fewer, and with
CLIP's all-positive affinities every Tip-X/CapS weight −ψ(KL) is negative, so one item fewer
*raises* the true class whatever the image (docs/methods.md). So each query also drops one
seeded random item of every other class, and any exact or near duplicate of itself: every class
enters its sums with one item fewer, as in a cache of one shot fewer, and the estimate no
longer depends on which class the query is in.

Every grid includes α = γ = 0, which is zero-shot exactly, so the tuned methods cannot lose
to zero-shot on this measure; when zero-shot is useless (random text) the large α values let
the cache dominate. A second, finer pass searches around each method's best coarse point.
The tuner composes the blend engine's own terms, then re-scores the winners with `blend`
itself, so tuning and serving share one implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvclip.blend import (
    CACHE_METHODS,
    METHODS,
    BlendParams,
    CacheTensors,
    affinities,
    blend,
    cache_logits,
    class_scale,
    kl_logits,
    zeroshot_logits,
)
from kvclip.cache_builder.progress import BuildMonitor
from kvclip.calibration import fit_calibration
from kvclip.vocabulary import NEAR_DUPLICATE_COSINE

PROTOCOL = (
    "balanced leave-one-out on the support set: query i excludes support item i, its exact and near "
    f"duplicates (plain-view cosine >= {NEAR_DUPLICATE_COSINE}) and one seeded random item of every other "
    "class, so every class takes part with one item fewer"
)
CLASS_BALANCE = "each class's cache sums times n̄ / n_c (per-class mean; n̄ the mean class size)"
# Plain-view cosine from which a support item is the query's own image again (a copy, resized or
# re-compressed): the build reports these (cache_builder/duplicates.py); docs/methods.md says why 0.98.
DUPLICATE_COSINE = NEAR_DUPLICATE_COSINE


@dataclass(frozen=True)
class Grid:
    """The coarse grid (it holds the references' published points: Tip-Adapter's β = 5.5, β < 0.5,
    γ > 10) and how finely the second pass divides the steps around each method's best point."""

    alphas: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 300.0, 1000.0)
    betas: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.5, 7.0, 10.0, 20.0, 50.0, 100.0)
    gammas: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    deltas: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
    refine_steps: int = 2  # values the second pass puts between the best coarse value and each neighbour

    def as_dict(self) -> dict[str, list[float] | int]:
        return {**{k: list(getattr(self, k)) for k in ("alphas", "betas", "gammas", "deltas")},
                "refine_steps": self.refine_steps}

    def deltas_for(self, captions: bool) -> tuple[float, ...]:
        """δ only varies when the cache has caption keys; the tuner's outer loop (and progress unit)."""
        return self.deltas if captions else (0.0,)

    def around(self, name: str, best: float) -> tuple[float, ...]:
        """The second pass's values of parameter `name` ("alphas", ...): the coarse neighbours of
        `best`, `best` itself and `refine_steps` values in each gap. Geometric steps (α, β, γ span
        decades) except from 0 and for δ, which is a share in [0, 1]. Past the grid's last value the
        gap is extended by the last coarse ratio; below a positive first value, down to its half."""
        values = sorted(getattr(self, name))
        i = values.index(best)
        lower = values[i - 1] if i > 0 else (best / 2 if best > 0 else None)
        upper = values[i + 1] if i + 1 < len(values) else (best * best / values[i - 1] if i > 0 and values[i - 1] > 0
                                                           else best * 2)
        if name == "deltas":
            upper = min(upper, 1.0)
        out = {best}
        for edge in (lower, upper):
            if edge is None or edge == best:
                continue
            out |= set(_steps(best, edge, self.refine_steps, linear=name == "deltas" or min(best, edge) == 0))
        return tuple(sorted(out))


@dataclass
class TuningResult:
    best_method: str
    params: dict[str, BlendParams]  # per cache method
    loo_top1: dict[str, float]  # per method, from `blend` with the chosen parameters
    n_queries: int
    grid: Grid = field(default_factory=Grid)
    duplicates: int = 0  # support items excluded from some query's sums as exact or near duplicates of it
    calibration: dict = field(default_factory=dict)  # kvclip.calibration.fit_calibration of the served logits

    def manifest_params(self) -> dict:
        return {
            "best_method": self.best_method,
            "methods": {m: p.as_dict() for m, p in self.params.items()},
        }

    def report(self) -> dict:
        return {
            "protocol": PROTOCOL,
            "class_balance": CLASS_BALANCE,
            "n_queries": self.n_queries,
            "duplicates_excluded": self.duplicates,
            "loo_top1": self.loo_top1,
            "grid": self.grid.as_dict(),
        }


def tune(
    cache: CacheTensors,
    query_features: torch.Tensor,
    label_ids: torch.Tensor,
    grid: Grid = Grid(),
    max_queries: int = 4000,
    seed: int = 0,
    monitor: BuildMonitor | None = None,
    fixed: dict[str, BlendParams] | None = None,
    fixed_best: str | None = None,
    target_precision: float | None = None,
) -> TuningResult:
    """Grid-search each cache method's parameters by balanced leave-one-out top-1 accuracy.

    `monitor` is checked before each δ of `grid.deltas_for(...)` and each method's second pass,
    and advanced once per δ (the second pass belongs to the last unit).
    `fixed` replaces the search's choice for some methods and `fixed_best` the best method
    (a pool build, whose pseudo-labels cannot choose them); leave-one-out accuracy is then
    reported for the parameters that will be served.
    Each method's score temperature (and, with `target_precision`, its abstention threshold) is
    fitted on the same leave-one-out logits of the chosen parameters (kvclip/calibration.py).
    """
    monitor = monitor or BuildMonitor()
    device = cache.device
    ids = query_ids(cache.num_items, max_queries, seed).to(device)
    query_features = query_features.to(device, torch.float32)
    queries = query_features[ids]
    truth = label_ids.to(device)[ids]
    exclude = balanced_exclusions(label_ids.to(device), ids, cache.num_classes, seed)
    duplicates = duplicate_mask(queries, query_features) & ~exclude
    exclude |= duplicates  # = loo_exclusions(...), with the duplicates kept apart for the report
    search = _Search(cache, queries, truth, exclude)

    captions = cache.caption_keys is not None
    deltas = grid.deltas_for(captions)
    for i, delta in enumerate(deltas):
        monitor.check()
        search.run(grid.alphas, grid.betas, grid.gammas, delta, _methods(captions))
        if i + 1 < len(deltas):
            monitor.advance(1)
    for method, (_, params) in list(search.best.items()):
        monitor.check()
        gammas = (0.0,) if method == "tip" else grid.around("gammas", params.gamma)
        for delta in grid.around("deltas", params.delta) if method == "caps" else (0.0,):
            search.run(grid.around("alphas", params.alpha), grid.around("betas", params.beta), gammas, delta,
                       (method,))
    monitor.advance(1)

    chosen = search.nested_best() | (fixed or {})
    logits = {"zeroshot": search.zeroshot} | {
        method: blend(queries, cache, params, method, exclude) for method, params in chosen.items()}
    loo = {method: _accuracy(values, truth) for method, values in logits.items()}
    best_method = fixed_best or simplest_within_one_se(loo, len(ids))
    return TuningResult(best_method, chosen, loo, len(ids), grid, int(duplicates.any(dim=0).sum()),
                        fit_calibration(logits, truth, target_precision))


def simplest_within_one_se(loo_top1: dict[str, float], n_queries: int) -> str:
    """The simplest method (METHODS is ordered simplest and cheapest first) whose accuracy is
    within one binomial standard error of the best: the one-standard-error rule. tip ⊂ tipx ⊂
    caps share grid points, so a richer method never scores lower on leave-one-out, and without
    a margin any noise-sized gain would pick it."""
    top = max(loo_top1.values())
    margin = math.sqrt(top * (1.0 - top) / max(1, n_queries)) + 1e-9
    return next(m for m in METHODS if m in loo_top1 and loo_top1[m] >= top - margin)


class _Search:
    """The best (score, params) per method over the grid points run so far."""

    def __init__(self, cache: CacheTensors, queries: torch.Tensor, truth: torch.Tensor, exclude: torch.Tensor):
        self.cache, self.queries, self.truth, self.exclude = cache, queries, truth, exclude
        self.scale = class_scale(cache, exclude)
        self.zeroshot = zeroshot_logits(queries, cache.text_weights)
        self.best: dict[str, tuple[tuple[float, float], BlendParams]] = {}

    def run(self, alphas, betas, gammas, delta: float, methods: tuple[str, ...]) -> None:
        """Score every (α, β, γ) at this δ for the given methods that the points belong to."""
        cache, exclude = self.cache, self.exclude
        affinity = affinities(self.queries, cache, delta)
        kl_term = self.scale * kl_logits(self.queries, cache, affinity, exclude) if any(gammas) else None
        alpha_axis = torch.tensor(alphas, device=cache.device).view(-1, 1, 1)
        for beta in betas:
            cache_term = self.scale * cache_logits(affinity, cache.label_ids, cache.num_classes, beta, exclude)
            for gamma in gammas:
                owners = [m for m in _owners(gamma, delta) if m in methods]
                if not owners:
                    continue
                base = self.zeroshot if gamma == 0.0 else self.zeroshot + gamma * kl_term
                logits = base.unsqueeze(0) + alpha_axis * cache_term.unsqueeze(0)
                accuracy = (logits.argmax(dim=-1) == self.truth).float().mean(dim=-1).tolist()
                bar = min(self.best[m][0][0] if m in self.best else -1.0 for m in owners)
                for i in (i for i, acc in enumerate(accuracy) if acc >= bar):  # the NLL only breaks ties
                    score = (accuracy[i], _mean_log_likelihood(logits[i], self.truth))
                    for method in owners:
                        if method not in self.best or score > self.best[method][0]:
                            self.best[method] = (score, BlendParams(alpha=alphas[i], beta=beta, gamma=gamma,
                                                                    delta=delta))

    def nested_best(self) -> dict[str, BlendParams]:
        """Each method's best point, or a simpler method's where that scores higher: tip's points
        are tipx's with γ = 0 and tipx's are caps's with δ = 0 (the second passes differ)."""
        out: dict[str, tuple[tuple[float, float], BlendParams]] = {}
        for method in CACHE_METHODS:
            if method not in self.best:
                continue
            candidates = [self.best[method]] + [out[m] for m in CACHE_METHODS[:CACHE_METHODS.index(method)] if m in out]
            out[method] = max(candidates, key=lambda c: c[0])
        return {method: params for method, (_, params) in out.items()}


def loo_exclusions(
    label_ids: torch.Tensor, ids: torch.Tensor, num_classes: int, seed: int, query_features: torch.Tensor
) -> torch.Tensor:
    """The tuner's leave-one-out (queries x items, True = left out) for the queries `ids`:
    balanced_exclusions plus each query's exact and near duplicates among the support items."""
    query_features = query_features.to(ids.device, torch.float32)
    return balanced_exclusions(label_ids, ids, num_classes, seed) | duplicate_mask(query_features[ids], query_features)


def balanced_exclusions(label_ids: torch.Tensor, ids: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """Balanced leave-one-out (queries x items, True = left out): query r, support item ids[r],
    leaves out that item and one seeded random item of every other non-empty class."""
    label_ids = label_ids.to(ids.device)
    counts = torch.bincount(label_ids, minlength=num_classes)
    by_class = torch.argsort(label_ids, stable=True)  # item ids grouped by class
    starts = torch.cumsum(counts, 0) - counts
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(len(ids), num_classes, generator=generator, dtype=torch.float64).to(ids.device)
    slot = starts + (draws * counts).long().minimum((counts - 1).clamp_min(0))
    picked = by_class[slot.clamp(max=max(0, len(label_ids) - 1))]
    own = label_ids[ids].view(-1, 1) == torch.arange(num_classes, device=ids.device)
    picked = torch.where(own | (counts == 0), ids.view(-1, 1), picked)
    exclude = torch.zeros(len(ids), len(label_ids), dtype=torch.bool, device=ids.device)
    return exclude.scatter_(1, picked, True)


def duplicate_mask(queries: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
    """queries x items: True where a support item's plain-view feature is the query's own image
    again, exactly or nearly (a file copied into the support set twice defeats exclusion by index)."""
    return queries @ query_features.T >= DUPLICATE_COSINE


def _methods(captions: bool) -> tuple[str, ...]:
    return CACHE_METHODS if captions else tuple(m for m in CACHE_METHODS if m != "caps")


def _owners(gamma: float, delta: float) -> tuple[str, ...]:
    """Which methods a grid point belongs to: tip ⊂ tipx ⊂ caps."""
    if delta != 0.0:
        return ("caps",)
    return ("tipx", "caps") if gamma != 0.0 else CACHE_METHODS


def _steps(a: float, b: float, n: int, linear: bool) -> list[float]:
    """n values strictly between a and b, and b: evenly spaced, or geometrically."""
    t = torch.linspace(0.0, 1.0, n + 2, dtype=torch.float64)[1:]
    values = a + (b - a) * t if linear else a * (b / a) ** t
    return [float(f"{float(v):.4g}") for v in values]  # 4 significant digits: readable in the manifest


def _mean_log_likelihood(logits: torch.Tensor, truth: torch.Tensor) -> float:
    return float(F.log_softmax(logits, dim=-1).gather(-1, truth.view(-1, 1)).mean())


def _accuracy(logits: torch.Tensor, truth: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == truth).float().mean())


def query_ids(num_items: int, max_queries: int, seed: int) -> torch.Tensor:
    """All support items, or a seeded random subset of them for large caches."""
    if num_items <= max_queries:
        return torch.arange(num_items)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_items, generator=generator)[:max_queries].sort().values
