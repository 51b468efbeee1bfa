"""Prometheus metrics on a registry the app owns: serving, uncertainty, calibration.

The names are an interface (alert rules and dashboards under deploy/ are built on them);
prometheus-client appends ``_total`` to counters. Calibration from /feedback uses 15 equal-width
confidence bins over [0, 1] (label ``bin`` = "0".."14"), the bins of the ECE in TFB.md section 5
(:func:`tfb_core.decide.uncertainty.confidence_bin`, as ``tfb eval``'s), so that windowed ECE is a
PromQL expression over ``increase()`` of the bin counters. NLL and Brier are the core's too.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from app.online import alpha_key, pooled_bound
from tfb_core.decide.uncertainty import ECE_BINS, accuracy, brier, confidence_bin, ece, nll

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_POW2 = tuple(float(2**k) for k in range(11))  # 1 .. 1024
_CONFIDENCE = tuple(round((k + 1) / ECE_BINS, 6) for k in range(ECE_BINS))
_ENTROPY = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0)
_MI = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
OTHER_LABEL = "_other"
#: the label of every per-adapter metric
A = ["adapter"]


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
        self.inflight = Gauge("tfb_inflight_requests", "requests accepted and not yet answered (classification, and "
                              "generations until their last token or their client leaves)",
                              registry=r)
        self.ready = Gauge("tfb_ready", "1 once the model is loaded and warmed up", registry=r)
        self.aborted = Counter("tfb_requests_aborted", "accepted /predict requests skipped before (the rest of) "
                               "their forward: nobody awaited them (reason: disconnect, timeout, shutdown)",
                               ["reason"], registry=r)
        for reason in ("disconnect", "timeout", "shutdown"):
            self.aborted.labels(reason=reason)
        # uncertainty
        # per adapter (label ``adapter``: its name; one base model may serve several)
        self.confidence = Histogram("tfb_prediction_confidence", "top-label confidence of predictions", A,
                                    buckets=_CONFIDENCE, registry=r)
        self.predictive_entropy = Histogram("tfb_prediction_predictive_entropy", "predictive entropy (nats)", A,
                                            buckets=_ENTROPY, registry=r)
        self.mutual_information = Histogram("tfb_prediction_mutual_information",
                                            "mutual information, epistemic (nats)", A, buckets=_MI, registry=r)
        self.predictions = Counter("tfb_predictions", "predictions by predicted label (per-request labels "
                                   f"outside the configured ones count as {OTHER_LABEL!r})", [*A, "label"], registry=r)
        self.sigma = Gauge("tfb_sigma", "posterior scale sigma in use", A, registry=r)
        self.default_samples = Gauge("tfb_default_samples", "default number of posterior samples N", A, registry=r)
        # calibration
        self.bin_count = Counter("tfb_calibration_bin_count", "labelled predictions per confidence bin",
                                 [*A, "bin"], registry=r)
        self.bin_correct = Counter("tfb_calibration_bin_correct", "correct labelled predictions per bin",
                                   [*A, "bin"], registry=r)
        self.bin_confidence = Counter("tfb_calibration_bin_confidence_sum", "sum of confidences per bin",
                                      [*A, "bin"], registry=r)
        self.feedback = Counter("tfb_feedback", "labels received on /feedback", A, registry=r)
        self.feedback_correct = Counter("tfb_feedback_correct", "labelled predictions that were right", A, registry=r)
        self.feedback_nll = Counter("tfb_feedback_nll_sum", "sum of -log p[true label]", A, registry=r)
        self.feedback_brier = Counter("tfb_feedback_brier_sum", "sum of Brier scores", A, registry=r)
        self.recent_accuracy = Gauge("tfb_recent_accuracy", "accuracy of the last K labelled predictions", A,
                                     registry=r)
        self.recent_ece = Gauge("tfb_recent_ece", "ECE (15 bins) of the last K labelled predictions", A, registry=r)
        self.recent_nll = Gauge("tfb_recent_nll", "NLL of the last K labelled predictions", A, registry=r)
        self.recent_brier = Gauge("tfb_recent_brier", "Brier score of the last K labelled predictions", A, registry=r)
        self.recent_count = Gauge("tfb_recent_count", "labelled predictions in the recent window (<= K)", A,
                                  registry=r)
        self._window = recent_window
        self._recent: dict[str, deque[tuple[list[float], int]]] = {}
        self._recent_dirty: set[str] = set()
        # prediction sets and abstention (tfb_core.decide.conformal); label-free accuracy estimate
        self.with_set = Counter("tfb_predictions_with_set", "predictions that got a prediction set (alpha)", A,
                                registry=r)
        self.set_size = Counter("tfb_prediction_set_size_sum", "sum of prediction set sizes", A, registry=r)
        self.with_risk = Counter("tfb_predictions_with_max_risk", "predictions asked to abstain or not (max_risk)",
                                 A, registry=r)
        self.abstentions = Counter("tfb_abstentions", "predictions that abstained at their max_risk", A, registry=r)
        self.confidence_sum = Counter("tfb_confidence_sum", "sum of top-label confidences of predictions "
                                      "(/ tfb_prediction_confidence_count: label-free accuracy estimate)", A,
                                      registry=r)
        self.estimated_accuracy = Gauge("tfb_estimated_accuracy", "mean confidence of the last K served "
                                        "predictions (each the top class's probability, averaged over the TFB "
                                        "posterior samples, as served: no further recalibration, unlike CBPE): "
                                        "their expected accuracy if those probabilities are calibrated "
                                        "(label-free)", A, registry=r)
        self.fb_with_set = Counter("tfb_feedback_with_set", "labelled predictions that had a prediction set", A,
                                   registry=r)
        self.fb_covered = Counter("tfb_feedback_set_covered", "labelled predictions whose set held the true label",
                                  A, registry=r)
        self.fb_target = Counter("tfb_feedback_set_target_sum", "sum of 1 - alpha over labelled predictions with "
                                 "a set (their promised coverage)", A, registry=r)
        self.fb_answered = Counter("tfb_feedback_answered", "labelled predictions answered (not abstained) under "
                                   "a max_risk", A, registry=r)
        self.fb_answered_wrong = Counter("tfb_feedback_answered_wrong", "of those, the wrong ones", A, registry=r)
        self.fb_risk_target = Counter("tfb_feedback_max_risk_sum", "sum of max_risk over labelled answered "
                                      "predictions", A, registry=r)
        self._recent_conf: dict[str, deque[float]] = {}
        # generation (/v1/completions, /v1/chat/completions)
        self.generated_tokens = Counter("tfb_generated_tokens", "tokens generated for answered generation requests",
                                        A, registry=r)
        self.generations = Counter("tfb_generations", "generation requests answered, by finish reason",
                                   [*A, "finish_reason"], registry=r)
        self.token_mi = Histogram("tfb_generated_token_mutual_information", "mutual information of each "
                                  "generated token under p-bar (nats, epistemic)", A, buckets=_MI, registry=r)
        self.sequence_mi = Histogram("tfb_generation_mean_mutual_information", "mean token mutual information "
                                     "of each generated answer (nats)", A, buckets=_MI, registry=r)
        self.gen_with_risk = Counter("tfb_generations_with_max_risk", "generated answers asked to abstain or not "
                                     "(max_risk)", A, registry=r)
        self.gen_abstentions = Counter("tfb_generation_abstentions", "generated answers withheld at their max_risk",
                                       A, registry=r)
        self.generation_rows = Gauge("tfb_generation_rows", "rows (sequences x posterior samples) of the running "
                                     "decode's forwards", registry=r)
        # uncertainty drift: the calibration set's values, the reference for tfb:*_drift:30m (NaN: none)
        self.cal_entropy = Gauge("tfb_calibration_predictive_entropy", "mean predictive entropy (nats) of the "
                                 "calibration set at the default N and seed", A, registry=r)
        self.cal_mi = Gauge("tfb_calibration_mutual_information", "mean mutual information (nats) of the "
                            "calibration set at the default N and seed", A, registry=r)

        # online prediction sets (per alpha; per class with Mondrian, else class "_all") and drift tests
        self.online_coverage = Gauge("tfb_online_coverage", "online prediction sets: realised coverage over the "
                                     "labelled predictions (long run, since the state began)", [*A, "alpha"],
                                     registry=r)
        self.online_labelled = Gauge("tfb_online_labelled", "online prediction sets: labels applied", [*A, "alpha"],
                                     registry=r)
        self.online_bound = Gauge("tfb_online_coverage_bound", "online prediction sets: the deterministic bound on "
                                  "|realised coverage - (1 - alpha)| at the current number of labels", [*A, "alpha"],
                                  registry=r)
        self.online_threshold = Gauge("tfb_online_threshold", "online prediction sets: the score threshold in force",
                                      [*A, "alpha", "class"], registry=r)
        self.online_effective_alpha = Gauge("tfb_online_effective_alpha", "online prediction sets: the miscoverage "
                                            "the current threshold has on the calibration set", [*A, "alpha", "class"],
                                            registry=r)
        self.drift_log = Gauge("tfb_drift_log_martingale", "drift test: natural log of the conformal test "
                               "martingale (alarm at log(1/delta))", [*A, "stream"], registry=r)
        self.drift_alarm = Gauge("tfb_drift_alarm", "drift test: 1 once the martingale reached 1/delta (false "
                                 "alarm probability <= delta on in-domain data), until recalibration", [*A, "stream"],
                                 registry=r)
        self.drift_observations = Gauge("tfb_drift_observations", "drift test: scores observed since the "
                                        "calibration", [*A, "stream"], registry=r)
        self.drift_log_threshold = Gauge("tfb_drift_log_threshold", "drift test: log(1/delta), the alarm level of "
                                         "tfb_drift_log_martingale", A, registry=r)

    def set_adapter(self, adapter: str, sigma: float, n_samples: int) -> None:
        """A served adapter: its sigma and N, and every per-adapter series at zero (``increase()``
        needs a zero to start from, and a dashboard lists the adapter before its first prediction)."""
        self.sigma.labels(adapter=adapter).set(sigma)
        self.default_samples.labels(adapter=adapter).set(n_samples)
        for b in range(ECE_BINS):
            for c in (self.bin_count, self.bin_correct, self.bin_confidence):
                c.labels(adapter=adapter, bin=str(b))
        for m in (self.confidence, self.predictive_entropy, self.mutual_information, self.feedback,
                  self.feedback_correct, self.feedback_nll, self.feedback_brier, self.with_set, self.set_size,
                  self.with_risk, self.abstentions, self.confidence_sum, self.fb_with_set, self.fb_covered,
                  self.fb_target, self.fb_answered, self.fb_answered_wrong, self.fb_risk_target,
                  self.generated_tokens, self.token_mi, self.sequence_mi, self.gen_with_risk, self.gen_abstentions):
            m.labels(adapter=adapter)

    def remove_adapter(self, adapter: str) -> None:
        """Forget an unloaded adapter: every series labelled with it, and its recent windows."""
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase):
                try:
                    metric.remove_by_labels({"adapter": adapter})
                except ValueError:  # a metric without the adapter label
                    continue
        for windows in (self._recent, self._recent_conf):
            windows.pop(adapter, None)
        self._recent_dirty.discard(adapter)

    # --- uncertainty ----------------------------------------------------------------------------
    def observe_predictions(self, predictions: Sequence[dict], configured_labels: Sequence[str],
                            adapter: str = "default") -> None:
        known = set(configured_labels)
        recent = self._recent_conf.setdefault(adapter, deque(maxlen=self._window))
        conf, ent, mi = (self.confidence.labels(adapter=adapter), self.predictive_entropy.labels(adapter=adapter),
                         self.mutual_information.labels(adapter=adapter))
        for p in predictions:
            conf.observe(p["confidence"])
            ent.observe(p["predictive_entropy"])
            mi.observe(p["mutual_information"])
            self.predictions.labels(adapter=adapter, label=p["label"] if p["label"] in known else OTHER_LABEL).inc()
            self.confidence_sum.labels(adapter=adapter).inc(p["confidence"])
            recent.append(p["confidence"])
            if p.get("prediction_set") is not None:
                self.with_set.labels(adapter=adapter).inc()
                self.set_size.labels(adapter=adapter).inc(len(p["prediction_set"]))
            if p.get("abstain") is not None:
                self.with_risk.labels(adapter=adapter).inc()
                if p["abstain"]:
                    self.abstentions.labels(adapter=adapter).inc()
        if recent:
            self.estimated_accuracy.labels(adapter=adapter).set(math.fsum(recent) / len(recent))

    def observe_generation(self, info: dict, adapter: str = "default", abstained: bool | None = None) -> None:
        """One answered generation (:meth:`tfb_core.serving.generation.GenerationService.result_info`);
        ``abstained``: whether it was withheld at its max_risk (None: none asked)."""
        c = info["completion"]
        if abstained is not None:
            self.gen_with_risk.labels(adapter=adapter).inc()
            if abstained:
                self.gen_abstentions.labels(adapter=adapter).inc()
        self.generated_tokens.labels(adapter=adapter).inc(len(c["tokens"]))
        self.generations.labels(adapter=adapter, finish_reason=c["finish_reason"]).inc()
        mi = self.token_mi.labels(adapter=adapter)
        for t in c["tokens"]:
            mi.observe(t["mutual_information"])
        self.sequence_mi.labels(adapter=adapter).observe(c["sequence"]["mean_mutual_information"])

    def observe_online(self, adapter: str, state: Any, alpha: float) -> None:
        """An online set state (:class:`app.online.AdapterOnline`) after a label at ``alpha``."""
        sets = state.alphas[alpha_key(alpha)]
        summary, a = sets.summary(), f"{alpha:g}"
        self.online_labelled.labels(adapter=adapter, alpha=a).set(summary["labelled"])
        if summary["realised_coverage"] is not None:
            self.online_coverage.labels(adapter=adapter, alpha=a).set(summary["realised_coverage"])
        self.online_bound.labels(adapter=adapter, alpha=a).set(pooled_bound(sets))
        names = list(state.labels) if sets.mondrian else ["_all"]
        for name, tracker, eff in zip(names, sets.trackers, state.effective_alphas(sets), strict=True):
            self.online_threshold.labels(adapter=adapter, alpha=a, **{"class": name}).set(tracker.q)
            self.online_effective_alpha.labels(adapter=adapter, alpha=a, **{"class": name}).set(eff)

    def observe_drift(self, adapter: str, stream: str, test: Any) -> None:
        """A drift test (:class:`tfb_core.decide.drift.DriftMonitor`) after its observations."""
        self.drift_log.labels(adapter=adapter, stream=stream).set(test.log_value)
        self.drift_alarm.labels(adapter=adapter, stream=stream).set(1.0 if test.alarm else 0.0)
        self.drift_observations.labels(adapter=adapter, stream=stream).set(test.observations)
        self.drift_log_threshold.labels(adapter=adapter).set(math.log(1.0 / test.delta))

    def reset_drift(self, adapter: str, delta: float) -> None:
        """An adapter's drift tests start (again): at a new calibration."""
        for stream in ("label_free", "labelled"):
            self.drift_log.labels(adapter=adapter, stream=stream).set(0.0)
            self.drift_alarm.labels(adapter=adapter, stream=stream).set(0.0)
            self.drift_observations.labels(adapter=adapter, stream=stream).set(0)
        self.drift_log_threshold.labels(adapter=adapter).set(math.log(1.0 / delta))

    def set_calibration_reference(self, adapter: str, entropy: float | None, mutual_information: float | None) -> None:
        """An adapter's calibration set's mean predictive entropy and MI (None: no calibration data)."""
        self.cal_entropy.labels(adapter=adapter).set(math.nan if entropy is None else entropy)
        self.cal_mi.labels(adapter=adapter).set(math.nan if mutual_information is None else mutual_information)

    def observe_feedback_conformal(self, covered: bool | None, alpha: float | None, answered: bool | None,
                                   correct: bool, max_risk: float | None, adapter: str = "default") -> None:
        """Realised coverage and selective risk of one labelled prediction (None: not asked for)."""
        if covered is not None and alpha is not None:
            self.fb_with_set.labels(adapter=adapter).inc()
            self.fb_target.labels(adapter=adapter).inc(1.0 - alpha)
            if covered:
                self.fb_covered.labels(adapter=adapter).inc()
        if answered and max_risk is not None:
            self.fb_answered.labels(adapter=adapter).inc()
            self.fb_risk_target.labels(adapter=adapter).inc(max_risk)
            if not correct:
                self.fb_answered_wrong.labels(adapter=adapter).inc()

    # --- calibration ----------------------------------------------------------------------------
    def observe_feedback(self, probs: Sequence[float], target: int, adapter: str = "default") -> None:
        """Count one labelled prediction (mean probabilities ``probs``, true class ``target``)."""
        confidence = max(probs)
        predicted = max(range(len(probs)), key=probs.__getitem__)
        correct = predicted == target
        b = str(int(confidence_bin(confidence)))
        self.bin_count.labels(adapter=adapter, bin=b).inc()
        self.bin_confidence.labels(adapter=adapter, bin=b).inc(confidence)
        if correct:
            self.bin_correct.labels(adapter=adapter, bin=b).inc()
            self.feedback_correct.labels(adapter=adapter).inc()
        self.feedback.labels(adapter=adapter).inc()
        one, y = torch.tensor([probs], dtype=torch.float64), torch.tensor([target])  # (1, C), (1,)
        self.feedback_nll.labels(adapter=adapter).inc(nll(one, y))
        self.feedback_brier.labels(adapter=adapter).inc(brier(one, y))
        self._recent.setdefault(adapter, deque(maxlen=self._window)).append((list(probs), target))
        self._recent_dirty.add(adapter)

    def refresh_recent(self) -> None:
        """Recompute the tfb_recent_* gauges (at scrape time, and only for adapters with new feedback)."""
        dirty, self._recent_dirty = self._recent_dirty, set()
        for adapter in sorted(dirty):
            items = list(self._recent[adapter])
            self.recent_count.labels(adapter=adapter).set(len(items))
            if not items:
                continue
            width = max(len(p) for p, _ in items)
            # Per-request label sets may differ in size: zero-padding the missing classes leaves the
            # top label, its confidence, -log p[y] and the Brier score unchanged.
            probs = torch.tensor([p + [0.0] * (width - len(p)) for p, _ in items], dtype=torch.float64)  # (K, C)
            target = torch.tensor([t for _, t in items])  # (K,)
            self.recent_accuracy.labels(adapter=adapter).set(accuracy(probs, target))
            self.recent_ece.labels(adapter=adapter).set(ece(probs, target))
            self.recent_nll.labels(adapter=adapter).set(nll(probs, target))
            self.recent_brier.labels(adapter=adapter).set(brier(probs, target))
