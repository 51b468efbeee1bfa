"""Hostile and careless clients (issue 13): inputs that cannot be classified, body parsing, content
types, API docs under a key, clients that go away, and shutdown with work in flight.

Every test is bounded in count and time and uses loopback only; ordering is forced with events.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError
from test_app_batching import Gate
from test_app_support import (
    PROMPTS,
    assert_close,
    clean_env,
    make_settings,
    metric,
    metric_samples,
    ready_client,
    strip_ids,
)
from tokenizers.processors import TemplateProcessing

from app.batching import BatchLimits, ModelWorker, Work
from app.cli import main
from app.main import create_app
from app.metrics import Metrics
from app.server import DRAIN_GRACE_S, build_server
from app.settings import Settings
from tfb_core.forward.classifier import EmptyPromptError
from tfb_core.forward.layout import Job
from tfb_core.serving.response import predict
from tfb_core.serving.startup import load_engine


@pytest.fixture(scope="module")
def client(tiny):
    with ready_client(make_settings(tiny, max_wait_ms=20.0)) as c:
        yield c


@pytest.fixture()
def no_bos_engine(tiny):
    """The tiny engine with a tokenizer that adds no BOS (as SmolLM2's): an empty prompt has no tokens."""
    engine = load_engine(make_settings(tiny).engine_config(), progress=False)
    engine.classifier.tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A", special_tokens=[])
    assert engine.classifier.tokenizer([""], add_special_tokens=True)["input_ids"] == [[]]
    return engine


# --- 1. inputs that cannot be classified ------------------------------------------------------------
@pytest.mark.parametrize("inputs,index", [(["   "], 0), (["a great film", " \n\t "], 1),
                                          ([{"prompt": "ok"}, "  "], 1)])
def test_blank_prompt_is_422_naming_it(client, inputs, index):
    r = client.post("/predict", json={"inputs": inputs})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert f"input {index}" in detail and "blank" in detail


def test_answers_do_not_depend_on_blank_company(client):
    """Valid requests coalesced with blank ones answer as they do alone; the blank ones are 422."""
    bodies = [{"inputs": [PROMPTS[i % 4]]} if i % 2 else {"inputs": [PROMPTS[i % 4], "   "]} for i in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda b: client.post("/predict", json=b), bodies))
    for body, r in zip(bodies, responses, strict=True):
        if len(body["inputs"]) == 2:
            assert r.status_code == 422 and "input 1" in r.json()["detail"]
        else:
            alone = client.post("/predict", json=body)
            assert r.status_code == 200 and alone.status_code == 200
            assert_close(strip_ids(r.json()), strip_ids(alone.json()))


def test_prompt_without_tokens_is_an_error_naming_it(no_bos_engine):
    clf = no_bos_engine.classifier
    with pytest.raises(EmptyPromptError, match="input 1 has no tokens"):
        clf.tokenize(["good", ""])
    with pytest.raises(EmptyPromptError):  # never padded into a batch of only padding
        clf.run_jobs([Job(clf.tokenize(["good"])[0], 1, None), Job([], 1, None)], sigma=0.0)


def test_worker_answers_others_when_one_work_has_no_tokens(no_bos_engine):
    """A work whose prompt has no tokens fails alone; the works sharing its batch answer as alone."""
    engine = no_bos_engine

    async def scenario():
        ready = asyncio.Event()
        worker = ModelWorker(lambda: engine, BatchLimits(max_rows=64, max_wait_s=0.2), Metrics(CollectorRegistry()),
                             lambda e: ready.set(), lambda exc: pytest.fail(f"load failed: {exc}"), warmup=False)
        worker.start(asyncio.get_running_loop())
        await asyncio.wait_for(ready.wait(), 60)
        works = [Work(prompts=p, n_samples=4, seed=0, labels=None, finish=lambda probs: probs)
                 for p in (PROMPTS[:2], ["good", ""], PROMPTS[2:3])]
        results = await asyncio.gather(*(worker.submit(w) for w in works), return_exceptions=True)
        await worker.drain(10)
        return results

    good, bad, other = asyncio.run(scenario())
    assert isinstance(bad, EmptyPromptError) and "input 1" in str(bad)
    for prompts, got in ((PROMPTS[:2], good), (PROMPTS[2:3], other)):
        alone = predict(engine, prompts, n_samples=4, seed=0, return_samples=True)
        assert torch.allclose(got, torch.tensor([p["samples"] for p in alone["predictions"]]), atol=1e-5)


# --- a live server (uvicorn in a thread, loopback) ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(settings):
    """``app.server``'s uvicorn (as `tfb serve` runs it) on a free loopback port, ready; yields (server, port)."""
    port = _free_port()
    server = build_server(settings.model_copy(update={"port": port}), log_config=None)
    thread = threading.Thread(target=server.run, name="tfb-test-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("the server did not become ready")
        server.thread = thread
        yield server, port
    finally:
        server.should_exit = True
        thread.join(30)


def _raw(port: int, data: bytes, timeout: float = 20.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return _read_all(s)


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


@pytest.fixture(scope="module")
def live(tiny):
    settings = make_settings(tiny, warmup=False, max_header_bytes=4096, header_timeout_s=0.5, body_timeout_s=0.5,
                             keep_alive_s=1)
    with live_server(settings) as (server, port):
        yield server, port


# --- 2. header size -------------------------------------------------------------------------------------
def test_headers_over_the_limit_are_400_and_closed(live):
    _, port = live
    for size in (8 * 1024, 64 * 1024, 4 * 1024 * 1024):  # within one socket read (431 by the app), or not (400)
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
        try:
            reply = _raw(port, big)
        except (BrokenPipeError, ConnectionResetError):  # closed while we were still sending: refused
            continue
        assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), reply[:200]
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200  # everyone else is served
    ok = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Small: " + b"a" * 1024 + b"\r\nConnection: close\r\n\r\n"
    assert _raw(port, ok).startswith(b"HTTP/1.1 200")


# --- 3. read timeouts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHo"], ids=["nothing", "half the headers"])
def test_slow_or_silent_headers_are_closed(live, sent):
    _, port = live
    reply = _raw(port, sent)  # returns only once the server closes the connection (socket timeout: 20 s)
    assert reply.startswith(b"HTTP/1.1 408"), reply


def test_headers_a_byte_at_a_time_are_closed(live):
    _, port = live
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        sent = 0
        try:
            for i in range(len(request)):
                s.sendall(request[i:i + 1])
                sent += 1
                time.sleep(0.05)  # 200 bytes at 20/s: far longer than the 0.5 s header timeout
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _read_all(s)
    assert sent < len(request) and reply.startswith(b"HTTP/1.1 408"), (sent, reply)


def test_slow_body_is_408(live):
    _, port = live
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"inputs\": ")
    reply = _raw(port, head)
    assert reply.startswith(b"HTTP/1.1 408") and b"TFB_BODY_TIMEOUT_S" in reply, reply


def test_idle_keep_alive_connection_is_closed(live):
    _, port = live
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _read_all(s)  # the answer, then EOF once the keep-alive timeout (1 s) closes it
    assert reply.startswith(b"HTTP/1.1 200") and reply.count(b"HTTP/1.1") == 1


def test_server_limits_are_the_settings(tiny):
    s = make_settings(tiny, max_header_bytes=8192, keep_alive_s=7, max_connections=99, drain_timeout_s=0.5)
    cfg = build_server(s).config
    assert cfg.h11_max_incomplete_event_size == 8192 and cfg.timeout_keep_alive == 7
    assert cfg.limit_concurrency == 99
    assert cfg.timeout_graceful_shutdown is not None and 0.5 < cfg.timeout_graceful_shutdown <= 0.5 + DRAIN_GRACE_S


# --- 4. drain with work longer than TFB_DRAIN_TIMEOUT_S; 7. clients that leave ----------------------------
def _wait(predicate, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _gate_server(server, monkeypatch) -> Gate:
    engine = server.config.app.state.tfb.predictor.engine
    gate = Gate(engine.classifier.run_jobs)
    monkeypatch.setattr(engine.classifier, "run_jobs", gate)
    return gate


def test_drain_overrun_is_503_and_exits_on_time(tiny, monkeypatch, caplog):
    """SIGTERM with a forward longer than the drain timeout: every accepted request gets 503 with
    Retry-After, the queued ones are never computed, and the server stops within the timeout plus
    the grace (uvicorn's own wait used to end first, with plain-text 500s, then the drain waited again)."""
    drain = 2.0
    settings = make_settings(tiny, warmup=False, drain_timeout_s=drain, max_wait_ms=0.0)
    caplog.set_level("INFO")
    with live_server(settings) as (server, port):
        gate = _gate_server(server, monkeypatch)
        state = server.config.app.state.tfb
        url = f"http://127.0.0.1:{port}/predict"
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = [pool.submit(httpx.post, url, json={"inputs": PROMPTS[:1]}, timeout=60)]
            assert gate.entered.wait(60)  # one in its forward (held), then two queued
            futures += [pool.submit(httpx.post, url, json={"inputs": [p]}, timeout=60) for p in PROMPTS[1:3]]
            _wait(lambda: len(state.worker._queue) == 2, "2 queued requests")
            t0 = time.monotonic()
            server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
            server.thread.join(drain + DRAIN_GRACE_S + 3.0)  # bounded: the margin only guards a hang
            stopped = not server.thread.is_alive()
            elapsed = time.monotonic() - t0
            gate.release.set()
            responses = [f.result() for f in futures]
    assert stopped, f"still running {elapsed:.1f}s after SIGTERM with TFB_DRAIN_TIMEOUT_S={drain}"
    for r in responses:
        assert r.status_code == 503 and r.headers["retry-after"] and "shutting down" in r.json()["detail"], r.text
    assert len(gate.calls) == 1  # the queued requests were never computed
    logged = "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records)
    for bad in ("never retrieved", "CancelledError", "Exception in ASGI application", "Cancel "):
        assert bad not in logged, logged


def test_disconnected_client_is_not_computed(tiny, monkeypatch):
    settings = make_settings(tiny, warmup=False, max_wait_ms=0.0)
    with live_server(settings) as (server, port):
        gate = _gate_server(server, monkeypatch)
        state = server.config.app.state.tfb
        samples = lambda: metric_samples(generate_latest(state.registry).decode())  # noqa: E731
        with ThreadPoolExecutor(max_workers=1) as pool:
            held = pool.submit(httpx.post, f"http://127.0.0.1:{port}/predict", json={"inputs": PROMPTS[:1]},
                               timeout=60)
            assert gate.entered.wait(60)
            body = json.dumps({"inputs": PROMPTS[1:3]}).encode()
            with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                _wait(lambda: len(state.worker._queue) == 1, "the request queued")
            # the client is gone while its request waits: cancelled now (499), skipped by the worker
            _wait(lambda: metric(samples(), "tfb_requests_total", route="/predict", status="499") == 1,
                  "the disconnect seen")
            gate.release.set()
            assert held.result().status_code == 200
        _wait(lambda: metric(samples(), "tfb_requests_aborted_total", reason="disconnect") == 1, "the abort counted")
        assert len(gate.calls) == 1  # only the held request's forward ran
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"inputs": PROMPTS[1:3]}, timeout=60)
        assert r.status_code == 200 and len(gate.calls) == 2
        assert metric(samples(), "tfb_inflight_requests") == 0 and metric(samples(), "tfb_queue_depth") == 0


# --- 5. settings that meant the opposite ---------------------------------------------------------------------
@pytest.mark.parametrize("bad,field", [
    ({"drain_timeout_s": float("inf")}, "drain_timeout_s"), ({"drain_timeout_s": float("nan")}, "drain_timeout_s"),
    ({"max_wait_ms": 1e12}, "max_wait_ms"), ({"max_wait_ms": float("inf")}, "max_wait_ms"),
    ({"request_timeout_s": float("inf")}, "request_timeout_s"), ({"api_key": ""}, "TFB_API_KEY"),
    ({"api_key": "   "}, "TFB_API_KEY"), ({"max_samples": 10**8, "max_batch_rows": 10**8}, "max_samples"),
    ({"max_header_bytes": 10**9}, "max_header_bytes"), ({"header_timeout_s": 0}, "header_timeout_s"),
    ({"body_timeout_s": float("inf")}, "body_timeout_s"), ({"max_connections": 0}, "max_connections"),
    ({"search_tolerance": float("nan")}, "search_tolerance")])
def test_settings_refuse_what_would_mean_the_opposite(bad, field):
    with clean_env(), pytest.raises(ValidationError, match=field):
        Settings(**bad)


@pytest.mark.parametrize("env,needle", [({"TFB_DRAIN_TIMEOUT_S": "inf"}, "TFB_DRAIN_TIMEOUT_S"),
                                        ({"TFB_API_KEY": ""}, "TFB_API_KEY"),
                                        ({"TFB_MAX_WAIT_MS": "1e12"}, "TFB_MAX_WAIT_MS")])
def test_tfb_serve_bad_setting_is_one_line_and_exit_2(tiny, monkeypatch, capsys, env, needle):
    with clean_env():
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert main(["serve", "--model", tiny["model"], "--labels", "negative", "positive", "--sigma", "0.05"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err and "Traceback" not in err, err


def test_short_drain_timeout_is_not_forever(tiny):
    cfg = build_server(make_settings(tiny, drain_timeout_s=0.4)).config
    assert cfg.timeout_graceful_shutdown == pytest.approx(0.4 + DRAIN_GRACE_S)  # was int(0.4) or None: no limit


# --- 8. documented behaviour: docs under a key, body parsing, content types -------------------------------------
def test_api_docs_are_public_under_a_key_and_the_rest_is_not(tiny):
    with ready_client(make_settings(tiny, api_key="s3cret", warmup=False)) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):  # README: public, as the probes
            assert c.get(path).status_code == 200
        assert c.post("/predict", json={"inputs": ["a"]}).status_code == 401
        assert c.get("/info").status_code == 401


@pytest.mark.parametrize("name,content,headers,status,needle", [
    ("deep nesting", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 422, "not valid JSON"),
    ("invalid UTF-8", b'{"inputs": ["\xff\xfe bad"]}', {}, 422, "not valid JSON"),
    ("malformed JSON", b'{"inputs": [', {}, 422, "json"),
    ("gzip body", gzip.compress(b'{"inputs": ["a"]}'), {"content-encoding": "gzip"}, 415, "content-encoding"),
    ("text body", b'{"inputs": ["a"]}', {"content-type": "text/plain"}, 415, "application/json"),
    ("form body", b"inputs=a", {"content-type": "application/x-www-form-urlencoded"}, 415, "application/json"),
])
def test_unreadable_bodies_are_4xx_as_documented(client, name, content, headers, status, needle):
    r = client.post("/predict", content=content, headers={"content-type": "application/json", **headers})
    assert r.status_code == status, r.text
    assert needle.lower() in r.text.lower()
    ok = client.post("/predict", content=b'{"inputs": ["a"]}', headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200
    assert client.post("/predict", content=b'{"inputs": ["a"]}', headers={"content-type": "application/vnd.x+json"}
                       ).status_code == 200


# --- 8. start-up errors name the right thing ---------------------------------------------------------------
@pytest.mark.parametrize("overrides,needle,not_needle", [
    ({"labels": ("a dull and tedious mess", "positive")}, "labels ['a dull and tedious mess', 'positive']",
     "adapter '"),
    ({"sigma": None, "anchor": "DIR"}, "is a directory", "no such file")])
def test_startup_errors_name_the_cause(tiny, tmp_path, overrides, needle, not_needle):
    overrides = {k: (str(tmp_path) if v == "DIR" else v) for k, v in overrides.items()}
    with TestClient(create_app(make_settings(tiny, warmup=False, **overrides))) as c:
        _wait(lambda: c.get("/readyz").json()["status"] != "loading", "the load to end")
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "failed"
    detail = r.json()["detail"]
    assert needle in detail and not_needle not in detail, detail
