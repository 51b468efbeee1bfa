"""The adapters a server serves: named engines on one base model, the first the default.

:class:`AdapterPool` is the one place an adapter's name resolves to its engine (``/predict``'s
``adapter``, ``/classify``'s ``model``, ``/v1/models``); it runs every adapter's requests in shared
forwards and warms them all up.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tfb_core.data.loading import LoadError
from tfb_core.serving.batch import BatchRequest, ForwardHook, run_batch
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.startup import load_engines


def check_names(names: Sequence[str]) -> None:
    """Adapter names must be unique: ``ValueError`` naming the repeated ones."""
    dup = sorted(n for n, count in Counter(names).items() if count > 1)
    if dup:
        raise ValueError(f"adapter names must be unique, repeated: {dup}")


class UnknownAdapterError(KeyError):
    """A request named an adapter that is not served."""

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return str(self.args[0])


class AdapterNotReadyError(RuntimeError):
    """A request named an adapter that is being loaded (its sigma search runs): retry later."""

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


#: an adapter loaded at run time, from its load request to ready: reading and installing its weights,
#: its sigma search, its calibration (only when the server calibrates before serving), or failed;
#: an adapter being unloaded answers what it accepted, and nothing new
State = Literal["loading", "searching", "calibrating", "ready", "failed", "unloading"]


@dataclass(eq=False)
class RuntimeAdapter:
    """An adapter loaded at run time while it is not (or no longer) ready: its state, why it failed,
    the progress of its sigma search, and its engine once it has one."""

    name: str
    cfg: EngineConfig
    state: State = "loading"
    detail: str | None = None
    #: the sigma search's progress: evaluations, sigmas tried, forwards run
    progress: dict[str, Any] = field(default_factory=dict)
    engine: TFBEngine | None = None
    #: what the adapter holds before it has an engine (bytes of its A', B', d), for /info
    weights_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    #: stops its background work (closes the search's gate), called at unload and shutdown
    cancel: Any = None
    #: its classifier once it is in the model's forwards, and its search's gate
    classifier: Any = None
    gate: Any = None

    def info(self) -> dict[str, Any]:
        """What /info says of it."""
        m = self.cfg.model
        out: dict[str, Any] = {"name": self.name, "state": self.state, "adapter": m.adapter,
                               "adapter_subfolder": m.adapter_subfolder, "published": self.cfg.published,
                               "task": self.cfg.task, "anchor": self.cfg.anchor,
                               "seconds": round(time.monotonic() - self.started, 1)}
        if self.progress or self.gate is not None:
            out["search_progress"] = dict(self.progress)
            if self.gate is not None:  # live: the forwards run so far
                out["search_progress"]["forwards"] = self.gate.forwards
        if self.detail:
            out["detail"] = self.detail
        if self.weights_bytes:
            out["memory"] = {"weights_bytes": self.weights_bytes, "noise_bytes": 0,
                             "total_bytes": self.weights_bytes}
        return out


class AdapterPool:
    """Named engines (adapters) on one base model, the first the default: what a server serves.

    Each engine is one adapter's whole state (weights, sigma, task, posterior, calibration); the
    pool routes a request to its engine and runs every engine's requests in shared forwards.
    """

    def __init__(self, engines: Sequence[TFBEngine]) -> None:
        if not engines:
            raise ValueError("no adapter to serve")
        check_names([e.name for e in engines])
        #: the adapters that answer requests, by name
        self.engines: dict[str, TFBEngine] = {e.name: e for e in engines}
        self.default = engines[0]
        #: adapters loaded at run time that do not answer (yet, or any more): loading, searching,
        #: calibrating, failed (until the name is loaded again), unloading
        self.pending: dict[str, RuntimeAdapter] = {}

    @classmethod
    def load(cls, named: Sequence[tuple[str, EngineConfig]], progress: bool = True,
             background_calibration: bool = False) -> AdapterPool:
        try:
            check_names([n for n, _ in named])  # before loading anything
        except ValueError as exc:
            raise LoadError(str(exc)) from None
        return cls(load_engines(named, progress, background_calibration))

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
        if engine is not None:
            return engine
        pending = self.pending.get(name)
        if pending is not None and pending.state in ("loading", "searching", "calibrating"):
            raise AdapterNotReadyError(f"adapter {name!r} is loading ({pending.state}): retry later; /info shows "
                                       "its progress")
        if pending is not None and pending.state == "failed":
            raise UnknownAdapterError(f"adapter {name!r} failed to load: {pending.detail}; this server serves "
                                      f"{self.names}")
        raise UnknownAdapterError(f"unknown adapter {name!r}: this server serves {self.names}")

    # --- adapters at run time ---------------------------------------------------------------------
    def listed(self) -> list[str]:
        """Names /v1/models lists: the served adapters, then those still loading."""
        return self.names + [n for n, p in self.pending.items() if p.state in ("loading", "searching", "calibrating")]

    def state(self, name: str) -> State:
        if name in self.engines:
            return "ready"
        return self.pending[name].state

    def occupied(self) -> int:
        """Adapters that count against the limit: served, loading, or unloading (not failed)."""
        return len(self.engines) + sum(p.state != "failed" for p in self.pending.values())

    def begin(self, record: RuntimeAdapter) -> None:
        """A load begins under ``record.name`` (a failed load of that name is forgotten);
        ``ValueError`` if the name is taken."""
        if record.name in self.engines or (record.name in self.pending and self.pending[record.name].state != "failed"):
            raise ValueError(f"adapter {record.name!r} is already {self.state(record.name)}: unload it first, or "
                             "choose another name")
        self.pending[record.name] = record

    def ready(self, record: RuntimeAdapter, engine: TFBEngine) -> None:
        """A runtime load is done: ``engine`` answers under its name from now on."""
        engine.name = record.name
        record.engine, record.state = engine, "ready"
        if self.pending.get(record.name) is record:
            del self.pending[record.name]
        self.engines[record.name] = engine

    def fail(self, record: RuntimeAdapter, reason: str) -> None:
        """A runtime load failed: listed with its reason (/info) until the name is loaded again."""
        record.state, record.detail, record.engine = "failed", reason, None
        if self.pending.get(record.name) is record:
            record.weights_bytes = 0

    def unlisted(self, name: str) -> RuntimeAdapter:
        """Begin the unload of ``name``: it answers no new request (404) from now on. Returns its
        record (state "unloading"; with the engine, if it had one). ``UnknownAdapterError`` for a
        name not served or loading; ``ValueError`` for the default adapter."""
        if name == self.default.name:
            raise ValueError(f"adapter {name!r} is the default adapter: it cannot be unloaded")
        engine = self.engines.pop(name, None)
        record = self.pending.get(name)
        if engine is None and (record is None or record.state in ("failed", "unloading")):
            raise UnknownAdapterError(f"unknown adapter {name!r}: this server serves {self.names}")
        if record is None:
            record = RuntimeAdapter(name, engine.cfg, engine=engine)  # type: ignore[union-attr]
            self.pending[name] = record
        record.state = "unloading"
        return record

    def forget(self, record: RuntimeAdapter) -> None:
        """The unload is done: nothing of the adapter is listed any more."""
        if self.pending.get(record.name) is record:
            del self.pending[record.name]

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
