"""The adapters a server serves: named engines on one base model, the first the default.

:class:`AdapterPool` is the one place an adapter's name resolves to its engine (``/predict``'s
``adapter``, ``/classify``'s ``model``, ``/v1/models``); it runs every adapter's requests in shared
forwards and warms them all up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from tfb_core.data.loading import LoadError
from tfb_core.serving.batch import BatchRequest, ForwardHook, run_batch
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.lifecycle import (  # noqa: F401 -- the pool's errors and records, where callers look
    AdapterNotReadyError,
    Lifecycle,
    RuntimeAdapter,
    State,
    UnknownAdapterError,
)
from tfb_core.serving.startup import Unsearched, load_adapters


def check_names(names: Sequence[str]) -> None:
    """Adapter names must be unique: ``ValueError`` naming the repeated ones."""
    dup = sorted(n for n, count in Counter(names).items() if count > 1)
    if dup:
        raise ValueError(f"adapter names must be unique, repeated: {dup}")


class AdapterPool:
    """Named engines (adapters) on one base model, the first the default: what a server serves.

    Each engine is one adapter's whole state (weights, sigma, task, posterior, calibration); the
    pool routes a request to its engine and runs every engine's requests in shared forwards.
    """

    def __init__(self, engines: Sequence[TFBEngine]) -> None:
        if not engines:
            raise ValueError("no adapter to serve")
        check_names([e.name for e in engines])
        self.default = engines[0]
        #: the adapters that do not simply answer (loading, searching, calibrating, failed, unloading):
        #: every load, search and unload goes through it
        self.lifecycle = Lifecycle({e.name: e for e in engines}, self.default)

    @classmethod
    def load(cls, named: Sequence[tuple[str, EngineConfig]], progress: bool = True,
             background_calibration: bool = False, search_in_background: bool = False) -> AdapterPool:
        """The pool of ``named`` adapters on one base model (:func:`~tfb_core.serving.startup.load_adapters`).
        ``search_in_background``: an adapter other than the default whose sigma must be searched is
        not searched now but left ``searching`` in :attr:`lifecycle`, which searches it in the
        background once it runs on a worker (:meth:`Lifecycle.attach`)."""
        try:
            check_names([n for n, _ in named])  # before loading anything
        except ValueError as exc:
            raise LoadError(str(exc)) from None
        loaded = load_adapters(named, progress, background_calibration, search_later=search_in_background)
        pool = cls([e for e in loaded if isinstance(e, TFBEngine)])
        for later in loaded:
            if isinstance(later, Unsearched):
                pool.lifecycle.adopt(later.name, later.plan.cfg, later.plan, later.classifier)
        return pool

    @property
    def engines(self) -> dict[str, TFBEngine]:
        """The adapters that answer requests, by name (a snapshot: the lifecycle replaces it, never
        changes it; read only)."""
        return self.lifecycle.engines

    @property
    def pending(self) -> dict[str, RuntimeAdapter]:
        """The adapters that do not answer (yet, or any more), by name (:attr:`Lifecycle.records`: a
        snapshot, read only)."""
        return self.lifecycle.records

    @property
    def names(self) -> list[str]:
        return list(self.engines)

    def get(self, name: str | None, base_model_alias: bool = False) -> TFBEngine:
        """The engine of adapter ``name``; None is the default adapter, and with ``base_model_alias``
        so are "" and the base model's id (vLLM serves the base model under its id). Another name:
        :class:`UnknownAdapterError` naming the served ones."""
        if name is None or (base_model_alias and name in ("", self.default.cfg.model.model)):
            return self.default
        engine = self.engines.get(name)
        return engine if engine is not None else self.lifecycle.get(name)

    # --- adapters at run time ---------------------------------------------------------------------
    def listed(self) -> list[str]:
        """Names /v1/models lists: the served adapters, then those still loading."""
        return self.names + self.lifecycle.coming()

    def state(self, name: str) -> State:
        return self.lifecycle.state(name)

    def occupied(self) -> int:
        """Adapters that count against the limit: served, loading, or unloading (not failed)."""
        return self.lifecycle.occupied()

    def rows(self, n_inputs: int, n_samples: int, name: str | None = None) -> int:
        return self.get(name).rows(n_inputs, n_samples)

    def run_batch(self, requests: Sequence[BatchRequest], max_rows: int,
                  on_forward: ForwardHook | None = None) -> list[torch.Tensor | Exception]:
        """Requests of any adapter (``BatchRequest.engine``, None: the default) in shared forwards."""
        return run_batch(self.default, requests, max_rows, on_forward)

    def warm_up(self, max_rows: int) -> float | None:
        """The first classifying adapter's warm-up (and measured forward cost: one base model, one
        cost for all), then the first forward of each other adapter."""
        engines = list(self.engines.values())
        # the one measurement is a classifying adapter's (a generative one's forwards are not planned so)
        first = next((e for e in engines if not e.task.generative), engines[0])
        overhead = first.warm_up(max_rows)
        for engine in engines:
            if engine is first:
                continue
            if engine.cfg.forward_overhead_tokens is None:
                engine.classifier.forward_overhead_tokens = first.classifier.forward_overhead_tokens
            engine.first_forward()
        return overhead
