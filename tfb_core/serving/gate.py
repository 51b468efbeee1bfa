"""A background thread's forwards, run one at a time by the thread that owns the model.

    search thread                              model's thread (the server's worker)
    -------------                              ------------------------------------
    gate.run(forward)  -> queued, waits        between batches, when nothing is queued (and under
                                               steady traffic, every few batches or decode steps):
                                               gate.ready() -> gate.step(): one forward
                       <- its result           serving requests in between any two of them

A σ search is a few calls of an objective that each run many forwards; handing each forward to the
model's thread (:attr:`BayesianClassifier.forward_runner`) lets the search run unchanged beside
serving: only the model's thread touches the model, a request waits for at most one of the
search's forwards, and the search gets a bounded share of a busy model thread (it is never
starved). :meth:`ForwardGate.pause` holds the forwards (the search waits; serving goes on).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any


class GateClosedError(RuntimeError):
    """The gate was closed (the adapter was unloaded, the server is shutting down): no more forwards."""


class _Call:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class ForwardGate:
    """Forwards queued by other threads (:meth:`run`), run by the model's thread (:meth:`step`).

    ``on_queued()``, called (outside the gate's lock) whenever a forward is queued or the gate is
    resumed, wakes the model's thread."""

    def __init__(self, on_queued: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._calls: deque[_Call] = deque()
        self._open = True
        self._closed: str | None = None
        self.on_queued = on_queued
        #: forwards run so far (progress)
        self.forwards = 0

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on the model's thread; blocks until it has run. Its error is raised here;
        :class:`GateClosedError` once the gate is closed."""
        call = _Call(fn)
        with self._lock:
            if self._closed is not None:
                raise GateClosedError(self._closed)
            self._calls.append(call)
        if self.on_queued is not None:
            self.on_queued()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def ready(self) -> bool:
        """Whether :meth:`step` has a forward to run now (queued, and the gate not paused)."""
        return self._closed is not None or (self._open and bool(self._calls))

    def step(self) -> bool:
        """Run one queued forward (on the model's thread); True once the gate is closed and empty
        (its background work is over)."""
        with self._lock:
            if not self._open or not self._calls:
                return self._closed is not None
            call = self._calls.popleft()
        try:
            call.result = call.fn()
            self.forwards += 1
        except BaseException as exc:  # noqa: BLE001 -- the caller's error, raised in its own thread
            call.error = exc
        finally:
            call.done.set()
        return False

    def pause(self) -> None:
        """Hold the queued forwards (the caller waits) until :meth:`resume`."""
        self._open = False

    def resume(self) -> None:
        self._open = True
        if self.on_queued is not None:
            self.on_queued()

    def close(self, reason: str) -> None:
        """No more forwards: the waiting and later :meth:`run` calls raise :class:`GateClosedError`."""
        with self._lock:
            self._closed = reason
            calls, self._calls = list(self._calls), deque()
        for call in calls:
            call.error = GateClosedError(reason)
            call.done.set()

    @property
    def closed(self) -> bool:
        return self._closed is not None
