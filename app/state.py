"""The state one app shares between its routes, its lifespan and its worker (``app.state.tfb``)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any, Literal

from prometheus_client import CollectorRegistry

from app.batching import BatchLimits, ModelWorker
from app.errors import NotReadyError
from app.metrics import Metrics
from app.middleware import Expiry
from app.online import Monitors
from app.predictor import FeedbackStore, LabelStore, Predictor
from app.settings import Settings
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.pool import AdapterPool
from tfb_core.serving.startup import load_engine

log = logging.getLogger("app")

Status = Literal["loading", "ready", "failed", "draining"]


class AppState:
    """Everything the routes share, set up once per app (``app.state.tfb``)."""

    def __init__(self, settings: Settings, feedback_store: LabelStore | None = None, shared_online: Any = None) -> None:
        self.settings = settings
        self.store = feedback_store if feedback_store is not None else FeedbackStore(settings.feedback_store_size)
        self.engine_configs = settings.engine_configs()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, settings.recent_window)
        #: online prediction sets and drift tests of the adapters (built from their calibrations)
        self.monitors = Monitors.of(settings, self.metrics, shared_online)
        self.status: Status = "loading"
        self.error: str | None = None
        self.started = time.monotonic()
        self.predictor: Predictor | None = None
        #: set when the drain's deadline passes: requests still running are answered 503 (middleware)
        self.expiry = Expiry()
        limits = BatchLimits(max_rows=settings.max_batch_rows, max_wait_s=settings.max_wait_ms / 1000.0,
                             max_queue=settings.max_queue, timeout_s=settings.request_timeout_s)
        self.worker = ModelWorker(self._load, limits, self.metrics, self._ready, self._failed, settings.warmup)

    def _load(self) -> AdapterPool:  # on the worker thread
        named = [(name, cfg.with_defaults()) for name, cfg in self.engine_configs]
        for name, cfg in named:
            log.info("adapter %s: %s on model %s (task %s)", name, cfg.model.adapter, cfg.model.model,
                     cfg.task or f"generic {list(cfg.labels or ())}")
        background = self.settings.calibrate_in_background
        if len(named) == 1:
            engine = load_engine(named[0][1], background_calibration=background)
            engine.name = named[0][0]
            return AdapterPool([engine])
        # the default adapter is searched now, the others in the background once the server is ready
        return AdapterPool.load(named, background_calibration=background, search_in_background=True)

    def _ready(self, adapters: AdapterPool) -> None:
        self.predictor = Predictor(adapters, self.worker, self.settings, self.metrics, self.store, self.monitors)
        for engine in adapters.engines.values():
            self.serve_engine(engine)
        # from now on every load, search and unload runs on the worker (start-up's deferred searches begin)
        adapters.lifecycle.attach(self.worker, self.serve_engine, self.settings.calibrate_in_background)
        if self.status == "loading":
            self.status = "ready"
            self.metrics.ready.set(1)
        for engine in adapters.engines.values():
            log.info("ready in %.1fs: adapter %s, sigma=%.6g (%s), N=%d, %d LoRA modules",
                     time.monotonic() - self.started, engine.name, engine.sigma, engine.sigma_source,
                     engine.cfg.n_samples, len(engine.classifier.posterior.modules))

    def serve_engine(self, engine: TFBEngine) -> None:
        """An adapter answers: its metric series, and its calibration left to run between batches
        (on the event loop at start-up, on the worker when a load or search ends)."""
        self.metrics.set_adapter(engine.name, engine.sigma, engine.cfg.n_samples)
        self._calibrated(engine)
        if (run := engine.calibration_run) is not None and run.state == "running":
            self.worker.add_background(run.step, lambda engine=engine: self._calibrated(engine))

    def _calibrated(self, engine: TFBEngine) -> None:
        """The calibration's drift reference as gauges (none while it is still running, or without one)."""
        if self.predictor is not None and self.predictor.adapters.engines.get(engine.name) is not engine:
            return  # unloaded meanwhile: its series are gone
        cal = engine.calibration
        self.metrics.set_calibration_reference(engine.name, cal and cal.mean_predictive_entropy,
                                               cal and cal.mean_mutual_information)
        self.monitors.drift_tests(engine)  # a new calibration: new drift tests (and online state), from 0

    def _failed(self, exc: BaseException) -> None:
        self.status = "failed"
        self.error = f"start-up failed: {exc}"
        # called on the loop, outside the worker's except block: the traceback is the exception's own
        # (exc_info=True here would log "NoneType: None")
        log.critical("%s", self.error, exc_info=None if isinstance(exc, (ValueError, RuntimeError)) else exc)
        if self.settings.exit_on_startup_failure:
            for handler in logging.getLogger().handlers + log.handlers:
                handler.flush()
            print(f"tfb-serve: {self.error}", file=sys.stderr, flush=True)
            os._exit(1)  # the server cannot serve; uvicorn would otherwise exit 0 on a signal

    def require_predictor(self) -> Predictor:
        if self.status == "ready" and self.predictor is not None:
            return self.predictor
        if self.status == "failed":
            raise NotReadyError(f"the model is not available: {self.error}")
        if self.status == "draining":
            raise NotReadyError("the server is shutting down")
        raise NotReadyError("the model is still loading: retry when /readyz answers 200")

    def begin_drain(self) -> None:
        """Shutdown begins (the server's signal handler): refuse new work, and TFB_DRAIN_TIMEOUT_S from
        now answer whatever is still running 503 with Retry-After. Idempotent; on the event loop."""
        if self.status == "ready":
            self.status = "draining"
        self.expiry.draining = True
        self.metrics.ready.set(0)
        if self.worker.begin_drain(self.settings.drain_timeout_s):
            asyncio.get_running_loop().call_later(self.settings.drain_timeout_s, self.expiry.set)

    async def shutdown(self) -> None:
        """The lifespan's end: drain (from :meth:`begin_drain`'s deadline if it ran), stop the worker."""
        self.begin_drain()  # under Ray Serve or plain uvicorn, the drain's clock starts here
        if self.predictor is not None:  # background sigma searches stop
            self.predictor.adapters.lifecycle.cancel_all("the server is shutting down")
        await self.worker.drain(self.settings.drain_timeout_s)
        self.monitors.flush()  # the online sets' last labels, written
