"""kvclip/calibration.py: the temperature fit, the score transforms, the metrics, the
precision threshold; and manifests from before calibration serving T = 1 with no threshold."""
from __future__ import annotations

import shutil

import pytest
import torch
from pydantic import ValidationError

from kvclip import artifact as store
from kvclip.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    brier,
    ece,
    fit_calibration,
    fit_map,
    fit_score_map,
    fit_temperature,
    map_nll,
    nll,
    probabilities,
    risk_coverage_auc,
    selective,
    served,
    threshold_for_precision,
)
from kvclip.manifest import Calibration
from tests.manifests import V1_CACHES


def sampled(n: int, classes: int, true_t: float, scale: float = 1.0, seed: int = 0):
    """Logits whose labels are drawn from softmax(logits / true_t): calibrated at true_t."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * scale
    truth = torch.multinomial(probabilities(logits, true_t), 1, generator=g).flatten()
    return logits, truth


@pytest.mark.parametrize("true_t", [0.5, 3.0, 200.0])
def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at(true_t):
    logits, truth = sampled(20000, 10, true_t, scale=true_t * 2)
    fitted = fit_temperature(logits, truth)
    assert fitted == pytest.approx(true_t, rel=0.06)
    assert nll(logits, truth, fitted) <= min(nll(logits, truth, fitted * f) for f in (0.8, 1.25))


@pytest.mark.parametrize("case", range(6))
def test_fit_temperature_is_the_minimum_over_the_whole_range(case):
    # Sizes, scales and sharpness from sharp (T ~ 0.01) to flat (T ~ 1e4): the fitted T is at
    # least as good as a grid search's minimum over [MIN_TEMPERATURE, MAX_TEMPERATURE].
    g = torch.Generator().manual_seed(case)
    true_t = float(10 ** (torch.rand(1, generator=g) * 6 - 2))
    scale = float(10 ** (torch.rand(1, generator=g) * 4 - 1))
    n, classes = 300 + 500 * case, 3 + 40 * case
    logits, truth = sampled(n, classes, true_t, scale=scale, seed=case)
    if case % 2:  # positive masses whose scale varies by 1000x per query, like a cache term's
        logits = kernel_masses(n, classes, seed=case)[0] * scale
        truth = torch.multinomial(probabilities(logits, true_t), 1, generator=g).flatten()
    assert nll(logits, truth, fit_temperature(logits, truth)) <= grid_minimum(logits, truth) * (1 + 1e-9) + 1e-12


def grid_minimum(logits: torch.Tensor, truth: torch.Tensor) -> float:
    """The least NLL over 1e-2..1e5 by grid search alone: 8 temperatures per decade, then 64
    between the best one's neighbours (the NLL is convex in 1/T, so its minimum lies there)."""
    coarse = torch.logspace(-2, 5, 57, dtype=torch.float64)
    scores = [nll(logits, truth, float(t)) for t in coarse]
    best = min(range(len(scores)), key=scores.__getitem__)
    low, high = coarse[max(best - 1, 0)].log10(), coarse[min(best + 1, len(coarse) - 1)].log10()
    return min(min(scores), *(nll(logits, truth, float(t)) for t in torch.logspace(float(low), float(high), 64,
                                                                                   dtype=torch.float64)))


def test_fit_temperature_stops_at_the_bounds():
    logits = torch.randn(500, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = logits.argmax(1)  # always right: the sharper the better
    assert fit_temperature(logits, truth) == MIN_TEMPERATURE
    flat = torch.zeros(500, 10, dtype=torch.float64)  # every T scores the same: uniform scores
    assert fit_temperature(flat, truth) == MAX_TEMPERATURE
    assert fit_temperature(logits, logits.argmin(1)) == MAX_TEMPERATURE  # always wrong: as flat as allowed
    # Started at a bound (a held-out fold starts where the last one ended), where the scores are
    # one-hot to the last digit and the slope is exactly 0:
    sure = torch.nn.functional.one_hot(truth, 10).double() * 1000
    assert fit_temperature(sure, truth, start=MIN_TEMPERATURE) == MIN_TEMPERATURE
    assert fit_temperature(flat, truth, start=MIN_TEMPERATURE) == MAX_TEMPERATURE


def test_fitted_temperature_beats_raw_softmax_and_keeps_the_argmax():
    logits, truth = sampled(5000, 10, 50.0, scale=100.0)
    t = fit_temperature(logits, truth)
    assert nll(logits, truth, t) < 0.5 * nll(logits, truth)
    raw, calibrated = probabilities(logits), probabilities(logits, t)
    assert torch.equal(raw.argmax(1), calibrated.argmax(1))
    assert ece(calibrated, truth) < 0.03 < 0.2 < ece(raw, truth)


def test_log_maps_keep_the_order_and_win_when_gap_size_varies_by_decades():
    # The gap's scale varies 100x per query but says nothing more about being right: plain
    # temperature scaling cannot serve both ends; a map of the log gaps can.
    g = torch.Generator().manual_seed(1)
    base, truth = sampled(8000, 10, 1.0, scale=1.0, seed=1)
    spread = 10 ** (torch.rand(8000, 1, generator=g, dtype=torch.float64) * 2)
    logits = base * spread * 10
    score_map, _ = fit_score_map(logits, truth)
    assert score_map.transform in ("log-gap", "log-mix")
    probs = served(logits, score_map)
    assert torch.equal(probs.argsort(1), logits.argsort(1))
    plain = fit_temperature(logits, truth)
    assert ece(probs, truth) < ece(probabilities(logits, plain), truth)
    assert fit_score_map(*sampled(8000, 10, 4.0, scale=8.0))[0].transform == "logit"  # plain logits: plain scaling


def kernel_masses(n: int, classes: int, seed: int):
    """Non-negative class masses, like a cache term's, whose overall scale varies by 1000x per query."""
    g = torch.Generator().manual_seed(seed)
    masses = torch.rand(n, classes, generator=g, dtype=torch.float64) ** 4
    return masses * 10 ** (torch.rand(n, 1, generator=g, dtype=torch.float64) * 3), g


@pytest.mark.parametrize("seed", [0, 1])
def test_log_mix_recovers_the_map_labels_were_drawn_at_and_is_chosen_on_held_out_folds(seed):
    logits, g = kernel_masses(4000, 10, seed)
    truth = torch.multinomial(probabilities(logits, 0.8, "log-mix", 0.7), 1, generator=g).flatten()
    score_map, held_out = fit_score_map(logits, truth)
    assert score_map.transform == "log-mix"
    assert score_map.temperature == pytest.approx(0.8, rel=0.05) and score_map.mix == pytest.approx(0.7, abs=0.05)
    assert held_out["log-mix"] < held_out["log-gap"] - 0.05 and held_out["log-mix"] < held_out["logit"] - 0.05
    probs = served(logits, score_map)
    assert torch.equal(probs.argmax(1), logits.argmax(1))
    assert ece(probs, truth) < 0.03 < ece(served(logits, fit_map(logits, truth, "log-gap")), truth)


@pytest.mark.parametrize("seed", [0, 1])
def test_held_out_folds_keep_log_gap_when_the_second_parameter_adds_nothing(seed):
    """log-mix contains log-gap (m = 0), so its in-sample NLL never loses; held out, it must."""
    logits, g = kernel_masses(4000, 10, seed)
    truth = torch.multinomial(probabilities(logits, 2.0, "log-gap"), 1, generator=g).flatten()
    score_map, held_out = fit_score_map(logits, truth)
    assert score_map.transform == "log-gap" and score_map.temperature == pytest.approx(2.0, rel=0.05)
    in_sample = fit_map(logits, truth, "log-mix")
    assert map_nll(logits, truth, in_sample) <= map_nll(logits, truth, score_map) + 1e-9
    assert held_out["log-gap"] <= held_out["log-mix"]


def test_few_queries_choose_in_sample_and_bad_shares_are_refused():
    logits, g = kernel_masses(6, 10, 0)
    truth = torch.multinomial(probabilities(logits, 0.8, "log-mix", 0.7), 1, generator=g).flatten()
    score_map, nlls = fit_score_map(logits, truth)
    assert set(nlls) == {"logit", "log-gap", "log-mix"}
    assert nlls[score_map.transform] == min(nlls.values()) == pytest.approx(map_nll(logits, truth, score_map))
    with pytest.raises(ValueError, match="share"):
        probabilities(logits, 1.0, "log-mix", 1.5)
    assert Calibration(transforms={"tip": "log-mix"}, mixes={"tip": 0.25}).mix("tip") == 0.25
    with pytest.raises(ValidationError, match="mixes"):
        Calibration(transforms={"tip": "log-mix"}, mixes={"tip": 1.5})


def test_ece_brier_and_risk_coverage_on_hand_made_cases():
    truth = torch.tensor([0, 0, 1, 1])
    sure_right = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert ece(sure_right, truth) == 0.0 and brier(sure_right, truth) == 0.0
    assert risk_coverage_auc(sure_right, truth) == 0.0
    sure_wrong = sure_right.flip(1)
    assert ece(sure_wrong, truth) == 1.0 and brier(sure_wrong, truth) == 2.0
    # 0.75 confident and right 3 times in 4: calibrated
    three_of_four = torch.tensor([[0.75, 0.25]] * 4)
    assert ece(three_of_four, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)
    # ranking: the wrong answer least confident gives a lower area than most confident
    truth = torch.tensor([0, 0, 0, 0])
    good = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    bad = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.01, 0.99]])
    assert risk_coverage_auc(good, truth) < risk_coverage_auc(bad, truth)


def test_threshold_for_precision_answers_the_most_queries_that_reach_the_target():
    truth = torch.zeros(6, dtype=torch.long)
    top = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    right = torch.tensor([True, True, False, True, False, False])
    probs = torch.stack([torch.where(right, top, 1 - top), torch.where(right, 1 - top, top)], 1)
    # precision by threshold: 0.95 -> 1, 0.9 -> 1, 0.8 -> 2/3, 0.7 -> 3/4, 0.6 -> 3/5
    assert threshold_for_precision(probs, truth, 0.75) == pytest.approx(0.7)
    assert threshold_for_precision(probs, truth, 1.0) == pytest.approx(0.9)
    at = selective(probs, truth, 0.7)
    assert at["coverage"] == pytest.approx(4 / 6) and at["accuracy"] == pytest.approx(0.75)
    assert threshold_for_precision(torch.tensor([[0.4, 0.6]]), torch.tensor([0]), 0.9) == 1.0  # none reach it


def test_fit_calibration_per_method_with_and_without_a_target():
    logits, truth = sampled(2000, 10, 20.0, scale=40.0)
    fitted = fit_calibration({"zeroshot": logits, "tip": logits * 3}, truth)
    assert fitted["temperatures"]["tip"] == pytest.approx(3 * fitted["temperatures"]["zeroshot"], rel=1e-3)
    assert fitted["min_score"] == {} and fitted["target_precision"] is None
    assert fitted["loo"]["tip"]["nll"] < fitted["loo"]["tip"]["nll_raw"]
    targeted = fit_calibration({"tip": logits}, truth, target_precision=0.6)
    assert targeted["loo"]["tip"]["accuracy"] >= 0.6 and 0 < targeted["loo"]["tip"]["coverage"] < 1


@pytest.mark.parametrize("name", ["pets", "pooled", "zs"])
def test_manifests_from_before_calibration_serve_t_1_and_no_threshold(name, tmp_path):
    loaded = store.load_cache(shutil.copytree(V1_CACHES / name, tmp_path / name))
    assert loaded.manifest.calibration is None
    for method in loaded.methods:
        assert loaded.score_temperature(method) == 1.0 and loaded.score_transform(method) == "logit"
        assert loaded.default_min_score(method) is None
    assert "calibration" not in loaded.manifest.to_json()  # re-written as it was


def test_auroc_counts_ordered_pairs():
    from kvclip.calibration import auroc

    assert auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2])) == 1.0
    assert auroc(torch.tensor([0.1]), torch.tensor([0.9])) == 0.0
    assert auroc(torch.tensor([0.5, 0.9]), torch.tensor([0.5, 0.1])) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
