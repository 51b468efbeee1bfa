"""Coalescing: concurrent requests share forwards, answers do not depend on the company they keep,
big requests are chunked, overload is 429/503 with Retry-After, shutdown answers what was accepted.

Ordering is forced with events (a gated ``run_jobs``), never with sleeps or timing asserts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from prometheus_client import CollectorRegistry
from test_app_support import (
    PROMPTS,
    assert_close,
    longest_run,
    make_settings,
    metric,
    metric_samples,
    ready_client,
    strip_ids,
)

from app.batching import BACKGROUND_EVERY, BatchLimits, ModelWorker, Work
from app.errors import NotReadyError
from app.metrics import Metrics
from tfb_core.serving.batch import BatchRequest
from tfb_core.serving.gate import ForwardGate
from tfb_core.serving.response import predict
from tfb_core.serving.startup import load_engine


def _bodies(n: int) -> list[dict]:
    out = []
    for i in range(n):
        body: dict = {"inputs": [PROMPTS[(i + k) % len(PROMPTS)] for k in range(1 + i % 3)]}
        if i % 4:
            body["n_samples"] = (3, 8, 16)[i % 3]
        if i % 5 == 1:
            body["seed"] = i % 3
        if i % 7 == 2:
            body["labels"] = ["yes", "no"]
        if i % 6 == 3:
            body["return_samples"] = True
        out.append(body)
    return out


@pytest.mark.parametrize("task", [None, "sst2"])  # generic prompts; a task's instruction kept across forwards
def test_concurrent_requests_equal_one_at_a_time(tiny, task):
    bodies = _bodies(60)
    if task:
        for body in bodies:
            body.pop("labels", None)
    extra = {"labels": None, "task": task, "max_length": 200} if task else {}
    with ready_client(make_settings(tiny, max_wait_ms=20.0, **extra)) as c:
        before = metric_samples(c.get("/metrics").text)
        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(pool.map(lambda b: c.post("/predict", json=b), bodies))
        assert [r.status_code for r in responses] == [200] * len(bodies)
        during = metric_samples(c.get("/metrics").text)
        # they did share batches: every request was in one batch, and fewer batches than requests ran

        def grew(name, **labels):
            return metric(during, name, **labels) - metric(before, name, **labels)

        assert grew("tfb_batch_requests_sum") == len(bodies)
        assert grew("tfb_batch_requests_count") < len(bodies), "every request ran in a batch of its own"
        assert grew("tfb_batch_inputs_sum") == sum(len(b["inputs"]) for b in bodies)  # each input computed once
        ids = [p["id"] for r in responses for p in r.json()["predictions"]]
        assert len(set(ids)) == len(ids)
        for body, r in zip(bodies, responses, strict=True):
            alone = c.post("/predict", json=body)
            assert alone.status_code == 200
            assert_close(strip_ids(r.json()), strip_ids(alone.json()))
        samples = metric_samples(c.get("/metrics").text)
        assert metric(samples, "tfb_requests_total", route="/predict", status="200") == 2 * len(bodies)
        assert metric(samples, "tfb_inflight_requests") == 0 and metric(samples, "tfb_queue_depth") == 0


# --- the worker on its own, with a gate in the forward ------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny):
    return load_engine(make_settings(tiny).engine_config(), progress=False)


class Gate:
    """Wraps run_jobs: records each call's job count and rows; holds the first call until released."""

    def __init__(self, run_jobs, hold_first: bool = True) -> None:
        self.run_jobs = run_jobs
        self.calls: list[tuple[int, int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, jobs, sigma=None, class_ids=None, prefix=None):
        self.calls.append((len(jobs), sum(j.n_samples for j in jobs)))
        self.entered.set()
        assert self.release.wait(60)
        return self.run_jobs(jobs, sigma, class_ids, prefix)


async def _started(engine, limits: BatchLimits) -> ModelWorker:
    ready = asyncio.Event()
    worker = ModelWorker(lambda: engine, limits, Metrics(CollectorRegistry()), lambda e: ready.set(),
                         lambda exc: pytest.fail(f"load failed: {exc}"), warmup=False)
    worker.start(asyncio.get_running_loop())
    await asyncio.wait_for(ready.wait(), 60)
    return worker


def _work(prompts, n=4, seed=0, labels=None) -> Work:
    return Work(prompts=list(prompts), n_samples=n, seed=seed, labels=labels, finish=lambda probs: probs)


async def _wait_for(predicate, what: str) -> None:
    for _ in range(6000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_queued_requests_share_one_forward(engine, monkeypatch):
    gate = Gate(engine.classifier.run_jobs)
    monkeypatch.setattr(engine.classifier, "run_jobs", gate)

    async def scenario():
        worker = await _started(engine, BatchLimits(max_rows=32, max_wait_s=0.0))
        first = asyncio.create_task(worker.submit(_work(PROMPTS[:1])))
        await asyncio.to_thread(gate.entered.wait, 60)
        rest = [asyncio.create_task(worker.submit(_work([p], seed=s))) for p, s in zip(PROMPTS, (0, 0, 1, 2),
                                                                                         strict=True)]
        await _wait_for(lambda: len(worker._queue) == 4, "4 queued requests")
        gate.release.set()
        results = await asyncio.gather(first, *rest)
        await worker.drain(10)
        return results

    results = asyncio.run(scenario())
    assert gate.calls == [(1, 4), (4, 16)]  # the four queued requests: one forward of 4 inputs x 4 samples
    for (prompt, seed), got in zip(zip(PROMPTS, (0, 0, 1, 2), strict=True), results[1:], strict=True):
        alone = predict(engine, [prompt], n_samples=4, seed=seed, return_samples=True)
        assert torch.allclose(got[0], torch.tensor(alone["predictions"][0]["samples"]), atol=1e-5)


def test_big_request_is_chunked(engine, monkeypatch):
    gate = Gate(engine.classifier.run_jobs, hold_first=False)
    monkeypatch.setattr(engine.classifier, "run_jobs", gate)
    prompts = PROMPTS * 2  # 8 inputs x 16 samples = 128 rows > 32

    async def scenario():
        worker = await _started(engine, BatchLimits(max_rows=32, max_wait_s=0.0))
        out = await worker.submit(_work(prompts, n=16))
        await worker.drain(10)
        return out

    got = asyncio.run(scenario())
    assert len(gate.calls) == 4 and all(rows <= 32 for _, rows in gate.calls)
    expected = predict(engine, prompts, n_samples=16, return_samples=True)
    assert torch.allclose(got, torch.tensor([p["samples"] for p in expected["predictions"]]), atol=1e-5)


def test_drain_answers_accepted_requests_then_refuses(engine, monkeypatch):
    gate = Gate(engine.classifier.run_jobs)
    monkeypatch.setattr(engine.classifier, "run_jobs", gate)

    async def scenario():
        worker = await _started(engine, BatchLimits(max_rows=8, max_wait_s=0.0))
        tasks = [asyncio.create_task(worker.submit(_work([p]))) for p in PROMPTS * 2]
        await asyncio.to_thread(gate.entered.wait, 60)
        drain = asyncio.create_task(worker.drain(60))
        await asyncio.sleep(0)
        with pytest.raises(NotReadyError, match="shutting down"):
            await worker.submit(_work(PROMPTS[:1]))
        gate.release.set()
        results = await asyncio.gather(*tasks)
        await drain
        return worker, results

    worker, results = asyncio.run(scenario())
    assert len(results) == 8 and all(r.shape == (1, 4, 2) for r in results)
    assert worker._thread is not None and not worker._thread.is_alive()


# --- overload over HTTP ---------------------------------------------------------------------------
def _gated_client(tiny, monkeypatch, **overrides):
    cm = ready_client(make_settings(tiny, warmup=False, **overrides))
    c = cm.__enter__()
    engine = c.app.state.tfb.predictor.engine
    gate = Gate(engine.classifier.run_jobs)
    monkeypatch.setattr(engine.classifier, "run_jobs", gate)
    return cm, c, gate


def _wait_metric(c, name: str, value: float) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if metric(metric_samples(c.get("/metrics").text), name) == value:
            return
        time.sleep(0.01)
    raise AssertionError(f"{name} never reached {value}")


def test_queue_full_is_429_with_retry_after(tiny, monkeypatch):
    cm, c, gate = _gated_client(tiny, monkeypatch, max_queue=1)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            busy = pool.submit(c.post, "/predict", json={"inputs": PROMPTS[:1]})
            assert gate.entered.wait(60)  # the worker holds the first request in its forward
            queued = pool.submit(c.post, "/predict", json={"inputs": PROMPTS[1:2]})
            _wait_metric(c, "tfb_queue_depth", 1)
            r = c.post("/predict", json={"inputs": PROMPTS[2:3]})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert "TFB_MAX_QUEUE" in r.json()["detail"]
            gate.release.set()
            assert busy.result().status_code == 200 and queued.result().status_code == 200
        assert c.post("/predict", json={"inputs": PROMPTS[2:3]}).status_code == 200
    finally:
        gate.release.set()
        cm.__exit__(None, None, None)


def test_request_timeout_is_503_with_retry_after(tiny, monkeypatch):
    cm, c, gate = _gated_client(tiny, monkeypatch, request_timeout_s=0.2)
    try:
        r = c.post("/predict", json={"inputs": PROMPTS[:1]})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert "TFB_REQUEST_TIMEOUT_S" in r.json()["detail"]
        gate.release.set()
        _wait_metric(c, "tfb_inflight_requests", 0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the timed-out forward may still be finishing
            r = c.post("/predict", json={"inputs": PROMPTS[:1]})
            if r.status_code == 200:
                break
        assert r.status_code == 200
    finally:
        gate.release.set()
        cm.__exit__(None, None, None)


# --- the worker is a queue and a thread: driven here by a fake engine, no model -----------------------
class FakeEngine:
    """What the worker needs of an engine: rows, warm_up, run_batch. Answers probs from the request."""

    sigma = 0.5

    def __init__(self) -> None:
        self.batches: list[list[BatchRequest]] = []
        self.gate = threading.Event()

    def rows(self, n_inputs: int, n_samples: int) -> int:
        return n_inputs * n_samples

    def warm_up(self, max_rows: int) -> None:
        return None

    def run_batch(self, requests, max_rows, on_forward=None):
        assert self.gate.wait(30)
        self.batches.append(list(requests))
        if on_forward is not None:
            on_forward(sum(len(r.prompts) for r in requests), sum(self.rows(len(r.prompts), r.n_samples)
                                                                  for r in requests), 0.001)
        return [ValueError(f"bad {r.prompts[0]}") if r.prompts[0].startswith("bad") else
                torch.full((len(r.prompts), r.n_samples, 2), float(r.seed)) for r in requests]


def test_the_worker_coalesces_and_routes_each_answer_and_error_with_a_fake_engine():
    engine = FakeEngine()
    registry = CollectorRegistry()

    async def scenario():
        ready = asyncio.Event()
        worker = ModelWorker(lambda: engine, BatchLimits(max_rows=64, max_wait_s=0.0), Metrics(registry),
                             lambda e: ready.set(), lambda exc: pytest.fail(f"load failed: {exc}"))
        worker.start(asyncio.get_running_loop())
        await asyncio.wait_for(ready.wait(), 30)
        first = asyncio.create_task(worker.submit(_work(["x"], n=2, seed=9)))
        await _wait_for(lambda: worker._busy, "the first batch to start")
        rest = [asyncio.create_task(worker.submit(_work([p], n=2, seed=s)))
                for p, s in (("a", 1), ("bad one", 2), ("b", 3))]
        await _wait_for(lambda: len(worker._queue) == 3, "3 queued requests")
        engine.gate.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        await worker.drain(10)
        return results

    results = asyncio.run(scenario())
    assert [len(b) for b in engine.batches] == [1, 3]  # the three queued requests: one batch
    assert [r.seed for r in engine.batches[1]] == [1, 2, 3]
    assert float(results[0][0, 0, 0]) == 9 and float(results[1][0, 0, 0]) == 1 and float(results[3][0, 0, 0]) == 3
    assert isinstance(results[2], ValueError) and "bad one" in str(results[2])  # its own error only
    assert registry.get_sample_value("tfb_batch_requests_sum") == 4
    assert registry.get_sample_value("tfb_batch_rows_sum") == 8


def test_background_step_with_none_left_or_while_draining_does_nothing():
    """The loop may turn for a generation the drain then takes away: a background step with no work
    left must not fail the worker thread, and while draining no calibration step runs."""
    worker = ModelWorker(lambda: None, BatchLimits(), Metrics(CollectorRegistry()), lambda e: None,
                         lambda exc: None, warmup=False)
    worker._background_step()  # nothing queued: no IndexError
    steps = []
    worker.add_background(lambda: steps.append(1) or False, lambda: None)
    worker._background_step()
    assert steps == [1]
    worker.begin_drain(1.0)
    worker._background_step()
    assert steps == [1]


def test_background_works_take_turns():
    """A long background work (a calibration: many steps) and one queued after it (an adapter's install,
    a search's forward) alternate step by step: the second does not wait for the first to end."""
    worker = ModelWorker(lambda: None, BatchLimits(), Metrics(CollectorRegistry()), lambda e: None,
                         lambda exc: None, warmup=False)
    steps: list[str] = []
    long_left = [5]

    def long() -> bool:
        steps.append("long")
        long_left[0] -= 1
        return long_left[0] == 0

    worker.add_background(long, lambda: None)
    worker.add_background(lambda: steps.append("install") or True, lambda: None)
    worker.add_background(lambda: steps.append("forward") or len(steps) > 4, lambda: None)
    for _ in range(9):
        worker._background_step()
    assert steps[:4] == ["long", "install", "forward", "long"]
    assert steps.count("long") == 5 and steps.count("install") == 1


# --- background work's share of a busy worker, and during a drain ------------------------------------
@pytest.mark.parametrize("every,forwards", [(1, 1), (BACKGROUND_EVERY, 1), (BACKGROUND_EVERY, 2)])
def test_background_gets_a_step_every_k_forwards_while_the_queue_never_empties(every, forwards):
    """A queue that never empties (each batch is one whole request of max_rows rows, 30 queued behind
    the first; its forwards: 1, or 2 where the planner splits it) does not starve background work: a
    search's gated forwards (queued by four threads) and an install awaited through ``call`` each get
    a step at least every ``background_every`` forwards of serving, all before the queue is empty."""
    engine = FakeEngine()
    events: list[str] = []
    run_batch = engine.run_batch

    def counted(requests, max_rows, on_forward=None):
        def forward(inputs, rows, seconds):
            events.append("batch")
            on_forward(inputs, rows, seconds)

        out = run_batch(requests, max_rows, forward)
        for _ in range(forwards - 1):  # the rest of the batch's forwards
            forward(1, 1, 0.0)
        return out

    engine.run_batch = counted  # type: ignore[method-assign]
    limits = BatchLimits(max_rows=4, max_wait_s=0.0, background_every=every)
    gate = ForwardGate()

    async def scenario():
        worker = await _started(engine, limits)
        gate.on_queued = worker.wake
        first = asyncio.create_task(worker.submit(_work(["x"], n=4)))
        await _wait_for(lambda: worker._busy, "the first batch to start")  # held in the fake's run_batch
        queued = [asyncio.create_task(worker.submit(_work([f"p{i}"], n=4, seed=i))) for i in range(30)]
        await _wait_for(lambda: len(worker._queue) == 30, "30 queued requests")
        searches = [threading.Thread(target=gate.run, args=(lambda: events.append("forward"),)) for _ in range(4)]
        for t in searches:
            t.start()
        await _wait_for(lambda: len(gate._calls) == 4, "4 queued forwards")
        worker.add_background(gate.step, lambda: None, ready=gate.ready)
        install = asyncio.create_task(worker.call(lambda: events.append("install") or "installed"))
        await asyncio.sleep(0)
        engine.gate.set()
        results = await asyncio.gather(first, *queued)
        gate.close("done")
        for t in searches:
            await asyncio.to_thread(t.join, 30)
        installed = await install
        await worker.drain(10)
        return results, installed

    results, installed = asyncio.run(scenario())
    assert len(results) == 31 and installed == "installed"
    assert events.count("forward") == 4 and events.count("install") == 1
    last_background = max(i for i, e in enumerate(events) if e != "batch")
    assert events[last_background + 1:].count("batch") > 0, "the background work waited for the queue to empty"
    # forwards of serving in a row while background work was ready: at most the bound
    assert longest_run(events[:last_background + 1], "batch") <= every, events


def test_an_install_awaited_during_a_drain_resolves_and_one_the_worker_never_runs_fails_503():
    """During a drain, work a request awaits (an install, an unload's free: ``call``) still runs;
    one that cannot run before the worker stops (never ready) fails with 503, never hangs; the
    background work nobody awaits (a calibration) does not run."""
    engine = FakeEngine()
    steps: list[str] = []

    async def scenario():
        worker = await _started(engine, BatchLimits(max_rows=4, max_wait_s=0.0))
        held = asyncio.create_task(worker.submit(_work(["x"], n=4)))
        await _wait_for(lambda: worker._busy, "a batch to start")
        drain = asyncio.create_task(worker.drain(5.0))
        await _wait_for(lambda: not worker.accepting, "the drain to begin")
        worker.add_background(lambda: steps.append("calibration") or False, lambda: None)
        install = asyncio.create_task(worker.call(lambda: steps.append("install") or "installed"))
        never = asyncio.create_task(worker.call(lambda: steps.append("never"), ready=lambda: False))
        await asyncio.sleep(0)
        engine.gate.set()
        # the bound only guards against a hang: nothing asserts a duration
        installed = await asyncio.wait_for(install, 30)
        with pytest.raises(NotReadyError, match="shutting down"):
            await asyncio.wait_for(never, 30)
        await asyncio.wait_for(drain, 30)
        return await held, installed

    result, installed = asyncio.run(scenario())
    assert installed == "installed" and float(result[0, 0, 0]) == 0
    assert steps == ["install"]
