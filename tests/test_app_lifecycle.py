"""Start-up, readiness, start-up failure, API key, settings and the `tfb serve` command line."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from test_app_support import (
    LABELS,
    PROMPTS,
    clean_env,
    make_settings,
    ready_client,
    wait_ready,
)

import app.state
from app.main import create_app
from app.settings import Settings
from tfb_core.config import DEFAULT_MODEL
from tfb_core.serving.config import DEMO_ADAPTER
from tfb_core.serving.startup import load_engine


def test_503_until_ready_then_200(tiny, monkeypatch):
    release = threading.Event()
    real_load = load_engine

    def slow_load(cfg, progress=True, background_calibration=False):
        assert release.wait(60), "the test never released the load"
        return real_load(cfg, progress=False, background_calibration=background_calibration)

    monkeypatch.setattr(app.state, "load_engine", slow_load)
    gc.unfreeze()  # an earlier app in this process froze its objects
    with TestClient(create_app(make_settings(tiny))) as c:
        try:
            assert gc.get_freeze_count() == 0
            assert c.get("/healthz").status_code == 200
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["status"] == "loading" and "retry-after" in r.headers
            r = c.post("/predict", json={"inputs": PROMPTS[:1]})
            assert r.status_code == 503 and "still loading" in r.json()["detail"]
            assert c.get("/info").status_code == 503
            assert c.post("/feedback", json={"id": "x", "label": 0}).status_code == 503
            metrics = c.get("/metrics").text
            assert "tfb_ready 0.0" in metrics
        finally:
            release.set()
        wait_ready(c)
        assert gc.get_freeze_count() > 0  # the loaded model's objects are out of the collector's way
        assert c.get("/healthz").status_code == 200
        assert c.post("/predict", json={"inputs": PROMPTS[:1]}).status_code == 200
        assert "tfb_ready 1.0" in c.get("/metrics").text


def test_startup_failure_is_reported(tiny):
    bad = "/nonexistent/adapter-dir"
    with TestClient(create_app(make_settings(tiny, adapter=bad))) as c:
        for _ in range(3000):
            r = c.get("/readyz")
            if r.json()["status"] != "loading":
                break
            threading.Event().wait(0.02)
        assert r.status_code == 503 and r.json()["status"] == "failed" and bad in r.json()["detail"]
        r = c.post("/predict", json={"inputs": ["a"]})
        assert r.status_code == 503 and bad in r.json()["detail"]
        assert c.get("/healthz").status_code == 200


def _env(tiny) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TFB_")}
    env["TFB_CACHE_DIR"] = str(tiny["root"] / "cache")
    env["OMP_NUM_THREADS"] = "1"  # as tests/conftest.py: one thread on a shared CPU
    return env


def test_bad_adapter_exits_nonzero_naming_it(tiny):
    """`tfb serve --adapter BAD` and `uvicorn --factory app.main:create_app` with TFB_ADAPTER=BAD (in parallel)."""
    bad_flag, bad_env = "/nonexistent/tfb-adapter", "/nonexistent/tfb-adapter-env"
    serve = [sys.executable, "-m", "app.cli", "serve", "--model", tiny["model"], "--adapter", bad_flag,
             "--labels", *LABELS, "--sigma", "0.05", "--port", "0"]
    factory = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--port", "0"]
    factory_env = {**_env(tiny), "TFB_MODEL": tiny["model"], "TFB_ADAPTER": bad_env,
                   "TFB_LABELS": "negative,positive", "TFB_SIGMA": "0.05"}
    root = Path(__file__).parents[1]
    procs = [(subprocess.Popen(argv, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
              bad) for argv, env, bad in ((serve, _env(tiny), bad_flag), (factory, factory_env, bad_env))]
    try:
        for proc, bad in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode != 0, err
            assert bad in err
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_tfb_serve_bad_setting_exits_2_naming_it(tiny, capsys):
    from app.cli import main

    with clean_env():
        assert main(["serve", "--model", tiny["model"], "--labels", *LABELS, "--sigma", "-1"]) == 2
    err = capsys.readouterr().err
    assert "tfb serve: error" in err and "sigma" in err


# --- API key ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("metrics_public", [False, True])
def test_api_key(tiny, metrics_public):
    settings = make_settings(tiny, api_key="s3cret", metrics_public=metrics_public, warmup=False)
    with ready_client(settings) as c:
        good = {"Authorization": "Bearer s3cret"}
        for bad in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
            r = c.post("/predict", json={"inputs": ["a"]}, headers=bad)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert c.get("/info", headers=bad).status_code == 401
            assert c.post("/feedback", json={"id": "x", "label": 0}, headers=bad).status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == (200 if metrics_public else 401)
        assert c.get("/metrics", headers=good).status_code == 200
        r = c.post("/predict", json={"inputs": ["a"]}, headers=good)
        assert r.status_code == 200
        r = c.post("/feedback", json={"id": r.json()["predictions"][0]["id"], "label": 0}, headers=good)
        assert r.status_code == 200
        assert "s3cret" not in c.get("/info", headers=good).text


# --- settings -----------------------------------------------------------------------------------------
def test_settings_from_environment(monkeypatch):
    with clean_env():
        monkeypatch.setenv("TFB_LABELS", "yes, no")
        monkeypatch.setenv("TFB_SIGMA", "0.01")
        monkeypatch.setenv("TFB_MAX_BATCH_ROWS", "128")
        monkeypatch.setenv("TFB_API_KEY", "zq-secret-9")
        s = Settings()
        assert s.labels == ("yes", "no") and s.sigma == 0.01 and s.max_batch_rows == 128
        assert s.api_key is not None and s.api_key.get_secret_value() == "zq-secret-9"
        assert "zq-secret-9" not in repr(s) and "zq-secret-9" not in str(s.model_dump())
        monkeypatch.setenv("TFB_LABELS", '["A", "B", "C"]')
        cfg = Settings().engine_config()
        assert cfg.labels == ("A", "B", "C") and cfg.max_rows == 128 and cfg.sigma == 0.01


def test_settings_defaults_are_the_embedded_default():
    with clean_env():
        cfg = Settings().engine_config().with_defaults()
    assert cfg.model.model == DEFAULT_MODEL and cfg.model.adapter == str(DEMO_ADAPTER) and cfg.task == "sst2"


@pytest.mark.parametrize("bad,field", [({"sigma": -1.0}, "sigma"), ({"dtype": "float8"}, "dtype"),
                                       ({"device": "tpu"}, "device"), ({"max_samples": 100}, "max_samples"),
                                       ({"n_samples": 0}, "n_samples"), ({"port": 70000}, "port"),
                                       ({"search_low": 0.5}, "low"), ({"max_length": 2}, "max_length"),
                                       ({"max_wat_ms": 1}, "max_wat_ms")])
def test_bad_settings_name_the_field(bad, field):
    with clean_env(), pytest.raises(ValidationError, match=field):
        Settings(**bad)


def test_serve_flags_override_environment(monkeypatch):
    from app.cli import build_parser, settings_overrides

    with clean_env():
        monkeypatch.setenv("TFB_PORT", "9000")
        monkeypatch.setenv("TFB_SIGMA", "0.2")
        monkeypatch.setenv("TFB_HOST", "0.0.0.0")
        args = build_parser().parse_args(["serve", "--port", "9100", "--labels", "yes", "no", "--samples", "4",
                                          "--seed", "7", "--model", "/m"])
        s = Settings(**settings_overrides(args))
    assert s.port == 9100 and s.host == "0.0.0.0" and s.sigma == 0.2
    assert s.labels == ("yes", "no") and s.n_samples == 4 and s.seed == 7 and s.model == "/m"
    cfg = s.engine_config()
    assert cfg.search.seed == 7  # as `tfb predict --seed`: the search's noise follows the seed
