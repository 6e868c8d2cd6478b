"""Choose α, β, γ, δ by leave-one-out on the support set: never on data reported as accuracy.

A training-free cache needs no refit for leave-one-out: query i is support image i (its
plain view) and the blend simply excludes support item i. Every grid includes α = γ = 0,
which is zero-shot exactly, so the tuned methods cannot lose to zero-shot on this measure;
when zero-shot is useless (random text) the large α values let the cache dominate.
The tuner composes the blend engine's own terms, then re-scores the winners with
`blend` itself, so tuning and serving share one implementation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvclip.cache_builder.progress import BuildMonitor
from kvclip.blend import (
    CACHE_METHODS,
    METHODS,
    BlendParams,
    CacheTensors,
    affinities,
    blend,
    cache_logits,
    kl_logits,
    zeroshot_logits,
)


@dataclass(frozen=True)
class Grid:
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 300.0, 1000.0)
    betas: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 20.0, 50.0, 100.0)
    gammas: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)
    deltas: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)

    def as_dict(self) -> dict[str, list[float]]:
        return {k: list(getattr(self, k)) for k in ("alphas", "betas", "gammas", "deltas")}

    def deltas_for(self, captions: bool) -> tuple[float, ...]:
        """δ only varies when the cache has caption keys; the tuner's outer loop (and progress unit)."""
        return self.deltas if captions else (0.0,)


@dataclass
class TuningResult:
    best_method: str
    params: dict[str, BlendParams]  # per cache method
    loo_top1: dict[str, float]  # per method, from `blend` with the chosen parameters
    n_queries: int
    grid: Grid = field(default_factory=Grid)

    def manifest_params(self) -> dict:
        return {
            "best_method": self.best_method,
            "methods": {m: p.as_dict() for m, p in self.params.items()},
        }

    def report(self) -> dict:
        return {
            "protocol": "leave-one-out on the support set (query i excludes support item i)",
            "n_queries": self.n_queries,
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
) -> TuningResult:
    """Grid-search each cache method's parameters by leave-one-out top-1 accuracy.

    `monitor` is checked before and advanced after each δ of `grid.deltas_for(...)`.
    `fixed` replaces the search's choice for some methods and `fixed_best` the best method
    (a pool build, whose pseudo-labels cannot choose them); leave-one-out accuracy is then
    reported for the parameters that will be served.
    """
    monitor = monitor or BuildMonitor()
    device = cache.device
    ids = query_ids(cache.num_items, max_queries, seed).to(device)
    queries = query_features.to(device, torch.float32)[ids]
    truth = label_ids.to(device)[ids]
    exclude = torch.zeros(len(ids), cache.num_items, dtype=torch.bool, device=device)
    exclude[torch.arange(len(ids), device=device), ids] = True

    zs = zeroshot_logits(queries, cache.text_weights)
    alphas = torch.tensor(grid.alphas, device=device).view(-1, 1, 1)
    best: dict[str, tuple[tuple[float, float], BlendParams]] = {}
    for delta in grid.deltas_for(cache.caption_keys is not None):
        monitor.check()
        affinity = affinities(queries, cache, delta)
        kl_term = kl_logits(queries, cache, affinity, exclude) if any(grid.gammas) else None
        for beta in grid.betas:
            cache_term = cache_logits(affinity, cache.values, beta, exclude)
            for gamma in grid.gammas:
                base = zs if gamma == 0.0 else zs + gamma * kl_term
                scores = _scores(base.unsqueeze(0) + alphas * cache_term.unsqueeze(0), truth)
                for alpha, score in zip(grid.alphas, scores):
                    params = BlendParams(alpha=alpha, beta=beta, gamma=gamma, delta=delta)
                    for method in _methods_for(gamma, delta, cache.caption_keys is not None):
                        if method not in best or score > best[method][0]:
                            best[method] = (score, params)
        monitor.advance(1)

    chosen = {method: params for method, (_, params) in best.items()} | (fixed or {})
    loo = {"zeroshot": _accuracy(zs, truth)}
    for method, params in chosen.items():
        loo[method] = _accuracy(blend(queries, cache, params, method, exclude), truth)
    # Ties go to the simpler, cheaper method (METHODS is ordered that way).
    best_method = fixed_best or max(loo, key=lambda m: (round(loo[m], 6), -METHODS.index(m)))
    return TuningResult(best_method, chosen, loo, len(ids), grid)


def _methods_for(gamma: float, delta: float, captions: bool) -> tuple[str, ...]:
    """Which methods a grid point belongs to: tip ⊂ tipx ⊂ caps (caps needs caption keys)."""
    if delta != 0.0:
        return ("caps",)
    methods = ("tipx", "caps") if gamma != 0.0 else CACHE_METHODS
    return methods if captions else tuple(m for m in methods if m != "caps")


def _scores(logits: torch.Tensor, truth: torch.Tensor) -> list[tuple[float, float]]:
    """(top-1 accuracy, −mean NLL) per leading slice; the NLL only breaks accuracy ties."""
    correct = (logits.argmax(dim=-1) == truth).float().mean(dim=-1)
    nll = -F.log_softmax(logits, dim=-1).gather(-1, truth.view(1, -1, 1).expand(logits.shape[0], -1, 1))
    return list(zip(correct.tolist(), (-nll.mean(dim=(1, 2))).tolist()))


def _accuracy(logits: torch.Tensor, truth: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == truth).float().mean())


def query_ids(num_items: int, max_queries: int, seed: int) -> torch.Tensor:
    """All support items, or a seeded random subset of them for large caches."""
    if num_items <= max_queries:
        return torch.arange(num_items)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_items, generator=generator)[:max_queries].sort().values
