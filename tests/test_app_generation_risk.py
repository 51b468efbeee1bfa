"""max_risk on the completion routes, through the server on the tiny Llama: an adapter whose
calibration questions it answers right answers (certified), one whose calibration answers are all
wrong abstains on everything, visibly to the unmodified OpenAI client (``abstained`` on the choice,
the configured refusal as its text, the answer in ``uncertainty.risk``), counted in the metrics; a
request whose decode is not the calibrated one is refused (400, the OpenAI routes' status of
/predict's 422) naming what differs; the
calibration is cached by content; every answer carries ``confidence`` = exp(-sequence.nll)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import require
from test_app_support import LABELS, chat_templated, make_settings, metric, metric_samples, ready_client

from tfb_core.decide.generation_risk import certainty
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.startup import load_engines

QUESTIONS = [f"question {i}: {w}" for i, w in enumerate(
    ["one two", "the cat", "a b c", "red green", "up down", "left right", "sun moon", "north south", "hot cold",
     "in out", "yes no", "day night", "tea cup", "big small", "old new", "rain snow", "sea land", "fire ice",
     "salt sugar", "pen ink", "king queen", "bread milk", "star sky", "cold wind"])]
SIGMA, N, MAX_TOKENS = 0.02, 3, 4
REFUSAL = "I cannot answer that reliably."


def _gen(name, path, calibration=None, **extra):
    spec = {"name": name, "path": path, "task": "generation", "sigma": SIGMA, "risk_score": "max_mi", **extra}
    if calibration is not None:
        spec["calibration"] = str(calibration)
    return spec


def _settings(tiny, cache, adapters):
    return make_settings(tiny, adapter=None, adapters=json.dumps([
        {"name": "clf", "path": tiny["adapter"], "labels": list(LABELS), "sigma": 0.05}, *adapters]),
        warmup=False, n_samples=N, max_inputs=32, anchor_max_tokens=MAX_TOKENS, cache_dir=str(cache), abstain_text=REFUSAL)


@pytest.fixture(scope="module")
def all_answers(tiny, tmp_path_factory):
    """The served greedy answers to QUESTIONS (at sigma, N, seed 0, temperature 0, MAX_TOKENS)."""
    cache = tmp_path_factory.mktemp("risk-answers")
    with ready_client(_settings(tiny, cache, [_gen("plain", tiny["adapter_other"]),
                                              _gen("zero", tiny["adapter_other"], sigma=0.0)])) as c:
        out = {}
        for model in ("plain", "zero"):
            r = c.post("/v1/completions", json={"model": model, "prompt": QUESTIONS, "max_tokens": MAX_TOKENS,
                                                "temperature": 0})
            assert r.status_code == 200, r.text
            out[model] = [ch["text"] for ch in r.json()["choices"]]
        return out


@pytest.fixture(scope="module")
def answers(all_answers):
    return all_answers["plain"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, all_answers):
    answers = all_answers["plain"]
    root = tmp_path_factory.mktemp("risk-files")
    mle = root / "mle.jsonl"  # the sigma = 0 answers, right
    mle.write_text("".join(json.dumps({"prompt": q, "answers": [a]}) + "\n"
                           for q, a in zip(QUESTIONS, all_answers["zero"], strict=True)))
    right, wrong, mixed = root / "right.jsonl", root / "wrong.jsonl", root / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"prompt": q, "answers": [a if i % 3 else "never this 999"]}) + "\n"
                             for i, (q, a) in enumerate(zip(QUESTIONS, answers, strict=True))))
    right.write_text("".join(json.dumps({"prompt": q, "answers": [a]}) + "\n" for q, a in zip(QUESTIONS, answers,
                                                                                               strict=True)))
    wrong.write_text("".join(json.dumps({"prompt": q, "answer": f"not {a} at all 12345"}) + "\n" for q, a in
                             zip(QUESTIONS, answers, strict=True)))
    return {"right": right, "wrong": wrong, "mixed": mixed, "mle": mle, "root": root}


@pytest.fixture(scope="module")
def client(tiny, files):
    adapters = [_gen("sure", tiny["adapter_other"], files["right"]), _gen("unsure", tiny["adapter_other"],
                                                                        files["wrong"]),
                _gen("plain", tiny["adapter_other"]), _gen("mixed", tiny["adapter_other"], files["mixed"])]
    default = _gen("mle", tiny["adapter_other"], files["mle"])
    del default["risk_score"]  # the default score: the sigma = 0 answer's NLL
    adapters.append(default)
    with ready_client(_settings(tiny, files["root"] / "cache", adapters)) as c:
        yield c


def _risk(**kw):
    return {"max_tokens": MAX_TOKENS, "temperature": 0, "max_risk": 0.2, **kw}


def test_a_certified_adapter_answers_and_an_uncertified_one_abstains_visibly_to_the_openai_client(client, answers):
    openai = require("openai", "the openai package is not installed (pip install -e '.[dev]')")
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    sure = oa.completions.create(model="sure", prompt=QUESTIONS[0], max_tokens=MAX_TOKENS, temperature=0,
                                 extra_body={"max_risk": 0.2})
    choice = sure.choices[0]
    assert choice.text == answers[0]
    extra = choice.model_extra
    assert extra["abstained"] is False
    risk = extra["uncertainty"]["risk"]
    # every calibration answer right: Learn-then-Test certifies the lowest threshold of the grid
    assert risk["certified"] and risk["threshold"] == pytest.approx(0.01) and risk["score"] == "max_mi"
    seq = extra["uncertainty"]["sequence"]
    assert risk["certainty"] == pytest.approx(math.exp(-seq["max_mutual_information"]))
    assert extra["uncertainty"]["confidence"] == pytest.approx(math.exp(-seq["nll"]))

    unsure = oa.completions.create(model="unsure", prompt=QUESTIONS[0], max_tokens=MAX_TOKENS, temperature=0,
                                   extra_body={"max_risk": 0.2})
    choice = unsure.choices[0]
    assert choice.text == REFUSAL and choice.finish_reason in ("stop", "length")
    assert choice.model_extra["abstained"] is True
    risk = choice.model_extra["uncertainty"]["risk"]
    assert not risk["certified"] and risk["threshold"] is None and risk["answer"] == answers[0]

    with chat_templated(client):  # the chat route: the refusal is the message's content
        chat = oa.chat.completions.create(model="unsure", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                          max_tokens=MAX_TOKENS, temperature=0, extra_body={"max_risk": 0.2})
    assert chat.choices[0].message.content == REFUSAL and chat.choices[0].model_extra["abstained"] is True
    info = {a["name"]: a["calibration"] for a in client.get("/info").json()["adapters"]}
    assert info["sure"]["state"] == "ready" and info["sure"]["score"] == "max_mi" and info["sure"]["accuracy"] == 1.0
    assert info["unsure"]["accuracy"] == 0.0 and info["plain"]["state"] == "off"
    # without max_risk nothing is decided: no abstained field, the answer as it is
    plain = client.post("/v1/completions", json={"model": "unsure", "prompt": QUESTIONS[0],
                                                 "max_tokens": MAX_TOKENS, "temperature": 0}).json()["choices"][0]
    assert "abstained" not in plain and plain["text"] == answers[0] and "risk" not in plain["uncertainty"]


def test_the_confidence_is_recalibrated_by_the_calibration_temperature_only_for_the_calibrated_decode(client):
    t = {a["name"]: a["calibration"] for a in client.get("/info").json()["adapters"]}["mixed"]
    temperature = t["confidence_temperature"]
    assert t["accuracy"] == pytest.approx(2 / 3) and abs(temperature - 1.0) > 0.05  # a third wrong: T moves
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    for body, calibrated in (({"temperature": 0}, True), ({"temperature": 0, "n_samples": N + 1}, False),
                             ({"temperature": 0.5, "seed": 3}, False), ({"temperature": 0, "answers": "per_sample"}, False)):
        r = client.post("/v1/completions", json={"model": "mixed", "prompt": QUESTIONS[2], "max_tokens": MAX_TOKENS,
                                                 **body})
        u = r.json()["choices"][0]["uncertainty"]
        raw = math.exp(-u["sequence"]["nll"])
        assert u["confidence_raw"] == pytest.approx(raw) and u["confidence_calibrated"] is calibrated, body
        expected = 1 / (1 + math.exp(-logit(raw) / temperature)) if calibrated else raw
        assert u["confidence"] == pytest.approx(expected, rel=1e-6), body


def test_the_default_score_decodes_and_decides_the_sigma_zero_answer(client, all_answers):
    info = {a["name"]: a["calibration"] for a in client.get("/info").json()["adapters"]}["mle"]
    assert info["score"] == "mle_nll" and info["sigma"] == 0.0 and info["accuracy"] == 1.0
    for extra in ({}, {"n_samples": N + 2, "posterior_seed": 5}):  # N and the seed do not change a sigma = 0 answer
        r = client.post("/v1/completions", json={**_risk(model="mle", prompt=QUESTIONS[:2]), **extra})
        assert r.status_code == 200, r.text
        body = r.json()
        # decided on the sigma = 0 answer: every calibration answer is right, but the tiny model gives its
        # answers p(answer) far below Learn-then-Test's starting points (0.999 ... 0.8): nothing is
        # certified, and the withheld answer is the sigma = 0 one
        assert body["sigma"] == 0.0
        assert [c["uncertainty"]["risk"]["answer"] for c in body["choices"]] == all_answers["zero"][:2]
        for c in body["choices"]:
            assert c["abstained"] is True and not c["uncertainty"]["risk"]["certified"]
            assert c["uncertainty"]["n_samples"] == 1
            assert c["uncertainty"]["risk"]["certainty"] == pytest.approx(math.exp(-c["uncertainty"]["sequence"]["nll"]))
            assert c["uncertainty"]["confidence_calibrated"] is True  # the calibration's decode
    # without max_risk the adapter answers under its posterior (sigma > 0), confidence raw
    plain = client.post("/v1/completions", json={"model": "mle", "prompt": QUESTIONS[0], "max_tokens": MAX_TOKENS,
                                                 "temperature": 0}).json()
    assert plain["sigma"] == SIGMA and plain["choices"][0]["uncertainty"]["confidence_calibrated"] is False


def test_each_prompt_of_a_request_is_decided_and_counted_in_the_metrics(client):
    def counts():
        text = metric_samples(client.get("/metrics").text)
        return {a: (metric(text, "tfb_generations_with_max_risk_total", adapter=a),
                    metric(text, "tfb_generation_abstentions_total", adapter=a)) for a in ("sure", "unsure")}

    before = counts()
    for model in ("sure", "unsure"):
        r = client.post("/v1/completions", json=_risk(model=model, prompt=QUESTIONS[:3]))
        assert r.status_code == 200, r.text
        assert [c["abstained"] for c in r.json()["choices"]] == [model == "unsure"] * 3
    client.post("/v1/completions", json={"model": "sure", "prompt": QUESTIONS[0], "max_tokens": 2, "temperature": 0})
    after = counts()
    assert after["sure"] == (before["sure"][0] + 3, before["sure"][1])
    assert after["unsure"] == (before["unsure"][0] + 3, before["unsure"][1] + 3)


@pytest.mark.parametrize(("extra", "param", "named"), [
    ({"temperature": 0.7}, "temperature", "temperature=0.7"),
    ({"n_samples": 5}, "n_samples", "n_samples=5"),
    ({"posterior_seed": 9}, "posterior_seed", "posterior_seed=9"),
    ({"answers": "per_sample"}, "answers", "answers='per_sample'"),
    ({"stream": True}, "stream", "stream=true"),
])
def test_another_decode_than_the_calibrated_one_is_refused_naming_what_differs(client, extra, param, named):
    r = client.post("/v1/completions", json={**_risk(model="sure", prompt=QUESTIONS[0]), **extra})
    # /predict's 422; the OpenAI routes answer every invalid request 400, as vLLM does
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and named in err["message"] and "calibration" in err["message"]
    # the calibrated values themselves are accepted
    same = {"temperature": 0, "n_samples": N, "posterior_seed": 0, "answers": "mean", "stream": False}[param]
    ok = client.post("/v1/completions", json={**_risk(model="sure", prompt=QUESTIONS[0]), param: same})
    assert ok.status_code == 200, ok.text


def test_max_risk_without_calibration_questions_is_refused_and_bad_values_are_422(client):
    r = client.post("/v1/completions", json=_risk(model="plain", prompt=QUESTIONS[0]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_risk", r.text
    assert "risk-controlled generation is off" in r.json()["error"]["message"]
    for bad in (0, 1, 1.5, -0.1, "x"):
        r = client.post("/v1/completions", json=_risk(model="sure", prompt=QUESTIONS[0], max_risk=bad))
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_risk", (bad, r.text)


def test_the_calibration_is_the_exact_match_count_and_is_cached_by_content(tiny, files, answers):
    cfg = dict(task="generation", sigma=SIGMA, n_samples=N, anchor_max_tokens=MAX_TOKENS, risk_score="max_mi")
    from tfb_core.config import ModelConfig

    model = ModelConfig(model=tiny["model"], adapter=tiny["adapter_other"], cache_dir=str(files["root"] / "c2"),
                        max_length=64)
    (first,) = load_engines([("a", EngineConfig(model=model, calibration=str(files["right"]), **cfg))], progress=False)
    # left to run (a server steps it between requests): here, all at once
    assert first.risk_calibration is None and first.calibration_run.state == "running"
    first.calibration_run.run()
    cal = first.risk_calibration
    assert cal is not None and cal.n == len(QUESTIONS) and cal.accuracy == 1.0
    assert cal.errors == (0,) * len(cal.grid) and cal.answered[-1] == len(QUESTIONS)
    # the same records under another path: read from the cache (no run), the source where they were read
    moved = files["root"] / "moved.jsonl"
    moved.write_text(files["right"].read_text())
    (again,) = load_engines([("a", EngineConfig(model=model, calibration=str(moved), **cfg))], progress=False)
    assert again.calibration_run is None and again.risk_calibration is not None
    assert again.risk_calibration.answered == cal.answered and again.risk_calibration.source == f"file {moved}"
    # other answers: another calibration (background: a run to step), all wrong
    (other,) = load_engines([("a", EngineConfig(model=model, calibration=str(files["wrong"]), **cfg))],
                            progress=False)
    assert other.risk_calibration is None and other.calibration_run is not None
    other.calibration_run.run()
    assert other.risk_calibration.accuracy == 0.0 and other.risk_calibration.errors == other.risk_calibration.answered
    assert not other.risk_calibration.threshold(0.2, 0.1).supported
    assert certainty(0.0) >= cal.threshold(0.2, 0.1).threshold
