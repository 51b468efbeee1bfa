"""Clear errors for hostile clients and broken files: a request's own label set larger than the adapter's, a 500
on a keep-alive connection, broken adapter files, /classify's validation, bundled defaults of an
adapter folder named by path, and requests on open connections during the drain.

Loopback only; nothing asserts a duration (timeouts only bound a hang).
"""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from test_app_hostile import _read_all, live_server
from test_app_support import PROMPTS, make_settings, ready_client

#: six labels, each one token of the tiny tokenizer, on an adapter configured with two
SIX = ["a", "b", "c", "d", "e", "f"]


@pytest.fixture(scope="module")
def client(tiny):
    with ready_client(make_settings(tiny)) as c:
        yield c


def _http(method: str, path: str, body: dict | None = None, close: bool = False) -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n")
    return head.encode() + data


# --- a request's labels outnumber the adapter's ---------------------------------------------------------
@pytest.mark.parametrize("path", ["/predict", "/classify"])
def test_more_request_labels_than_configured_are_answered(client, path):
    key = "inputs" if path == "/predict" else "input"
    r = client.post(path, json={key: PROMPTS[:2], "labels": SIX, "n_samples": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["labels"] == SIX
    items = out["predictions"] if path == "/predict" else out["data"]
    for p in items:
        assert len(p["probs"]) == 6 and p["label"] == SIX[max(range(6), key=lambda i: p["probs"][i])]


@pytest.mark.parametrize("path", ["/predict", "/classify"])
def test_a_class_past_the_configured_labels_wins(client, monkeypatch, path):
    """The winning class is the request's sixth label: the response is built with the request's
    label set, not the adapter's two (an IndexError, a 500, before)."""
    served = client.app.state.tfb.worker.engine
    real = served.run_batch

    def last_class_wins(requests, *args, **kwargs):  # (B, N, C) per request: all mass on class C - 1
        out = real(requests, *args, **kwargs)
        return [torch.nn.functional.one_hot(torch.full(t.shape[:2], t.shape[-1] - 1), t.shape[-1]).float()
                if isinstance(t, torch.Tensor) else t for t in out]

    monkeypatch.setattr(served, "run_batch", last_class_wins)
    key = "inputs" if path == "/predict" else "input"
    r = client.post(path, json={key: PROMPTS[:2], "labels": SIX, "n_samples": 3})
    assert r.status_code == 200, r.text
    items = r.json()["predictions"] if path == "/predict" else r.json()["data"]
    assert [p["label"] for p in items] == ["f", "f"] and all(p["probs"][5] == 1.0 for p in items)


# --- a 500 closes its keep-alive connection --------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tiny):
    with live_server(make_settings(tiny, warmup=False, keep_alive_s=30)) as (server, port):
        yield server, port


@pytest.mark.parametrize("path,key", [("/predict", "inputs"), ("/classify", "input")])
def test_500_closes_the_keep_alive_connection(live, monkeypatch, path, key):
    """An unexpected error is a 500 with ``Connection: close`` and the server closes the connection
    (a client reusing it is not left waiting for an answer that never comes)."""
    server, port = live

    def broken(*args, **kwargs):
        raise RuntimeError("forced")

    monkeypatch.setattr("app.predictor.respond", broken)  # the engine's answer as the response JSON
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(_http("POST", path, {key: PROMPTS[:1]}))
        reply = _read_all(s)  # ends when the server closes (the keep-alive timeout is 30 s: the socket's 20 s first)
    head = reply.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 500") and b"connection: close" in head, reply


# --- start-up errors name the adapter and the file ----------------------------------------------------------
def _failed_readyz(settings) -> str:
    from fastapi.testclient import TestClient
    from test_app_hostile import _wait

    from app.main import create_app

    with TestClient(create_app(settings)) as c:
        _wait(lambda: c.get("/readyz").json()["status"] != "loading", "the load to end")
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "failed", r.text
    return r.json()["detail"]


def test_truncated_adapter_weights_name_the_adapter_and_file(tiny, tmp_path, caplog):
    broken = tmp_path / "broken-adapter"
    shutil.copytree(tiny["adapter"], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # cut inside the header
    caplog.set_level("INFO")
    detail = _failed_readyz(make_settings(tiny, adapter=str(broken), warmup=False))
    assert str(broken) in detail and str(weights) in detail and "truncated or corrupt" in detail, detail
    assert "NoneType: None" not in caplog.text


def test_unexpected_startup_error_logs_its_own_traceback(tiny, monkeypatch, caplog):
    """A start-up failure that is not a LoadError is logged with its traceback, not ``NoneType: None``
    (the log call runs on the event loop, outside the worker's except block)."""
    class Surprise(Exception):
        pass

    def load(*args, **kwargs):
        raise Surprise("a bug in loading")

    monkeypatch.setattr("app.state.load_engine", load)
    caplog.set_level("INFO")
    assert "a bug in loading" in _failed_readyz(make_settings(tiny, warmup=False))
    failed = [r for r in caplog.records if "start-up failed" in r.getMessage()]
    assert failed and failed[0].exc_info is not None and failed[0].exc_info[0] is Surprise, caplog.text
    assert "NoneType: None" not in caplog.text


# --- calibration: the file's name, and what an unsupported alpha means --------------------------------------
def test_missing_calibration_file_is_named_as_one(tiny, tmp_path):
    missing = tmp_path / "no-such-calibration.jsonl"
    detail = _failed_readyz(make_settings(tiny, warmup=False, calibration=str(missing)))
    assert f"calibration file {str(missing)!r}: no such file" in detail and "anchor" not in detail, detail


@pytest.fixture(scope="module")
def skewed_cal(tmp_path_factory):
    """18 negative and 2 positive labelled records: with Mondrian at alpha 0.1, only 'positive'
    (n_y = 2 < 1/alpha - 1) is unsupported."""
    path = tmp_path_factory.mktemp("cal20") / "cal.jsonl"
    words = ["great", "dull", "superb", "tedious", "fine", "awful", "moving", "thin", "warm", "flat"]
    rows = [{"prompt": f"a {w} film, {v} cast", "label": "negative"} for w in words for v in ("good", "bad")]
    rows[0]["label"] = rows[1]["label"] = "positive"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_unsupported_alpha_detail_names_what_it_means(tiny, skewed_cal):
    from tfb_core.serving.response import predict
    from tfb_core.serving.startup import load_engine

    plain = load_engine(make_settings(tiny, calibration=str(skewed_cal)).engine_config(), progress=False)
    out = predict(plain, PROMPTS[:2], alpha=0.01)  # 20 inputs: 1/21 > 0.01
    detail = out["conformal"]["detail"]
    assert "Mondrian" not in detail and "every label" in detail, detail
    assert all(p["prediction_set"] == ["negative", "positive"] for p in out["predictions"])

    mondrian = load_engine(make_settings(tiny, calibration=str(skewed_cal), conformal_mondrian=True
                                            ).engine_config(), progress=False)
    out = predict(mondrian, PROMPTS, alpha=0.1)
    detail = out["conformal"]["detail"]
    assert not out["conformal"]["supported"] and "['positive']" in detail and "every label" not in detail, detail
    assert "'negative'" not in detail
    assert all("positive" in p["prediction_set"] for p in out["predictions"])  # forced into every set


# --- one validation for /predict and /classify --------------------------------------------------------------
WRONG_TYPES = [("n_samples", True), ("n_samples", "5"), ("n_samples", 2.0), ("seed", "1"), ("alpha", "0.1"),
               ("max_risk", "0.1"), ("return_samples", "yes"), ("labels", ["yes", 1])]


@pytest.mark.parametrize("field,value", WRONG_TYPES, ids=[f"{f}={v!r}" for f, v in WRONG_TYPES])
def test_classify_refuses_what_predict_refuses(client, field, value):
    p = client.post("/predict", json={"inputs": ["fine"], field: value})
    assert p.status_code == 422, p.text
    r = client.post("/classify", json={"input": "fine", field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and err["type"] == "BadRequestError", err


@pytest.mark.parametrize("field", ["alpha", "max_risk"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_alpha_is_named_as_such(client, field, value):
    body = f'"{field}": {value}'
    p = client.post("/predict", content=f'{{"inputs": ["fine"], {body}}}', headers={"content-type": "application/json"})
    r = client.post("/classify", content=f'{{"input": "fine", {body}}}', headers={"content-type": "application/json"})
    assert p.status_code == 422 and "must be a finite number in (0, 1)" in p.text, p.text
    assert r.status_code == 400 and "must be a finite number in (0, 1)" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == field


def test_400s_have_one_type_and_task_errors_name_input(tiny):
    with ready_client(make_settings(tiny, labels=None, task="sst2", max_length=200)) as c:
        task = c.post("/classify", json={"input": [{"text": "x"}]})  # sst2 needs a sentence
        parse = c.post("/classify", content=b'{"input": ', headers={"content-type": "application/json"})
        schema = c.post("/classify", json={"input": "x", "n_samples": 0})
        limit = c.post("/classify", json={"input": "x", "n_samples": 999})
    errors = [r.json()["error"] for r in (task, parse, schema, limit)]
    assert all(r.status_code == 400 for r in (task, parse, schema, limit))
    assert {e["type"] for e in errors} == {"BadRequestError"}, errors
    assert errors[0]["param"] == "input" and "sentence" in errors[0]["message"]
    assert errors[2]["param"] == errors[3]["param"] == "n_samples"


def test_classify_empty_list_is_the_validators_400(client):
    r = client.post("/classify", json={"input": []})
    assert r.status_code == 400 and "at least one" in r.json()["error"]["message"] and r.json()["error"]["param"] == "input"


# --- an adapter folder's own anchor and calibration follow it, and the calibration cache is by content -----
def _folder_with_sets(tiny, where) -> str:
    """A copy of the tiny adapter with an anchor.jsonl and a calibration.jsonl beside its weights."""
    folder = shutil.copytree(tiny["adapter"], where)
    words = ["great", "dull", "superb", "tedious", "fine", "awful", "moving", "thin"]
    rows = [{"prompt": f"a {w} film", "label": ["negative", "positive"][i % 2]} for i, w in enumerate(words)]
    (folder / "anchor.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]))
    (folder / "calibration.jsonl").write_text("\n".join(json.dumps(r) for r in rows[4:]))
    return str(folder)


def test_adapter_folder_named_by_path_brings_its_anchor_and_calibration(tiny, tmp_path, monkeypatch):
    from tfb_core.serving import config as engine_module
    from tfb_core.serving.config import EngineConfig

    folder = _folder_with_sets(tiny, tmp_path / "mine")
    s = make_settings(tiny, adapter=None, sigma=None, cache_dir=str(tmp_path / "cache"),
                      adapters=json.dumps([{"name": "mine", "adapter": folder}]))
    cfg = s.engine_configs()[0][1].with_defaults()
    assert cfg.anchor == f"{folder}/anchor.jsonl" and cfg.calibration == f"{folder}/calibration.jsonl"
    # the demo adapter's folder, named by its path: also its task
    monkeypatch.setattr(engine_module, "DEMO_ADAPTER", tmp_path / "mine")
    demo = EngineConfig(model=cfg.model).with_defaults()
    assert demo.task == "sst2" and demo.anchor == cfg.anchor and demo.calibration == cfg.calibration
    # what is given explicitly wins
    given = EngineConfig(model=cfg.model, sigma=0.1, calibration_split=0.5, labels=("a", "b")).with_defaults()
    assert given.anchor is None and given.calibration is None and given.task is None


def test_same_calibration_under_another_path_reuses_the_cache(tiny, tmp_path, caplog):
    from tfb_core.serving.response import info
    from tfb_core.serving.startup import load_engine

    cache_dir = str(tmp_path / "cache")
    caplog.set_level("INFO", logger="tfb_core")
    first = load_engine(make_settings(tiny, adapter=_folder_with_sets(tiny, tmp_path / "a"), sigma=0.05,
                                         cache_dir=cache_dir).engine_config(), progress=False)
    computed = [r for r in caplog.records if r.getMessage().startswith("calibration on")]
    assert first.calibration is not None and len(computed) == 1
    caplog.clear()
    moved = _folder_with_sets(tiny, tmp_path / "b")
    second = load_engine(make_settings(tiny, adapter=moved, sigma=0.05, cache_dir=cache_dir).engine_config(),
                            progress=False)
    assert not [r for r in caplog.records if r.getMessage().startswith("calibration on")]  # no second forward
    assert second.calibration is not None and second.calibration.scores == first.calibration.scores
    assert info(second)["calibration"]["source"] == f"file {moved}/calibration.jsonl"  # shown: where it was read


# --- a request on an open keep-alive connection during the drain ---------------------------------------------
def _read_response(s: socket.socket) -> bytes:
    """One whole response (headers and a Content-Length body) from a connection left open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed before a whole response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "closed within the body"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_request_on_open_connection_during_drain_is_503(tiny):
    """SIGTERM with a client's keep-alive connection open: its next request is answered 503 with
    Retry-After and Connection: close (uvicorn closed idle connections at the signal: the request
    found the connection closed), and the server then stops."""
    import signal

    from test_app_hostile import _wait

    settings = make_settings(tiny, warmup=False, drain_timeout_s=5.0, keep_alive_s=30)
    with live_server(settings) as (server, port):
        state = server.config.app.state.tfb
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(_http("POST", "/predict", {"inputs": PROMPTS[:1]}))
            assert _read_response(s).startswith(b"HTTP/1.1 200")  # the connection stays open (keep-alive)
            server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
            _wait(lambda: state.status == "draining", "the drain to begin")
            try:
                s.sendall(_http("POST", "/predict", {"inputs": PROMPTS[:1]}))
                reply = _read_all(s)
            except (BrokenPipeError, ConnectionResetError) as exc:
                reply = repr(exc).encode()
        server.thread.join(30)
        assert not server.thread.is_alive()
    head = reply.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 503"), reply
    assert b"retry-after:" in head and b"connection: close" in head and b"shutting down" in reply, reply
