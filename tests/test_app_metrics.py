"""app/metrics.py alone, on a registry of its own, against values computed by hand."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry

from app.metrics import Metrics
from tfb_core.decide.uncertainty import confidence_bin


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
    m.set_adapter("a", 0.1, 10)
    # (probs, true class): a 2-label right, a 3-label wrong, a 2-label wrong, a 3-label right
    labelled = [([0.9, 0.1], 0), ([0.2, 0.5, 0.3], 2), ([0.4, 0.6], 0), ([0.1, 0.1, 0.8], 2)]
    for probs, target in labelled:
        m.observe_feedback(probs, target, "a")
    assert value(registry, "tfb_feedback_total", adapter="a") == 4
    assert value(registry, "tfb_feedback_correct_total", adapter="a") == 2
    nll = -(math.log(0.9) + math.log(0.3) + math.log(0.4) + math.log(0.8))
    assert value(registry, "tfb_feedback_nll_sum_total", adapter="a") == pytest.approx(nll)
    brier = (0.01 + 0.01) + (0.04 + 0.25 + 0.49) + (0.36 + 0.36) + (0.01 + 0.01 + 0.04)
    assert value(registry, "tfb_feedback_brier_sum_total", adapter="a") == pytest.approx(brier)
    # bins: 0.9 -> 13, 0.5 -> 7, 0.6 -> 9, 0.8 -> 12
    for b, (count, correct, conf) in {13: (1, 1, 0.9), 7: (1, 0, 0.5), 9: (1, 0, 0.6), 12: (1, 1, 0.8)}.items():
        assert value(registry, "tfb_calibration_bin_count_total", adapter="a", bin=str(b)) == count
        assert value(registry, "tfb_calibration_bin_correct_total", adapter="a", bin=str(b)) == correct
        assert value(registry, "tfb_calibration_bin_confidence_sum_total", adapter="a", bin=str(b)) == pytest.approx(conf)
    assert value(registry, "tfb_calibration_bin_count_total", adapter="a", bin="0") == 0  # every bin exists from the start
    # the last K = 3: wrong (0.5), wrong (0.6), right (0.8)
    m.refresh_recent()
    assert value(registry, "tfb_recent_count", adapter="a") == 3
    assert value(registry, "tfb_recent_accuracy", adapter="a") == pytest.approx(1 / 3)
    assert value(registry, "tfb_recent_nll", adapter="a") == pytest.approx(-(math.log(0.3) + math.log(0.4) + math.log(0.8)) / 3)
    assert value(registry, "tfb_recent_brier", adapter="a") == pytest.approx((0.78 + 0.72 + 0.06) / 3)
    # three bins with one prediction each: ECE = mean |accuracy - confidence| = (0.5 + 0.6 + 0.2) / 3
    assert value(registry, "tfb_recent_ece", adapter="a") == pytest.approx((0.5 + 0.6 + 0.2) / 3, abs=1e-6)


def test_recent_ece_has_fifteen_bins_where_ten_would_differ():
    """Two predictions share a bin of 10 but not of 15: the ECEs differ (0.37 vs 0.1167), so the
    gauge is checked against a hand computation and torchmetrics' 15-bin MulticlassCalibrationError."""
    import torch
    from torchmetrics.classification import MulticlassCalibrationError

    registry = CollectorRegistry()
    m = Metrics(registry, recent_window=10)
    m.set_adapter("a", 0.1, 10)
    labelled = [([0.62, 0.38], 0), ([0.68, 0.32], 1), ([0.05, 0.95], 1)]  # right, wrong, right
    for probs, target in labelled:
        m.observe_feedback(probs, target, "a")
    m.refresh_recent()
    # 15 bins of width 1/15: 0.62 -> [0.6, 0.667), 0.68 -> [0.667, 0.733), 0.95 -> [0.933, 1]: one each
    fifteen = (abs(1 - 0.62) + abs(0 - 0.68) + abs(1 - 0.95)) / 3
    # 10 bins: 0.62 and 0.68 share [0.6, 0.7) (accuracy 1/2, mean confidence 0.65)
    ten = (2 * abs(0.5 - 0.65) + abs(1 - 0.95)) / 3
    assert fifteen == pytest.approx(0.37) and abs(fifteen - ten) > 0.2
    oracle = MulticlassCalibrationError(num_classes=2, n_bins=15, norm="l1")
    oracle.update(torch.tensor([p for p, _ in labelled]), torch.tensor([t for _, t in labelled]))
    assert float(oracle.compute()) == pytest.approx(fifteen, abs=1e-6)
    assert value(registry, "tfb_recent_ece", adapter="a") == pytest.approx(fifteen, abs=1e-6)


def test_estimated_accuracy_is_the_mean_confidence_of_the_recent_window():
    """Several predictions of different confidences over two requests: the gauge is the mean of the
    last K, not the last one (0.55) nor the mean of all (0.6875)."""
    registry = CollectorRegistry()
    m = Metrics(registry, recent_window=3)
    m.set_adapter("a", 0.1, 10)

    def pred(c: float) -> dict:
        return {"confidence": c, "predictive_entropy": 0.5, "mutual_information": 0.01, "label": "x"}

    m.observe_predictions([pred(0.9), pred(0.6)], ("x", "y"), "a")
    assert value(registry, "tfb_estimated_accuracy", adapter="a") == pytest.approx((0.9 + 0.6) / 2)
    m.observe_predictions([pred(0.7), pred(0.55)], ("x", "y"), "a")
    assert value(registry, "tfb_estimated_accuracy", adapter="a") == pytest.approx((0.6 + 0.7 + 0.55) / 3)


def test_prediction_histograms_and_other_labels():
    registry = CollectorRegistry()
    m = Metrics(registry)
    preds = [{"confidence": 0.95, "predictive_entropy": 0.2, "mutual_information": 0.004, "label": "positive"},
             {"confidence": 0.55, "predictive_entropy": 0.69, "mutual_information": 0.2, "label": "maybe"}]
    m.observe_predictions(preds, ("negative", "positive"), "a")
    assert value(registry, "tfb_predictions_total", adapter="a", label="positive") == 1
    assert value(registry, "tfb_predictions_total", adapter="a", label="_other") == 1
    assert value(registry, "tfb_prediction_confidence_count", adapter="a") == 2
    assert value(registry, "tfb_prediction_confidence_sum", adapter="a") == pytest.approx(1.5)
    assert value(registry, "tfb_prediction_mutual_information_bucket", adapter="a", le="0.01") == 1
    assert value(registry, "tfb_prediction_predictive_entropy_bucket", adapter="a", le="0.7") == 2


def test_adapters_have_their_own_series_and_recent_windows():
    registry = CollectorRegistry()
    m = Metrics(registry, recent_window=2)
    m.set_adapter("a", 0.1, 10)
    m.set_adapter("b", 0.0, 4)
    assert value(registry, "tfb_sigma", adapter="a") == 0.1 and value(registry, "tfb_default_samples", adapter="b") == 4
    assert value(registry, "tfb_feedback_total", adapter="b") == 0  # exported from the start
    m.observe_feedback([0.9, 0.1], 0, "a")
    m.observe_feedback([0.3, 0.7], 0, "b")
    m.observe_feedback([0.2, 0.8], 1, "b")
    m.observe_predictions([{"confidence": 0.6, "predictive_entropy": 0.6, "mutual_information": 0.0,
                            "label": "x"}], ("x", "y"), "b")
    m.refresh_recent()
    assert value(registry, "tfb_feedback_total", adapter="a") == 1 and value(registry, "tfb_feedback_total", adapter="b") == 2
    assert value(registry, "tfb_recent_accuracy", adapter="a") == 1.0
    assert value(registry, "tfb_recent_accuracy", adapter="b") == 0.5
    assert value(registry, "tfb_estimated_accuracy", adapter="b") == pytest.approx(0.6)
    assert registry.get_sample_value("tfb_estimated_accuracy", {"adapter": "a"}) is None  # no prediction yet
