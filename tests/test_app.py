"""The HTTP server on the tiny model: /predict against tfb_core and `tfb predict`, errors, feedback, metrics.

One app for the module (the lifespan runs inside ``with TestClient(...)``); counters are compared
as deltas, since the tests share it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_app_support import (
    LABELS,
    PROMPTS,
    assert_close,
    make_settings,
    metric,
    metric_samples,
    ready_client,
    strip_ids,
)

from tfb_core.decide.uncertainty import brier, nll
from tfb_core.serving.response import predict as engine_predict
from tfb_core.serving.startup import load_engine


@pytest.fixture(scope="module")
def settings(tiny):
    return make_settings(tiny)


@pytest.fixture(scope="module")
def client(settings):
    with ready_client(settings) as c:
        yield c


@pytest.fixture(scope="module")
def engine(settings):
    return load_engine(settings.engine_config(), progress=False)


def predict(client, **body):
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --- /predict against the library and the CLI ---------------------------------------------------
@pytest.mark.parametrize("n_samples,seed", [(None, None), (5, 3), (16, 0)])
def test_predict_matches_engine(client, engine, n_samples, seed):
    out = predict(client, inputs=PROMPTS, n_samples=n_samples, seed=seed, return_samples=True)
    expected = engine_predict(engine, PROMPTS, n_samples=n_samples, seed=seed, return_samples=True)
    assert_close(strip_ids(out), expected)
    assert out["labels"] == list(LABELS) and out["sigma"] == 0.05
    assert out["n_samples"] == (n_samples or 10)
    for p in out["predictions"]:
        assert len(p["probs"]) == 2 and p["label"] == LABELS[p["index"]]
        assert len(p["samples"]) == out["n_samples"]


def test_predict_matches_cli(client, tiny, capsys):
    from app.cli import main

    argv = ["predict", "--model", tiny["model"], "--adapter", tiny["adapter"], "--labels", *LABELS,
            "--sigma", "0.05", "--samples", "6", "--seed", "11", "--json"]
    for prompt in PROMPTS:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    cli_out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = predict(client, inputs=PROMPTS, n_samples=6, seed=11)
    assert_close(strip_ids(out), cli_out)


def test_default_seed_is_deterministic_and_own_seed_differs(client):
    a = predict(client, inputs=PROMPTS[:2])
    b = predict(client, inputs=PROMPTS[:2])
    assert strip_ids(a) == strip_ids(b)
    same = predict(client, inputs=PROMPTS[:2], seed=0)  # the configured seed
    assert_close(strip_ids(same), strip_ids(a))
    other = predict(client, inputs=PROMPTS[:2], seed=12345)
    assert other["predictions"][0]["probs"] != a["predictions"][0]["probs"]
    assert strip_ids(predict(client, inputs=PROMPTS[:2], seed=12345)) == strip_ids(other)


def test_ids_unique_and_samples_optional(client):
    out = predict(client, inputs=PROMPTS + PROMPTS)
    ids = [p["id"] for p in out["predictions"]]
    assert len(set(ids)) == len(ids)
    assert all("samples" not in p for p in out["predictions"])
    for p in out["predictions"]:
        assert math.isclose(sum(p["probs"]), 1.0, rel_tol=1e-5)
        assert p["confidence"] == max(p["probs"])
        assert p["mutual_information"] >= 0.0
        assert math.isclose(p["predictive_entropy"] - p["expected_entropy"], p["mutual_information"], abs_tol=1e-5)


def test_prompt_objects_and_other_labels(client, engine):
    plain = predict(client, inputs=[PROMPTS[0]])
    obj = predict(client, inputs=[{"prompt": PROMPTS[0]}])
    assert strip_ids(obj) == strip_ids(plain)
    out = predict(client, inputs=PROMPTS[:2], labels=["yes", "no"], n_samples=4)
    assert out["labels"] == ["yes", "no"]
    assert all(p["label"] in ("yes", "no") and len(p["probs"]) == 2 for p in out["predictions"])
    ids = engine.classifier.class_ids_for(["yes", "no"])
    noise = engine.noise(0, 4)
    probs = engine.classifier.sample_probs(PROMPTS[:2], 4, sigma=engine.sigma, noise=noise, class_ids=ids)  # (B, N, C)
    mean = probs.mean(1)
    got = torch.tensor([p["probs"] for p in out["predictions"]])
    assert torch.allclose(got, mean, atol=1e-5)


# --- bad requests: each its 4xx, and the server still answers -------------------------------------
LONG_PROMPT = " ".join(["a great film with a wonderful cast"] * 40)  # > 64 tokens, < 16 KiB
BAD = [
    ("malformed JSON", {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}, 422, "json"),
    ("not an object", {"json": ["a"]}, 422, ""),
    ("inputs not a list", {"json": {"inputs": "a great film"}}, 422, "inputs"),
    ("empty inputs", {"json": {"inputs": []}}, 422, "at least 1"),
    ("missing inputs", {"json": {"n_samples": 3}}, 422, "inputs"),
    ("empty prompt", {"json": {"inputs": [""]}}, 422, "at least 1 character"),
    ("blank prompt object", {"json": {"inputs": [{"prompt": ""}]}}, 422, "non-empty"),
    ("object without prompt", {"json": {"inputs": [{"sentence": "x"}]}}, 422, "prompt"),
    ("number as input", {"json": {"inputs": [3]}}, 422, "inputs"),
    ("N as a string", {"json": {"inputs": ["a"], "n_samples": "5"}}, 422, "n_samples"),
    ("N zero", {"json": {"inputs": ["a"], "n_samples": 0}}, 422, "n_samples"),
    ("N over the limit", {"json": {"inputs": ["a"], "n_samples": 17}}, 422, "TFB_MAX_SAMPLES"),
    ("negative seed", {"json": {"inputs": ["a"], "seed": -1}}, 422, "seed"),
    ("float seed", {"json": {"inputs": ["a"], "seed": 1.5}}, 422, "seed"),
    ("return_samples not bool", {"json": {"inputs": ["a"], "return_samples": "yes"}}, 422, "return_samples"),
    ("unknown field", {"json": {"inputs": ["a"], "temperature": 1}}, 422, "temperature"),
    ("too many inputs", {"json": {"inputs": ["a"] * 9}}, 422, "TFB_MAX_INPUTS"),
    ("prompt too long", {"json": {"inputs": [LONG_PROMPT]}}, 422, "TFB_MAX_LENGTH"),
    ("body too large", {"json": {"inputs": ["a" * 20000]}}, 413, "TFB_MAX_BODY_BYTES"),
    ("one label", {"json": {"inputs": ["a"], "labels": ["yes"]}}, 422, "labels"),
    ("duplicate labels", {"json": {"inputs": ["a"], "labels": ["yes", "yes"]}}, 422, "distinct"),
    ("label of many tokens", {"json": {"inputs": ["a"], "labels": ["yes", "a dull and tedious mess"]}}, 422,
     "not one"),
    ("empty label", {"json": {"inputs": ["a"], "labels": ["yes", ""]}}, 422, "at least 1 character"),
]


@pytest.mark.parametrize("name,kwargs,status,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_4xx_and_server_still_answers(client, name, kwargs, status, needle):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert needle.lower() in r.text.lower()
    assert predict(client, inputs=["still answering"])["predictions"]


def test_error_bodies_name_the_problem(client):
    r = client.post("/predict", json={"inputs": ["a"], "n_samples": 99})
    assert r.json() == {"detail": "n_samples 99 is over the limit of 16 (TFB_MAX_SAMPLES)"}
    r = client.get("/nope")
    assert r.status_code == 404 and "detail" in r.json()
    assert client.get("/predict").status_code == 405


def test_named_task_labels_and_fields(tiny):
    settings = make_settings(tiny, labels=None, task="sst2", max_length=200)
    with ready_client(settings) as c:
        out = c.post("/predict", json={"inputs": [{"sentence": "a great film"}], "labels": list(LABELS)})
        assert out.status_code == 200 and out.json()["labels"] == ["negative", "positive"]
        r = c.post("/predict", json={"inputs": [{"sentence": "a great film"}], "labels": ["yes", "no"]})
        assert r.status_code == 422 and "fixed labels" in r.json()["detail"]
        r = c.post("/predict", json={"inputs": ["a great film"]})  # a one-field task takes a bare string
        assert r.status_code == 200 and r.json()["predictions"][0]["probs"] == out.json()["predictions"][0]["probs"]
        r = c.post("/predict", json={"inputs": [{"text": "a great film"}]})
        assert r.status_code == 422 and "sentence" in r.json()["detail"]
        r = c.post("/predict", json={"inputs": [{"sentence": "ok"}, {"text": "x"}]})
        assert r.status_code == 422 and "input 1" in r.json()["detail"]
        info = c.get("/info").json()
        assert info["task"] == "sst2" and info["input_fields"] == ["sentence"]


# --- /feedback and the calibration metrics --------------------------------------------------------
def test_feedback_moves_calibration_counters(client):
    before = metric_samples(client.get("/metrics").text)
    preds = predict(client, inputs=PROMPTS, n_samples=8, seed=5)["predictions"]
    targets = [0, 1, 1, 0]
    for p, y in zip(preds, targets, strict=True):
        label = LABELS[y] if y == 0 else y  # by name and by index
        r = client.post("/feedback", json={"id": p["id"], "label": label})
        assert r.status_code == 200, r.text
        assert r.json() == {"id": p["id"], "label": LABELS[y], "index": y, "correct": p["index"] == y,
                            "confidence": p["confidence"]}
    after = metric_samples(client.get("/metrics").text)

    def delta(name, **labels):  # of the one adapter, named after its folder
        return metric(after, name, adapter="adapter", **labels) - metric(before, name, adapter="adapter", **labels)

    for b in range(15):
        members = [(p, y) for p, y in zip(preds, targets, strict=True)
                   if min(math.floor(p["confidence"] * 15), 14) == b]
        assert delta("tfb_calibration_bin_count_total", bin=str(b)) == len(members)
        assert delta("tfb_calibration_bin_correct_total", bin=str(b)) == sum(p["index"] == y for p, y in members)
        assert math.isclose(delta("tfb_calibration_bin_confidence_sum_total", bin=str(b)),
                            sum(p["confidence"] for p, _ in members), abs_tol=1e-9)
    assert delta("tfb_feedback_total") == 4
    assert delta("tfb_feedback_correct_total") == sum(p["index"] == y for p, y in zip(preds, targets, strict=True))
    probs = torch.tensor([p["probs"] for p in preds], dtype=torch.float64)
    target = torch.tensor(targets)
    assert math.isclose(delta("tfb_feedback_nll_sum_total"), 4 * nll(probs, target), rel_tol=1e-6)
    assert math.isclose(delta("tfb_feedback_brier_sum_total"), 4 * brier(probs, target), rel_tol=1e-6)
    # the recent window (its values: tests/test_app_metrics.py) holds these labels too
    assert int(delta("tfb_recent_count")) == 4


def test_feedback_errors(client):
    pred = predict(client, inputs=[PROMPTS[0]])["predictions"][0]
    r = client.post("/feedback", json={"id": "0" * 32, "label": "positive"})
    assert r.status_code == 404 and "unknown or expired" in r.json()["detail"]
    r = client.post("/feedback", json={"id": pred["id"], "label": "neutral"})
    assert r.status_code == 422 and "neutral" in r.json()["detail"]
    r = client.post("/feedback", json={"id": pred["id"], "label": 2})
    assert r.status_code == 422
    r = client.post("/feedback", json={"id": pred["id"], "label": True})
    assert r.status_code == 422
    assert client.post("/feedback", json={"id": pred["id"], "label": 1}).status_code == 200
    r = client.post("/feedback", json={"id": pred["id"], "label": 1})
    assert r.status_code == 409 and "already" in r.json()["detail"]


def test_feedback_store_is_bounded(tiny):
    with ready_client(make_settings(tiny, feedback_store_size=2, warmup=False)) as c:
        ids = [p["id"] for p in c.post("/predict", json={"inputs": PROMPTS[:3]}).json()["predictions"]]
        assert c.post("/feedback", json={"id": ids[0], "label": 0}).status_code == 404  # expired
        assert c.post("/feedback", json={"id": ids[2], "label": 0}).status_code == 200


def test_feedback_on_other_labels(client):
    pred = predict(client, inputs=[PROMPTS[1]], labels=["yes", "no"])["predictions"][0]
    r = client.post("/feedback", json={"id": pred["id"], "label": "no"})
    assert r.status_code == 200 and r.json()["index"] == 1


# --- /metrics, /info, probes --------------------------------------------------------------------
SERVING = ["tfb_requests_total", "tfb_request_duration_seconds_bucket", "tfb_queue_wait_seconds_bucket",
           "tfb_forward_duration_seconds_bucket", "tfb_batch_inputs_bucket", "tfb_batch_rows_bucket",
           "tfb_queue_depth", "tfb_queue_capacity", "tfb_inflight_requests", "tfb_ready"]
UNCERTAINTY = ["tfb_prediction_confidence_bucket", "tfb_prediction_predictive_entropy_bucket",
               "tfb_prediction_mutual_information_bucket", "tfb_predictions_total", "tfb_sigma",
               "tfb_default_samples"]
CALIBRATION = ["tfb_calibration_bin_count_total", "tfb_calibration_bin_correct_total",
               "tfb_calibration_bin_confidence_sum_total", "tfb_feedback_total", "tfb_feedback_correct_total",
               "tfb_feedback_nll_sum_total", "tfb_feedback_brier_sum_total", "tfb_recent_accuracy", "tfb_recent_ece",
               "tfb_recent_nll", "tfb_recent_brier", "tfb_recent_count"]


def test_metrics_parse_and_names(client):
    predict(client, inputs=PROMPTS[:2])
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = metric_samples(r.text)
    names = {name for name, _ in samples}
    missing = [n for n in SERVING + UNCERTAINTY + CALIBRATION if n not in names]
    assert not missing, missing
    assert metric(samples, "tfb_ready") == 1.0
    assert metric(samples, "tfb_sigma", adapter="adapter") == 0.05
    assert metric(samples, "tfb_default_samples", adapter="adapter") == 10
    assert metric(samples, "tfb_queue_capacity") == 256
    assert metric(samples, "tfb_requests_total", route="/predict", status="200") >= 1
    assert metric(samples, "tfb_predictions_total", adapter="adapter", label="positive") + \
        metric(samples, "tfb_predictions_total", adapter="adapter", label="negative") >= 2
    bins = {dict(labels).get("bin") for name, labels in samples if name == "tfb_calibration_bin_count_total"}
    assert bins == {str(b) for b in range(15)}


def _server_timing(response) -> dict[str, float]:
    out = {}
    for entry in response.headers.get("server-timing", "").split(","):
        name, _, dur = entry.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def test_server_timing_headers(client):
    timing = _server_timing(client.post("/predict", json={"inputs": PROMPTS[:2]}))
    assert set(timing) == {"queue", "batch", "app"} and all(v >= 0.0 for v in timing.values())
    for r in (client.get("/healthz"), client.post("/predict", json={"inputs": []}),
              client.post("/predict", content=b"x" * (2 << 20), headers={"content-type": "application/json"})):
        assert r.status_code in (200, 413, 422) and set(_server_timing(r)) == {"app"}


def test_unknown_paths_share_one_route_label(client):
    for i in range(3):
        client.get(f"/random-{i}")
    samples = metric_samples(client.get("/metrics").text)
    routes = {dict(labels)["route"] for name, labels in samples if name == "tfb_requests_total"}
    assert "other" in routes and not any(r.startswith("/random") for r in routes)


def test_info_and_probes(client):
    info = client.get("/info").json()
    assert info["labels"] == list(LABELS) and info["sigma"] == 0.05 and info["sigma_source"] == "fixed"
    assert info["n_samples"] == 10 and info["limits"]["max_inputs"] == 8
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/feedback", "/info", "/metrics", "/healthz", "/readyz"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def test_sigma_zero_is_the_plain_adapter(tiny):
    with ready_client(make_settings(tiny, sigma=0.0, warmup=False)) as c:
        out = c.post("/predict", json={"inputs": PROMPTS[:2], "n_samples": 5, "return_samples": True}).json()
    assert out["sigma"] == 0.0 and out["n_samples"] == 5
    for p in out["predictions"]:
        assert p["mutual_information"] == 0.0 and all(s == p["probs"] for s in p["samples"])
