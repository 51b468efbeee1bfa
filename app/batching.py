"""The model worker: a queue and one thread that owns the model and coalesces queued requests.

    event loop                         worker thread (owns the engine, hence torch)
    ----------                         --------------------------------------------
    submit(work) -> queue  --------->  wait for the first work, then up to max_wait_ms more
    await future  (timeout)            take whole works while rows <= max_batch_rows
                                       engine.run_batch(requests): tokens, label sets, one noise
                                       draw per seed, forwards planned by length (tfb_core.serving.batch)
    future.set_result  <-------------  finish(probs) per work, resolved on the loop

Rows of an input = N (1 at sigma = 0). Every request keeps its own noise, so its answer does not
depend on which other requests shared its forward. The worker also loads the model (so that
/healthz answers while it loads) and runs the engine's warm-up; and background work (a calibration's
or a sigma search's forward, an adapter's install or free) one step at a time: whenever no request is
queued, and under steady traffic at least once every :data:`BACKGROUND_EVERY` forwards of serving
(a batch's forwards, decode steps), so that a request waits for at most one step and background work is never
starved. During a drain only the background work that a request awaits (an install, an unload's
free: :meth:`ModelWorker.call`) still runs; what is left of it when the worker stops fails with 503.

Generation (:class:`GenWork`, ``submit_generation``): the worker keeps one running decode
(:class:`tfb_core.serving.generation.GenerationBatch`). Each turn of its loop serves the queued
classification batch, if any (without waiting for company while a decode runs), then one decode step
of every running generation: queued generations are prepared (tokenized) and join at that step,
abandoned ones (client gone, timed out) leave it first, and each step's tokens and ended answers are
posted to their requests' queues on the event loop. Generations join while the decode's rows stay
within TFB_MAX_BATCH_ROWS (one bigger request decodes alone), first come first served; the drain
waits for them as for queued requests.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from app.errors import NotReadyError, QueueFullError, RequestTimeoutError
from app.metrics import Metrics
from tfb_core.forward.classifier import Prompt
from tfb_core.serving.batch import BatchRequest
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.generation import GenerationBatch, GenerationService, GenerationUpdate
from tfb_core.serving.pool import AdapterPool

log = logging.getLogger(__name__)

Labels = tuple[str, ...]
#: what the worker loads and serves: one engine, or several adapters' on one base model
Served = TFBEngine | AdapterPool
#: while requests keep the worker busy (the queue never empties, or generations decode), background
#: work that is ready gets one step after this many forwards of serving (a classification batch's
#: forwards: it may be planned as several, by length; a decode step), counted in forwards because a
#: background step is one forward of at most TFB_MAX_BATCH_ROWS rows too (a sigma search's or a
#: calibration's; an install or a free is less). 4: background work gets at least a fifth of a
#: saturated worker (a sigma search of 139 forwards ends), an install or an unload waits for at most
#: 4 forwards, and requests lose at most a fifth of the throughput, only while background work is
#: ready. Idle turns serve background work at once.
BACKGROUND_EVERY = 4


@dataclass(frozen=True)
class BatchLimits:
    max_rows: int = 64
    max_wait_s: float = 0.005
    max_queue: int = 256
    timeout_s: float = 60.0
    background_every: int = BACKGROUND_EVERY  # forwards of serving between two background steps, at most

    def __post_init__(self) -> None:
        if self.background_every < 1:
            raise ValueError(f"background_every must be >= 1, got {self.background_every}")


@dataclass(eq=False)
class Background:
    """A background work of the worker (:meth:`ModelWorker.add_background`)."""

    step: Callable[[], bool]  # a little work on the worker thread; True once finished
    on_done: Callable[[], None]  # on the event loop, once finished (or, if ``awaited``, once dropped)
    ready: Callable[[], bool] | None = None  # whether ``step`` has work now (None: always)
    awaited: bool = False  # a request waits for it: it runs during a drain, and fails if dropped


@dataclass(eq=False)
class Work:
    """One request's share of the worker: its prompts, N, seed, labels and what to make of the result.

    ``finish`` runs on the worker thread with the (B, N, C) per-sample probabilities and returns
    what the request's future resolves to (so that no torch work is left for the event loop).
    """

    prompts: list[Prompt]  # texts, or token ids taken as they are
    n_samples: int
    seed: int
    labels: Labels | None  # None: the configured labels
    finish: Callable[[torch.Tensor], Any]
    engine: TFBEngine | None = None  # the adapter that answers it (None: the default)
    keep_last: int | None = None  # only the last K tokens of each prompt (vLLM's truncate_prompt_tokens)
    rows: int = 0
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None  # its batch was taken from the queue (time.monotonic)
    finished: float | None = None  # its result was built
    future: asyncio.Future | None = None
    abandoned: bool = False  # nobody awaits it any more (timed out, client gone, shut down): skip it
    abort_reason: str = ""
    dropped: bool = False  # counted in tfb_requests_aborted_total

    def timing(self) -> dict[str, float]:
        """Seconds spent queued (waiting for the worker and for company) and in its batch."""
        if self.started is None or self.finished is None:
            return {}
        return {"queue": self.started - self.enqueued, "batch": self.finished - self.started}


@dataclass(eq=False)
class GenWork:
    """One generation request's share of the worker: ``prepare(service)`` builds its
    :class:`~tfb_core.forward.completion.GenerationRequest` on the worker thread (tokenizing; its
    error is the request's), then it decodes in the running batch; every update it gets
    (:class:`~tfb_core.serving.generation.GenerationUpdate`: tokens if ``stream``, then its result
    or error) is put on ``updates`` on the event loop."""

    prepare: Callable[[GenerationService], Any]
    stream: bool = False
    engine: TFBEngine | None = None  # the adapter it decodes with (an unload waits for it)
    request: Any = None  # its GenerationRequest, once prepared on the worker thread
    rows: int = 0  # rows of the decode forward it takes (N, or 1 at sigma = 0 in mean mode)
    updates: asyncio.Queue | None = None
    enqueued: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # nobody reads its updates (client gone, timed out): its rows leave the decode
    abort_reason: str = ""
    ended: bool = False  # its result or error was posted
    counted: bool = False  # in tfb_inflight_requests (from its admission to its end or abandonment)


class ModelWorker:
    """Loads the engine on its own thread, then serves batches; futures resolve on ``loop``."""

    def __init__(self, load: Callable[[], Served], limits: BatchLimits, metrics: Metrics,
                 on_ready: Callable[[Served], None], on_failure: Callable[[BaseException], None],
                 warmup: bool = True) -> None:
        self._load = load
        self.limits = limits
        self.metrics = metrics
        self._on_ready = on_ready
        self._on_failure = on_failure
        self._warmup = warmup
        self.engine: Served | None = None
        self._queue: deque[Work] = deque()
        self._queued_rows = 0
        self._busy = False
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._deadline: float | None = None  # the drain's deadline (time.monotonic), once it began
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        #: background works, taking turns (:meth:`add_background`); the one whose step is running now
        self._background: deque[Background] = deque()
        self._background_running: Background | None = None
        self._served = 0  # forwards of serving (batches', decode steps) since the last background step
        #: generation: requests waiting for the next step, and the running decode (worker thread's)
        self._gen_queue: deque[GenWork] = deque()
        self._gen_running: list[GenWork] = []
        self._gen_busy = False  # the running decode has work (read under the lock)
        self._generation: GenerationBatch | None = None
        self._service: GenerationService | None = None
        #: how many generations a decode runs at once (past it, they wait in the queue: max_queue)
        self.max_generations = max(1, limits.max_rows)
        metrics.queue_capacity.set(limits.max_queue)

    # --- lifecycle (event loop side) -------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # daemon: a load still running at exit (e.g. a long sigma search) must not hold the process
        self._thread = threading.Thread(target=self._run, name="tfb-model-worker", daemon=True)
        self._thread.start()

    def begin_drain(self, timeout_s: float) -> bool:
        """Refuse new work from now on; :meth:`drain` waits for the accepted work until ``timeout_s``
        from now. The first call sets the deadline (and returns True)."""
        with self._cond:
            self._accepting = False
            if self._deadline is not None:
                return False
            self._deadline = time.monotonic() + timeout_s
            return True

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work, answer what is queued (until the drain's deadline: ``timeout_s`` from the
        first :meth:`begin_drain`), answer the rest 503, then stop the thread."""
        self.begin_drain(timeout_s)
        assert self._deadline is not None
        deadline = self._deadline
        while time.monotonic() < deadline:
            with self._cond:
                if (not self._queue and not self._busy and not self._gen_queue and not self._gen_busy
                        and not any(b.awaited for b in self._background)):
                    break
            await asyncio.sleep(0.01)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            left_gen = list(self._gen_queue) + list(self._gen_running)
            self._gen_queue.clear()
            self._queued_rows = 0
            self._stopping = True
            # awaited work the worker will not run (the drain's deadline passed, or it never started):
            # its caller gets 503, never a hang; the one running now is settled by the worker
            dropped = [b for b in self._background if b.awaited and b is not self._background_running]
            for b in dropped:
                self._background.remove(b)
            self._cond.notify_all()
        self.metrics.queue_depth.set(0)
        for b in dropped:
            self._call_on_loop(lambda _, b=b: b.on_done(), None)
        for work in left:
            self._resolve(work, NotReadyError("the server is shutting down"))
        for gen in left_gen:
            gen.abandoned = True
            self._post(gen, GenerationUpdate(gen, error=NotReadyError("the server is shutting down")))
        if left:
            log.warning("shutdown: %d queued requests not answered within %.0fs", len(left), timeout_s)
        thread = self._thread
        if thread is not None and thread.is_alive() and self.engine is not None:
            # a forward in progress cannot be interrupted; its requests are answered already, and the
            # thread is a daemon: the process does not wait for it past a short grace
            await asyncio.to_thread(thread.join, max(0.0, deadline - time.monotonic()) + 1.0)

    def add_background(self, step: Callable[[], bool], on_done: Callable[[], None],
                       ready: Callable[[], bool] | None = None, awaited: bool = False) -> None:
        """Run ``step()`` on the worker thread between batches (whenever no request waits, and at least
        every :data:`BACKGROUND_EVERY` forwards of serving) until it returns True (or raises: logged);
        then ``on_done()`` on the event loop. ``ready()`` (called under the worker's lock: it must not
        take it): whether ``step`` has work now (None: always); the worker sleeps while no background
        work is ready (:meth:`wake`). Not ``awaited``: skipped during a drain and dropped at shutdown.
        ``awaited`` (a request waits for it): it runs during a drain too, which waits for it; if the
        worker stops first, ``on_done()`` is called without it having run (so its waiter never hangs)."""
        with self._cond:
            self._background.append(Background(step, on_done, ready, awaited))
            self._cond.notify()

    def wake(self) -> None:
        """Background work may have become ready (from any thread)."""
        with self._cond:
            self._cond.notify()

    async def call(self, fn: Callable[[], Any], ready: Callable[[], bool] | None = None) -> Any:
        """``fn()`` run on the worker thread between batches (the model's owner), once ``ready()``
        (None: at once; see :meth:`add_background`); its result, or its error. It runs during a drain
        too; 503 (:class:`NotReadyError`) if the worker stops before it ran."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        outcome: list[Any] = []

        def step() -> bool:
            try:
                outcome.append((True, fn()))
            except Exception as exc:  # noqa: BLE001 -- raised to the caller
                outcome.append((False, exc))
            return True

        def on_done() -> None:
            if future.done():
                return
            if not outcome:
                future.set_exception(NotReadyError("the server is shutting down"))
            elif outcome[0][0]:
                future.set_result(outcome[0][1])
            else:
                future.set_exception(outcome[0][1])

        self.add_background(step, on_done, ready, awaited=True)
        return await future

    def holds(self, engine: TFBEngine) -> bool:
        """Whether a queued or decoding request uses ``engine`` (under the worker's lock, as a
        background ``ready`` is called; or on the worker thread)."""
        return (any(w.engine is engine and not w.abandoned for w in self._queue)
                or any(g.engine is engine for g in self._gen_queue)
                or any(g.engine is engine for g in self._gen_running))

    # --- requests (event loop side) --------------------------------------------------------------
    def rows_of(self, n_inputs: int, n_samples: int, engine: TFBEngine | None = None) -> int:
        engine = engine or self.engine  # type: ignore[assignment]
        return n_inputs * n_samples if engine is None else engine.rows(n_inputs, n_samples)

    async def submit(self, work: Work) -> Any:
        """Queue ``work`` and wait for its result; raises the work's error, or 429/503 on overload."""
        loop = asyncio.get_running_loop()
        work.future = loop.create_future()
        work.rows = self.rows_of(len(work.prompts), work.n_samples, work.engine)
        with self._cond:
            self._admit(self._queue, "request")
            work.enqueued = time.monotonic()
            self._queue.append(work)
            self._queued_rows += work.rows
            depth = len(self._queue)
            self._cond.notify()
        self.metrics.queue_depth.set(depth)
        self.metrics.inflight.inc()
        try:
            return await asyncio.wait_for(asyncio.shield(work.future), self.limits.timeout_s)
        except asyncio.CancelledError:  # the client went away, or the drain's deadline passed
            self._abandon(work, "disconnect" if self._accepting else "shutdown")
            raise
        except asyncio.TimeoutError:
            self._abandon(work, "timeout")
            raise RequestTimeoutError(f"not answered within the request timeout of {self.limits.timeout_s:g}s "
                                      "(TFB_REQUEST_TIMEOUT_S): the server is overloaded, retry later") from None
        finally:
            self.metrics.inflight.dec()

    def _abandon(self, work: Work, reason: str) -> None:
        """Nobody awaits ``work`` any more: the worker skips it (if not started) and nothing is logged."""
        work.abandoned = True
        work.abort_reason = reason
        fut = work.future
        if fut is not None and fut.done() and not fut.cancelled():
            fut.exception()  # an error that arrived with the cancellation: read, so never "never retrieved"

    @property
    def accepting(self) -> bool:
        """Whether new work is taken (False once the drain began)."""
        return self._accepting

    @property
    def generating(self) -> bool:
        """Whether a generation is queued or decoding."""
        with self._cond:
            return bool(self._gen_queue) or self._gen_busy

    def _admit(self, queue: deque, kind: str) -> None:
        """503 while shutting down, 429 when ``queue`` holds TFB_MAX_QUEUE works (under the lock)."""
        if not self._accepting:
            raise NotReadyError("the server is shutting down")
        if len(queue) >= self.limits.max_queue:
            raise QueueFullError(f"the {kind} queue is full ({self.limits.max_queue} requests, "
                                 "TFB_MAX_QUEUE): retry later")

    def submit_generation(self, work: GenWork) -> None:
        """Queue a generation; it joins the running decode at the next step, and its updates arrive
        on ``work.updates``. 429 past TFB_MAX_QUEUE waiting, 503 while shutting down."""
        work.updates = asyncio.Queue()
        with self._cond:
            self._admit(self._gen_queue, "generation")
            work.enqueued = time.monotonic()
            self._gen_queue.append(work)
            work.counted = True
            self.metrics.inflight.inc()
            self._cond.notify()

    def abandon_generation(self, work: GenWork, reason: str, count: bool = True) -> None:
        """Nobody reads ``work``'s updates any more: the worker takes its rows out of the decode
        before the next step (or never starts it). ``count``: in tfb_requests_aborted_total{reason}."""
        if not work.abandoned:
            work.abandoned = True
            work.abort_reason = reason
            if count and not work.ended:
                self.metrics.aborted.labels(reason=reason).inc()
            with self._cond:
                self._uncount(work)
                self._cond.notify()

    def _uncount(self, work: GenWork) -> None:
        """Out of tfb_inflight_requests, once (its end or its abandonment, whichever comes first; under the lock)."""
        if work.counted:
            work.counted = False
            self.metrics.inflight.dec()

    def _post(self, work: GenWork, update: GenerationUpdate) -> None:
        """Put an update on the work's queue, on the event loop (from any thread)."""
        q, loop = work.updates, self._loop
        if update.result is not None or update.error is not None:
            work.ended = True
            with self._cond:
                self._uncount(work)
        if q is None or loop is None:
            return
        try:
            loop.call_soon_threadsafe(q.put_nowait, update)
        except RuntimeError:  # the loop is closed
            pass

    def _drop(self, work: Work) -> None:
        """Count an abandoned work the worker skipped before (the rest of) its forward; on the worker thread."""
        if not work.dropped:
            work.dropped = True
            self.metrics.aborted.labels(reason=work.abort_reason or "timeout").inc()

    def _resolve(self, work: Work, result: Any) -> None:
        """Set the work's future from any thread (an exception instance is raised to the caller)."""
        fut, loop = work.future, self._loop
        if fut is None or loop is None:
            return

        def settle() -> None:
            if fut.done():
                return
            if work.abandoned:  # timed out: nobody awaits it (and an unread exception would be logged)
                fut.cancel()
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # --- worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            engine = self._load()
            if self._warmup:
                engine.warm_up(self.limits.max_rows)
        except BaseException as exc:  # noqa: BLE001 -- every start-up failure is reported, then fatal
            self._call_on_loop(self._on_failure, exc)
            return
        # the model, tokenizer and libraries are ~500k long-lived objects: a full collection scanning
        # them took 0.4 s on a CPU, a pause for every thread; frozen, collections skip them
        gc.collect()
        gc.freeze()
        self.engine = engine
        self._call_on_loop(self._on_ready, engine)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                try:
                    self._process(engine, batch)
                except BaseException as exc:  # noqa: BLE001 -- a bug must fail its requests, not the worker
                    log.exception("batch of %d requests failed", len(batch))
                    for work in batch:
                        self._resolve(work, exc)
                finally:
                    with self._cond:
                        self._busy = False
            decoded = self._has_generation()
            if decoded:  # one decode step of every running generation, between batches
                self._generation_step(engine)
                self._served += 1
            # nothing served: the worker is free for background work; else it gets its bounded share,
            # so that a queue that never empties or a decode that never ends does not starve it
            if not (batch or decoded) or self._served >= self.limits.background_every:
                self._background_step()

    def _ready_background(self) -> Background | None:
        """The first background work with something to do now (under the lock); while draining, only
        work that a request awaits."""
        return next((b for b in self._background if (self._accepting or b.awaited)
                     and (b.ready is None or b.ready())), None)

    def _has_generation(self) -> bool:
        with self._cond:
            return bool(self._gen_queue) or self._gen_busy

    def _generation_step(self, engine: Served) -> None:
        """Drop abandoned generations, admit queued ones while their rows fit (TFB_MAX_BATCH_ROWS rows
        per decode forward; one bigger request runs alone), run one step, post the updates."""
        if self._generation is None:
            self._service = GenerationService(engine, max_rows=self.limits.max_rows)
            self._generation = GenerationBatch(self._service)
        gen, service = self._generation, self._service
        assert service is not None
        # one pass, each work read once: a work abandoned meanwhile (from the event loop) is either
        # cancelled here or kept for the next step, never dropped from the list with its rows decoding
        running: list[GenWork] = []
        for work in self._gen_running:
            if work.abandoned:
                gen.cancel(work)
            else:
                running.append(work)
        self._gen_running = running
        with self._cond:
            queued = [w for w in self._gen_queue if not w.abandoned]
            self._gen_queue.clear()
            self._gen_busy = self._gen_busy or bool(queued)  # never neither queued nor busy while it runs
        rows = sum(w.rows for w in self._gen_running)
        left: list[GenWork] = []
        for i, work in enumerate(queued):
            if work.request is None:  # prepared once (tokenized), even if it has to wait for room
                try:
                    work.request = work.prepare(service)
                except Exception as exc:  # noqa: BLE001 -- the request's own error (a 4xx), answered
                    self._post(work, GenerationUpdate(work, error=exc))
                    continue
                work.rows = sum(len(stream) for stream in work.request.streams())
            if self._gen_running and (rows + work.rows > self.limits.max_rows
                                      or len(self._gen_running) >= self.max_generations):
                left = queued[i:]  # first come, first served: the rest wait for room
                break
            gen.submit(work, work.request, stream=work.stream)
            self._gen_running.append(work)
            rows += work.rows
        if left:
            with self._cond:
                self._gen_queue.extendleft(reversed(left))
        try:
            updates = gen.step() if gen.busy else []
        except Exception as exc:  # noqa: BLE001 -- a failed forward fails the decode's requests, not the worker
            log.exception("a generation step failed")
            updates = gen.fail_all(exc)
        for update in updates:
            work = update.key
            if update.result is not None or update.error is not None:
                self._gen_running = [w for w in self._gen_running if w is not work]
            if not work.abandoned:
                self._post(work, update)
        with self._cond:
            self._gen_busy = gen.busy or bool(self._gen_queue)
        self.metrics.generation_rows.set(gen.rows)

    def _background_step(self) -> None:
        """One step of the first ready background work, if any (none, or draining: e.g. the drain
        took the generation that made the loop turn)."""
        with self._cond:
            work = self._ready_background()
            if work is None:
                return
            self._background_running = work
            self._served = 0
        try:
            finished = work.step()
        except Exception:  # noqa: BLE001 -- the work failed (it keeps its own account of why): drop it
            log.exception("background work failed")
            finished = True
        with self._cond:
            self._background_running = None
            self._background.remove(work)
            if not finished:  # its turn is over: the next ready work goes first (a long calibration
                self._background.append(work)  # must not hold up an adapter's install or its search)
        if finished:
            self._call_on_loop(lambda _: work.on_done(), None)

    def _call_on_loop(self, fn: Callable[[Any], None], arg: Any) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(fn, arg)
            except RuntimeError:
                pass

    def _next_batch(self) -> list[Work] | None:
        """Block for the next batch: whole works, up to max_rows rows (a bigger work comes alone);
        an empty list when no request is queued and background work is waiting; None: stop."""
        lim = self.limits
        with self._cond:
            while True:
                while self._queue and self._queue[0].abandoned:
                    self._queued_rows -= self._queue[0].rows
                    self._drop(self._queue.popleft())
                if self._queue:
                    break
                if self._stopping:
                    return None
                if self._gen_queue or self._gen_busy:  # a decode step to run: no waiting
                    return []
                if self._ready_background() is not None:
                    return []
                self._cond.wait()
            deadline = self._queue[0].enqueued + lim.max_wait_s
            # while generations decode, a batch does not wait for company: it would stall their steps
            while self._queued_rows < lim.max_rows and not self._stopping and not self._gen_busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[Work] = []
            rows = 0
            while self._queue and (not batch or rows + self._queue[0].rows <= lim.max_rows):
                work = self._queue.popleft()
                self._queued_rows -= work.rows
                if not work.abandoned:
                    batch.append(work)
                    rows += work.rows
                else:
                    self._drop(work)
            self._busy = bool(batch)
            depth = len(self._queue)
        self.metrics.queue_depth.set(depth)
        return batch

    def _process(self, engine: Served, batch: Sequence[Work]) -> None:
        now = time.monotonic()
        self.metrics.batch_requests.observe(len(batch))
        for work in batch:
            work.started = now
            self.metrics.queue_wait.observe(now - work.enqueued)
        # a work whose client left (or whose drain deadline passed) is skipped before its next forward
        requests = [BatchRequest(w.prompts, w.n_samples, w.seed, w.labels, cancelled=lambda w=w: w.abandoned,
                                 engine=w.engine, keep_last=w.keep_last)
                    for w in batch]
        results = engine.run_batch(requests, self.limits.max_rows, on_forward=self._observe_forward)
        for work, res in zip(batch, results, strict=True):
            if work.abandoned:  # nobody awaits it: no response to build (its future is cancelled)
                self._drop(work)
                self._resolve(work, None)
                continue
            if isinstance(res, BaseException):
                self._resolve(work, res)
                continue
            try:
                result = work.finish(res)
                work.finished = time.monotonic()
                self._resolve(work, result)
            except Exception as exc:  # noqa: BLE001
                log.exception("building a response failed")
                self._resolve(work, exc)

    def _observe_forward(self, inputs: int, rows: int, seconds: float) -> None:
        self._served += 1
        self.metrics.forward_duration.observe(seconds)
        self.metrics.batch_inputs.observe(inputs)
        self.metrics.batch_rows.observe(rows)
