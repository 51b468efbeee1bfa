"""What keeps decisions honest after deployment: online prediction sets and drift alarms, per adapter.

* :class:`AdapterOnline`: an adapter's online conformal state (:mod:`tfb_core.decide.online`),
  one :class:`~tfb_core.decide.online.OnlineSets` per requested alpha (each alpha's own trackers:
  one alpha's labels never move another's), started at the split-conformal quantiles of the
  adapter's calibration and moved by the labels of /feedback. Written atomically under the cache
  (``online/<key>.json``, :func:`tfb_core.search.cache.save_json`), keyed by the calibration's content, the
  score, Mondrian and eta: a restart restores it (logged, and in /info, with when, by which
  process, after how many labels); a new calibration starts afresh.
* :class:`AdapterDrift`: two conformal test martingales (:mod:`tfb_core.decide.drift`): label-free on
  every served prediction's 1 - confidence, and on the true label's score as labels arrive; both
  against the calibration set, both reset with it.

Scope of a state: one process, or (``shared``: deploy/ray/serve_app.py's actor under Ray Serve)
every replica. Shared, the actor holds the state and applies every label, whichever replica it
reaches; each replica serves from its mirror of the actor's state (a snapshot of its history,
pulled at most ``refresh_s`` old), so the thresholds a prediction was served with are the actor's
at the update count stored with it, and the delay D the bound counts includes the mirror's lag.
A label of a prediction made before its replica joined the shared state (``state_id``), or made
by a state since replaced (a restart without the actor, a new calibration), is not applied: for
the bound it is an unlabelled prediction.
"""

from __future__ import annotations

import asyncio
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

from tfb_core.data.loading import default_cache_dir
from tfb_core.data.tasks import TaskError
from tfb_core.decide.conformal import Calibration, nonconformity
from tfb_core.decide.drift import DriftMonitor
from tfb_core.decide.online import OnlineSets, Served, coverage_bound, effective_alpha
from tfb_core.search import cache
from tfb_core.serving.engine import TFBEngine

log = logging.getLogger(__name__)

KIND = "online"
#: what an online set promises (the response's ``conformal.guarantee``; split conformal's: ``split_conformal``)
ONLINE = "online_long_run"


def alpha_key(alpha: float) -> str:
    return repr(float(alpha))


class AdapterOnline:
    """One adapter's online sets, per alpha; persisted under the cache."""

    def __init__(self, engine: TFBEngine, cal: Calibration, max_alphas: int, save_interval_s: float,
                 shared: Any = None, refresh_s: float = 1.0) -> None:
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
        self.shared, self.refresh_s = shared, refresh_s
        self.key_text = cache.canonical(self.key)
        self._pulled_at = -math.inf
        if shared is not None:  # the actor's state if it has one, else ours becomes it
            self._spawn(self._attach())

    # --- the shared state (several replicas) ---------------------------------------------------
    @staticmethod
    def _spawn(coro: Any) -> None:
        try:
            asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no event loop (a library caller): nothing shared
            coro.close()

    async def _attach(self) -> None:
        try:
            got = await self.shared.attach(self.key_text, self.state_id,
                                           {k: v.to_dict() for k, v in self.alphas.items()})
        except Exception as exc:  # the actor unreachable: this replica's own state, said in the log
            log.warning("adapter %s: the shared online conformal state is unreachable (%s): serving this "
                        "replica's own", self.adapter, exc)
            return
        self._adopt(got)

    def _adopt(self, got: dict[str, Any] | None) -> None:
        """Take the actor's state (a snapshot of its history): its id, and each alpha's trackers
        unless the mirror already has more labels of it (a snapshot that arrived late)."""
        if got is None:
            return
        if got["state_id"] != self.state_id:
            self.state_id, self.alphas = got["state_id"], {}
        for k, d in got["alphas"].items():
            theirs = OnlineSets.from_dict(d)
            mine = self.alphas.get(k)
            if mine is None or sum(t.labelled for t in theirs.trackers) >= sum(t.labelled for t in mine.trackers):
                self.alphas[k] = theirs

    async def _pull(self) -> None:
        try:
            self._adopt(await self.shared.snapshot(self.key_text))
        except Exception as exc:
            log.warning("adapter %s: could not read the shared online conformal state (%s)", self.adapter, exc)

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
        if self.shared is not None and time.monotonic() - self._pulled_at >= self.refresh_s:
            self._pulled_at = time.monotonic()
            self._spawn(self._pull())
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

    async def label(self, served: Served, probs: list[float], target: int) -> bool | None:
        """Apply one label; its coverage, or None if the prediction is not this state's."""
        score = float(nonconformity(torch.tensor([probs], dtype=torch.float64), self.score)[0, target])
        key = alpha_key(served.alpha)
        if self.shared is not None:  # the actor applies it (it may be another replica's prediction)
            first = OnlineSets.start(served.alpha, self.eta, self.cal.quantiles(served.alpha, self.score,
                                                                                self.mondrian)[0], self.mondrian)
            got = await self.shared.update(self.key_text, served.to_dict(), target, score, first.to_dict())
            if got is None:  # not the actor's state: e.g. the actor restarted empty; (re)join it
                self._spawn(self._attach())
                return None
            self._adopt({"state_id": self.state_id, "alphas": {key: got["state"]}})
            covered = bool(got["covered"])
        else:
            if served.state_id != self.state_id or key not in self.alphas:
                return None
            covered = self.alphas[key].update(target, score, served)
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
                 drift_jump: float = 0.01, metrics: Any = None, shared: Any = None) -> None:
        self.metrics = metrics  # app.metrics.Metrics: the drift gauges start at 0 with each test
        self.shared = shared  # the online sets' state shared across replicas (deploy/ray/serve_app.py)
        self.max_alphas, self.save_interval_s = max_alphas, save_interval_s
        self.drift_delta, self.drift_jump = drift_delta, drift_jump
        self.online: dict[str, AdapterOnline] = {}
        self.drift: dict[str, AdapterDrift] = {}
        self._cal: dict[str, Calibration] = {}

    @classmethod
    def of(cls, settings: Any, metrics: Any = None, shared: Any = None) -> Monitors:
        """Configured by the server's settings (:class:`app.settings.Settings`)."""
        return cls(settings.online_max_alphas, settings.online_save_interval_s, settings.drift_delta,
                   settings.drift_jump, metrics, shared)

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
            state = self.online[engine.name] = AdapterOnline(engine, cal, self.max_alphas, self.save_interval_s,
                                                             self.shared)
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
