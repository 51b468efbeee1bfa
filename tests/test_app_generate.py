"""Bayesian generation behind the OpenAI API, through the server on the tiny Llama: sigma = 0 is the
plain peft model's greedy generate with every MI 0; the OpenAI client reads the responses; streamed
chunks reassemble to the non-streamed answer (text held back where a stop string may still cut it);
per-sample answers; errors in OpenAI's body naming the field; classification served while a
generation decodes; a client that leaves takes its rows out of the decode."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import require
from prometheus_client import CollectorRegistry
from test_app_support import (
    CHAT_TEMPLATE,
    assert_close,
    longest_run,
    make_settings,
    metric,
    metric_samples,
    ready_client,
)

from app.batching import BACKGROUND_EVERY, BatchLimits, GenWork, ModelWorker
from app.errors import NotReadyError
from app.metrics import Metrics
from tfb_core.config import ModelConfig
from tfb_core.data.loading import load_adapter, load_base_model
from tfb_core.forward.decoding import Decoding
from tfb_core.serving.gate import ForwardGate
from tfb_core.serving.generation import GenerationSettings
from tfb_core.serving.startup import load_engine

PROMPTS = ["a great film with a wonderful cast", "I would not watch it again"]


def _adapters(tiny):
    return [{"name": "zero", "path": tiny["adapter"], "sigma": 0.0},
            {"name": "bayes", "path": tiny["adapter_other"], "sigma": 0.3}]


@pytest.fixture(scope="module")
def client(tiny):
    settings = make_settings(tiny, adapter=None, adapters=json.dumps(_adapters(tiny)), warmup=False, max_tokens=400)
    with ready_client(settings) as c:
        yield c


@pytest.fixture(scope="module")
def peft(tiny):
    cfg = ModelConfig(model=tiny["model"], adapter=tiny["adapter"], dtype="float32")
    tok, model = load_base_model(cfg)
    return tok, load_adapter(model, cfg)


def _greedy(peft, tokens: list[int], n: int) -> list[int]:
    tok, model = peft
    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             pad_token_id=tok.pad_token_id)
    return out[0, len(tokens):].tolist()


def _openai(client):
    openai = require("openai", "the openai package is not installed")
    return openai, openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def _events(text: str) -> list[dict]:
    """The JSON chunks of a server-sent event stream, which must end with [DONE]."""
    blocks = text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]", text[-200:]
    assert all(b.startswith("data: ") for b in blocks[:-1])
    return [json.loads(b[len("data: "):]) for b in blocks[:-2]]


def _ids(choice: dict) -> list[int]:
    return [t["token_id"] for t in choice["uncertainty"]["tokens"]]


def test_sigma_zero_is_the_peft_models_greedy_generate_and_every_mi_is_zero(client, peft):
    tok = peft[0]
    for prompt in PROMPTS:
        r = client.post("/v1/completions", json={"model": "zero", "prompt": prompt, "max_tokens": 8,
                                                 "temperature": 0, "logprobs": 2, "n_samples": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        expected = _greedy(peft, tok(prompt)["input_ids"], 8)
        assert _ids(choice) == expected
        assert choice["text"] == tok.decode(expected, skip_special_tokens=True)
        for t in choice["uncertainty"]["tokens"]:
            assert t["mutual_information"] == 0.0 and t["expected_entropy"] == t["predictive_entropy"]
            assert t["prob"] == pytest.approx(math.exp(t["logprob"]))
        seq = choice["uncertainty"]["sequence"]
        assert seq["max_mutual_information"] == 0.0 and seq["mean_mutual_information"] == 0.0
        assert seq["nll"] == pytest.approx(-sum(t["logprob"] for t in choice["uncertainty"]["tokens"]))
        # OpenAI's logprobs are p̄'s, the chosen token the most probable (greedy)
        lp = choice["logprobs"]
        assert lp["token_logprobs"] == [t["logprob"] for t in choice["uncertainty"]["tokens"]]
        assert all(max(top.values()) == pytest.approx(v) for top, v in zip(lp["top_logprobs"], lp["token_logprobs"],
                                                                           strict=True))
        assert body["usage"] == {"prompt_tokens": len(tok(prompt)["input_ids"]), "completion_tokens": len(expected),
                                 "total_tokens": len(tok(prompt)["input_ids"]) + len(expected)}
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "zero"


def test_the_openai_client_reads_completions_and_chat_completions(client, peft):
    openai, oa = _openai(client)
    tok = peft[0]
    resp = oa.completions.create(model="zero", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=1)
    expected = _greedy(peft, tok(PROMPTS[0])["input_ids"], 6)
    assert resp.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert resp.usage.completion_tokens == len(expected)
    assert len(resp.choices[0].logprobs.token_logprobs) == len(expected)
    unc = resp.choices[0].model_extra["uncertainty"]
    assert [t["token_id"] for t in unc["tokens"]] == expected
    # extensions through extra_body; the Bayesian adapter's tokens carry MI > 0
    resp = oa.completions.create(model="bayes", prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                 extra_body={"n_samples": 4, "posterior_seed": 3})
    assert resp.model_extra["n_samples"] == 4 and resp.model_extra["sigma"] == 0.3
    assert all(t["mutual_information"] > 0.0 for t in resp.choices[0].model_extra["uncertainty"]["tokens"])
    with pytest.raises(openai.BadRequestError, match="chat template"):
        oa.chat.completions.create(model="zero", messages=[{"role": "user", "content": "hi"}])
    tokenizer = client.app.state.tfb.predictor.engine.classifier.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        messages = [{"role": "user", "content": "a great film"}]
        chat = oa.chat.completions.create(model="zero", messages=messages, max_completion_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expected = _greedy(peft, tok(rendered, add_special_tokens=False)["input_ids"], 5)
        assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
        assert [c.token for c in chat.choices[0].logprobs.content] == [tok.decode([i]) for i in expected]
        assert all(len(c.top_logprobs) == 2 for c in chat.choices[0].logprobs.content)
        # OpenAI's bytes are each token's own: a character split over tokens is whole in their concatenation
        raw = b"".join(bytes(c.bytes) for c, i in zip(chat.choices[0].logprobs.content, expected, strict=True)
                       if i != tok.eos_token_id)
        assert raw.decode("utf-8", errors="replace") == chat.choices[0].message.content
        assert chat.choices[0].model_extra["uncertainty"]["sequence"]["max_mutual_information"] == 0.0
    finally:
        tokenizer.chat_template = None


def _stream(client, body: dict) -> list[dict]:
    r = client.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    return _events(r.text)


def test_streamed_chunks_reassemble_to_the_answer_with_the_same_token_uncertainty(client):
    body = {"model": "bayes", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "n_samples": 4,
            "posterior_seed": 2, "logprobs": 1, "stop_token_ids": []}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = _stream(client, body)
    *tokens, end = chunks
    assert len(tokens) == 12 and all(c["choices"][0]["finish_reason"] is None for c in tokens)
    assert "".join(c["choices"][0]["text"] for c in tokens) == whole["text"]
    assert_close([c["choices"][0]["uncertainty"]["token"] for c in tokens], whole["uncertainty"]["tokens"])
    assert [c["choices"][0]["logprobs"]["tokens"][0] for c in tokens] == whole["logprobs"]["tokens"]
    # each token's text_offset, streamed or not: where its character begins in the text
    assert [c["choices"][0]["logprobs"]["text_offset"][0] for c in tokens] == whole["logprobs"]["text_offset"]
    offsets = whole["logprobs"]["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(whole["text"])
    assert end["choices"][0]["finish_reason"] == "length"
    assert_close(end["choices"][0]["uncertainty"]["sequence"], whole["uncertainty"]["sequence"])
    # a stop string across a token boundary: the text before it is streamed, nothing of it
    pieces = [t["token"] for t in whole["uncertainty"]["tokens"]]
    text = whole["text"]
    stop = None
    for j in range(len(pieces) - 1):
        a, b = pieces[j], pieces[j + 1]
        if a and b and a[-1].isprintable() and b[0].isprintable() and "\ufffd" not in a[-1] + b[0]:
            cand = a[-1] + b[0]
            at = len("".join(pieces[:j + 1])) - 1
            if text.find(cand) == at and "\ufffd" not in text[:at]:
                stop = cand
                break
    assert stop is not None, pieces
    cut = client.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    chunks = _stream(client, {**body, "stop": [stop]})
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    # the OpenAI client's stream, with the usage chunk
    _, oa = _openai(client)
    got = list(oa.completions.create(model="bayes", prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True,
                                     stream_options={"include_usage": True},
                                     extra_body={"n_samples": 4, "posterior_seed": 2, "stop_token_ids": []}))
    assert "".join(c.choices[0].text for c in got if c.choices) == whole["text"]
    assert got[-1].usage.completion_tokens == 12


def test_chat_stream_has_a_role_delta_then_one_chunk_per_token(client):
    tokenizer = client.app.state.tfb.predictor.engine.classifier.tokenizer
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        body = {"model": "bayes", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
                "n_samples": 3}
        whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        parts = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": "h"},
                                                                    {"type": "text", "text": "i"}]}]}
        r = client.post("/v1/chat/completions", json=parts, headers={"x-request-id": "abc"})
        assert r.json()["choices"][0]["message"] == whole["message"]  # OpenAI's text parts, joined
        assert r.json()["id"] == "chatcmpl-abc"
        r = client.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = _events(r.text)
    finally:
        tokenizer.chat_template = None
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = chunks[1:-1]
    assert "".join(c["choices"][0]["delta"]["content"] for c in tokens) == whole["message"]["content"]
    assert_close([c["choices"][0]["uncertainty"]["token"] for c in tokens], whole["uncertainty"]["tokens"])
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_several_prompts_are_one_choice_each_as_if_sent_alone(client):
    body = {"model": "bayes", "max_tokens": 6, "temperature": 0, "n_samples": 3, "stop_token_ids": []}
    many = client.post("/v1/completions", json={**body, "prompt": PROMPTS}).json()
    alone = [client.post("/v1/completions", json={**body, "prompt": p}).json() for p in PROMPTS]
    assert [c["index"] for c in many["choices"]] == [0, 1]
    for got, one in zip(many["choices"], alone, strict=True):
        assert got["text"] == one["choices"][0]["text"] and _ids(got) == _ids(one["choices"][0])
        assert_close(got["uncertainty"], one["choices"][0]["uncertainty"])
    assert many["usage"]["completion_tokens"] == 12
    assert many["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)


def test_per_sample_answers_their_clusters_and_semantic_entropy(client):
    body = {"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "n_samples": 4, "answers": "per_sample",
            "stop_token_ids": []}
    zero = client.post("/v1/completions", json={**body, "model": "zero"}).json()["choices"][0]
    mean = client.post("/v1/completions", json={**body, "model": "zero", "answers": "mean"}).json()["choices"][0]
    a = zero["uncertainty"]["answers"]
    assert [s["text"] for s in a["samples"]] == [mean["text"]] * 4  # sigma = 0: one model, N equal answers
    assert a["semantic_entropy"] == 0.0 and a["majority_share"] == 1.0 and zero["text"] == mean["text"]
    bayes = client.post("/v1/completions", json={**body, "model": "bayes", "posterior_seed": 1}).json()["choices"][0]
    a = bayes["uncertainty"]["answers"]
    texts = [s["text"] for s in a["samples"]]
    assert len(texts) == 4 and len(set(texts)) > 1  # the posterior samples disagree
    assert sorted(m for c in a["clusters"] for m in c["members"]) == [0, 1, 2, 3]
    shares = [c["share"] for c in a["clusters"]]
    assert a["semantic_entropy"] == pytest.approx(-sum(p * math.log(p) for p in shares))
    assert bayes["text"] == a["majority"] == texts[a["clusters"][0]["members"][0]]
    # each sample decodes under its own p_n: its tokens' MI is 0
    assert all(t["mutual_information"] == 0.0 for t in bayes["uncertainty"]["tokens"])


@pytest.mark.parametrize(("path", "body", "status", "param", "text"), [
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", "only n=1"),
    ("/v1/completions", {"prompt": ["x"] * 9}, 400, "prompt", "TFB_MAX_INPUTS"),
    ("/v1/completions", {"prompt": ["x", "word " * 80]}, 400, "prompt", "prompt 1: the prompt has"),
    ("/v1/completions", {"prompt": ["x", "y"], "stream": True}, 400, "prompt", "stream=true takes one prompt"),
    ("/v1/completions", {"prompt": [1, 2]}, 400, "prompt", "token ids"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 401}, 400, "max_tokens", "TFB_MAX_TOKENS"),
    ("/v1/completions", {"prompt": "x", "n_samples": 17}, 400, "n_samples", "TFB_MAX_SAMPLES"),
    ("/v1/completions", {"prompt": "word " * 80}, 400, "prompt", "TFB_MAX_LENGTH"),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal"),
    ("/v1/completions", {"prompt": "x", "stream": True, "answers": "per_sample"}, 400, "stream", "per_sample"),
    ("/v1/completions", {}, 400, "prompt", "Field required"),
    # torch's generators take a uint64: 2**64 was a 500 (seed) and a 400 naming nothing (posterior_seed)
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 400, "seed", "less than 18446744073709551616"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "seed": 2**64}, 400, "seed", "less than"),
    ("/v1/completions", {"prompt": "x", "posterior_seed": 2**64}, 400, "posterior_seed", "less than"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "messages", "chat template"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 999},
     400, "max_completion_tokens", "TFB_MAX_TOKENS"),
])
def test_errors_are_openais_body_naming_the_field(client, path, body, status, param, text):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and text in err["message"] and err["code"] == status, err


def test_the_largest_seeds_are_answered(client):
    """2**64 - 1, the largest seed torch takes, for the token draws and the posterior samples."""
    for field in ("seed", "posterior_seed"):
        r = client.post("/v1/completions", json={"model": "bayes", "prompt": "x", "max_tokens": 2, "temperature": 1.0,
                                                 "n_samples": 2, field: 2**64 - 1})
        assert r.status_code == 200, r.text


def test_unknown_fields_are_ignored_and_info_lists_the_routes(client):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "frequency_penalty": 0.5,
                                             "whatever": {"a": 1}})
    assert r.status_code == 200, r.text
    info = client.get("/info").json()
    assert info["limits"]["max_tokens"] == 400
    routes = {a["name"]: a["routes"] for a in info["adapters"]}
    assert "/v1/completions" in routes["bayes"] and "/v1/chat/completions" not in routes["bayes"]  # no template
    assert info["routes"] == routes["zero"]


def _running(client) -> bool:
    return client.app.state.tfb.worker.generating


def _wait_idle(client, timeout_s: float = 30) -> None:
    """Until the worker runs no generation (fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while _running(client) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not _running(client)


def test_generations_join_while_their_rows_fit_and_the_rest_wait(client, monkeypatch):
    """TFB_MAX_BATCH_ROWS = 32 here: three requests of N = 16 rows each; two decode together, the third
    waits for room, and each answer equals the request sent alone."""
    rows: list[int] = []
    step = Decoding.step

    def counted(self):
        rows.append(len(self.rows))
        return step(self)

    monkeypatch.setattr(Decoding, "step", counted)
    body = {"model": "bayes", "max_tokens": 30, "temperature": 0, "n_samples": 16, "stop_token_ids": []}
    alone = [client.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0] for p in PROMPTS + ["x"]]
    rows.clear()
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda p: client.post("/v1/completions", json={**body, "prompt": p}),
                            PROMPTS + ["x"]))
    assert all(r.status_code == 200 for r in got)
    assert max(rows) == 32 and all(n <= 32 for n in rows)
    for r, one in zip(got, alone, strict=True):
        assert _ids(r.json()["choices"][0]) == _ids(one)


def test_classification_is_served_while_a_generation_decodes(client):
    done: dict[str, float] = {}

    def generate():
        r = client.post("/v1/completions", json={"model": "bayes", "prompt": "x", "max_tokens": 400,
                                                 "temperature": 0, "n_samples": 2, "stop_token_ids": []})
        done["generation"] = time.monotonic()
        done["tokens"] = r.json()["usage"]["completion_tokens"]

    t = threading.Thread(target=generate)
    t.start()
    deadline = time.monotonic() + 60
    while not _running(client) and time.monotonic() < deadline:
        time.sleep(0.005)
    r = client.post("/predict", json={"inputs": PROMPTS, "adapter": "bayes", "n_samples": 4})
    answered = time.monotonic()
    t.join()
    assert r.status_code == 200, r.text
    assert done["tokens"] == 400
    assert answered < done["generation"]  # not after the generation: between its steps


def test_a_stream_whose_client_leaves_frees_its_rows(client):
    before = metric(metric_samples(client.get("/metrics").text), "tfb_requests_aborted_total", reason="disconnect")
    with client.stream("POST", "/v1/completions", json={"model": "bayes", "prompt": "x", "max_tokens": 400,
                                                        "temperature": 0, "n_samples": 3, "stream": True,
                                                        "stop_token_ids": []}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert _running(client)
        # the generation is in flight while it decodes
        assert metric(metric_samples(client.get("/metrics").text), "tfb_inflight_requests") == 1
        decoding = client.app.state.tfb.worker._generation.decoding
        stream = list(decoding.streams.values())[-1]  # the request's, kept to read after it was released
    _wait_idle(client)
    samples = metric_samples(client.get("/metrics").text)
    assert metric(samples, "tfb_requests_aborted_total", reason="disconnect") == before + 1
    assert metric(samples, "tfb_generation_rows") == 0
    assert metric(samples, "tfb_inflight_requests") == 0  # and out of flight once its client left
    assert not decoding.streams  # released: the decode keeps nothing of it
    assert stream.finish[0] == "cancelled" and len(stream.token_ids) < 400


def test_a_full_queue_is_429_and_a_timeout_503_in_openais_body_and_the_rows_are_freed(client, monkeypatch):
    worker = client.app.state.tfb.worker
    predictor = client.app.state.tfb.predictor
    body = {"model": "bayes", "prompt": "x", "max_tokens": 400, "temperature": 0, "n_samples": 2,
            "stop_token_ids": []}
    monkeypatch.setattr(worker, "limits", dataclasses.replace(worker.limits, max_queue=0))
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "TFB_MAX_QUEUE" in r.json()["error"]["message"]
    monkeypatch.undo()
    before = metric(metric_samples(client.get("/metrics").text), "tfb_requests_aborted_total", reason="timeout")
    monkeypatch.setattr(predictor, "settings", predictor.settings.model_copy(update={"request_timeout_s": 0.2}))
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 503 and "TFB_REQUEST_TIMEOUT_S" in r.json()["error"]["message"], r.text
    _wait_idle(client)
    samples = metric_samples(client.get("/metrics").text)
    assert metric(samples, "tfb_requests_aborted_total", reason="timeout") == before + 1


def test_drain_finishes_the_running_generation_and_refuses_new_ones(tiny):
    engine = load_engine(make_settings(tiny).engine_configs()[0][1].with_defaults(), progress=False)

    def work() -> GenWork:
        return GenWork(prepare=lambda svc: svc.request(engine, svc.encode_prompt("x"), GenerationSettings(
            max_tokens=30, n_samples=2, stop_token_ids=())))

    async def scenario():
        ready = asyncio.Event()
        worker = ModelWorker(lambda: engine, BatchLimits(), Metrics(CollectorRegistry()), lambda _: ready.set(),
                             lambda exc: None, warmup=False)
        worker.start(asyncio.get_running_loop())
        await ready.wait()
        running = work()
        worker.submit_generation(running)
        drain = asyncio.create_task(worker.drain(60))
        await asyncio.sleep(0)
        with pytest.raises(NotReadyError, match="shutting down"):
            worker.submit_generation(work())
        while True:
            update = await running.updates.get()
            if update.result is not None or update.error is not None:
                break
        await drain
        return worker, update

    worker, update = asyncio.run(scenario())
    assert update.error is None and len(update.result["completion"]["token_ids"]) == 30
    assert worker._thread is not None and not worker._thread.is_alive()


def test_seeds_and_metrics(client):
    """OpenAI's seed fixes the token draws at temperature 1; posterior_seed the posterior samples; each
    answered generation counts its tokens and observes their MI, by adapter."""
    body = {"model": "bayes", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1.0, "n_samples": 3,
            "stop_token_ids": []}
    before = metric_samples(client.get("/metrics").text)
    a, b, c = (client.post("/v1/completions", json={**body, "seed": s}).json()["choices"][0] for s in (5, 5, 6))
    assert _ids(a) == _ids(b) and _ids(a) != _ids(c)
    greedy = {**body, "temperature": 0}
    p1, p2 = (client.post("/v1/completions", json={**greedy, "posterior_seed": s}).json()["choices"][0]
              for s in (1, 2))
    assert [t["mutual_information"] for t in p1["uncertainty"]["tokens"]] != \
        [t["mutual_information"] for t in p2["uncertainty"]["tokens"]]
    after = metric_samples(client.get("/metrics").text)

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("tfb_generated_tokens_total", adapter="bayes") == 5 * 8
    assert grew("tfb_generated_token_mutual_information_count", adapter="bayes") == 5 * 8
    assert grew("tfb_generated_token_mutual_information_sum", adapter="bayes") == pytest.approx(
        sum(t["mutual_information"] for ch in (a, b, c, p1, p2) for t in ch["uncertainty"]["tokens"]))
    assert grew("tfb_generation_mean_mutual_information_count", adapter="bayes") == 5
    assert grew("tfb_generations_total", adapter="bayes", finish_reason="length") == 5
    assert metric(after, "tfb_inflight_requests") == 0  # each left the count when it was answered


@pytest.fixture(scope="module")
def gen_engine(tiny):
    return load_engine(make_settings(tiny, max_length=256).engine_configs()[0][1].with_defaults(), progress=False)


def _long_work(engine, max_tokens: int) -> GenWork:
    return GenWork(prepare=lambda svc: svc.request(engine, svc.encode_prompt("x"), GenerationSettings(
        max_tokens=max_tokens, n_samples=2, stop_token_ids=())))


def test_a_generation_abandoned_while_the_step_cancels_another_leaves_the_decode(gen_engine):
    """The red team's repro (clients leaving mid-stream left their rows decoding to max_tokens), made
    deterministic: a request abandoned while the step is cancelling an abandoned one (the event loop
    runs beside the worker) is cancelled too, or kept for the next step: its rows never stay in the
    decode without a request that reads them."""
    worker = ModelWorker(lambda: gen_engine, BatchLimits(), Metrics(CollectorRegistry()), lambda _: None,
                         lambda exc: None, warmup=False)
    works = [_long_work(gen_engine, 40) for _ in range(3)]
    for work in works:
        worker.submit_generation(work)
    worker._generation_step(gen_engine)  # all three join and decode one token
    gen = worker._generation
    assert gen is not None and gen.rows == 6 and worker._gen_running == works
    first, second, third = works
    cancel = gen.cancel

    def cancel_and_race(key):  # the client of ``second`` leaves while the worker cancels ``first``
        if key is first:
            worker.abandon_generation(second, "disconnect")
        return cancel(key)

    gen.cancel = cancel_and_race  # type: ignore[method-assign]
    worker.abandon_generation(first, "disconnect")
    worker._generation_step(gen_engine)
    worker._generation_step(gen_engine)  # a work kept for the next step is cancelled there
    assert worker._gen_running == [third]
    assert gen.rows == 2, "an abandoned request's rows are still decoding"


def test_a_searchs_forwards_get_a_step_every_k_decode_steps(gen_engine):
    """A decode that runs on does not starve a sigma search: its gated forwards (four queued by four
    threads) each get a step at least every ``BACKGROUND_EVERY`` decode steps, all before the
    generation ends."""
    events: list[str] = []

    async def scenario():
        ready = asyncio.Event()
        worker = ModelWorker(lambda: gen_engine, BatchLimits(), Metrics(CollectorRegistry()), lambda _: ready.set(),
                             lambda exc: None, warmup=False)
        step = worker._generation_step

        def counted(engine):
            step(engine)
            events.append("decode")

        worker._generation_step = counted  # type: ignore[method-assign]
        worker.start(asyncio.get_running_loop())
        await ready.wait()
        gate = ForwardGate(on_queued=worker.wake)
        searches = [threading.Thread(target=gate.run, args=(lambda: events.append("forward"),)) for _ in range(4)]
        for t in searches:
            t.start()
        for _ in range(3000):
            if len(gate._calls) == 4:
                break
            await asyncio.sleep(0.01)
        work = _long_work(gen_engine, 60)
        worker.submit_generation(work)
        while not events:  # it decodes
            await asyncio.sleep(0.01)
        worker.add_background(gate.step, lambda: None, ready=gate.ready)
        while True:
            update = await work.updates.get()
            if update.result is not None or update.error is not None:
                break
        gate.close("done")
        for t in searches:
            await asyncio.to_thread(t.join, 30)
        await worker.drain(10)
        return update

    update = asyncio.run(scenario())
    assert update.error is None and len(update.result["completion"]["token_ids"]) == 60
    assert events.count("forward") == 4
    first = events.index("forward")
    last = max(i for i, e in enumerate(events) if e == "forward")
    assert "decode" in events[last:], "the forwards waited for the generation to end"
    # between two forwards (before the first, the decode ran before the search was added)
    assert longest_run(events[first:last], "decode") <= BACKGROUND_EVERY, events
