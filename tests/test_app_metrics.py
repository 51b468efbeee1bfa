"""app/metrics.py alone, on a registry of its own, against values computed by hand."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry

from app.metrics import Metrics, confidence_bin


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels or None)
    assert got is not None, f"{name}{labels} is not exported"
    return got


def test_confidence_bins_are_fifteen_half_open_intervals():
    assert confidence_bin(0.0) == 0 and confidence_bin(1.0) == 14
    assert confidence_bin(0.5) == 7  # 7.5 / 15: binary predictions start in bin 7
    assert confidence_bin(0.9) == 13 and confidence_bin(0.95) == 14
    assert confidence_bin(2 / 3 + 1e-9) == 10 and confidence_bin(2 / 3 - 1e-9) == 9


def test_feedback_counters_and_recent_window_by_hand():
    registry = CollectorRegistry()
    m = Metrics(registry, recent_window=3)
    # (probs, true class): a 2-label right, a 3-label wrong, a 2-label wrong, a 3-label right
    labelled = [([0.9, 0.1], 0), ([0.2, 0.5, 0.3], 2), ([0.4, 0.6], 0), ([0.1, 0.1, 0.8], 2)]
    for probs, target in labelled:
        m.observe_feedback(probs, target)
    assert value(registry, "tfb_feedback_total") == 4
    assert value(registry, "tfb_feedback_correct_total") == 2
    nll = -(math.log(0.9) + math.log(0.3) + math.log(0.4) + math.log(0.8))
    assert value(registry, "tfb_feedback_nll_sum_total") == pytest.approx(nll)
    brier = (0.01 + 0.01) + (0.04 + 0.25 + 0.49) + (0.36 + 0.36) + (0.01 + 0.01 + 0.04)
    assert value(registry, "tfb_feedback_brier_sum_total") == pytest.approx(brier)
    # bins: 0.9 -> 13, 0.5 -> 7, 0.6 -> 9, 0.8 -> 12
    for b, (count, correct, conf) in {13: (1, 1, 0.9), 7: (1, 0, 0.5), 9: (1, 0, 0.6), 12: (1, 1, 0.8)}.items():
        assert value(registry, "tfb_calibration_bin_count_total", bin=str(b)) == count
        assert value(registry, "tfb_calibration_bin_correct_total", bin=str(b)) == correct
        assert value(registry, "tfb_calibration_bin_confidence_sum_total", bin=str(b)) == pytest.approx(conf)
    assert value(registry, "tfb_calibration_bin_count_total", bin="0") == 0  # every bin exists from the start
    # the last K = 3: wrong (0.5), wrong (0.6), right (0.8)
    m.refresh_recent()
    assert value(registry, "tfb_recent_count") == 3
    assert value(registry, "tfb_recent_accuracy") == pytest.approx(1 / 3)
    assert value(registry, "tfb_recent_nll") == pytest.approx(-(math.log(0.3) + math.log(0.4) + math.log(0.8)) / 3)
    assert value(registry, "tfb_recent_brier") == pytest.approx((0.78 + 0.72 + 0.06) / 3)
    # three bins with one prediction each: ECE = mean |accuracy - confidence| = (0.5 + 0.6 + 0.2) / 3
    assert value(registry, "tfb_recent_ece") == pytest.approx((0.5 + 0.6 + 0.2) / 3, abs=1e-6)


def test_prediction_histograms_and_other_labels():
    registry = CollectorRegistry()
    m = Metrics(registry)
    preds = [{"confidence": 0.95, "predictive_entropy": 0.2, "mutual_information": 0.004, "label": "positive"},
             {"confidence": 0.55, "predictive_entropy": 0.69, "mutual_information": 0.2, "label": "maybe"}]
    m.observe_predictions(preds, ("negative", "positive"))
    assert value(registry, "tfb_predictions_total", label="positive") == 1
    assert value(registry, "tfb_predictions_total", label="_other") == 1
    assert value(registry, "tfb_prediction_confidence_count") == 2
    assert value(registry, "tfb_prediction_confidence_sum") == pytest.approx(1.5)
    assert value(registry, "tfb_prediction_mutual_information_bucket", le="0.01") == 1
    assert value(registry, "tfb_prediction_predictive_entropy_bucket", le="0.7") == 2
