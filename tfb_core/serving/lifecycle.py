"""One state machine for every adapter that is not simply served: loaded at run time, searched after
start-up, and every unload. :class:`~tfb_core.serving.pool.AdapterPool` and the server's load and
unload routes only ask it.

    loading ──install──► searching ──searched──► calibrating ──calibrated──► ready
       │   (sigma fixed or cached: the install goes on to calibrating or ready at once;
       │    calibrating only where the server calibrates before it serves)
       │                     └──search failed──► failed ──the name loaded again──► gone
       └──files unreadable, caller gone before the install──► gone

    loading, searching, calibrating, ready ──unload──► unloading ──freed──► gone
                      (the free waits until the load is over and no accepted request holds it)

An adapter configured at start-up whose sigma is not known (not the default adapter) enters at
``searching`` (:meth:`Lifecycle.adopt`): the server is ready when the default is.

Every transition is a compare-and-set under one lock (:meth:`Lifecycle._move`): it happens only
if the record is still in a state it expects. The transitions that go with model work (install,
the engine built after the search, a failure's free, unloading → gone) run on the model's worker
in the same step as that work, so no other step of the worker (another load's install, an unload's
free) can fall between the check and the work. ``unload`` itself is a transition on the caller's
thread: requests for the adapter are refused from that moment.

**An unload that meets a load in flight** (state ``loading``: its files are being read, or its
install waits for the worker): the unload wins. The record is ``unloading`` at once (requests for
it: 404; the name stays taken); the load's install step finds it so and installs nothing (if the
install ran already, what it installed is left to the free), and the load ends with
:class:`AdapterUnloadedError` (409 on the server); the unload's free waits until the load is over,
frees whatever was installed and then answers (200). Nothing is left behind: no slot, no record.

**A load whose caller goes away** (its HTTP handler cancelled): once its install is queued on the
worker, the install step does the rest itself (the transitions, the search's thread), so the adapter
is served (or searching) and listed as any other, and can be unloaded; cancelled while its files
were being read, nothing was installed and the record is gone (:meth:`Lifecycle.abandon`).

Two loads of one name: :meth:`Lifecycle.begin` takes the name (or refuses it) with no wait between
the check and the taking; a name is free again only once its record is gone (or failed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from tfb_core.serving import runtime
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.gate import ForwardGate, GateClosedError
from tfb_core.serving.startup import SigmaPlan

log = logging.getLogger(__name__)

State = Literal["loading", "searching", "calibrating", "ready", "unloading", "gone", "failed"]
#: the states a record may leave for each state (``ready`` records are the pool's engines)
TRANSITIONS: dict[State, frozenset[State]] = {
    "loading": frozenset({"searching", "calibrating", "ready", "unloading", "gone"}),
    "searching": frozenset({"calibrating", "ready", "failed", "unloading"}),
    "calibrating": frozenset({"ready", "unloading"}),
    "ready": frozenset({"unloading"}),
    "unloading": frozenset({"gone"}),
    "failed": frozenset({"gone"}),
    "gone": frozenset(),
}
#: states in which an adapter is on its way to answer (503 with Retry-After meanwhile)
COMING: frozenset[State] = frozenset({"loading", "searching", "calibrating"})


class UnknownAdapterError(KeyError):
    """A request named an adapter that is not served."""

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return str(self.args[0])


class AdapterNotReadyError(RuntimeError):
    """A request named an adapter that is being loaded (its sigma search runs): retry later."""

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AdapterBusyError(ValueError):
    """A load of a name that is taken (``state``: what it is doing), or past the limit (``state`` None)."""

    def __init__(self, message: str, state: State | None = None) -> None:
        super().__init__(message)
        self.state = state


class AdapterUnloadedError(RuntimeError):
    """The adapter was unloaded while it loaded: the load ended, nothing of it is left."""


class Worker(Protocol):
    """What the lifecycle needs of the model's thread (the server's ``ModelWorker``)."""

    def add_background(self, step: Callable[[], bool], on_done: Callable[[], None],
                       ready: Callable[[], bool] | None = None, awaited: bool = False) -> None: ...

    def wake(self) -> None: ...

    def holds(self, engine: TFBEngine) -> bool: ...


@dataclass(eq=False)
class RuntimeAdapter:
    """An adapter while it is not (or no longer) ready: its state, why it failed, the progress of its
    sigma search, and what of it is in the model (its classifier, its engine once it has one)."""

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
    #: its load is in flight (reading, or its install not yet run): an unload's free waits for it
    loading: bool = False
    #: a start-up adapter's search, left for :meth:`Lifecycle.attach` to start
    prepared: Any = None

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


def _nothing() -> None:
    return None


class Lifecycle:
    """The adapters of one pool that are not simply served (``records``), and every transition.

    ``engines``: the served adapters (the pool's), ``default`` the default adapter's engine (never
    unloaded). :attr:`engines` and :attr:`records` are replaced, never changed in place (under the
    lock): a reader on another thread iterates a snapshot that no transition changes under it."""

    def __init__(self, engines: dict[str, TFBEngine], default: TFBEngine) -> None:
        #: the adapters that answer requests, by name
        self.engines: dict[str, TFBEngine] = dict(engines)
        self.default = default
        #: loading, searching, calibrating, failed (until the name is loaded again), unloading
        self.records: dict[str, RuntimeAdapter] = {}
        #: generators whose kept rows (a chat head's keys and values) an adapter's free drops
        self.generators: list[Any] = []
        self._lock = threading.RLock()
        self._worker: Worker | None = None
        self._on_ready: Callable[[TFBEngine], None] = lambda engine: None
        self.background_calibration = True

    # --- queries (any thread) ---------------------------------------------------------------------
    def state(self, name: str) -> State:
        """``name``'s state (``KeyError`` for a name neither served nor in a record)."""
        with self._lock:  # served, or a record: never neither in between
            if name in self.engines:
                return "ready"
            return self.records[name].state

    def coming(self) -> list[str]:
        """Names of the adapters on their way to answer."""
        return [n for n, r in self.records.items() if r.state in COMING]

    def occupied(self) -> int:
        """Adapters that count against the limit: served, loading, or unloading (not failed)."""
        return len(self.engines) + sum(r.state != "failed" for r in self.records.values())

    def get(self, name: str) -> TFBEngine:
        """The engine serving ``name``, or why there is none: loading (503), failed or unknown (404)."""
        with self._lock:  # the engine and the record change together
            engine = self.engines.get(name)
            if engine is not None:
                return engine
            record = self.records.get(name)
        if record is not None and record.state in COMING:
            raise AdapterNotReadyError(f"adapter {name!r} is loading ({record.state}): retry later; /info shows "
                                       "its progress")
        if record is not None and record.state == "failed":
            raise UnknownAdapterError(f"adapter {name!r} failed to load: {record.detail}; this server serves "
                                      f"{list(self.engines)}")
        raise UnknownAdapterError(f"unknown adapter {name!r}: this server serves {list(self.engines)}")

    # --- set-up -----------------------------------------------------------------------------------
    def attach(self, worker: Worker, on_ready: Callable[[TFBEngine], None] | None = None,
               background_calibration: bool = True) -> None:
        """Run on ``worker`` from now on; ``on_ready(engine)`` (on the worker) when an adapter begins
        to answer; ``background_calibration``: a ready adapter's calibration runs while it answers
        (else it stays ``calibrating``, 503). Starts the searches of adopted start-up adapters."""
        self._worker = worker
        self._on_ready = on_ready or (lambda engine: None)
        self.background_calibration = background_calibration
        for record in list(self.records.values()):
            if record.state == "searching" and record.prepared is not None:
                prepared, record.prepared = record.prepared, None
                clf = record.classifier
                if clf.forward_overhead_tokens is None:  # as a runtime load's install: the default's
                    clf.forward_overhead_tokens = self.default.classifier.forward_overhead_tokens
                self._start_search(record, prepared, "searching")

    def adopt(self, name: str, cfg: EngineConfig, plan: SigmaPlan, classifier: Any) -> RuntimeAdapter:
        """A start-up adapter whose sigma is still to search: ``searching`` from now on, its search
        started by :meth:`attach` (in the background, as a runtime load's)."""
        record = RuntimeAdapter(name, cfg, state="searching", classifier=classifier)
        record.prepared = runtime.prepared_of(record, plan, classifier)
        with self._lock:
            if name in self.engines or name in self.records:
                raise AdapterBusyError(f"adapter {name!r} is already {self.state(name)}", self.state(name))
            self.records = {**self.records, name: record}
        return record

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            raise RuntimeError("the lifecycle runs on a worker: attach() it first")
        return self._worker

    # --- transitions --------------------------------------------------------------------------------
    def _move(self, record: RuntimeAdapter, sources: Collection[State], target: State) -> bool:
        """Compare-and-set: ``record`` goes to ``target`` only if it is in one of ``sources``."""
        with self._lock:
            return self._move_locked(record, sources, target)

    def _move_locked(self, record: RuntimeAdapter, sources: Collection[State], target: State) -> bool:
        if record.state not in sources:
            return False
        assert target in TRANSITIONS[record.state], f"{record.state} -> {target}"
        record.state = target
        if target == "ready":
            self.engines = {**self.engines, record.name: record.engine}  # type: ignore[dict-item]
        if target in ("ready", "gone") and self.records.get(record.name) is record:
            self.records = {n: r for n, r in self.records.items() if r is not record}
        return True

    def begin(self, name: str, cfg: EngineConfig, limit: int | None = None) -> RuntimeAdapter:
        """A load takes ``name`` (a failed load of that name is forgotten): its record, ``loading``.
        :class:`AdapterBusyError` if the name is taken or ``limit`` adapters are counted."""
        with self._lock:
            taken = self.records.get(name)
            if name in self.engines or (taken is not None and taken.state != "failed"):
                state = self.state(name)
                raise AdapterBusyError(f"adapter {name!r} is {state}", state)
            if limit is not None and self.occupied() >= limit:
                raise AdapterBusyError(f"{self.occupied()} adapters are served, the limit is {limit}")
            if taken is not None:  # failed: its memory was freed when it failed
                self._move_locked(taken, ("failed",), "gone")
            record = RuntimeAdapter(name, cfg, loading=True)
            self.records = {**self.records, name: record}
        return record

    def abandon(self, record: RuntimeAdapter) -> None:
        """The load ended before its install was queued (its files failed to read, or its caller
        went away): nothing was installed. The record goes (an unload waiting on it frees nothing)."""
        with self._lock:
            record.loading = False
            self._move_locked(record, ("loading",), "gone")
        if self._worker is not None:
            self._worker.wake()  # an unload's free may be waiting for the load to be over

    def install(self, record: RuntimeAdapter, prepared: runtime.Prepared) -> State:
        """On the worker: put the prepared adapter into the model's forwards and move it on (ready,
        calibrating, or searching with its search started). :class:`AdapterUnloadedError` if it was
        unloaded meanwhile (what was installed is then the unload's to free)."""
        try:
            if record.state != "loading":
                raise AdapterUnloadedError(f"adapter {record.name!r} was unloaded while it loaded")
            clf, engine = runtime.install(self.default.classifier, prepared)
            record.classifier = clf
            moved = self._serve(record, engine, "loading") if engine is not None \
                else self._start_search(record, prepared, "loading")
            if not moved:
                raise AdapterUnloadedError(f"adapter {record.name!r} was unloaded while it loaded")
            return record.state
        except BaseException:
            self._move(record, ("loading",), "gone")  # a failed install changed nothing
            raise
        finally:
            record.loading = False
            self.worker.wake()

    def _serve(self, record: RuntimeAdapter, engine: TFBEngine, source: State) -> bool:
        """On the worker: the adapter answers from now on (or, if the server calibrates before it
        serves, once its calibration is done)."""
        engine.name = record.name
        record.engine = engine
        run = engine.calibration_run
        if run is None or run.state != "running" or self.background_calibration:
            return self._ready(record, engine, source)
        if not self._move(record, (source,), "calibrating"):
            return False

        def step() -> bool:
            done = True
            try:
                done = run.step()  # a failed calibration answers 503 on alpha and max_risk: it serves
            finally:
                if done:
                    self._ready(record, engine, "calibrating")
            return done

        self.worker.add_background(step, _nothing)
        return True

    def _ready(self, record: RuntimeAdapter, engine: TFBEngine, source: State) -> bool:
        if not self._move(record, (source,), "ready"):
            return False
        self._on_ready(engine)
        log.info("adapter %s ready in %.1fs: sigma=%.6g (%s)", record.name, time.monotonic() - record.started,
                 engine.sigma, engine.sigma_source)
        return True

    def _start_search(self, record: RuntimeAdapter, prepared: runtime.Prepared, source: State) -> bool:
        """On the worker (or before it runs): ``searching``, the search on a thread of its own, each
        forward run by the worker through a gate."""
        worker = self.worker
        gate = ForwardGate(on_queued=worker.wake)
        with self._lock:
            if record.state != source:
                return False
            if source != "searching":
                self._move_locked(record, (source,), "searching")
            record.gate, record.cancel = gate, gate.close
        worker.add_background(gate.step, _nothing, ready=gate.ready)
        threading.Thread(target=self._search, args=(record, prepared, gate), daemon=True,
                         name=f"tfb-sigma-search-{record.name}").start()
        return True

    def _search(self, record: RuntimeAdapter, prepared: runtime.Prepared, gate: ForwardGate) -> None:
        """The sigma search, on its own thread; its engine is served in the worker's step that builds it."""
        try:
            runtime.search(prepared, record.classifier, gate,
                           then=lambda engine: self._serve(record, engine, "searching"))
        except BaseException as exc:  # noqa: BLE001 -- every failure is the adapter's, shown in /info
            reason = str(exc) if isinstance(exc, GateClosedError) else f"sigma search: {type(exc).__name__}: {exc}"
            if not isinstance(exc, GateClosedError):
                log.exception("adapter %s: the sigma search failed", record.name)
            self.worker.add_background(lambda: self._failed(record, reason), _nothing)
        finally:
            gate.close("the sigma search is over")

    def _failed(self, record: RuntimeAdapter, reason: str) -> bool:
        """On the worker: a search failed (unless the adapter was unloaded meanwhile): listed with its
        reason until the name is loaded again, its memory freed now."""
        if not self._move(record, ("searching",), "failed"):
            return True  # unloaded meanwhile: the unload frees it
        log.error("adapter %s failed to load: %s", record.name, reason)
        record.detail = reason
        self._free(record)
        return True

    def _free(self, record: RuntimeAdapter) -> None:
        """On the worker: whatever of ``record`` is in the model."""
        clf, engine = record.classifier, record.engine
        record.classifier = record.engine = record.gate = None
        record.weights_bytes = 0
        if clf is not None:
            runtime.unload(clf, engine, self.generators)

    def unload(self, name: str, on_gone: Callable[[], None] = _nothing) -> RuntimeAdapter:
        """Begin the unload of ``name`` (any thread): it answers no new request (404) from now on and
        its background work stops; the worker frees it once its load is over and no accepted request
        holds it, then ``on_gone()`` runs (on the worker's event loop; also if the worker stops before the
        free, the record's state then not ``gone``). ``UnknownAdapterError`` for a
        name not served or loading; ``ValueError`` for the default adapter."""
        if name == self.default.name:
            raise ValueError(f"adapter {name!r} is the default adapter: it cannot be unloaded")
        with self._lock:
            engine = self.engines.get(name)
            record = self.records.get(name)
            if engine is not None:  # a served adapter (runtime or start-up): a record again
                self.engines = {n: e for n, e in self.engines.items() if n != name}
                record = RuntimeAdapter(name, engine.cfg, state="ready", engine=engine, classifier=engine.classifier)
                self.records = {**self.records, name: record}
            if record is None or not self._move_locked(record, ("loading", "searching", "calibrating", "ready"),
                                                      "unloading"):
                raise UnknownAdapterError(f"unknown adapter {name!r}: this server serves {list(self.engines)}")
        if record.cancel is not None:
            record.cancel(f"adapter {name!r} was unloaded")
        run = record.engine.calibration_run if record.engine is not None else None
        if run is not None and run.state == "running":  # its next step does nothing
            run.state, run.error = "failed", f"adapter {name!r} was unloaded"
        worker = self.worker

        def free() -> bool:
            try:
                self._free(record)
            finally:  # a free that broke (logged by the worker) must not hold the name forever
                self._move(record, ("unloading",), "gone")
            return True

        def ready() -> bool:  # the worker's lock is held: read, never lock
            engine = record.engine
            return not record.loading and (engine is None or not worker.holds(engine))

        # awaited: it runs during a drain too; if the worker stops first, on_gone() runs without it
        # (the record then is not "gone", and the caller says so)
        worker.add_background(free, on_gone, ready=ready, awaited=True)
        return record

    def cancel_all(self, reason: str) -> None:
        """Stop every background search (shutdown)."""
        for record in list(self.records.values()):
            if record.cancel is not None:
                record.cancel(reason)

