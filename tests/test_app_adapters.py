"""The server with several adapters on one base model: routing, /info, metrics, configuration."""

from __future__ import annotations

import json

import pytest
from test_app_support import assert_close, clean_env, make_settings, metric, metric_samples, ready_client, strip_ids

from app.settings import Settings

PROMPTS = ["a great film with a wonderful cast", "a dull mess", "superb"]


def _adapters(tiny):
    return [{"name": "qkv", "path": tiny["adapter"]},
            {"name": "yes-no", "adapter": tiny["adapter_qv"], "labels": ["yes", "no"], "sigma": 0.0},
            {"name": "other", "path": tiny["adapter_other"], "sigma": 0.2}]


@pytest.fixture(scope="module")
def client(tiny):
    settings = make_settings(tiny, adapter=None, adapters=json.dumps(_adapters(tiny)))
    with ready_client(settings) as c:
        yield c


def test_each_adapter_answers_as_a_server_of_that_adapter_alone(client, tiny):
    bodies = [({"inputs": PROMPTS, "adapter": "qkv", "n_samples": 4, "seed": 3}, "qkv"),
              ({"inputs": PROMPTS, "n_samples": 4, "seed": 3}, "qkv"),  # the default: the first
              ({"inputs": PROMPTS[:2], "adapter": "yes-no"}, "yes-no"),
              ({"inputs": PROMPTS[1:], "adapter": "other", "n_samples": 6, "seed": 1}, "other")]
    got = [client.post("/predict", json=b) for b, _ in bodies]
    for r, (_, name) in zip(got, bodies, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["adapter"] == name
    specs = {a["name"]: a for a in _adapters(tiny)}
    for r, (body, name) in zip(got, bodies, strict=True):
        spec = specs[name]
        alone = make_settings(tiny, adapter=spec.get("adapter") or spec["path"],
                              labels=spec.get("labels", ["negative", "positive"]), sigma=spec.get("sigma", 0.05))
        with ready_client(alone) as single:
            want = single.post("/predict", json={k: v for k, v in body.items() if k != "adapter"})
        assert_close(strip_ids(r.json()), strip_ids(want.json()))
    assert got[2].json()["labels"] == ["yes", "no"] and got[2].json()["sigma"] == 0.0


def test_unknown_adapter_is_404_naming_the_served_ones(client):
    r = client.post("/predict", json={"inputs": PROMPTS, "adapter": "nope"})
    assert r.status_code == 404
    assert "nope" in r.json()["detail"] and "['qkv', 'yes-no', 'other']" in r.json()["detail"]


def test_info_lists_every_adapter_with_sigma_and_provenance(client, tiny):
    info = client.get("/info").json()
    assert info["default_adapter"] == "qkv"
    by_name = {a["name"]: a for a in info["adapters"]}
    assert list(by_name) == ["qkv", "yes-no", "other"]
    assert by_name["yes-no"]["labels"] == ["yes", "no"] and by_name["yes-no"]["sigma"] == 0.0
    assert by_name["other"]["sigma"] == 0.2 and by_name["other"]["sigma_source"] == "fixed"
    assert by_name["other"]["adapter"] == tiny["adapter_other"]
    assert info["sigma"] == by_name["qkv"]["sigma"] == 0.05  # the top level: the default adapter's


def test_metrics_carry_the_adapter(client):
    before = metric_samples(client.get("/metrics").text)
    out = client.post("/predict", json={"inputs": PROMPTS[:2], "adapter": "other"}).json()
    client.post("/feedback", json={"id": out["predictions"][0]["id"], "label": "positive"})
    after = metric_samples(client.get("/metrics").text)
    for name in ("tfb_sigma", "tfb_default_samples"):
        assert metric(after, name, adapter="other") == {"tfb_sigma": 0.2, "tfb_default_samples": 10}[name]
    assert metric(after, "tfb_prediction_confidence_count", adapter="other") - \
        metric(before, "tfb_prediction_confidence_count", adapter="other") == 2
    assert metric(after, "tfb_prediction_confidence_count", adapter="yes-no") == \
        metric(before, "tfb_prediction_confidence_count", adapter="yes-no")
    assert metric(after, "tfb_feedback_total", adapter="other") - metric(before, "tfb_feedback_total", adapter="other") == 1
    assert metric(after, "tfb_feedback_total", adapter="qkv") == metric(before, "tfb_feedback_total", adapter="qkv")


def test_adapters_from_a_toml_file_and_settings_errors(tiny, tmp_path):
    toml = tmp_path / "adapters.toml"
    toml.write_text(f'[[adapters]]\nname = "a"\npath = "{tiny["adapter"]}"\n\n'
                    '[[adapters]]\nname = "b"\npublished = "mle/boolq/1"\n')
    toml_ok = tmp_path / "ok.toml"
    toml_ok.write_text(f'[[adapters]]\nname = "a"\npath = "{tiny["adapter"]}"\n\n'
                       f'[[adapters]]\nname = "b"\npath = "{tiny["adapter_qv"]}"\ntask = "sst2"\n')
    named = make_settings(tiny, adapter=None, adapters=str(toml_ok)).engine_configs()
    assert [n for n, _ in named] == ["a", "b"]
    assert named[0][1].model.adapter == tiny["adapter"] and named[1][1].task == "sst2"
    assert named[1][1].sigma == 0.05  # not set by the adapter: the server's
    # on the default base model, a published adapter needs its own (Llama-3.1-8B): refused at start-up
    with clean_env(), pytest.raises(ValueError, match="adapters share one base model: adapter 'b' needs model "
                                                      "'meta-llama/Meta-Llama-3.1-8B'"):
        Settings(adapters=str(toml))
    assert make_settings(tiny, adapter=None, adapters=str(toml)).engine_configs()[1][1].published  # a local copy
    with pytest.raises(ValueError, match="unset adapter"):
        make_settings(tiny, adapters=str(toml))  # TFB_ADAPTER and TFB_ADAPTERS both
    with pytest.raises(ValueError, match="repeated"):
        make_settings(tiny, adapter=None, adapters=json.dumps([{"name": "x", "path": "/a"}, {"name": "x", "path": "/b"}]))
    with pytest.raises(ValueError, match="missing.toml'.*no such file"):
        make_settings(tiny, adapter=None, adapters=str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError, match="neither a JSON list nor"):
        make_settings(tiny, adapter=None, adapters="{not a list}")
    with pytest.raises(ValueError, match="published name"):
        make_settings(tiny, adapter=None, adapters=json.dumps([{"name": "x"}]))
    with pytest.raises(ValueError, match="string_pattern_mismatch|should match pattern"):
        make_settings(tiny, adapter=None, adapters=json.dumps([{"name": "a b", "path": "/a"}]))


def test_single_adapter_name_defaults(tiny):
    assert make_settings(tiny).engine_configs()[0][0] == "adapter"  # its folder's name
    assert make_settings(tiny, adapter_name="mine").engine_configs()[0][0] == "mine"
    with clean_env():
        assert Settings(published="mle/boolq/1").engine_configs()[0][0] == "mle/boolq/1"
        assert Settings().engine_configs()[0][0] == "sst2-mle"  # the demo


def test_serve_flags_as_vllms_lora_modules(tiny, capsys):
    from app.cli import build_parser, settings_overrides

    args = build_parser().parse_args(["serve", "--model", tiny["model"], "--lora-modules", f"a={tiny['adapter']}",
                                      "b=published:mle/boolq/1", "--lora-modules",
                                      json.dumps({"name": "c", "path": tiny["adapter_qv"], "sigma": 0.1})])
    with clean_env():
        s = Settings(**settings_overrides(args))
    named = dict(s.engine_configs())
    assert list(named) == ["a", "b", "c"]
    assert named["a"].model.adapter == tiny["adapter"] and named["b"].published == "mle/boolq/1"
    assert named["c"].model.adapter == tiny["adapter_qv"] and named["c"].sigma == 0.1
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--lora-modules", "no-equals-sign"])
    assert exit_info.value.code == 2
    assert "expected name=path" in capsys.readouterr().err


def test_classify_model_names_the_adapter(client):
    """vLLM's /classify: ``model`` picks the adapter, as a LoRA name does in vLLM; /v1/models lists them."""
    r = client.post("/classify", json={"model": "other", "input": PROMPTS[:2], "n_samples": 4, "seed": 2})
    assert r.status_code == 200, r.text
    same = client.post("/predict", json={"adapter": "other", "inputs": PROMPTS[:2], "n_samples": 4, "seed": 2}).json()
    assert r.json()["model"] == "other"
    for item, p in zip(r.json()["data"], same["predictions"], strict=True):
        assert item["probs"] == pytest.approx(p["probs"], abs=1e-6) and item["label"] == p["label"]
    yes_no = client.post("/classify", json={"model": "yes-no", "input": "Is it good?"}).json()
    assert yes_no["labels"] == ["yes", "no"] and yes_no["data"][0]["num_classes"] == 2
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["qkv", "yes-no", "other"]
    missing = client.post("/classify", json={"model": "nope", "input": "x"})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]


def test_v1_models_lists_each_adapters_own_folder(client, tiny):
    """As vLLM lists a LoRA adapter: ``root`` is that adapter's own path, ``parent`` the base model."""
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert list(cards) == ["qkv", "yes-no", "other"]
    assert {name: m["root"] for name, m in cards.items()} == {
        "qkv": tiny["adapter"], "yes-no": tiny["adapter_qv"], "other": tiny["adapter_other"]}
    assert all(m["parent"] == tiny["model"] for m in cards.values())
