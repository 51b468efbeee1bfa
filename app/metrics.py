"""Prometheus metrics on a registry the app owns: serving, uncertainty, calibration.

The names are an interface (alert rules and dashboards under deploy/ are built on them);
prometheus-client appends ``_total`` to counters. Calibration from /feedback uses 15 equal-width
confidence bins over [0, 1] (label ``bin`` = "0".."14"), the bins of the ECE in TFB.md section 5,
so that windowed ECE is a PromQL expression over ``increase()`` of the bin counters.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tfb_core.uncertainty import ECE_BINS, accuracy, brier, ece, nll

_EPS = 1e-12
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_POW2 = tuple(float(2**k) for k in range(11))  # 1 .. 1024
_CONFIDENCE = tuple(round((k + 1) / ECE_BINS, 6) for k in range(ECE_BINS))
_ENTROPY = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0)
_MI = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
OTHER_LABEL = "_other"


def confidence_bin(confidence: float) -> int:
    """The calibration bin of a top-label confidence: min(floor(conf * 15), 14)."""
    return min(max(int(math.floor(confidence * ECE_BINS)), 0), ECE_BINS - 1)


class Metrics:
    """Every metric of the server, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, recent_window: int = 1000) -> None:
        r = registry
        self.registry = registry
        # serving
        self.requests = Counter("tfb_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_duration = Histogram("tfb_request_duration_seconds", "HTTP request latency", ["route"],
                                          buckets=_LATENCY, registry=r)
        self.queue_wait = Histogram("tfb_queue_wait_seconds", "time a request waited for its batch",
                                    buckets=_LATENCY, registry=r)
        self.forward_duration = Histogram("tfb_forward_duration_seconds", "duration of one batched forward",
                                          buckets=_LATENCY, registry=r)
        self.batch_requests = Histogram("tfb_batch_requests", "requests coalesced into one batch (its forwards "
                                        "are planned together)", buckets=_POW2, registry=r)
        self.batch_inputs = Histogram("tfb_batch_inputs", "inputs per batched forward", buckets=_POW2, registry=r)
        self.batch_rows = Histogram("tfb_batch_rows", "rows (inputs x samples) per batched forward",
                                    buckets=_POW2, registry=r)
        self.queue_depth = Gauge("tfb_queue_depth", "requests waiting for a forward", registry=r)
        self.queue_capacity = Gauge("tfb_queue_capacity", "most requests the queue holds", registry=r)
        self.inflight = Gauge("tfb_inflight_requests", "/predict requests accepted and not yet answered",
                              registry=r)
        self.ready = Gauge("tfb_ready", "1 once the model is loaded and warmed up", registry=r)
        self.aborted = Counter("tfb_requests_aborted", "accepted /predict requests skipped before (the rest of) "
                               "their forward: nobody awaited them (reason: disconnect, timeout, shutdown)",
                               ["reason"], registry=r)
        for reason in ("disconnect", "timeout", "shutdown"):
            self.aborted.labels(reason=reason)
        # uncertainty
        self.confidence = Histogram("tfb_prediction_confidence", "top-label confidence of predictions",
                                    buckets=_CONFIDENCE, registry=r)
        self.predictive_entropy = Histogram("tfb_prediction_predictive_entropy", "predictive entropy (nats)",
                                            buckets=_ENTROPY, registry=r)
        self.mutual_information = Histogram("tfb_prediction_mutual_information",
                                            "mutual information, epistemic (nats)", buckets=_MI, registry=r)
        self.predictions = Counter("tfb_predictions", "predictions by predicted label (per-request labels "
                                   f"outside the configured ones count as {OTHER_LABEL!r})", ["label"], registry=r)
        self.sigma = Gauge("tfb_sigma", "posterior scale sigma in use", registry=r)
        self.default_samples = Gauge("tfb_default_samples", "default number of posterior samples N", registry=r)
        # calibration
        self.bin_count = Counter("tfb_calibration_bin_count", "labelled predictions per confidence bin", ["bin"],
                                 registry=r)
        self.bin_correct = Counter("tfb_calibration_bin_correct", "correct labelled predictions per bin", ["bin"],
                                   registry=r)
        self.bin_confidence = Counter("tfb_calibration_bin_confidence_sum", "sum of confidences per bin", ["bin"],
                                      registry=r)
        for b in range(ECE_BINS):  # every bin exists from the start: increase() needs a zero to start from
            for c in (self.bin_count, self.bin_correct, self.bin_confidence):
                c.labels(bin=str(b))
        self.feedback = Counter("tfb_feedback", "labels received on /feedback", registry=r)
        self.feedback_correct = Counter("tfb_feedback_correct", "labelled predictions that were right", registry=r)
        self.feedback_nll = Counter("tfb_feedback_nll_sum", "sum of -log p[true label]", registry=r)
        self.feedback_brier = Counter("tfb_feedback_brier_sum", "sum of Brier scores", registry=r)
        self.recent_accuracy = Gauge("tfb_recent_accuracy", "accuracy of the last K labelled predictions", registry=r)
        self.recent_ece = Gauge("tfb_recent_ece", "ECE (15 bins) of the last K labelled predictions", registry=r)
        self.recent_nll = Gauge("tfb_recent_nll", "NLL of the last K labelled predictions", registry=r)
        self.recent_brier = Gauge("tfb_recent_brier", "Brier score of the last K labelled predictions", registry=r)
        self.recent_count = Gauge("tfb_recent_count", "labelled predictions in the recent window (<= K)", registry=r)
        self._recent: deque[tuple[list[float], int]] = deque(maxlen=recent_window)
        self._recent_dirty = False
        # prediction sets and abstention (tfb_core.conformal); label-free accuracy estimate
        self.with_set = Counter("tfb_predictions_with_set", "predictions that got a prediction set (alpha)",
                                registry=r)
        self.set_size = Counter("tfb_prediction_set_size_sum", "sum of prediction set sizes", registry=r)
        self.with_risk = Counter("tfb_predictions_with_max_risk", "predictions asked to abstain or not (max_risk)",
                                 registry=r)
        self.abstentions = Counter("tfb_abstentions", "predictions that abstained at their max_risk", registry=r)
        self.confidence_sum = Counter("tfb_confidence_sum", "sum of top-label confidences of predictions "
                                      "(/ tfb_prediction_confidence_count: label-free accuracy estimate)", registry=r)
        self.estimated_accuracy = Gauge("tfb_estimated_accuracy", "mean confidence of the last K predictions: "
                                        "their expected accuracy if calibrated (label-free, as CBPE)", registry=r)
        self.fb_with_set = Counter("tfb_feedback_with_set", "labelled predictions that had a prediction set",
                                   registry=r)
        self.fb_covered = Counter("tfb_feedback_set_covered", "labelled predictions whose set held the true label",
                                  registry=r)
        self.fb_target = Counter("tfb_feedback_set_target_sum", "sum of 1 - alpha over labelled predictions with "
                                 "a set (their promised coverage)", registry=r)
        self.fb_answered = Counter("tfb_feedback_answered", "labelled predictions answered (not abstained) under "
                                   "a max_risk", registry=r)
        self.fb_answered_wrong = Counter("tfb_feedback_answered_wrong", "of those, the wrong ones", registry=r)
        self.fb_risk_target = Counter("tfb_feedback_max_risk_sum", "sum of max_risk over labelled answered "
                                      "predictions", registry=r)
        self._recent_conf: deque[float] = deque(maxlen=recent_window)
        # uncertainty drift: the calibration set's values, the reference for tfb:*_drift:30m (NaN: none)
        self.cal_entropy = Gauge("tfb_calibration_predictive_entropy", "mean predictive entropy (nats) of the "
                                 "calibration set at the default N and seed", registry=r)
        self.cal_mi = Gauge("tfb_calibration_mutual_information", "mean mutual information (nats) of the "
                            "calibration set at the default N and seed", registry=r)
        self.set_calibration_reference(None, None)

    # --- uncertainty ----------------------------------------------------------------------------
    def observe_predictions(self, predictions: Sequence[dict], configured_labels: Sequence[str]) -> None:
        known = set(configured_labels)
        for p in predictions:
            self.confidence.observe(p["confidence"])
            self.predictive_entropy.observe(p["predictive_entropy"])
            self.mutual_information.observe(p["mutual_information"])
            self.predictions.labels(label=p["label"] if p["label"] in known else OTHER_LABEL).inc()
            self.confidence_sum.inc(p["confidence"])
            self._recent_conf.append(p["confidence"])
            if p.get("prediction_set") is not None:
                self.with_set.inc()
                self.set_size.inc(len(p["prediction_set"]))
            if p.get("abstain") is not None:
                self.with_risk.inc()
                if p["abstain"]:
                    self.abstentions.inc()
        if self._recent_conf:
            self.estimated_accuracy.set(math.fsum(self._recent_conf) / len(self._recent_conf))

    def set_calibration_reference(self, entropy: float | None, mutual_information: float | None) -> None:
        """The calibration set's mean predictive entropy and MI (None: no calibration data)."""
        self.cal_entropy.set(math.nan if entropy is None else entropy)
        self.cal_mi.set(math.nan if mutual_information is None else mutual_information)

    def observe_feedback_conformal(self, covered: bool | None, alpha: float | None, answered: bool | None,
                                   correct: bool, max_risk: float | None) -> None:
        """Realised coverage and selective risk of one labelled prediction (None: not asked for)."""
        if covered is not None and alpha is not None:
            self.fb_with_set.inc()
            self.fb_target.inc(1.0 - alpha)
            if covered:
                self.fb_covered.inc()
        if answered and max_risk is not None:
            self.fb_answered.inc()
            self.fb_risk_target.inc(max_risk)
            if not correct:
                self.fb_answered_wrong.inc()

    # --- calibration ----------------------------------------------------------------------------
    def observe_feedback(self, probs: Sequence[float], target: int) -> None:
        """Count one labelled prediction (mean probabilities ``probs``, true class ``target``)."""
        confidence = max(probs)
        predicted = max(range(len(probs)), key=probs.__getitem__)
        correct = predicted == target
        b = str(confidence_bin(confidence))
        self.bin_count.labels(bin=b).inc()
        self.bin_confidence.labels(bin=b).inc(confidence)
        if correct:
            self.bin_correct.labels(bin=b).inc()
            self.feedback_correct.inc()
        self.feedback.inc()
        self.feedback_nll.inc(-math.log(max(probs[target], _EPS)))
        self.feedback_brier.inc(sum((p - (1.0 if c == target else 0.0)) ** 2 for c, p in enumerate(probs)))
        self._recent.append((list(probs), target))
        self._recent_dirty = True

    def refresh_recent(self) -> None:
        """Recompute the tfb_recent_* gauges (at scrape time, and only after new feedback)."""
        if not self._recent_dirty:
            return
        self._recent_dirty = False
        items = list(self._recent)
        self.recent_count.set(len(items))
        if not items:
            return
        width = max(len(p) for p, _ in items)
        # Per-request label sets may differ in size: zero-padding the missing classes leaves the
        # top label, its confidence, -log p[y] and the Brier score unchanged.
        probs = torch.tensor([p + [0.0] * (width - len(p)) for p, _ in items], dtype=torch.float64)  # (K, C)
        target = torch.tensor([t for _, t in items])  # (K,)
        self.recent_accuracy.set(accuracy(probs, target))
        self.recent_ece.set(ece(probs, target))
        self.recent_nll.set(nll(probs, target))
        self.recent_brier.set(brier(probs, target))
