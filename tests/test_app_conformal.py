"""Prediction sets and abstention through the engine and /predict on the tiny model: the
calibration data (file, held-out anchor split, none), its cache, the API fields and their errors.
The conformal math itself is tested against MAPIE and scipy in test_conformal.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_app_support import LABELS, PROMPTS, make_settings, ready_client, strip_ids

from tfb_core.data.loading import LoadError
from tfb_core.data.tasks import TaskError
from tfb_core.decide.conformal import Calibration
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.response import predict
from tfb_core.serving.startup import load_engine, split_anchor

WORDS = ["great", "dull", "superb", "tedious", "fine", "awful", "moving", "thin", "warm", "flat"]
CAL = [{"prompt": f"a {w} film, {v} cast", "label": LABELS[(i + j) % 2]}
       for i, w in enumerate(WORDS) for j, v in enumerate(["good", "bad"])]  # 20 labelled records


@pytest.fixture(scope="module")
def cal_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "cal.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in CAL))
    return path


@pytest.fixture(scope="module")
def settings(tiny, cal_file):
    return make_settings(tiny, calibration=str(cal_file))


@pytest.fixture(scope="module")
def client(settings):
    with ready_client(settings) as c:
        yield c


def oracle_calibration(engine: TFBEngine) -> Calibration:
    """The calibration recomputed from the records by the public predict path."""
    out = predict(engine, CAL)
    probs = torch.tensor([p["probs"] for p in out["predictions"]], dtype=torch.float64)
    target = torch.tensor([LABELS.index(r["label"]) for r in CAL])
    return Calibration.fit(probs, target)


def test_sets_and_abstention_match_the_calibration(client, settings):
    engine = load_engine(settings.engine_config(), progress=False)
    cal = oracle_calibration(engine)
    assert engine.calibration is not None
    for score in ("lac", "aps"):
        assert list(engine.calibration.scores[score]) == pytest.approx(list(cal.scores[score]), abs=1e-6)
    r = client.post("/predict", json={"inputs": PROMPTS, "alpha": 0.2, "max_risk": 0.9})
    assert r.status_code == 200, r.text
    out = r.json()
    probs = torch.tensor([p["probs"] for p in out["predictions"]], dtype=torch.float64)
    sets = cal.prediction_sets(probs, 0.2, "lac").sets
    abstain, th = cal.abstain(probs.max(1).values, 0.9, 0.1)
    for p, s, a in zip(out["predictions"], sets, abstain, strict=True):
        assert p["prediction_set"] == [LABELS[c] for c in s]
        assert p["abstain"] is a
    assert out["conformal"]["supported"] and out["conformal"]["score"] == "lac"
    assert out["abstention"]["supported"] == th.supported and th.supported


@pytest.mark.parametrize("field", ["alpha", "max_risk"])
@pytest.mark.parametrize("other,asks", [({"n_samples": 3}, "n_samples=3"), ({"seed": 5}, "seed=5"),
                                        ({"n_samples": 3, "seed": 5}, "n_samples=3 and seed=5")])
def test_a_guarantee_at_another_n_or_seed_is_refused(client, settings, field, other, asks):
    """The calibration holds for the score function at the default N and seed only: a request asking
    for sets or abstention at another is refused alike on /predict (422) and /classify (vLLM's 400,
    ``param`` the field), naming the calibration's N and seed; without alpha or max_risk it is served."""
    at = f"the calibration was computed at n_samples={settings.n_samples}, seed={settings.seed}"
    r = client.post("/predict", json={"inputs": PROMPTS[:1], field: 0.2, **other})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(f"{field}: {at}") and f"this request asks {asks}:" in detail
    c = client.post("/classify", json={"input": PROMPTS[0], field: 0.2, **other})
    assert c.status_code == 400, c.text
    err = c.json()["error"]
    assert err["param"] == field and err["message"] == detail
    assert client.post("/predict", json={"inputs": PROMPTS[:1], **other}).status_code == 200


def test_the_calibrations_own_n_and_seed_are_accepted(client, settings):
    info = client.get("/info").json()["calibration"]
    assert (info["n_samples"], info["seed"]) == (settings.n_samples, settings.seed) == (10, 0)
    ask = {"inputs": PROMPTS, "alpha": 0.2, "max_risk": 0.9}
    default = client.post("/predict", json=ask)
    explicit = client.post("/predict", json={**ask, "n_samples": settings.n_samples, "seed": settings.seed})
    assert default.status_code == explicit.status_code == 200, explicit.text
    assert strip_ids(explicit.json()) == strip_ids(default.json())
    c = client.post("/classify", json={"input": PROMPTS, "alpha": 0.2, "max_risk": 0.9,
                                       "n_samples": settings.n_samples, "seed": settings.seed})
    assert c.status_code == 200, c.text
    assert [d["prediction_set"] for d in c.json()["data"]] == [p["prediction_set"] for p in default.json()["predictions"]]


def test_engine_and_cli_refuse_alike_but_not_at_sigma_zero(settings, tiny, cal_file, tmp_path):
    """``tfb predict`` goes through the engine's check; at sigma = 0 every sample is the mean, so N
    and the seed do not change the score function and any is accepted."""
    engine = load_engine(settings.engine_config(), progress=False)
    assert (engine.calibration.n_samples, engine.calibration.seed) == (settings.n_samples, settings.seed)
    with pytest.raises(TaskError, match=r"^max_risk: the calibration was computed at n_samples=10, seed=0 .*"
                                        r"this request asks seed=1:") as e:
        predict(engine, PROMPTS[:1], seed=1, max_risk=0.5)
    assert e.value.param == "max_risk"
    flat = load_engine(make_settings(tiny, sigma=0.0, calibration=str(cal_file),
                                                 cache_dir=str(tmp_path)).engine_config(), progress=False)
    assert predict(flat, PROMPTS[:1], n_samples=3, seed=5, alpha=0.2)["conformal"]["supported"]


def test_fields_only_when_asked(client):
    out = client.post("/predict", json={"inputs": PROMPTS[:1]}).json()
    assert "prediction_set" not in out["predictions"][0] and "abstain" not in out["predictions"][0]
    assert "conformal" not in out


def test_unsupported_alpha_says_so(client):
    out = client.post("/predict", json={"inputs": PROMPTS[:2], "alpha": 0.01}).json()  # 20 inputs: 1/21 > 0.01
    assert not out["conformal"]["supported"] and "below 1/(n+1)" in out["conformal"]["detail"]
    assert all(p["prediction_set"] == list(LABELS) for p in out["predictions"])


@pytest.mark.parametrize("body,needle", [({"alpha": 0}, "alpha"), ({"alpha": 1.0}, "alpha"),
                                         ({"max_risk": 1.5}, "max_risk"), ({"max_risk": -0.1}, "max_risk"),
                                         ({"alpha": "x"}, "alpha")])
def test_bad_alpha_or_max_risk_is_422_naming_it(client, body, needle):
    r = client.post("/predict", json={"inputs": PROMPTS[:1], **body})
    assert r.status_code == 422 and needle in r.text


def test_other_labels_refuse_sets(client):
    r = client.post("/predict", json={"inputs": PROMPTS[:1], "labels": ["yes", "no"], "alpha": 0.2})
    assert r.status_code == 422 and "alpha" in r.text


def test_info_shows_the_calibration(client, cal_file):
    info = client.get("/info").json()["calibration"]
    assert info["n"] == len(CAL) and str(cal_file) in info["source"] and info["score"] == "lac"


def test_drift_reference_is_the_calibration_sets_mean_uncertainty(client, settings):
    """The calibration set's mean entropy and MI, by the public predict path, in /info and as gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    out = predict(load_engine(settings.engine_config(), progress=False), CAL)
    entropy = sum(p["predictive_entropy"] for p in out["predictions"]) / len(CAL)
    mi = sum(p["mutual_information"] for p in out["predictions"]) / len(CAL)
    assert mi > 0.0
    info = client.get("/info").json()["calibration"]
    assert info["mean_predictive_entropy"] == pytest.approx(entropy, rel=1e-4)
    assert info["mean_mutual_information"] == pytest.approx(mi, rel=1e-3)
    gauges = {s.name: s.value for f in text_string_to_metric_families(client.get("/metrics").text)
              for s in f.samples if s.name.startswith("tfb_calibration_") and s.labels == {"adapter": "adapter"}}
    assert gauges["tfb_calibration_predictive_entropy"] == pytest.approx(entropy, rel=1e-4)
    assert gauges["tfb_calibration_mutual_information"] == pytest.approx(mi, rel=1e-3)


def test_no_calibration_data_is_422_saying_why(tiny):
    with ready_client(make_settings(tiny, warmup=False)) as c:
        r = c.post("/predict", json={"inputs": PROMPTS[:1], "max_risk": 0.1})
        assert c.get("/info").json()["calibration"]["n"] == 0
        reference = [line for line in c.get("/metrics").text.splitlines()
                     if line.startswith(("tfb_calibration_mutual_information{", "tfb_calibration_predictive_entropy{"))]
        assert len(reference) == 2 and all(line.endswith(" NaN") for line in reference)  # no reference: no drift ratio
    assert r.status_code == 422 and "max_risk" in r.text and "TFB_CALIBRATION" in r.text


def test_calibration_is_cached_atomically_and_reused(tiny, cal_file, tmp_path):
    # a cache of its own: a server of an earlier test may still finish a background calibration step
    settings = make_settings(tiny, calibration=str(cal_file), cache_dir=str(tmp_path / "cache"))
    cache_dir = Path(settings.cache_dir) / "calibration"
    first = load_engine(settings.engine_config(), progress=False).calibration
    files = list(cache_dir.glob("*.json"))
    assert files and not list(cache_dir.glob("*.tmp"))
    data = json.loads(files[0].read_text())
    data["result"]["n"] = 999  # a cached result is what the engine uses
    files[0].write_text(json.dumps(data))
    assert load_engine(settings.engine_config(), progress=False).calibration.n == 999
    files[0].write_text("{half a file")  # corrupt: recomputed
    again = load_engine(settings.engine_config(), progress=False).calibration
    assert again == first
    data = json.loads(files[0].read_text())
    del data["result"]["n_samples"], data["result"]["seed"]  # a cache that does not say its N and seed
    data["result"]["n"] = 999
    files[0].write_text(json.dumps(data))
    assert load_engine(settings.engine_config(), progress=False).calibration == first  # recomputed


def test_unlabelled_calibration_file_is_a_load_error(tiny, tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"prompt": "a film"}))
    with pytest.raises(LoadError, match="needs a label"):
        load_engine(make_settings(tiny, calibration=str(bad)).engine_config(), progress=False)


def test_anchor_split_is_seeded_disjoint_and_held_out_of_the_search(tiny, tmp_path):
    keep, held = split_anchor(20, 0.5, 3)
    assert (keep, held) == split_anchor(20, 0.5, 3) and len(held) == 10
    assert sorted(keep + held) == list(range(20))
    anchor = tmp_path / "a.jsonl"
    anchor.write_text("\n".join(json.dumps(r) for r in CAL))
    s = make_settings(tiny, sigma=None, anchor=str(anchor), search_criterion="flip", search_iters=2,
                      search_samples=2, cache_dir=str(tmp_path / "cache"), calibration_split=0.5)
    engine = load_engine(s.engine_config(), progress=False)
    assert engine.calibration.n == 10 and "held out" in engine.calibration.source
    assert engine.search_result is not None
    assert math.isfinite(engine.sigma)
    # by default sigma is searched on the whole anchor (as the reference does) and nothing calibrates
    whole = load_engine(make_settings(tiny, sigma=None, anchor=str(anchor), search_criterion="flip",
                                         search_iters=2, search_samples=2,
                                         cache_dir=str(tmp_path / "cache")).engine_config(), progress=False)
    assert whole.calibration is None and whole.search_result is not None


def test_the_demo_calibrates_on_its_bundled_held_out_sentences():
    from tfb_core.data.jsonl import read_jsonl
    from tfb_core.serving.config import DEMO_ANCHOR, DEMO_CALIBRATION, EngineConfig

    cfg = EngineConfig().with_defaults()
    assert cfg.calibration == str(DEMO_CALIBRATION) and cfg.anchor == str(DEMO_ANCHOR)
    cal, anchor = read_jsonl(DEMO_CALIBRATION), read_jsonl(DEMO_ANCHOR)
    assert len(cal) == 272 and all(r["label"] in (0, 1) for r in cal)
    assert not {r["sentence"] for r in cal} & {r["sentence"] for r in anchor}  # the search never sees them


def test_metrics_count_sets_abstentions_and_realised_coverage(client):
    from test_app_support import metric_samples

    def scrape():
        return metric_samples(client.get("/metrics").text)

    def value(samples, name, adapter):
        return samples.get((name, frozenset({("adapter", adapter)})), 0.0)

    before = scrape()
    out = client.post("/predict", json={"inputs": PROMPTS, "alpha": 0.2, "max_risk": 0.9}).json()
    preds = out["predictions"]
    truth = [LABELS[0], LABELS[1], LABELS[1], LABELS[0]]
    for p, y in zip(preds, truth, strict=True):
        assert client.post("/feedback", json={"id": p["id"], "label": y}).status_code == 200
    after = scrape()

    def delta(name, adapter):
        return value(after, name, adapter) - value(before, name, adapter)

    sizes = sum(len(p["prediction_set"]) for p in preds)
    covered = sum(y in p["prediction_set"] for p, y in zip(preds, truth, strict=True))
    answered = [(p, y) for p, y in zip(preds, truth, strict=True) if not p["abstain"]]
    assert out["abstention"]["supported"] and answered  # max_risk 0.9: the tiny model certifies a threshold
    assert delta("tfb_predictions_with_set_total", "adapter") == 4
    assert delta("tfb_prediction_set_size_sum_total", "adapter") == sizes
    assert delta("tfb_predictions_with_max_risk_total", "adapter") == 4
    assert delta("tfb_abstentions_total", "adapter") == sum(p["abstain"] for p in preds)
    assert delta("tfb_confidence_sum_total", "adapter") == pytest.approx(sum(p["confidence"] for p in preds), abs=1e-6)
    assert delta("tfb_feedback_with_set_total", "adapter") == 4 and delta("tfb_feedback_set_covered_total", "adapter") == covered
    assert delta("tfb_feedback_set_target_sum_total", "adapter") == pytest.approx(4 * 0.8)
    assert delta("tfb_feedback_answered_total", "adapter") == len(answered)
    assert delta("tfb_feedback_answered_wrong_total", "adapter") == sum(p["label"] != y for p, y in answered)
    assert 0.5 <= value(after, "tfb_estimated_accuracy", "adapter") <= 1.0


def test_cli_predict_sets_match_the_server(client, tiny, cal_file, capsys):
    from tfb_core.cli import main

    args = ["predict", "--model", tiny["model"], "--adapter", tiny["adapter"], "--labels", *LABELS, "--sigma", "0.05",
            "--cache-dir", str(Path(make_settings(tiny).cache_dir)), "--calibration", str(cal_file), "--alpha", "0.2",
            "--json", *[a for p in PROMPTS for a in ("--prompt", p)]]
    assert main(args) == 0
    cli = json.loads(capsys.readouterr().out)
    server = client.post("/predict", json={"inputs": PROMPTS, "alpha": 0.2}).json()
    assert [p["prediction_set"] for p in cli["predictions"]] == [p["prediction_set"] for p in server["predictions"]]
    with pytest.raises(SystemExit):
        main([*args[:-1 - 2 * len(PROMPTS)], "--alpha", "1.5"])
    assert "--alpha must be in (0, 1)" in capsys.readouterr().err


# --- calibration in the background ----------------------------------------------------------------
@pytest.fixture
def gated_steps(monkeypatch):
    """Each calibration step waits for a permit of the returned semaphore (the worker blocks in it)."""
    import threading

    from tfb_core.serving.calibrate import CalibrationRun

    permits = threading.Semaphore(0)
    step = CalibrationRun.step

    def gated(self):
        assert permits.acquire(timeout=60), "the test never released the calibration step"
        return step(self)

    monkeypatch.setattr(CalibrationRun, "step", gated)
    return permits


def test_background_calibration_serves_requests_between_its_steps(tiny, cal_file, gated_steps, tmp_path):
    """Ready before the calibration: requests are answered between its steps; alpha/max_risk answer
    503 + Retry-After naming the progress until it is done, then the same sets as a calibration run
    before start-up."""
    import concurrent.futures
    import time

    from test_app_support import wait_ready

    settings = make_settings(tiny, calibration=str(cal_file), cache_dir=str(tmp_path / "cache"), n_samples=8)
    with ready_client(settings, calibrated=False) as c:
        wait_ready(c, calibrated=False)  # ready while the first step waits for its permit
        engine = c.app.state.tfb.predictor.engine
        run = engine.calibration_run
        assert run is not None and run.state == "running" and engine.calibration is None
        steps = -(-len(CAL) // run.chunk_inputs)
        assert steps >= 3  # 32 rows // 8 samples = 4 inputs a step: 5 steps
        info = c.get("/info").json()["calibration"]
        assert info["state"] == "running" and info["n"] == len(CAL) and info["done"] == 0
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            plain = pool.submit(c.post, "/predict", json={"inputs": PROMPTS[:2]})
            deadline = time.monotonic() + 60
            while not c.app.state.tfb.worker._queue and not plain.done():  # until the request is queued
                assert time.monotonic() < deadline
                time.sleep(0.01)
            gated_steps.release()  # one step; then the queued request goes before the next step
            r = plain.result(timeout=60)
        assert r.status_code == 200
        assert run.state == "running" and 0 < run.done < len(CAL)  # answered between two steps
        for field, value in (("alpha", 0.2), ("max_risk", 0.3)):
            r = c.post("/predict", json={"inputs": PROMPTS[:1], field: value})
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert field in r.json()["detail"] and f"{run.done} of {len(CAL)} inputs" in r.json()["detail"]
        r = c.post("/classify", json={"input": PROMPTS[0], "alpha": 0.2})
        assert r.status_code == 503 and "Retry-After" in r.headers and "still running" in r.json()["error"]["message"]
        info = c.get("/info").json()["calibration"]
        assert info["state"] == "running" and info["done"] == run.done and info["eta_s"] >= 0
        for _ in range(len(CAL)):  # at least one input a step (the first steps are smaller: timed)
            gated_steps.release()
        wait_ready(c)
        assert c.get("/info").json()["calibration"]["state"] == "ready"
        answered = c.post("/predict", json={"inputs": PROMPTS, "alpha": 0.2, "max_risk": 0.3}).json()
    for _ in range(steps):  # the engine loaded with the calibration before start-up
        gated_steps.release()
    sync = load_engine(make_settings(tiny, calibration=str(cal_file), cache_dir=str(tmp_path / "other"),
                                        n_samples=8).engine_config(), progress=False)
    assert sync.calibration is not None and sync.calibration_run is None
    assert engine.calibration.n == sync.calibration.n == len(CAL)
    for score in ("lac", "aps"):
        assert list(engine.calibration.scores[score]) == pytest.approx(list(sync.calibration.scores[score]), abs=1e-6)
    expected = predict(sync, PROMPTS, alpha=0.2, max_risk=0.3)
    assert [p["prediction_set"] for p in answered["predictions"]] == [p["prediction_set"] for p in expected["predictions"]]
    assert answered["abstention"]["threshold"] == expected["abstention"]["threshold"]


def test_background_calibration_is_cached_for_the_next_start(tiny, cal_file, tmp_path):
    settings = make_settings(tiny, calibration=str(cal_file), cache_dir=str(tmp_path / "cache"))
    with ready_client(settings) as c:
        first = c.app.state.tfb.predictor.engine.calibration
    assert first is not None
    with ready_client(settings, calibrated=False) as c:  # from the cache: ready with its calibration
        engine = c.app.state.tfb.predictor.engine
        assert engine.calibration == first and engine.calibration_run is None
        assert c.get("/info").json()["calibration"]["state"] == "ready"


def test_calibration_before_ready_when_not_in_background(tiny, cal_file, tmp_path):
    settings = make_settings(tiny, calibration=str(cal_file), cache_dir=str(tmp_path / "cache"),
                             calibrate_in_background=False)
    with ready_client(settings, calibrated=False) as c:
        engine = c.app.state.tfb.predictor.engine
        assert engine.calibration is not None and engine.calibration_run is None
        assert c.post("/predict", json={"inputs": PROMPTS[:1], "alpha": 0.2}).status_code == 200


def test_failed_background_calibration_says_why(tiny, cal_file, tmp_path, monkeypatch):
    """A calibration whose forward fails: served on without it; alpha answers 503 naming the cause
    (no Retry-After: retrying will not help), /info says failed."""
    from tfb_core.serving.calibrate import CalibrationRun

    step = CalibrationRun.step

    def failing(self):
        def broken(prompts):
            raise RuntimeError("the device fell over")

        self.forward = broken
        return step(self)

    monkeypatch.setattr(CalibrationRun, "step", failing)
    settings = make_settings(tiny, calibration=str(cal_file), cache_dir=str(tmp_path / "cache"))
    with ready_client(settings) as c:  # waits until the run has ended
        info = c.get("/info").json()["calibration"]
        assert info["state"] == "failed" and "the device fell over" in info["detail"]
        r = c.post("/predict", json={"inputs": PROMPTS[:1], "max_risk": 0.2})
        assert r.status_code == 503 and "Retry-After" not in r.headers
        assert "the device fell over" in r.json()["detail"] and "max_risk" in r.json()["detail"]
        assert c.post("/predict", json={"inputs": PROMPTS[:1]}).status_code == 200
    assert not list((tmp_path / "cache").glob("calibration/*.json"))  # nothing cached


def test_aps_mondrian_and_risk_delta_reach_the_server(tiny, cal_file, tmp_path):
    """TFB_CONFORMAL_SCORE=aps, TFB_CONFORMAL_MONDRIAN and TFB_RISK_DELTA through the server, against
    a from-scratch computation on the calibration probabilities the test gets itself from /predict
    at the default N and seed: per-class APS quantiles, and the threshold's exact binomial p-value
    (scipy) on the calibration counts, which any valid Learn-then-Test keeps <= delta."""
    stats = pytest.importorskip("scipy.stats")
    delta, alpha, max_risk = 0.3, 0.2, 0.9  # the tiny random model certifies only a loose max_risk
    s = make_settings(tiny, calibration=str(cal_file), conformal_score="aps", conformal_mondrian=True,
                      risk_delta=delta, cache_dir=str(tmp_path))
    with ready_client(s) as c:
        info = c.get("/info").json()["calibration"]
        cal_probs = [p["probs"] for p in c.post("/predict", json={"inputs": [r["prompt"] for r in CAL[:8]]}
                                                 ).json()["predictions"]]
        cal_probs += [p["probs"] for p in c.post("/predict", json={"inputs": [r["prompt"] for r in CAL[8:16]]}
                                                  ).json()["predictions"]]
        cal_probs += [p["probs"] for p in c.post("/predict", json={"inputs": [r["prompt"] for r in CAL[16:]]}
                                                  ).json()["predictions"]]
        out = c.post("/predict", json={"inputs": PROMPTS, "alpha": alpha, "max_risk": max_risk}).json()
        inputs = PROMPTS + [r["prompt"] for r in CAL]  # at most 8 a request (make_settings)
        by_alpha = {a: {"predictions": [p for i in range(0, len(inputs), 8) for p in c.post(
            "/predict", json={"inputs": inputs[i:i + 8], "alpha": a}).json()["predictions"]]}
            for a in (0.1, 0.2, 0.3, 0.4, 0.5)}
    assert (info["score"], info["mondrian"], info["risk_delta"]) == ("aps", True, delta)
    assert out["conformal"]["score"] == "aps" and out["conformal"]["mondrian"] is True
    assert out["abstention"]["delta"] == delta
    target = [LABELS.index(r["label"]) for r in CAL]

    def aps(p: list[float], y: int) -> float:  # mass of the labels ranked at or above y (ties: lower index first)
        return sum(q for k, q in enumerate(p) if q > p[y] or (q == p[y] and k <= y))

    def quantile(scores: list[float], a: float) -> float:  # the ceil((n + 1)(1 - a))-th smallest
        return sorted(scores)[math.ceil((len(scores) + 1) * (1 - a)) - 1]

    # the test's probabilities and the server's calibration come from forwards of other batch
    # compositions (float order: ~1e-8); a score that close to its quantile can fall either side
    decided = discriminating = 0
    for a, answer in by_alpha.items():
        # Mondrian: each class's own quantile; shared: one over all classes (what Mondrian must not give)
        q = [quantile([aps(p, y) for p, t in zip(cal_probs, target, strict=True) if t == y], a) for y in range(2)]
        shared = quantile([aps(p, t) for p, t in zip(cal_probs, target, strict=True)], a)
        for p in answer["predictions"]:
            for y in range(2):
                score = aps(p["probs"], y)
                if abs(score - q[y]) > 1e-6:
                    assert (LABELS[y] in p["prediction_set"]) == (score <= q[y]), (a, p["probs"], q)
                    decided += 1
                    discriminating += abs(score - shared) > 1e-6 and (score <= shared) != (score <= q[y])
    assert decided >= len(PROMPTS) and discriminating >= 1  # clear-cut cases, some where Mondrian matters
    assert [p["prediction_set"] for p in out["predictions"]] == [
        p["prediction_set"] for p in by_alpha[alpha]["predictions"][:len(PROMPTS)]]
    th = out["abstention"]
    assert th["supported"], th
    conf = [max(p) for p in cal_probs]
    answered = [i for i, cf in enumerate(conf) if cf >= th["threshold"]]
    errors = sum(max(range(2), key=lambda k: cal_probs[i][k]) != target[i] for i in answered)
    assert len(answered) / len(CAL) == pytest.approx(th["calibration_answered_fraction"])
    assert stats.binom.cdf(errors, len(answered), max_risk) <= delta
    for p in out["predictions"]:
        assert p["abstain"] is (p["confidence"] < th["threshold"])


def test_the_configured_risk_delta_is_the_one_abstention_uses(tiny):
    """TFB_RISK_DELTA reaches Learn-then-Test: on a calibration whose certified threshold differs
    between delta 0.05 and 0.3, the engine's threshold is the one at its configured delta (a delta
    fixed anywhere on the way gives one of them for both)."""
    gen = torch.Generator().manual_seed(3)
    conf = 0.5 + 0.5 * torch.rand(600, generator=gen, dtype=torch.float64)
    wrong = torch.rand(600, generator=gen, dtype=torch.float64) < 0.4 * (1 - conf)  # risk rises as conf falls
    probs = torch.stack([conf, 1 - conf], 1)
    thresholds = {}
    for delta in (0.05, 0.3):
        engine = load_engine(make_settings(tiny, risk_delta=delta).engine_config(), progress=False)
        engine.calibration = Calibration.fit(probs, wrong.long(), "synthetic", n_samples=engine.cfg.n_samples,
                                             seed=engine.cfg.seed)
        out = predict(engine, PROMPTS, max_risk=0.1)
        assert out["abstention"]["delta"] == delta
        thresholds[delta] = out["abstention"]["threshold"]
        assert thresholds[delta] == engine.calibration.threshold(0.1, delta).threshold
    assert thresholds[0.3] < thresholds[0.05]  # a looser delta certifies a lower threshold here


def test_background_calibration_steps_are_sized_by_their_time(monkeypatch, tmp_path):
    """A step is what a request arriving during it waits for: the first takes one input, then as
    many as fit in step_s at the measured pace (one forward of 64 rows takes tens of seconds on a
    loaded CPU); run() takes full chunks; the calibration does not depend on the chunking."""
    from tfb_core.serving import calibrate
    from tfb_core.serving.calibrate import CalibrationData, CalibrationRun

    clock = [0.0]
    monkeypatch.setattr(calibrate.time, "monotonic", lambda: clock[0])
    gen = torch.Generator().manual_seed(0)
    table = torch.softmax(torch.randn(40, 3, 2, generator=gen), -1)  # (inputs, N, C)
    prompts = [str(i) for i in range(40)]
    targets = torch.randint(0, 2, (40,), generator=gen)

    def run_with(per_input_s: float, background: bool) -> tuple[list[int], dict]:
        sizes: list[int] = []
        out: dict = {}

        def forward(chunk: list[str]) -> torch.Tensor:
            sizes.append(len(chunk))
            clock[0] += per_input_s * len(chunk)
            return table[[int(p) for p in chunk]]

        data = CalibrationData(prompts, targets, "synthetic", 3, 0)
        run = CalibrationRun(data, forward, lambda cal: out.update(cal.to_dict()), {"k": per_input_s},
                             tmp_path / str(background), chunk_inputs=8, step_s=0.5)
        if background:
            while not run.step():
                pass
        else:
            run.run()
        return sizes, out

    slow, cal_slow = run_with(0.2, True)  # 0.2 s an input: 2 inputs fit in 0.5 s
    assert slow[:3] == [1, 2, 2] and max(slow) == 2 and sum(slow) == 40
    fast, cal_fast = run_with(0.01, True)  # 50 fit: capped at the chunk of one forward
    assert fast[:2] == [1, 8] and sum(fast) == 40
    full, cal_full = run_with(0.2, False)  # the CLI's run: nothing waits, full chunks
    assert full == [8] * 5
    assert cal_slow == cal_fast == cal_full
