"""Helpers shared by the app tests (no tests here): settings on the tiny model, a ready client, metrics."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings

LABELS = ("negative", "positive")
PROMPTS = ["a great film with a wonderful cast", "a dull and tedious mess of a movie",
           "the plot is thin but the acting is superb", "I would not watch it again"]


@contextmanager
def clean_env() -> Iterator[None]:
    """No TFB_* variable of the calling shell leaks into the settings under test."""
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith("TFB_")}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


def make_settings(tiny: dict[str, Any], **overrides: Any) -> Settings:
    """Settings for the tiny model (generic task, fixed sigma) with small limits; ``overrides`` win."""
    values: dict[str, Any] = dict(
        model=tiny["model"], adapter=tiny["adapter"], labels=LABELS, sigma=0.05,
        cache_dir=str(tiny["root"] / "cache"), exit_on_startup_failure=False, max_wait_ms=2.0, max_inputs=8,
        max_samples=16, max_batch_rows=32, max_body_bytes=16384, max_length=64, request_timeout_s=120.0)
    values.update(overrides)
    with clean_env():
        return Settings(**values)


def wait_ready(client: TestClient, limit_s: float = 120.0, calibrated: bool = True) -> None:
    """Poll /readyz until 200 and, with ``calibrated``, until no adapter's sigma search or calibration
    is still running in the background (the bound only guards against a hang; nothing asserts a duration)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            break
        assert r.json()["status"] == "loading", r.json()
        time.sleep(0.02)
    else:
        raise AssertionError("the app did not become ready")
    if calibrated:
        wait_calibrated(client, deadline)


def wait_calibrated(client: TestClient, deadline: float) -> None:
    """Wait until every start-up adapter's background sigma search and every adapter's background
    calibration (if any) has finished or failed."""
    adapters = client.app.state.tfb.predictor.adapters  # type: ignore[attr-defined]
    while adapters.lifecycle.coming() or any(e.calibration_run is not None and e.calibration_run.state == "running"
                                             for e in adapters.engines.values()):
        if time.monotonic() > deadline:
            raise AssertionError("the calibration did not finish")
        time.sleep(0.02)


@contextmanager
def ready_client(settings: Settings, calibrated: bool = True, **client_kwargs: Any) -> Iterator[TestClient]:
    """A client of the app once it is ready (and, with ``calibrated``, its background searches and
    calibrations done)."""
    with TestClient(create_app(settings), **client_kwargs) as client:
        wait_ready(client, calibrated=calibrated)
        yield client


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, parsed with prometheus-client's own parser."""
    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def strip_ids(response: dict[str, Any]) -> dict[str, Any]:
    """The response without what the server adds to the engine's answer: prediction ids and the adapter's name."""
    return {**{k: v for k, v in response.items() if k != "adapter"},
            "predictions": [{k: v for k, v in p.items() if k != "id"} for p in response["predictions"]]}


def assert_close(a: Any, b: Any, tol: float = 1e-5, path: str = "") -> None:
    """Equal structure; floats equal within ``tol`` (padding in another batch may move the last bits)."""
    if isinstance(a, float) or isinstance(b, float):
        assert abs(float(a) - float(b)) <= tol, f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_close(a[k], b[k], tol, f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, tol, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


#: a minimal chat template for the tiny tokenizer (which has none): role: content lines
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@contextmanager
def chat_templated(client):
    """The served tokenizer with :data:`CHAT_TEMPLATE` for the duration (the tiny one has none)."""
    tok = client.app.state.tfb.predictor.engine.classifier.tokenizer
    tok.chat_template = CHAT_TEMPLATE
    try:
        yield tok
    finally:
        tok.chat_template = None


def longest_run(events: list[str], what: str) -> int:
    """The most ``what`` events in a row in ``events``."""
    longest = run = 0
    for e in events:
        run = run + 1 if e == what else 0
        longest = max(longest, run)
    return longest
