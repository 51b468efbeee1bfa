"""What keeps decisions honest after deployment: online prediction sets and drift alarms, per adapter.

* :class:`AdapterOnline`: an adapter's online conformal state (:mod:`tfb_core.decide.online`),
  one :class:`~tfb_core.decide.online.OnlineSets` per requested alpha (each alpha's own trackers:
  one alpha's labels never move another's), started at the split-conformal quantiles of the
  adapter's calibration and moved by the labels of /feedback. Written atomically under the cache
  (``online/<key>.json``, :func:`tfb_core.cache.save_json`), keyed by the calibration's content, the
  score, Mondrian and eta: a restart restores it (logged, and in /info, with when, by which
  process, after how many labels); a new calibration starts afresh.
* :class:`AdapterDrift`: two conformal test martingales (:mod:`tfb_core.decide.drift`): label-free on
  every served prediction's 1 - confidence, and on the true label's score as labels arrive; both
  against the calibration set, both reset with it.

Scope of a state: one process. Under Ray Serve each replica holds its own (deploy/ray/serve_app.py
says what holds then): a label updates the state that served its prediction (``state_id``), and
a label for another state's prediction (another replica's, or from before a restart) is not applied:
for the bound it is an unlabelled prediction.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tfb_core import cache
from tfb_core.data.loading import default_cache_dir
from tfb_core.data.tasks import TaskError
from tfb_core.decide.conformal import Calibration, nonconformity
from tfb_core.decide.drift import DriftMonitor
from tfb_core.decide.online import OnlineSets, Served, coverage_bound, effective_alpha
from tfb_core.serving.engine import TFBEngine

log = logging.getLogger(__name__)

KIND = "online"
#: what an online set promises (the response's ``conformal.guarantee``; split conformal's: ``split_conformal``)
ONLINE = "online_long_run"


def alpha_key(alpha: float) -> str:
    return repr(float(alpha))


class AdapterOnline:
    """One adapter's online sets, per alpha; persisted under the cache."""

    def __init__(self, engine: TFBEngine, cal: Calibration, max_alphas: int, save_interval_s: float) -> None:
        cfg = engine.cfg
        self.adapter = engine.name
        self.cal = cal
        self.score, self.mondrian, self.eta = cfg.conformal_score, cfg.conformal_mondrian, cfg.online_eta
        self.n_classes = cal.n_classes
        self.labels = tuple(engine.task.labels)
        self.max_alphas = max_alphas
        self.save_interval_s = save_interval_s
        self.state_id = uuid.uuid4().hex  # this process's state: labels of its own predictions only
        body = {k: v for k, v in cal.to_dict().items() if k != "source"}
        self.key = {"adapter": self.adapter, "calibration_sha256": cache.sha256_text([cache.canonical(body)]),
                    "score": self.score, "mondrian": self.mondrian, "eta": self.eta}
        self.cache_dir = default_cache_dir(cfg.model.cache_dir)
        self.alphas: dict[str, OnlineSets] = {}
        self.restored: dict[str, Any] | None = None
        self.writes = 0
        self._dirty = False
        self._saved_at = -math.inf
        self._restore()

    # --- persistence ------------------------------------------------------------------------
    def path(self) -> Path:
        return cache.cache_path(self.cache_dir, self.key).parent.parent / KIND / cache.cache_path(self.cache_dir,
                                                                                                  self.key).name

    def _restore(self) -> None:
        data = cache.load_json(self.cache_dir, self.key, KIND)
        if data is None:
            return
        try:
            alphas = {k: OnlineSets.from_dict(v) for k, v in data["alphas"].items()}
            if any(s.eta != self.eta or s.mondrian != self.mondrian or len(s.trackers) != (
                    self.n_classes if self.mondrian else 1) for s in alphas.values()):
                raise ValueError("its states are for another eta, Mondrian setting or label set")
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("online conformal state %s is unreadable or implausible (%s): starting afresh", self.path(), exc)
            return
        self.alphas = alphas
        self.writes = int(data.get("writes", 0))
        labelled = sum(s.summary()["labelled"] for s in alphas.values())
        self.restored = {"path": str(self.path()), "written_at": data.get("written_at"), "pid": data.get("pid"),
                         "host": data.get("host"), "labelled": labelled, "alphas": sorted(alphas, key=float)}
        log.info("adapter %s: online conformal state restored from %s (written %s by pid %s on %s; %d labels, "
                 "alphas %s)", self.adapter, self.path(), data.get("written_at"), data.get("pid"), data.get("host"),
                 labelled, ", ".join(self.restored["alphas"]))

    def save(self, force: bool = False) -> None:
        """Write the state if it changed (at most every ``save_interval_s``, unless ``force``)."""
        now = time.monotonic()
        if not self._dirty or (not force and now - self._saved_at < self.save_interval_s):
            return
        self.writes += 1
        payload = {"alphas": {k: s.to_dict() for k, s in self.alphas.items()}, "writes": self.writes,
                   "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pid": os.getpid(),
                   "host": socket.gethostname()}
        try:
            cache.save_json(self.cache_dir, self.key, payload, KIND)
        except OSError as exc:  # a full disk must not fail /feedback: the state lives on in memory
            log.warning("could not write the online conformal state of %s (%s)", self.adapter, exc)
            return
        self._dirty, self._saved_at = False, now

    # --- serving and labels -------------------------------------------------------------------
    def sets(self, alpha: float) -> OnlineSets:
        key = alpha_key(alpha)
        state = self.alphas.get(key)
        if state is None:
            if len(self.alphas) >= self.max_alphas:
                raise TaskError(f"alpha: online prediction sets track at most {self.max_alphas} alphas per adapter "
                                f"(TFB_ONLINE_MAX_ALPHAS), already {sorted(self.alphas, key=float)}; ask one of "
                                "those", param="alpha")
            initial, _ = self.cal.quantiles(alpha, self.score, self.mondrian)
            state = self.alphas[key] = OnlineSets.start(alpha, self.eta, initial, self.mondrian)
            self._dirty = True
        return state

    def serve(self, alpha: float) -> tuple[Served, dict[str, Any]]:
        """The thresholds a request's sets use now, and what the response says of them."""
        state = self.sets(alpha)
        served = Served(alpha, state.thresholds(self.n_classes), [t.labelled for t in state.trackers], self.state_id)
        return served, self.describe(state)

    def describe(self, state: OnlineSets) -> dict[str, Any]:
        s = state.summary()
        bound = pooled_bound(state)
        return {
            "guarantee": ONLINE,
            "promise": ("long-run coverage under any shift: over the labelled predictions (as /feedback received "
                        f"them), |realised coverage - (1 - alpha)| <= bound, now {_fmt(bound)} after {s['labelled']} "
                        "labels, and over any window of W labels <= (1 + (D + 1) eta) / (eta W), D = max_delay; "
                        "nothing for a single "
                        "prediction, nor for predictions never labelled"
                        + (" (per true class: Mondrian)" if state.mondrian else "")),
            "method": "quantile tracking (Angelopoulos, Barber & Bates 2023)", "eta": state.eta,
            "labelled": s["labelled"], "realised_coverage": s["realised_coverage"],
            "bound": None if math.isinf(bound) else bound,
            "max_delay": max(t.max_delay for t in state.trackers),
            "thresholds": [t.q for t in state.trackers],
        }

    def label(self, served: Served, probs: list[float], target: int) -> bool | None:
        """Apply one label; its coverage, or None if the prediction is not this state's."""
        if served.state_id != self.state_id:
            return None
        state = self.alphas.get(alpha_key(served.alpha))
        if state is None:
            return None
        score = float(nonconformity(torch.tensor([probs], dtype=torch.float64), self.score)[0, target])
        covered = state.update(target, score, served)
        self._dirty = True
        self.save()
        return covered

    def effective_alphas(self, state: OnlineSets) -> list[float]:
        """Per tracker, the calibration miscoverage its threshold corresponds to."""
        if state.mondrian:
            return [effective_alpha(c, t.q) for c, t in zip(self.cal.class_scores[self.score], state.trackers,
                                                            strict=True)]
        return [effective_alpha(self.cal.scores[self.score], state.trackers[0].q)]

    def info(self) -> dict[str, Any]:
        return {"method": "quantile tracking (Angelopoulos, Barber & Bates 2023)", "eta": self.eta,
                "score": self.score, "mondrian": self.mondrian, "path": str(self.path()), "restored": self.restored,
                "alphas": {k: self.describe(s) for k, s in sorted(self.alphas.items(), key=lambda kv: float(kv[0]))}}


def pooled_bound(state: OnlineSets) -> float:
    """The bound on the pooled |realised miscoverage - alpha|: the per-tracker bounds weighted by
    their shares of the labels (inf before any label)."""
    total = sum(t.labelled for t in state.trackers)
    if total == 0:
        return math.inf
    return math.fsum(t.labelled * coverage_bound(state.alpha, state.eta, t.labelled, t.max_delay, state.bound)
                     for t in state.trackers if t.labelled) / total


class AdapterDrift:
    """An adapter's drift tests: label-free (1 - confidence) and labelled (1 - p[true label])."""

    STREAMS = ("label_free", "labelled")

    def __init__(self, cal: Calibration, delta: float, jump: float, seed: int = 0) -> None:
        self.delta = delta
        self.monitors = {
            "label_free": DriftMonitor(cal.predicted_scores, delta, jump, seed),
            "labelled": DriftMonitor(cal.scores["lac"], delta, jump, seed + 1),
        }

    def info(self) -> dict[str, Any]:
        return {"test": "conformal test martingale (Simple Jumper, Vovk et al. 2021)", "delta": self.delta,
                "promise": "on inputs exchangeable with the calibration set, P(alarm ever) <= delta (Ville)",
                **{name: {"observations": m.observations, "log_martingale": m.log_value, "alarm": m.alarm,
                          "alarm_at": m.alarm_at} for name, m in self.monitors.items()}}


def _fmt(x: float) -> str:
    return "unbounded (no labels yet)" if math.isinf(x) else f"{x:.4g}"


class Monitors:
    """The online sets and drift tests of the served adapters, built on first use from each
    adapter's calibration (and built afresh when it changes: a recalibration resets both)."""

    def __init__(self, max_alphas: int = 16, save_interval_s: float = 1.0, drift_delta: float = 0.01,
                 drift_jump: float = 0.01, metrics: Any = None) -> None:
        self.metrics = metrics  # app.metrics.Metrics: the drift gauges start at 0 with each test
        self.max_alphas, self.save_interval_s = max_alphas, save_interval_s
        self.drift_delta, self.drift_jump = drift_delta, drift_jump
        self.online: dict[str, AdapterOnline] = {}
        self.drift: dict[str, AdapterDrift] = {}
        self._cal: dict[str, Calibration] = {}

    @classmethod
    def of(cls, settings: Any, metrics: Any = None) -> Monitors:
        """Configured by the server's settings (:class:`app.settings.Settings`)."""
        return cls(settings.online_max_alphas, settings.online_save_interval_s, settings.drift_delta,
                   settings.drift_jump, metrics)

    def _sync(self, engine: TFBEngine) -> Calibration | None:
        cal = engine.calibration
        if cal is None or engine.task.generative:
            return None
        if self._cal.get(engine.name) is not cal:  # first use, or recalibrated: new state and tests
            self.remove(engine.name)
            self._cal[engine.name] = cal
            self.drift[engine.name] = AdapterDrift(cal, self.drift_delta, self.drift_jump, engine.cfg.seed)
            if self.metrics is not None:
                self.metrics.reset_drift(engine.name, self.drift_delta)
        return cal

    def online_state(self, engine: TFBEngine) -> AdapterOnline | None:
        """The adapter's online sets (None: not configured, or no calibration yet)."""
        cal = self._sync(engine)
        if cal is None or not engine.cfg.conformal_online:
            return None
        state = self.online.get(engine.name)
        if state is None:
            state = self.online[engine.name] = AdapterOnline(engine, cal, self.max_alphas, self.save_interval_s)
        return state

    def drift_tests(self, engine: TFBEngine) -> AdapterDrift | None:
        return self.drift.get(engine.name) if self._sync(engine) is not None else None

    def remove(self, name: str) -> None:
        state = self.online.pop(name, None)
        if state is not None:
            state.save(force=True)
        self.drift.pop(name, None)
        self._cal.pop(name, None)

    def flush(self) -> None:
        """Write every changed online state now (shutdown)."""
        for state in self.online.values():
            state.save(force=True)
