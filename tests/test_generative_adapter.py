"""A generative adapter served at start-up: its kind, its sigma searched on its own greedy anchor
answers (or cached, or fixed), the routes it answers and the ones it refuses."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import with_chat_template
from test_app_support import CHAT_TEMPLATE, LABELS, PROMPTS, clean_env, make_settings, ready_client

from app.settings import Settings
from tfb_core.config import DEFAULT_MODEL, SearchConfig
from tfb_core.data.loading import LoadError
from tfb_core.forward.generator import BayesianGenerator
from tfb_core.search.generation import make_anchors, read_anchor, search_generation_sigma
from tfb_core.search.strategy import GENERATION_SEARCH
from tfb_core.serving.config import (
    DEMO_ADAPTER,
    DEMO_GENERATIVE_ADAPTER,
    EngineConfig,
)
from tfb_core.serving.startup import load_classifiers, load_engines

ANCHOR = [{"prompt": "one two three"}, {"prompt": "the cat sat on"}, {"prompt": "a b c d", "answer": "e"},
          {"messages": [{"role": "user", "content": "count to three"}]},
          {"messages": [{"role": "user", "content": "name a colour"}], "answer": ["red", "blue"]}]
#: a short search: the tiny model's answers move quickly with sigma
SEARCH = dict(search_low=0.01, search_high=0.2, search_iters=2, search_samples=3)


@pytest.fixture(scope="module")
def chat_model(tiny, tmp_path_factory):
    """A copy of the tiny model whose tokenizer has a chat template (anchor lines may be chat messages)."""
    root = tmp_path_factory.mktemp("chatmodel")
    model = with_chat_template(tiny["model"], root / "model", CHAT_TEMPLATE)
    anchor = root / "anchor.jsonl"
    anchor.write_text("".join(json.dumps(r) + "\n" for r in ANCHOR))
    return {"model": str(model), "anchor": str(anchor), "root": root}


def _adapters(tiny, chat_model, **gen):
    return [{"name": "clf", "path": tiny["adapter"], "labels": list(LABELS), "sigma": 0.05},
            {"name": "writer", "path": tiny["adapter_other"], "task": "generation", "anchor": chat_model["anchor"], **gen}]


def _settings(tiny, chat_model, cache, **gen):
    return make_settings(tiny, model=chat_model["model"], adapter=None, labels=None, sigma=None,
                         adapters=json.dumps(_adapters(tiny, chat_model, **gen)), cache_dir=str(cache), **SEARCH)


def test_the_embedded_default_also_serves_the_generative_demo_unless_the_settings_name_something_else():
    with clean_env():
        names = [(n, c.with_defaults()) for n, c in Settings().engine_configs()]
        assert [n for n, _ in names] == ["sst2-mle", "arith-mle"]
        (_, sst2), (_, arith) = names
        assert sst2.model.adapter == str(DEMO_ADAPTER) and sst2.task == "sst2" and not sst2.generative
        assert arith.model.adapter == str(DEMO_GENERATIVE_ADAPTER) and arith.generative
        assert arith.model.model == sst2.model.model == DEFAULT_MODEL  # one base model
        # the generation default of the search, its own anchor, and its calibration questions (max_risk)
        assert (arith.search.criterion, arith.search.tolerance) == (GENERATION_SEARCH.criterion, GENERATION_SEARCH.tolerance)
        assert sst2.search.tolerance == SearchConfig().tolerance
        assert arith.anchor == str(DEMO_GENERATIVE_ADAPTER / "anchor.jsonl")
        assert arith.calibration == str(DEMO_GENERATIVE_ADAPTER / "calibration.jsonl")
        for given in ({"sigma": 0.02}, {"anchor": "/x.jsonl"}, {"task": "sst2"}, {"generation_demo": False},
                      {"adapter": str(DEMO_ADAPTER)}, {"calibration": "/c.jsonl"}):
            assert [n for n, _ in Settings(**given).engine_configs()] == ["sst2-mle"], given
        # an explicit tolerance is the user's, for either kind; TFB_SEED moves the search's seed, not its bound
        tol = Settings(search_tolerance=0.3).engine_configs()
        assert [c.search.tolerance for _, c in tol] == [0.3, 0.3]
        seeded = Settings(seed=7).engine_configs()
        assert [(c.search.seed, c.search.tolerance) for _, c in seeded] == [(7, 1.5), (7, GENERATION_SEARCH.tolerance)]


def test_a_folder_says_it_is_generative_only_through_its_train_config(tmp_path, tiny):
    folder = tmp_path / "gen"
    shutil.copytree(tiny["adapter"], folder)
    (folder / "calibration.jsonl").write_text('{"prompt": "x", "answer": "y"}\n')
    cfg = EngineConfig(model=EngineConfig().model.__class__(model=tiny["model"], adapter=str(folder)), labels=LABELS)
    assert not cfg.with_defaults().generative  # labels given: a classifier whatever the folder says
    (folder / "train_config.json").write_text(json.dumps({"kind": "generation"}))
    plain = EngineConfig(model=cfg.model)
    assert plain.with_defaults().generative and plain.with_defaults().calibration == str(folder / "calibration.jsonl")
    assert plain.with_defaults().search == GENERATION_SEARCH
    (folder / "train_config.json").write_text("not json")
    assert not plain.with_defaults().generative
    with pytest.raises(ValueError, match="no labels"):
        EngineConfig(task="generation", labels=LABELS)


def test_sigma_is_the_generative_search_on_the_anchor_and_a_restart_reads_it_from_the_cache(tiny, chat_model, tmp_path):
    settings = _settings(tiny, chat_model, tmp_path / "cache")
    with ready_client(settings) as c:
        info = {a["name"]: a for a in c.get("/info").json()["adapters"]}
        writer = info["writer"]
        assert writer["kind"] == "generation" and writer["labels"] == [] and writer["sigma_source"] == "search"
        assert info["clf"]["kind"] == "classification"
        assert "/predict" not in writer["routes"] and "/v1/chat/completions" in writer["routes"]
        assert writer["search"]["criterion"] == "nll" and writer["search"]["tolerance"] == GENERATION_SEARCH.tolerance
        assert writer["calibration"]["state"] == "off"
        sigma = writer["sigma"]
        # a completion of the generative adapter carries its posterior's uncertainty
        r = c.post("/v1/completions", json={"model": "writer", "prompt": PROMPTS[0], "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"][0]["uncertainty"]["tokens"]) == 3
    # the oracle: the library's own search on a generator of the same adapter, anchors read alone
    cfg = settings.engine_configs()[1][1].with_defaults()
    clfs = load_classifiers([settings.engine_configs()[0][1].model, cfg.model], [LABELS, ()])
    gen = BayesianGenerator.from_classifier(clfs[1])
    expected = search_generation_sigma(gen, make_anchors(gen.tokenizer, read_anchor(chat_model["anchor"])), cfg.search,
                                       max_tokens=cfg.anchor_max_tokens, adapter=1, max_rows=cfg.max_rows)
    assert expected.satisfied and sigma == pytest.approx(expected.sigma, rel=1e-6)
    with ready_client(settings) as c:
        writer = {a["name"]: a for a in c.get("/info").json()["adapters"]}["writer"]
        assert (writer["sigma_source"], writer["sigma"]) == ("cache", sigma)
    # its key hashes the decoder's source too (an edit to it searches again)
    from tfb_core.search import cache

    keys = [json.loads(f.read_text())["key"] for f in (tmp_path / "cache" / "sigma").glob("*.json")]
    assert [k["code_sha256"] for k in keys if k["task"] == "generation"] == [cache.code_sha256(cache.GENERATION_SEARCH)]
    # another anchor is another search
    other = chat_model["root"] / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in ANCHOR[:3]))
    engines = load_engines(_settings(tiny, chat_model, tmp_path / "cache", anchor=str(other)).engine_configs(),
                           progress=False)
    assert engines[1].sigma_source == "search"


def test_classification_routes_refuse_a_generative_adapter_naming_it(tiny, chat_model, tmp_path):
    with ready_client(_settings(tiny, chat_model, tmp_path / "cache", sigma=0.1)) as c:
        r = c.post("/predict", json={"inputs": PROMPTS[:1], "adapter": "writer"})
        assert r.status_code == 422 and "adapter 'writer' is a generative adapter" in r.json()["detail"], r.text
        r = c.post("/classify", json={"model": "writer", "input": PROMPTS[:1]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        assert c.post("/predict", json={"inputs": PROMPTS[:1], "adapter": "clf"}).status_code == 200
        ok = c.post("/v1/chat/completions", json={"model": "writer", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200 and ok.json()["choices"][0]["uncertainty"]["sequence"]["nll"] > 0


def test_a_generative_adapter_alone_warms_up_and_serves(tiny, chat_model, tmp_path):
    settings = make_settings(tiny, model=chat_model["model"], labels=None, task="generation", sigma=0.1,
                             adapter=tiny["adapter_other"], cache_dir=str(tmp_path / "cache"), warmup=True)
    with ready_client(settings) as c:
        assert c.get("/info").json()["kind"] == "generation"
        r = c.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["uncertainty"]["tokens"][0]["mutual_information"] >= 0


@pytest.mark.parametrize("line, why", [
    ({"text": "x"}, "give one of 'prompt'"), ({"prompt": "x", "messages": []}, "give one of 'prompt'"),
    ({"prompt": ""}, "'prompt' must be a non-empty string"), ({"messages": [{"role": "user"}]}, "'messages' must be"),
    ({"prompt": "x", "answer": 5}, "'answer' must be")])
def test_a_bad_anchor_line_stops_start_up_naming_the_file_and_line(tiny, chat_model, tmp_path, line, why):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ANCHOR[0]) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(LoadError, match=f"adapter 'writer': .*bad.jsonl: record 2: {why}"):
        load_engines(_settings(tiny, chat_model, tmp_path / "cache", anchor=str(bad)).engine_configs(), progress=False)


def test_an_anchor_prompt_over_the_length_limit_stops_start_up(tiny, chat_model, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": " ".join(["word"] * 200)}) + "\n")
    with pytest.raises(LoadError, match="long.jsonl: record 1: the prompt has .* tokens, not within 1 to 64"):
        load_engines(_settings(tiny, chat_model, tmp_path / "cache", anchor=str(long)).engine_configs(), progress=False)


def test_a_generative_adapter_loaded_at_run_time_searches_beside_serving_and_answers_as_at_start_up(
        tiny, chat_model, tmp_path, monkeypatch):
    """POST /v1/load_lora_adapter with task 'generation': 202, its search's forwards run by the worker
    (through the gate, as a classifier's), then the same sigma and the same completion as the adapter
    configured at start-up."""
    body = {"model": "writer", "prompt": PROMPTS[0], "max_tokens": 4, "n_samples": 4, "posterior_seed": 2,
            "temperature": 0}
    with ready_client(_settings(tiny, chat_model, tmp_path / "a")) as c:
        want_sigma = {a["name"]: a for a in c.get("/info").json()["adapters"]}["writer"]["sigma"]
        want = c.post("/v1/completions", json=body).json()["choices"][0]
    served = [{"name": "clf", "path": tiny["adapter"], "labels": list(LABELS), "sigma": 0.05}]
    settings = make_settings(tiny, model=chat_model["model"], labels=None, sigma=None, adapter=None,
                             adapters=json.dumps(served), cache_dir=str(tmp_path / "b"),
                             allow_runtime_lora_updating=True, **SEARCH,
                             allowed_local_paths=[str(tiny["root"]), str(Path(chat_model["anchor"]).parent)])
    from tfb_core.forward import generator

    threads: set[str] = set()
    arm = generator.arm

    def watched(*args, **kwargs):  # the thread each decode forward runs on
        threads.add(threading.current_thread().name)
        return arm(*args, **kwargs)

    monkeypatch.setattr(generator, "arm", watched)
    with ready_client(settings) as c:
        threads.clear()
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "writer", "lora_path": tiny["adapter_other"],
                                                  "task": "generation", "anchor": chat_model["anchor"]})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 120
        while (entry := {a["name"]: a for a in c.get("/info").json()["adapters"]}["writer"])["state"] != "ready":
            assert entry["state"] == "searching" and time.monotonic() < deadline, entry
            time.sleep(0.05)
        assert entry["kind"] == "generation" and entry["sigma_source"] == "search"
        assert entry["sigma"] == pytest.approx(want_sigma, rel=1e-6)
        assert threads == {"tfb-model-worker"}  # the search's forwards (its decodes too) ran on the worker
        got = c.post("/v1/completions", json=body).json()["choices"][0]
        assert [t["token_id"] for t in got["uncertainty"]["tokens"]] == [t["token_id"] for t in want["uncertainty"]["tokens"]]
        for a, b in zip(got["uncertainty"]["tokens"], want["uncertainty"]["tokens"], strict=True):
            assert a["mutual_information"] == pytest.approx(b["mutual_information"], abs=1e-5)


def test_the_chat_templates_head_is_kept_per_sample_across_chat_requests(tiny, chat_model, tmp_path):
    """The served generator keeps the keys and values of what every chat prompt starts with (the
    template's head), per posterior sample: a second chat request reads them."""
    from test_app_support import CHAT_TEMPLATE

    from tfb_core.serving.generation import chat_head

    with ready_client(_settings(tiny, chat_model, tmp_path / "cache", sigma=0.1)) as c:
        body = {"model": "writer", "max_tokens": 2, "n_samples": 3, "temperature": 0}
        for q in ("count to three", "name a colour"):
            r = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": q}]})
            assert r.status_code == 200, r.text
        gen = c.app.state.tfb.worker._service.generator
        tok = c.app.state.tfb.predictor.engine.classifier.tokenizer
        assert tok.chat_template == CHAT_TEMPLATE and gen.prefix_tokens == chat_head(tok)
        assert gen.prefix_tokens == tok("user: ", add_special_tokens=False)["input_ids"][:len(gen.prefix_tokens)]
        assert len(gen.prefix_rows) == 3  # the adapter's 3 samples of the default draw, computed once
