"""Online prediction sets and drift tests through the API on the tiny model: the guarantee each
response names, thresholds moved by /feedback (out of order, per alpha), a restart that restores
the state, the metrics; oracles: the split-conformal sets of the calibration recomputed here, and the
quantile-tracking update computed here from what the responses served."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from test_app_conformal import CAL
from test_app_support import LABELS, PROMPTS, make_settings, ready_client

from tfb_core.decide.conformal import Calibration, nonconformity

ETA = 0.1


@pytest.fixture
def cal_file(tmp_path) -> Path:
    path = tmp_path / "cal.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in CAL))
    return path


def online_settings(tiny, cal_file, cache: Path, **over):
    return make_settings(tiny, calibration=str(cal_file), cache_dir=str(cache), conformal_online=True,
                         online_eta=ETA, online_save_interval_s=0.0, online_max_alphas=2, **over)


def thresholds(out: dict) -> list[float]:
    return out["conformal"]["thresholds"]


def metric(client, name: str, **labels: str) -> float | None:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_split_sets_say_so(tiny, cal_file, tmp_path):
    with ready_client(make_settings(tiny, calibration=str(cal_file), cache_dir=str(tmp_path / "c"))) as client:
        out = client.post("/predict", json={"inputs": PROMPTS[:1], "alpha": 0.2}).json()
        assert out["conformal"]["guarantee"] == "split_conformal"
        assert "exchangeable" in out["conformal"]["promise"] and "thresholds" not in out["conformal"]
        info = client.get("/info").json()["adapters"][0]
        assert info["online_conformal"] == {"state": "off"} and info["drift"]["delta"] == 0.01


def test_online_sets_follow_feedback_out_of_order_per_alpha_and_survive_a_restart(tiny, cal_file, tmp_path):
    cache = tmp_path / "cache"
    settings = online_settings(tiny, cal_file, cache)
    with ready_client(settings) as client:
        first = client.post("/predict", json={"inputs": PROMPTS, "alpha": 0.2})
        assert first.status_code == 200, first.text
        out = first.json()
        c = out["conformal"]
        assert c["guarantee"] == "online_long_run" and c["labelled"] == 0 and c["bound"] is None
        assert "any shift" in c["promise"] and c["eta"] == ETA
        # before any label, the online sets are the split-conformal sets (same start), computed here
        probs = torch.tensor([p["probs"] for p in out["predictions"]], dtype=torch.float64)
        rows = [p for i in range(0, len(CAL), 8) for p in client.post(
            "/predict", json={"inputs": [r["prompt"] for r in CAL[i:i + 8]]}).json()["predictions"]]
        cal = Calibration.fit(torch.tensor([p["probs"] for p in rows], dtype=torch.float64),
                              torch.tensor([LABELS.index(r["label"]) for r in CAL]))
        assert thresholds(out) == pytest.approx(cal.quantiles(0.2, "lac")[0][:1], abs=1e-6)
        split = cal.prediction_sets(probs, 0.2, "lac").sets
        assert [p["prediction_set"] for p in out["predictions"]] == [[LABELS[k] for k in s] for s in split]
        other = client.post("/predict", json={"inputs": PROMPTS[:1], "alpha": 0.3}).json()
        q_other = thresholds(other)
        # a second batch served before any label: the same thresholds
        second = client.post("/predict", json={"inputs": PROMPTS, "alpha": 0.2}).json()
        assert thresholds(second) == thresholds(out)
        # labels in reverse order, the true label the least likely one (misses where the set is a singleton)
        q = thresholds(out)[0]
        preds = out["predictions"] + second["predictions"]
        for p in reversed(preds):
            y = 1 - p["index"]
            r = client.post("/feedback", json={"id": p["id"], "label": LABELS[y]})
            assert r.status_code == 200, r.text
            err = LABELS[y] not in p["prediction_set"]  # the set the client saw
            q += ETA * ((1.0 if err else 0.0) - 0.2)
        now = client.post("/predict", json={"inputs": PROMPTS[:1], "alpha": 0.2}).json()
        assert thresholds(now)[0] == pytest.approx(q, abs=1e-9)
        assert now["conformal"]["labelled"] == len(preds)
        assert now["conformal"]["max_delay"] == len(preds) - 1  # the first one served waited for all others
        assert thresholds(client.post("/predict", json={"inputs": PROMPTS[:1], "alpha": 0.3}).json()) == q_other
        # the sets are {y : 1 - p_y <= q}, recomputed here
        p0 = torch.tensor([now["predictions"][0]["probs"]], dtype=torch.float64)
        want = [LABELS[k] for k in range(2) if nonconformity(p0, "lac")[0, k] <= q]
        assert now["predictions"][0]["prediction_set"] == want
        errs = sum(LABELS[1 - p["index"]] not in p["prediction_set"] for p in preds)
        assert metric(client, "tfb_online_coverage", alpha="0.2") == pytest.approx(1 - errs / len(preds))
        assert metric(client, "tfb_online_threshold", alpha="0.2", **{"class": "_all"}) == pytest.approx(q)
        assert metric(client, "tfb_online_labelled", alpha="0.2") == len(preds)
        assert metric(client, "tfb_drift_observations", stream="labelled") == len(preds)
        assert metric(client, "tfb_drift_observations", stream="label_free") >= 2 * len(PROMPTS)
        # a third alpha is past TFB_ONLINE_MAX_ALPHAS=2: refused, naming it
        r = client.post("/predict", json={"inputs": PROMPTS[:1], "alpha": 0.05})
        assert r.status_code == 422 and "TFB_ONLINE_MAX_ALPHAS" in r.text
    written = list((cache / "online").glob("*.json"))
    assert len(written) == 1
    with ready_client(settings) as client:  # a restart: the state comes back, with where from
        again = client.post("/predict", json={"inputs": PROMPTS[:1], "alpha": 0.2}).json()
        assert thresholds(again)[0] == pytest.approx(q, abs=1e-12) and again["conformal"]["labelled"] == len(preds)
        restored = client.get("/info").json()["adapters"][0]["online_conformal"]["restored"]
        assert restored["labelled"] == len(preds) and restored["path"] == str(written[0])
        assert restored["pid"] and restored["written_at"]
        # a label for a prediction of the state before the restart could not be applied: not this state's
        assert client.post("/feedback", json={"id": preds[0]["id"], "label": LABELS[0]}).status_code == 404


def test_a_corrupt_state_file_starts_afresh(tiny, cal_file, tmp_path):
    cache = tmp_path / "cache"
    settings = online_settings(tiny, cal_file, cache)
    with ready_client(settings) as client:
        p = client.post("/predict", json={"inputs": PROMPTS[:1], "alpha": 0.2}).json()
        q0 = thresholds(p)
        client.post("/feedback", json={"id": p["predictions"][0]["id"], "label": LABELS[0]})
    (path,) = (cache / "online").glob("*.json")
    data = json.loads(path.read_text())
    data["result"]["alphas"]["0.2"]["trackers"][0]["q"] = math.pi  # out of any reachable range
    path.write_text(json.dumps(data))
    with ready_client(settings) as client:
        again = client.post("/predict", json={"inputs": PROMPTS[:1], "alpha": 0.2}).json()
        assert thresholds(again) == q0 and again["conformal"]["labelled"] == 0
        assert client.get("/info").json()["adapters"][0]["online_conformal"]["restored"] is None


def test_drift_tests_reset_on_recalibration(tmp_path):
    """A new calibration is a new test: the martingale, its count and its alarm start again, in
    the metrics too; the online state starts afresh with it."""
    import types

    from prometheus_client import CollectorRegistry

    from app.metrics import Metrics
    from app.online import Monitors
    from tfb_core.config import ModelConfig
    from tfb_core.serving.config import EngineConfig

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 2, generator=gen), dim=1)
    cal = Calibration.fit(probs, torch.randint(0, 2, (50,), generator=gen))
    engine = types.SimpleNamespace(name="a", calibration=cal, task=types.SimpleNamespace(labels=LABELS, generative=False),
                                   cfg=EngineConfig(model=ModelConfig(cache_dir=str(tmp_path)), conformal_online=True))
    metrics = Metrics(CollectorRegistry())
    mon = Monitors(drift_delta=0.01, metrics=metrics)
    test = mon.drift_tests(engine).monitors["label_free"]
    for _ in range(200):  # every input stranger than the whole calibration set: the alarm rises
        test.observe(0.99)
    metrics.observe_drift("a", "label_free", test)
    assert test.alarm and metrics.drift_alarm.labels(adapter="a", stream="label_free")._value.get() == 1
    online = mon.online_state(engine)
    assert mon.drift_tests(engine).monitors["label_free"] is test and mon.online_state(engine) is online
    engine.calibration = Calibration.fit(probs, torch.randint(0, 2, (50,), generator=gen))  # recalibrated
    fresh = mon.drift_tests(engine).monitors["label_free"]
    assert fresh is not test and fresh.observations == 0 and not fresh.alarm
    assert metrics.drift_alarm.labels(adapter="a", stream="label_free")._value.get() == 0
    assert mon.online_state(engine) is not online


def test_online_sets_are_opt_in_per_adapter(tiny):
    """TFB_ADAPTERS' conformal_online and online_eta are each adapter's own; the others keep the
    server's (off by default); a bad eta is refused by name."""
    from pydantic import ValidationError

    spec = [{"name": "on", "adapter": str(tiny["adapter"]), "conformal_online": True, "online_eta": 0.02},
            {"name": "off", "adapter": str(tiny["adapter"])}]
    cfgs = dict(make_settings(tiny, adapters=json.dumps(spec), adapter=None).engine_configs())
    assert (cfgs["on"].conformal_online, cfgs["on"].online_eta) == (True, 0.02)
    assert (cfgs["off"].conformal_online, cfgs["off"].online_eta) == (False, 0.05)
    with pytest.raises(ValidationError, match="online_eta"):
        make_settings(tiny, adapters=json.dumps([{**spec[0], "online_eta": 0.0}]), adapter=None)
