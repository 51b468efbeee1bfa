"""Ray Serve scale-out (deploy/ray/serve_app.py) on a real local Ray, on CPU with the tiny model.

One module-scoped cluster (Ray's start is the slow part): two replicas of the app behind Ray's
HTTP proxy on loopback. Checks: concurrent requests are answered by both replicas, with the same
answers as the single-process app; /feedback works whichever replica it reaches; the replicas'
metrics reach Ray's Prometheus endpoint under the documented names (after the ``ray_`` prefix
is stripped, as prometheus-ray.yml does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from conftest import LABELS, require
from helpers.ray_cluster import local_serve
from test_deploy import EXPORTED

require("ray.serve", "ray[serve] is not installed (extra 'ray')")

RAY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "ray"
SIGMA = 0.05
N_REQUESTS = 24




def tiny_settings(tiny) -> dict:
    calibration = tiny["root"] / "ray-calibration.jsonl"  # labelled: prediction sets and abstention
    calibration.write_text("".join(json.dumps({"prompt": f"a {w} film", "label": LABELS[i % 2]}) + "\n"
                                   for i, w in enumerate(["great", "dull", "superb", "tedious", "fine", "awful",
                                                          "moving", "thin", "warm", "flat"] * 2)))
    return {"model": tiny["model"], "adapter": tiny["adapter"], "labels": LABELS, "sigma": SIGMA,
            "cache_dir": str(tiny["root"] / "cache-ray"), "n_samples": 4, "warmup": False,
            "calibration": str(calibration)}


@pytest.fixture(scope="module")
def cluster(tiny):
    sys.path.insert(0, str(RAY_DIR))
    import serve_app

    try:
        with local_serve([serve_app], lambda: serve_app.build_app(
                {**tiny_settings(tiny), "num_gpus": 0, "num_cpus": 0.5, "num_replicas": 2,
                 "metrics_interval_s": 1.0, "ready_timeout_s": 300}), "tfb") as running:
            yield running
    finally:
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


@pytest.fixture(scope="module")
def predictions(cluster, reference):
    """N_REQUESTS concurrent /predict calls through Ray's proxy: (text, replica, body) each."""
    texts = list(reference)

    def call(i: int) -> tuple[str, str, dict]:
        text = texts[i % len(texts)]
        r = httpx.post(f"{cluster['base']}/predict", json={"inputs": [text], "seed": 3}, timeout=60)
        assert r.status_code == 200, r.text
        return text, r.headers["x-tfb-replica"], r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(call, range(N_REQUESTS)))


@pytest.fixture(scope="module")
def labelled(cluster, predictions):
    """/feedback for every prediction: a mistyped label first, then the right one, then again. The
    predictions are labelled concurrently (each one's three posts in order): one client's sequential
    posts may all be routed to the one replica Ray's router has found idle, and then no label would
    reach the replica that did not predict."""
    def label(body: dict) -> list[httpx.Response]:
        pred_id = body["predictions"][0]["id"]
        return [httpx.post(f"{cluster['base']}/feedback", json={"id": pred_id, "label": lab}, timeout=30)
                for lab in ("postive", "positive", "negative")]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(label, [body for _, _, body in predictions]))


def test_two_replicas_answer_concurrent_requests(predictions, reference):
    replicas = {rep for _, rep, _ in predictions}
    assert len(replicas) == 2, f"answers came from {replicas}"
    for text, _, body in predictions:
        want = reference[text]
        got = body["predictions"][0]
        exp = want["predictions"][0]
        assert body["sigma"] == pytest.approx(SIGMA) and body["labels"] == LABELS
        assert got["label"] == exp["label"]
        assert got["probs"] == pytest.approx(exp["probs"], abs=1e-5)
        assert got["mutual_information"] == pytest.approx(exp["mutual_information"], abs=1e-5)


def test_feedback_reaches_any_replica_and_a_typo_blocks_nothing(labelled):
    replicas = set()
    for typo, right, again in labelled:
        assert typo.status_code == 422 and "postive" in typo.text, typo.text
        assert right.status_code == 200, right.text  # the typo did not claim the prediction
        assert again.status_code == 409, again.text  # a second label, whichever replica it reached
        replicas |= {r.headers["x-tfb-replica"] for r in (typo, right, again)}
    assert len(replicas) == 2, f"/feedback reached only {replicas}"


def scrape_ray(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_metrics_exported_the_ray_way(cluster, predictions, labelled):
    want_requests = N_REQUESTS
    deadline = time.monotonic() + 90
    while True:
        text = scrape_ray(cluster["metrics_port"])
        total = sum(float(v) for v in re.findall(
            r'^ray_tfb_requests_total\{[^}]*route="/predict"[^}]*status="200"[^}]*\} (\S+)$', text, re.M))
        fb = sum(float(v) for v in re.findall(r"^ray_tfb_feedback_total\{[^}]*\} (\S+)$", text, re.M))
        if total >= want_requests and fb >= len(labelled):
            break
        assert time.monotonic() < deadline, f"Ray exported {total} /predict requests and {fb} labels"
        time.sleep(1)
    assert total == want_requests
    assert fb == len(labelled)
    names = {m[len("ray_"):] for m in re.findall(r"^(ray_tfb_\w+)\{", text, re.M)}
    assert names <= EXPORTED, names - EXPORTED
    for needed in ("tfb_ready", "tfb_calibration_bin_count_total", "tfb_request_duration_seconds_bucket",
                   "tfb_prediction_mutual_information_bucket", "tfb_batch_rows_count"):
        assert needed in names
    ready = [float(v) for v in re.findall(r"^ray_tfb_ready\{[^}]*\} (\S+)$", text, re.M)]
    assert ready == [1.0, 1.0], "one tfb_ready series per replica"


class _FakeRemote:
    """A Ray actor method whose .remote() answers after ``delay_s`` without blocking the loop."""

    def __init__(self, fn, delay_s: float) -> None:
        self.fn, self.delay_s = fn, delay_s

    def remote(self, *args):
        async def later():
            await asyncio.sleep(self.delay_s)
            return self.fn(*args)
        return asyncio.ensure_future(later())  # runs whether or not it is awaited, as a Ray call does


class _FakeActor:
    def __init__(self, actor, delay_s: float = 0.05) -> None:
        for name in ("add", "lookup", "claim"):
            setattr(self, name, _FakeRemote(getattr(actor, name), delay_s))


def test_shared_store_validates_before_claiming_and_never_blocks_the_loop():
    """The shared store (no cluster: the actor's class behind a fake handle) refuses a typo with
    422 without claiming, takes the right label once, 409s a second one from any replica, and
    waits for the actor on the event loop without blocking it."""
    sys.path.insert(0, str(RAY_DIR))
    try:
        import serve_app
    finally:
        sys.path.remove(str(RAY_DIR))
    from app.errors import DuplicateFeedbackError, UnknownPredictionError
    from app.predictor import FeedbackRecord, FeedbackStore
    from tfb_core.data.tasks import TaskError, generic_task

    actor = _FakeActor(serve_app.FeedbackStoreActor(100))
    here = serve_app.SharedFeedbackStore(FeedbackStore(100), actor)  # the replica that predicted
    there = serve_app.SharedFeedbackStore(FeedbackStore(100), actor)  # another replica

    def target(label):
        return lambda r: generic_task(r.labels).label_index(label)

    async def scenario():
        here.add("p1", FeedbackRecord(tuple(LABELS), [0.2, 0.8], 1, prediction_set=("positive",), alpha=0.1,
                              abstain=False, max_risk=0.05))
        await asyncio.sleep(0.1)  # the fire-and-forget add reaches the actor
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        tick = asyncio.create_task(ticker())
        with pytest.raises(TaskError, match="postive"):
            await there.label("p1", target("postive"))  # a typo, through the other replica
        assert ticks > 0, "the event loop was blocked while the actor answered"
        record, index = await there.label("p1", target("positive"))
        assert index == 1 and record == FeedbackRecord(tuple(LABELS), [0.2, 0.8], 1, labelled=True,
                                               prediction_set=("positive",), alpha=0.1, abstain=False,
                                               max_risk=0.05)  # the whole prediction, conformal fields too
        with pytest.raises(DuplicateFeedbackError):
            await here.label("p1", target("positive"))  # the predicting replica learns of it
        with pytest.raises(DuplicateFeedbackError):
            await there.label("p1", target("negative"))
        with pytest.raises(UnknownPredictionError):
            await there.label("nope", target("positive"))
        tick.cancel()

    asyncio.run(scenario())


def test_feedback_on_another_replica_keeps_the_conformal_fields(cluster, labelled):
    """Predictions with alpha and max_risk, labelled through whichever replica the proxy picks:
    realised coverage and selective risk count every label, also those that reach the replica
    that did not predict (it reads the prediction set and abstain flag from the shared actor).
    Runs after test_metrics_exported_the_ray_way, whose counts exclude these requests."""
    base = cluster["base"]

    def predict_and_label(i: int) -> tuple[bool, bool, bool, bool]:
        r = httpx.post(f"{base}/predict", json={"inputs": ["a great film" if i % 2 else "a dull mess"],
                                                "alpha": 0.2, "max_risk": 0.45}, timeout=60)
        assert r.status_code == 200, r.text
        p = r.json()["predictions"][0]
        truth = LABELS[i % 2]
        f = httpx.post(f"{base}/feedback", json={"id": p["id"], "label": truth}, timeout=30)
        assert f.status_code == 200, f.text
        return (f.headers["x-tfb-replica"] != r.headers["x-tfb-replica"], truth in p["prediction_set"],
                not p["abstain"], (not p["abstain"]) and p["label"] != truth)

    # concurrent clients, so that Ray's router spreads them; rounds of 16 until a label has reached
    # the replica that did not predict (the bound only guards against a router that never spreads)
    outcomes: list[tuple[bool, bool, bool, bool]] = []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while not any(o[0] for o in outcomes) and len(outcomes) < 80:
            outcomes += pool.map(predict_and_label, range(len(outcomes), len(outcomes) + 16))
    made = len(outcomes)
    cross, covered, answered, wrong = (sum(column) for column in zip(*outcomes, strict=True))
    assert cross > 0, "no label reached the other replica: nothing was tested"

    def total(text: str, name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^ray_{name}\{{[^}}]*\}} (\S+)$", text, re.M))

    deadline = time.monotonic() + 90
    while True:
        text = scrape_ray(cluster["metrics_port"])
        if total(text, "tfb_feedback_total") >= len(labelled) + made:
            break
        assert time.monotonic() < deadline, "the labels did not reach Ray's metrics"
        time.sleep(1)
    assert total(text, "tfb_feedback_with_set_total") == made
    assert total(text, "tfb_feedback_set_covered_total") == covered
    assert total(text, "tfb_feedback_set_target_sum_total") == pytest.approx(0.8 * made)
    assert total(text, "tfb_feedback_answered_total") == answered
    assert total(text, "tfb_feedback_answered_wrong_total") == wrong


GEN_BODY = {"prompt": "a great film", "max_tokens": 6, "temperature": 0, "n_samples": 3, "stop_token_ids": []}


def test_generation_and_its_stream_go_through_rays_proxy_as_in_one_process(cluster, tiny):
    """/v1/completions through Ray's proxy: the same tokens and uncertainty as the single-process app,
    and a stream arrives as server-sent events, chunk by chunk, ending with [DONE]."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(**tiny_settings(tiny)))) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        alone = client.post("/v1/completions", json=GEN_BODY).json()["choices"][0]
    r = httpx.post(f"{cluster['base']}/v1/completions", json=GEN_BODY, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]
    assert got["text"] == alone["text"]
    for a, b in zip(got["uncertainty"]["tokens"], alone["uncertainty"]["tokens"], strict=True):
        assert a["token_id"] == b["token_id"]
        assert a["mutual_information"] == pytest.approx(b["mutual_information"], abs=1e-5)
    with httpx.stream("POST", f"{cluster['base']}/v1/completions", json={**GEN_BODY, "stream": True},
                      timeout=60) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone["text"]
    assert [c["choices"][0]["uncertainty"]["token"]["token_id"] for c in chunks[:-1]] == \
        [t["token_id"] for t in alone["uncertainty"]["tokens"]]


def test_runtime_lora_updating_is_refused_under_ray_serve(tiny):
    """A load through Ray's proxy would reach one replica: the replica refuses the setting, naming it."""
    sys.path.insert(0, str(RAY_DIR))
    try:
        import serve_app
    finally:
        sys.path.remove(str(RAY_DIR))
    from app.settings import Settings

    serve_app.check_replica_settings(Settings(**tiny_settings(tiny)))  # off: fine
    with pytest.raises(ValueError, match="TFB_ALLOW_RUNTIME_LORA_UPDATING .* TFB_ADAPTERS"):
        serve_app.check_replica_settings(Settings(**tiny_settings(tiny), allow_runtime_lora_updating=True))


def test_online_sets_are_shared_across_replicas_through_the_actor(tmp_path):
    """Two replicas' online states (no cluster: the actor's class behind a fake handle): both join
    the actor's state; a label reaching replica B for a prediction replica A served moves the
    threshold by eta (err - alpha), computed here from A's served set; A's mirror follows; a
    prediction B served before it joined (its own state then) is not applied (unlabelled, for the bound)."""
    import types

    sys.path.insert(0, str(RAY_DIR))
    try:
        import serve_app
    finally:
        sys.path.remove(str(RAY_DIR))
    import torch

    from app.online import AdapterOnline
    from tfb_core.config import ModelConfig
    from tfb_core.decide.conformal import Calibration
    from tfb_core.serving.config import EngineConfig

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(40, 2, generator=gen) * 2, dim=1)
    cal = Calibration.fit(probs, torch.randint(0, 2, (40,), generator=gen))
    engine = types.SimpleNamespace(name="a", calibration=cal, task=types.SimpleNamespace(labels=LABELS, generative=False),
                                   cfg=EngineConfig(model=ModelConfig(cache_dir=str(tmp_path)), conformal_online=True,
                                                    online_eta=0.1))

    class Remote:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args):
            async def later():
                await asyncio.sleep(0.01)
                return self.fn(*args)
            return asyncio.ensure_future(later())

    actor = serve_app.OnlineStateActor()
    handle = types.SimpleNamespace(**{m: Remote(getattr(actor, m)) for m in ("attach", "snapshot", "update")})

    async def scenario():
        a = AdapterOnline(engine, cal, 4, 0.0, serve_app.SharedOnline(handle), refresh_s=0.0)
        await asyncio.sleep(0.05)  # A's state becomes the actor's
        b = AdapterOnline(engine, cal, 4, 0.0, serve_app.SharedOnline(handle), refresh_s=0.0)
        early, _ = b.serve(0.2)  # before B joined
        await asyncio.sleep(0.05)
        assert a.state_id == b.state_id == actor.states[a.key_text]["state_id"]
        served, said = a.serve(0.2)
        q0 = served.thresholds[0]
        p = [0.3, 0.7]
        err = 1 - p[0] > q0  # the true class 0's score against the served threshold
        assert await b.label(served, p, 0) is (not err)
        assert await b.label(early, p, 0) is None
        a.serve(0.2)  # starts A's refresh
        await asyncio.sleep(0.05)
        now, said = a.serve(0.2)
        assert now.thresholds[0] == pytest.approx(q0 + 0.1 * (float(err) - 0.2)) and said["labelled"] == 1

    asyncio.run(scenario())
