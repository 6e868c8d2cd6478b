"""Calibrated scores and abstention: a temperature per method, the threshold for a target
precision, and the metrics that judge them (docs/methods.md, "Calibration" and "Abstention").

The blended logits are sums of up to α·N exponentials, so `softmax(logits)` is nearly one-hot
whatever the accuracy. One temperature T per method, fitted by minimising the NLL on the
builder's balanced leave-one-out logits, makes the top score a probability. Two forms, each
with T as its only parameter, and the one with the lower leave-one-out NLL is kept:

- "logit": `softmax(logit / T)`, plain temperature scaling;
- "log-gap": `softmax(−log(1 + gap) / T)`, `gap_c = max(logit) − logit_c`, i.e. p_c ∝ (1 + gap_c)^(−1/T).
  The cache term's gaps span decades from query to query (a query near many support items
  gets gaps ~100× larger than one near few), and their size says little more about being right
  than their order of magnitude does; on such logits one temperature is either overconfident at
  large gaps or underconfident at small ones (docs/methods.md has the figures).

Both are increasing in the logit, so the argmax, and accuracy, never change.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Bounds of the 1-D search over log T: logits of tuned caches reach ~1e4 (α up to ~3000),
# so T must be able to go far above 1; far below 1 only sharpens an already sharp softmax.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e5
ECE_BINS = 15
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
TRANSFORMS = ("logit", "log-gap")


def transformed(logits: torch.Tensor, transform: str = "logit") -> torch.Tensor:
    """What the temperature divides: the logits, or −log(1 + gap to the top logit)."""
    if transform == "logit":
        return logits
    if transform == "log-gap":
        return -torch.log1p(logits.max(dim=-1, keepdim=True).values - logits)
    raise ValueError(f"unknown score transform {transform!r}")


def nll(logits: torch.Tensor, truth: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits / T)."""
    if len(truth) == 0:
        return 0.0
    return float(F.cross_entropy(logits.double() / temperature, truth))


def fit_temperature(logits: torch.Tensor, truth: torch.Tensor, iterations: int = 60) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising nll: golden-section search on log T.
    The NLL is convex in 1/T (cross-entropy is convex in logits, which are linear in 1/T), hence
    unimodal in log T, so the bracket search finds the minimum. 1.0 without queries."""
    if len(truth) == 0:
        return 1.0
    logits, truth = logits.double(), truth.to(logits.device)
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)

    def loss(log_t: float) -> float:
        return nll(logits, truth, math.exp(log_t))

    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):  # 60 steps shrink the bracket by 0.618^60 ~ 3e-13
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = loss(b)
    return float(f"{math.exp((lo + hi) / 2):.6g}")


def probabilities(logits: torch.Tensor, temperature: float = 1.0, transform: str = "logit") -> torch.Tensor:
    """The served scores over the cache's labels: softmax(transformed(logits) / T)."""
    return (transformed(logits, transform) / temperature).softmax(dim=-1)


def fit_score_map(logits: torch.Tensor, truth: torch.Tensor) -> tuple[str, float]:
    """(transform, T) with the lowest NLL: T fitted for each of TRANSFORMS; "logit" on ties."""
    fits = [(nll(transformed(logits, name), truth, t), name, t)
            for name in TRANSFORMS for t in [fit_temperature(transformed(logits, name), truth)]]
    _, name, t = min(fits, key=lambda fit: fit[0])
    return name, t


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


def calibration_report(logits: torch.Tensor, truth: torch.Tensor, temperature: float, transform: str,
                       min_score: float | None) -> dict[str, float | str | None]:
    """Everything `kvclip eval` reports per method about its served scores."""
    logits = logits.double()
    probs = probabilities(logits, temperature, transform)
    return {"temperature": temperature, "transform": transform, "ece": ece(probs, truth),
            "nll": nll(transformed(logits, transform), truth, temperature),
            "brier": brier(probs, truth), "aurc": risk_coverage_auc(probs, truth),
            **selective(probs, truth, min_score)}


CALIBRATION_PROTOCOL = ("per method, the temperature T (and transform: softmax(logit / T), or "
                        "softmax(-log(1 + gap) / T)) minimising the NLL on the tuned parameters' balanced "
                        "leave-one-out logits; min_score: the lowest top-score threshold whose leave-one-out "
                        "precision reaches target_precision")


def fit_calibration(loo_logits: dict[str, torch.Tensor], truth: torch.Tensor,
                    target_precision: float | None = None) -> dict:
    """Per method: T, and with a target precision the default min_score, from leave-one-out
    logits; the manifest's `calibration` (kvclip.manifest.Calibration) as a dict."""
    temperatures: dict[str, float] = {}
    transforms: dict[str, str] = {}
    min_score: dict[str, float] = {}
    loo: dict[str, dict[str, float | None]] = {}
    for method, logits in loo_logits.items():
        logits = logits.double()
        transform, t = fit_score_map(logits, truth)
        temperatures[method], transforms[method] = t, transform
        probs = probabilities(logits, t, transform)
        if target_precision is not None:
            min_score[method] = threshold_for_precision(probs, truth, target_precision)
        loo[method] = {"nll_raw": nll(logits, truth), "ece_raw": ece(probabilities(logits), truth),
                       "nll": nll(transformed(logits, transform), truth, t), "ece": ece(probs, truth),
                       **{k: v for k, v in selective(probs, truth, min_score.get(method)).items() if k != "min_score"}}
    return {"protocol": CALIBRATION_PROTOCOL, "temperatures": temperatures, "transforms": transforms,
            "target_precision": target_precision,
            "min_score": min_score, "loo": loo}


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve of a score separating `positive` from `negative` samples: the
    chance that a random positive scores above a random negative (ties count one half)."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    diff = positive.double().view(-1, 1) - negative.double().view(1, -1)
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())
