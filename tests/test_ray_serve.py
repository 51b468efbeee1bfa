"""Ray Serve scale-out (deploy/ray/serve_app.py) on a real local Ray, on CPU with the tiny model.

One module-scoped cluster (Ray's start is the slow part): two replicas of the app behind Ray's
HTTP proxy on loopback. Checks: concurrent requests are answered by both replicas, with the same
answers as the single-process app; /feedback works whichever replica it reaches; the replicas'
metrics reach Ray's Prometheus endpoint under the documented names (after the ``ray_`` prefix
is stripped, as prometheus-ray.yml does).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
pytest.importorskip("app.main", reason="app.main is not importable yet")

from conftest import LABELS  # noqa: E402
from test_deploy import EXPORTED  # noqa: E402

RAY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "ray"
SIGMA = 0.05
N_REQUESTS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_settings(tiny) -> dict:
    return {"model": tiny["model"], "adapter": tiny["adapter"], "labels": LABELS, "sigma": SIGMA,
            "cache_dir": str(tiny["root"] / "cache-ray"), "n_samples": 4, "warmup": False}


@pytest.fixture(scope="module")
def cluster(tiny):
    import ray
    from ray import cloudpickle, serve

    sys.path.insert(0, str(RAY_DIR))
    import serve_app

    # The workers need not import serve_app from a path: ship the module's code by value.
    cloudpickle.register_pickle_by_value(serve_app)
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway loopback cluster: no token written to ~/.ray
    metrics_port, http_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        app = serve_app.build_app({**tiny_settings(tiny), "num_gpus": 0, "num_cpus": 0.5, "num_replicas": 2,
                                   "metrics_interval_s": 1.0, "ready_timeout_s": 300})
        serve.run(app, name="tfb", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 300
        while True:  # serve.run returns once the replicas are running; the proxy may lag a little
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Ray Serve application did not become ready"
            time.sleep(0.5)
        yield {"base": base, "metrics_port": metrics_port}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if auth_mode is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = auth_mode
            cloudpickle.unregister_pickle_by_value(serve_app)
            sys.path.remove(str(RAY_DIR))


@pytest.fixture(scope="module")
def reference(tiny):
    """The single-process app's answers, for the same settings."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(**tiny_settings(tiny)))) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        return {text: client.post("/predict", json={"inputs": [text], "seed": 3}).json()
                for text in ("a great film", "a dull mess")}


def test_two_replicas_answer_concurrent_requests(cluster, reference):
    texts = list(reference)

    def call(i: int) -> tuple[str, str, dict]:
        text = texts[i % len(texts)]
        r = httpx.post(f"{cluster['base']}/predict", json={"inputs": [text], "seed": 3}, timeout=60)
        assert r.status_code == 200, r.text
        return text, r.headers["x-tfb-replica"], r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(N_REQUESTS)))
    replicas = {rep for _, rep, _ in results}
    assert len(replicas) == 2, f"answers came from {replicas}"
    for text, _, body in results:
        want = reference[text]
        got = body["predictions"][0]
        exp = want["predictions"][0]
        assert body["sigma"] == pytest.approx(SIGMA) and body["labels"] == LABELS
        assert got["label"] == exp["label"]
        assert got["probs"] == pytest.approx(exp["probs"], abs=1e-5)
        assert got["mutual_information"] == pytest.approx(exp["mutual_information"], abs=1e-5)
    cluster["predict_ids"] = [b["predictions"][0]["id"] for _, _, b in results]
    cluster["predict_replicas"] = replicas


def test_feedback_reaches_any_replica(cluster):
    ids = cluster.get("predict_ids")
    if not ids:
        pytest.skip("needs the predictions of the previous test")
    seen = set()
    for pred_id in ids:
        r = httpx.post(f"{cluster['base']}/feedback", json={"id": pred_id, "label": "positive"}, timeout=30)
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-tfb-replica"])
    dup = httpx.post(f"{cluster['base']}/feedback", json={"id": ids[0], "label": "positive"}, timeout=30)
    assert dup.status_code in (409, 422), dup.text


def scrape_ray(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_metrics_exported_the_ray_way(cluster):
    if not cluster.get("predict_ids"):
        pytest.skip("needs the traffic of the previous tests")
    want_requests = N_REQUESTS
    deadline = time.monotonic() + 90
    while True:
        text = scrape_ray(cluster["metrics_port"])
        total = sum(float(v) for v in re.findall(
            r'^ray_tfb_requests_total\{[^}]*route="/predict"[^}]*status="200"[^}]*\} (\S+)$', text, re.M))
        fb = sum(float(v) for v in re.findall(r"^ray_tfb_feedback_total\{[^}]*\} (\S+)$", text, re.M))
        if total >= want_requests and fb >= len(cluster["predict_ids"]):
            break
        assert time.monotonic() < deadline, f"Ray exported {total} /predict requests and {fb} labels"
        time.sleep(1)
    assert total == want_requests
    assert fb == len(cluster["predict_ids"])
    names = {m[len("ray_"):] for m in re.findall(r"^(ray_tfb_\w+)\{", text, re.M)}
    assert names <= EXPORTED, names - EXPORTED
    for needed in ("tfb_ready", "tfb_calibration_bin_count_total", "tfb_request_duration_seconds_bucket",
                   "tfb_prediction_mutual_information_bucket", "tfb_batch_rows_count"):
        assert needed in names
    ready = [float(v) for v in re.findall(r"^ray_tfb_ready\{[^}]*\} (\S+)$", text, re.M)]
    assert ready == [1.0, 1.0], "one tfb_ready series per replica"
