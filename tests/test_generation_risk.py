"""Risk-controlled generation and answer confidence, against independent oracles: synthetic scores
whose selective risk is known in closed form (the certified threshold keeps it <= max_risk in >= 1 -
delta of many calibration draws), Learn-then-Test recomputed by brute force with scipy's binomial
tails, and ECE / Brier / NLL of confidences computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require

from tfb_core.decide.conformal import LTT_FALLBACK
from tfb_core.decide.generation_risk import (
    GRID,
    RISK_SCORES,
    RiskCalibration,
    answer_confidence,
    certainty,
    certified,
    confidence_metrics,
    confidence_report,
    fit_confidence_temperature,
    scale_confidence,
    score_value,
)


def _draw(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores u ~ Uniform(0, 1), each answer wrong with probability u^2 (half of them wrong, as the demo's)."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    wrong = torch.rand(n, generator=gen, dtype=torch.float64) < u**2
    return u, wrong


def _true_risk(threshold: float) -> float:
    """Selective risk of answering where exp(-u) >= threshold, i.e. u <= s = -log threshold:
    E[u^2 | u <= s] = s^2 / 3 (s capped at 1); 0 where nothing is answered."""
    if not math.isfinite(threshold) or threshold > 1.0:
        return 0.0
    s = min(1.0, -math.log(threshold))
    return s**2 / 3


@pytest.mark.parametrize("max_risk", [0.1, 0.2])
def test_the_certified_threshold_keeps_the_known_selective_risk_in_at_least_1_minus_delta_of_draws(max_risk):
    delta, draws, n = 0.1, 400, 300
    gen = torch.Generator().manual_seed(1)
    held = answered = tight = 0
    for _ in range(draws):
        u, wrong = _draw(n, gen)
        th = certified(u, wrong, max_risk, delta)
        held += _true_risk(th.threshold) <= max_risk
        answered += th.supported
        tight += _true_risk(th.threshold) > max_risk / 2
    assert held / draws >= 1 - delta
    # not vacuous: with 300 questions the procedure certifies something in most draws, and the
    # guarantee is not met by a margin only (the best threshold's risk is max_risk itself)
    assert answered / draws > 0.6
    assert tight / draws > 0.2


def _oracle_ltt(u: torch.Tensor, wrong: torch.Tensor, max_risk: float, delta: float) -> float:
    """Learn-then-Test by brute force: every grid threshold's counts from the data, the p-value of
    'risk > max_risk' from scipy's binomial CDF, the fallback procedure over the grid (delta split
    equally over the grid points nearest LTT_FALLBACK, a rejection passing its level on)."""
    stats = require("scipy.stats", "scipy computes the oracle's binomial tails")
    grid = sorted(GRID, reverse=True)
    points = [c for c in LTT_FALLBACK if c >= grid[-1]]
    level = [0.0] * len(grid)
    for c in points:
        level[min(range(len(grid)), key=lambda j: abs(grid[j] - c))] += delta / len(points)
    best, carried = math.inf, 0.0
    for j, g in enumerate(grid):
        answer = [math.exp(-float(x)) >= g for x in u]
        k = sum(a and bool(w) for a, w in zip(answer, wrong, strict=True))
        m = sum(answer)
        p = 1.0 if m == 0 else float(stats.binom.cdf(k, m, max_risk))
        a = level[j] + carried
        if a > 0 and p <= a:
            best, carried = g, a
        else:
            carried = 0.0
    return best


def test_the_threshold_is_learn_then_test_recomputed_by_brute_force_with_scipy():
    gen = torch.Generator().manual_seed(7)
    seen_certified = 0
    for n, max_risk in ((60, 0.2), (150, 0.1), (300, 0.2), (300, 0.05)):
        for _ in range(3):
            u, wrong = _draw(n, gen)
            th = certified(u, wrong, max_risk, 0.1)
            assert th.threshold == pytest.approx(_oracle_ltt(u, wrong, max_risk, 0.1))
            seen_certified += th.supported
    assert seen_certified >= 3  # the comparison covers certified thresholds, not only "none"


def test_a_calibration_round_trips_and_gives_the_same_threshold():
    gen = torch.Generator().manual_seed(3)
    u, wrong = _draw(200, gen)
    nll = torch.rand(200, generator=gen, dtype=torch.float64) * 4
    cal = RiskCalibration.fit("nll", u, wrong, nll, "file x", n_samples=10, seed=0, sigma=0.01, max_tokens=8)
    again = RiskCalibration.from_dict(cal.to_dict())
    assert again == cal
    assert cal.threshold(0.2, 0.1) == certified(u, wrong, 0.2, 0.1)
    assert cal.accuracy == pytest.approx(1 - float(wrong.double().mean()))
    with pytest.raises(ValueError, match="max_risk"):
        cal.threshold(1.5, 0.1)
    with pytest.raises(ValueError, match="unknown risk score"):
        RiskCalibration.fit("entropy", u, wrong, nll)


def test_each_score_reads_its_value_from_a_served_answer():
    info = {"completion": {"sequence": {"nll": 1.25, "max_mutual_information": 0.5}},
            "answers": {"semantic_entropy": 0.75}}
    assert {s: score_value(s, info) for s in RISK_SCORES} == {"nll": 1.25, "mle_nll": 1.25, "max_mi": 0.5,
                                                              "semantic_entropy": 0.75}
    assert RISK_SCORES["semantic_entropy"].mode == "per_sample" and RISK_SCORES["mle_nll"].mle
    assert certainty(1.25) == pytest.approx(math.exp(-1.25)) and answer_confidence(0.0) == 1.0


def test_confidence_metrics_are_the_hand_computed_ece_brier_and_nll():
    require("torchmetrics", "torchmetrics computes the ECE")
    c = torch.tensor([0.9, 0.8, 0.3, 0.6], dtype=torch.float64)
    y = torch.tensor([True, False, False, True])
    m = confidence_metrics(c, y)
    # 15 equal-width bins: each confidence alone in its bin, so ECE = mean |c - y|
    assert m["ece"] == pytest.approx((0.1 + 0.8 + 0.3 + 0.4) / 4, abs=1e-6)
    assert m["brier"] == pytest.approx((0.01 + 0.64 + 0.09 + 0.16) / 4)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.2) + math.log(0.7) + math.log(0.6)) / 4)
    assert (m["mean_confidence"], m["accuracy"]) == (pytest.approx(0.65), 0.5)
    # two confidences in one bin (0.60 and 0.62 in [0.6, 0.667)): |mean c - accuracy| there, weighted
    two = confidence_metrics(torch.tensor([0.60, 0.62, 0.1]), torch.tensor([True, False, False]))
    assert two["ece"] == pytest.approx((2 * abs(0.61 - 0.5) + 0.1) / 3, abs=1e-6)


def test_temperature_scaling_recovers_a_known_temperature_and_the_report_pairs_its_differences():
    gen = torch.Generator().manual_seed(0)
    n, t_true = 20000, 2.0
    z = torch.randn(n, generator=gen, dtype=torch.float64) * 2
    right = torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(z)  # calibrated at logit z
    overconfident = torch.sigmoid(z * t_true)  # what a model reports: logits t_true times too large
    t = fit_confidence_temperature(overconfident, right)
    assert t == pytest.approx(t_true, rel=0.05)
    assert torch.allclose(scale_confidence(overconfident, t_true), torch.sigmoid(z), atol=1e-9)
    assert fit_confidence_temperature(overconfident, torch.ones(n, dtype=torch.bool)) == 1.0
    k = 300
    rep = confidence_report({"raw": overconfident[:k], "scaled": scale_confidence(overconfident[:k], t)},
                            {"raw": right[:k], "scaled": right[:k]}, ["raw"], n_boot=200)
    d = rep["differences"]["scaled-raw"]
    for m in ("ece", "brier", "nll"):
        assert d[m]["diff"] == pytest.approx(rep["metrics"]["scaled"][m] - rep["metrics"]["raw"][m])
        assert d[m]["lo"] <= d[m]["hi"]
    assert d["nll"]["hi"] < 0  # the recalibrated confidences are better, and the paired interval says so
