"""Calibrated scores and abstention: a score map per method, the threshold for a target
precision, and the metrics that judge them (docs/methods.md, "Calibration" and "Abstention").

The blended logits are sums of up to α·N exponentials, so `softmax(logits)` is nearly one-hot
whatever the accuracy. Each method gets a map `softmax(transformed(logit) / T)`, fitted by
minimising the NLL on the builder's balanced leave-one-out logits. Three transforms:

- "logit": the logit itself, plain temperature scaling (T only);
- "log-gap": `−log(1 + gap)`, `gap_c = max(logit) − logit_c` (T only). The cache term's gaps span
  decades from query to query and their size says little beyond their order of magnitude;
- "log-mix": `−(1 − m)·log(1 + gap) + m·log(1 + lift)`, `lift_c = logit_c − min(logit)` (T and the
  share m ∈ [0, 1]). `(1 + lift)^(1/T)` is each class's cache mass above the weakest class, the
  vote share of a kernel (Parzen) classifier, sharpened: a query far from every support item has
  small gaps and can still be sure if one class holds most of the little mass there is.

Which transform a method serves is chosen by the NLL on held-out folds of the leave-one-out
queries (log-mix has two parameters, so its in-sample NLL would always win), then refitted on
all of them. Every transform is increasing in the logit, so the argmax, and accuracy, never change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Bounds of the 1-D search over log T: logits of tuned caches reach ~1e4 (α up to ~3000),
# so T must be able to go far above 1; far below 1 only sharpens an already sharp softmax.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e5
ECE_BINS = 15
TRANSFORMS = ("logit", "log-gap", "log-mix")  # simplest first: ties keep the simpler map
CV_FOLDS = 5  # held-out folds that choose the transform; fewer queries than 2 per fold: in-sample


@dataclass(frozen=True)
class ScoreMap:
    """A method's served scores: softmax(transformed(logits, transform, mix) / temperature)."""

    transform: str = "logit"
    temperature: float = 1.0
    mix: float = 0.0  # log-mix only: the share of the log-lift feature


def _gap_feature(logits: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(logits.max(dim=-1, keepdim=True).values - logits)


def _lift_feature(logits: torch.Tensor) -> torch.Tensor:
    return torch.log1p(logits - logits.min(dim=-1, keepdim=True).values)


def transformed(logits: torch.Tensor, transform: str = "logit", mix: float = 0.0) -> torch.Tensor:
    """What the temperature divides: the logits, −log(1 + gap to the top logit), or the log-mix
    (module docstring). log-mix with mix = 0 is log-gap."""
    if transform == "logit":
        return logits
    if transform == "log-gap":
        return _gap_feature(logits)
    if transform == "log-mix":
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"log-mix share must lie in [0, 1], got {mix}")
        return (1.0 - mix) * _gap_feature(logits) + mix * _lift_feature(logits)
    raise ValueError(f"unknown score transform {transform!r}")


def nll(logits: torch.Tensor, truth: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits / T)."""
    if len(truth) == 0:
        return 0.0
    return float(F.cross_entropy(logits.double() / temperature, truth))


class _TemperatureSlope:
    """d/dβ and d²/dβ² of the mean NLL of softmax(β · z): E_p[z] − z_true and Var_p[z].

    Rows are shifted by their maximum once (softmax and both derivatives are unchanged): exp(β·z)
    then never overflows, and E_p[z²] − E_p[z]², small where p is peaked on the row's maximum,
    loses no precision. Row sums are einsums, which make no n × C temporaries."""

    def __init__(self, logits: torch.Tensor, truth: torch.Tensor):
        self.shifted = logits - logits.max(dim=-1, keepdim=True).values
        self.squared = self.shifted * self.shifted
        self.true_mean = float(self.shifted.gather(-1, truth.view(-1, 1)).mean())
        self._weights = torch.empty_like(self.shifted)

    def __call__(self, beta: float) -> tuple[float, float]:
        weights = torch.mul(self.shifted, beta, out=self._weights).exp_()
        total = weights.sum(dim=-1)
        mean = torch.einsum("nc,nc->n", weights, self.shifted) / total
        variance = torch.einsum("nc,nc->n", weights, self.squared) / total - mean * mean
        return float(mean.mean()) - self.true_mean, float(variance.clamp_min(0.0).mean())


def fit_temperature(logits: torch.Tensor, truth: torch.Tensor, start: float | None = None,
                    max_steps: int = 100) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising nll. The NLL is convex in β = 1/T
    (cross-entropy is convex in logits, which are linear in β), so its minimum is where the slope
    crosses zero: Newton steps on β inside a bracket that always holds that crossing, and a
    bisection of log β whenever a step would leave it: about ten passes over the logits where a
    search on the NLL's values needs sixty, fewer from a `start` (a T) near the answer.
    1.0 without queries; MAX_TEMPERATURE when every T scores the same."""
    if len(truth) == 0:
        return 1.0
    logits, truth = logits.double(), truth.to(logits.device)
    slope_at = _TemperatureSlope(logits, truth)
    lo, hi = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE
    beta = min(max(1.0 / start, lo), hi) if start else math.sqrt(lo * hi)
    slope, curvature = slope_at(beta)
    # The minimum lies where the NLL falls towards: at that bound if it still falls there.
    if slope < 0 and (beta >= hi or slope_at(hi)[0] <= 0):
        return MIN_TEMPERATURE
    if slope > 0 and (beta <= lo or slope_at(lo)[0] >= 0):
        return MAX_TEMPERATURE
    if slope == 0:  # a minimum, or flat (one-hot scores or equal logits): flat from the lowest β on, the largest T
        return MAX_TEMPERATURE if curvature == 0 and slope_at(lo)[0] >= 0 else float(f"{1.0 / beta:.6g}")
    last_move = hi - lo
    for _ in range(max_steps):
        if slope < 0:
            lo = beta
        elif slope > 0:
            hi = beta
        else:
            break
        newton = beta - slope / curvature if curvature > 0 else math.nan
        # Bisect (in log β: the bracket spans seven decades) when Newton would leave the bracket
        # or is not at least halving its moves.
        if lo < newton < hi and abs(newton - beta) < last_move / 2:
            moved_to = newton
        else:
            moved_to = math.sqrt(lo * hi)
        last_move, beta = abs(moved_to - beta), moved_to
        if last_move <= 1e-10 * beta:
            break
        slope, curvature = slope_at(beta)
    return float(f"{1.0 / beta:.6g}")


def probabilities(logits: torch.Tensor, temperature: float = 1.0, transform: str = "logit",
                  mix: float = 0.0) -> torch.Tensor:
    """The served scores over the cache's labels: softmax(transformed(logits) / T)."""
    return (transformed(logits, transform, mix) / temperature).softmax(dim=-1)


def served(logits: torch.Tensor, score_map: ScoreMap) -> torch.Tensor:
    """probabilities() with a method's fitted map."""
    return probabilities(logits, score_map.temperature, score_map.transform, score_map.mix)


def map_nll(logits: torch.Tensor, truth: torch.Tensor, score_map: ScoreMap) -> float:
    """The NLL of the true class under the served scores of `score_map`."""
    return nll(transformed(logits, score_map.transform, score_map.mix), truth, score_map.temperature)


def fit_log_mix(logits: torch.Tensor, truth: torch.Tensor, iterations: int = 50) -> ScoreMap:
    """The log-mix map (T, m) minimising the NLL. With a = (1 − m)/T and b = m/T the scores are
    softmax(a·gap_feature + b·lift_feature): the NLL is convex in (a, b) ≥ 0, so its minimum is
    either on an edge (b = 0: log-gap, a = 0: log-lift, each a 1-D temperature fit) or a
    stationary point inside, which damped Newton steps from the better edge reach while staying
    in the quadrant (a + b ≤ 1 / MIN_TEMPERATURE)."""
    if len(truth) == 0:
        return ScoreMap("log-mix", 1.0, 0.0)
    logits, truth = logits.double(), truth.to(logits.device)
    features = torch.stack([_gap_feature(logits), _lift_feature(logits)])  # 2 x n x C
    true_values = features.gather(2, truth.view(1, -1, 1).expand(2, -1, 1)).squeeze(2)  # 2 x n

    def loss(w: torch.Tensor) -> float:
        return float(F.cross_entropy(torch.einsum("k,knc->nc", w, features), truth))

    edges = []
    for k in range(2):
        w = torch.zeros(2, dtype=torch.float64, device=logits.device)
        w[k] = 1.0 / fit_temperature(features[k], truth)
        edges.append((loss(w), w))
    value, w = min(edges, key=lambda edge: edge[0])
    for _ in range(iterations):
        weighted = torch.einsum("k,knc->nc", w, features).softmax(dim=-1) * features  # p · feature
        expected = weighted.sum(dim=-1)  # E_p[feature] per query, 2 x n
        grad = (expected - true_values).mean(dim=1)
        # Σ p·f_k·f_l as one matrix product (a three-operand einsum here runs 4x slower)
        hessian = (weighted.flatten(1) @ features.flatten(1).T - expected @ expected.T) / len(truth)
        step = -torch.linalg.solve(hessian + 1e-12 * torch.eye(2, dtype=w.dtype, device=w.device), grad)
        if float(grad @ step) > -1e-12:  # stationary (or no descent direction left)
            break
        # The longest step that keeps a, b >= 0 and a + b <= 1/MIN_TEMPERATURE, then halve until the NLL drops.
        room = [float(-w[k] / step[k]) for k in range(2) if step[k] < 0]
        if float(step.sum()) > 0:
            room.append(float((1.0 / MIN_TEMPERATURE - w.sum()) / step.sum()))
        t = min([1.0, *room])
        while t > 1e-10 and loss((w + t * step).clamp_min(0.0)) >= value:
            t /= 2
        if t <= 1e-10:
            break
        w = (w + t * step).clamp_min(0.0)
        value = loss(w)
    total = float(w.sum())
    return ScoreMap("log-mix", float(f"{1.0 / total:.6g}"), float(f"{float(w[1]) / total:.6g}"))


def fit_map(logits: torch.Tensor, truth: torch.Tensor, transform: str, start: ScoreMap | None = None) -> ScoreMap:
    """The NLL-minimising map with the given transform; `start`, a map near it, saves steps."""
    if transform == "log-mix":  # its two edge fits would need a start each
        return fit_log_mix(logits, truth)
    return ScoreMap(transform, fit_temperature(transformed(logits, transform), truth,
                                               start.temperature if start else None))


def cv_folds(truth: torch.Tensor, folds: int = CV_FOLDS) -> torch.Tensor:
    """Each query's fold, stratified: the i-th query of each class goes to fold i mod `folds`."""
    fold = torch.empty_like(truth)
    for c in truth.unique():
        members = (truth == c).nonzero().flatten()
        fold[members] = torch.arange(len(members), device=truth.device) % folds
    return fold


def held_out_nll(logits: torch.Tensor, truth: torch.Tensor, transform: str, folds: int = CV_FOLDS) -> float:
    """Mean NLL of each query under the map fitted on the other folds (cross-validation)."""
    fold = cv_folds(truth, folds)
    total, score_map = 0.0, None
    for k in range(folds):
        held, fit_on = fold == k, fold != k
        if held.any():  # folds share most of their queries: each fit starts from the last one
            score_map = fit_map(logits[fit_on], truth[fit_on], transform, score_map)
            total += map_nll(logits[held], truth[held], score_map) * int(held.sum())
    return total / len(truth)


def fit_score_map(logits: torch.Tensor, truth: torch.Tensor) -> tuple[ScoreMap, dict[str, float]]:
    """The map of the transform with the lowest held-out NLL (cross-validated over CV_FOLDS; in-sample
    with fewer than 2 queries per fold), refitted on every query; and the NLL each transform got.
    The simpler transform on ties."""
    logits = logits.double()
    if len(truth) >= 2 * CV_FOLDS:
        scores = {name: held_out_nll(logits, truth, name) for name in TRANSFORMS}
        best = min(TRANSFORMS, key=lambda name: scores[name])
        return fit_map(logits, truth, best), scores
    maps = {name: fit_map(logits, truth, name) for name in TRANSFORMS}
    scores = {name: map_nll(logits, truth, maps[name]) for name in TRANSFORMS}
    return maps[min(TRANSFORMS, key=lambda name: scores[name])], scores


def ece(probs: torch.Tensor, truth: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy − mean top score| per equal-width bin of the top
    score, weighted by the bin's share of queries."""
    if len(truth) == 0:
        return 0.0
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == truth).double()
    # Bin b holds (b/bins, (b+1)/bins]; a top score is at least 1/C > 0.
    which = (confidence.double() * bins).ceil().long().clamp(1, bins) - 1
    total = torch.zeros(bins, dtype=torch.float64, device=probs.device)
    gap = total.clone().index_add_(0, which, correct - confidence.double())
    return float(gap.abs().sum() / len(truth))


def brier(probs: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over queries of Σ_c (p_c − [c = y])² (0 perfect, 2 worst)."""
    if len(truth) == 0:
        return 0.0
    onehot = F.one_hot(truth, probs.shape[-1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(dim=-1).mean())


def risk_coverage_auc(probs: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the risk–coverage curve: answering the most confident k queries for every k,
    the mean over k of their error rate (lower is better; the error rate itself for a
    confidence that ranks nothing)."""
    if len(truth) == 0:
        return 0.0
    confidence, predicted = probs.max(dim=-1)
    order = confidence.argsort(descending=True, stable=True)
    errors = (predicted[order] != truth[order]).double().cumsum(0)
    return float((errors / torch.arange(1, len(truth) + 1, device=errors.device)).mean())


def selective(probs: torch.Tensor, truth: torch.Tensor, min_score: float | None) -> dict[str, float | None]:
    """Coverage (share answered: top score ≥ min_score) and accuracy of the answered ones."""
    confidence, predicted = probs.max(dim=-1)
    answered = confidence >= (min_score or 0.0)
    n = int(answered.sum())
    accuracy = float((predicted[answered] == truth[answered]).double().mean()) if n else None
    return {"min_score": min_score, "coverage": n / max(1, len(truth)), "accuracy": accuracy}


def threshold_for_precision(probs: torch.Tensor, truth: torch.Tensor, target: float) -> float:
    """The smallest top-score threshold at which the answered queries' accuracy reaches `target`,
    keeping as many answers as possible; above every score (1.0, nothing answered) when no
    threshold reaches it."""
    confidence, predicted = probs.max(dim=-1)
    order = confidence.argsort(descending=True, stable=True)
    sorted_conf = confidence[order].double()
    correct = (predicted[order] == truth[order]).double().cumsum(0)
    precision = correct / torch.arange(1, len(truth) + 1, device=correct.device)
    # A threshold answers every query whose score ties it, so only the last of each tie run counts.
    last_of_tie = torch.ones_like(sorted_conf, dtype=torch.bool)
    last_of_tie[:-1] = sorted_conf[1:] < sorted_conf[:-1]
    ok = ((precision >= target) & last_of_tie).nonzero().flatten()
    if len(ok) == 0:
        return 1.0
    return float(sorted_conf[int(ok[-1])])


def calibration_report(logits: torch.Tensor, truth: torch.Tensor, score_map: ScoreMap,
                       min_score: float | None) -> dict[str, float | str | None]:
    """Everything `kvclip eval` reports per method about its served scores."""
    logits = logits.double()
    probs = served(logits, score_map)
    return {"temperature": score_map.temperature, "transform": score_map.transform, "mix": score_map.mix,
            "ece": ece(probs, truth), "nll": map_nll(logits, truth, score_map),
            "brier": brier(probs, truth), "aurc": risk_coverage_auc(probs, truth),
            **selective(probs, truth, min_score)}


CALIBRATION_PROTOCOL = ("per method, the score map softmax(transformed(logit) / T) minimising the NLL on the tuned "
                        "parameters' balanced leave-one-out logits; the transform (logit, log-gap, log-mix) chosen "
                        f"by the NLL on {CV_FOLDS} held-out folds of those queries; min_score: the lowest top-score "
                        "threshold whose leave-one-out precision reaches target_precision")


def fit_calibration(loo_logits: dict[str, torch.Tensor], truth: torch.Tensor,
                    target_precision: float | None = None) -> dict:
    """Per method: T, and with a target precision the default min_score, from leave-one-out
    logits; the manifest's `calibration` (kvclip.manifest.Calibration) as a dict."""
    temperatures: dict[str, float] = {}
    transforms: dict[str, str] = {}
    mixes: dict[str, float] = {}
    min_score: dict[str, float] = {}
    loo: dict[str, dict[str, float | None]] = {}
    for method, logits in loo_logits.items():
        logits = logits.double()
        score_map, chosen_by = fit_score_map(logits, truth)
        temperatures[method], transforms[method] = score_map.temperature, score_map.transform
        if score_map.transform == "log-mix":
            mixes[method] = score_map.mix
        probs = served(logits, score_map)
        if target_precision is not None:
            min_score[method] = threshold_for_precision(probs, truth, target_precision)
        loo[method] = {"nll_raw": nll(logits, truth), "ece_raw": ece(probabilities(logits), truth),
                       "nll": map_nll(logits, truth, score_map), "ece": ece(probs, truth),
                       **{f"selection_nll_{name}": value for name, value in chosen_by.items()},
                       **{k: v for k, v in selective(probs, truth, min_score.get(method)).items() if k != "min_score"}}
    return {"protocol": CALIBRATION_PROTOCOL, "temperatures": temperatures, "transforms": transforms,
            "mixes": mixes, "target_precision": target_precision,
            "min_score": min_score, "loo": loo}


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve of a score separating `positive` from `negative` samples: the
    chance that a random positive scores above a random negative (ties count one half)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    diff = positive.double().view(-1, 1) - negative.double().view(1, -1)
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())
