"""vLLM's /invocations, /tokenize and /detokenize (app/vllm_extra.py) on the tiny model.

vLLM's shapes, restated independently of the app (vllm/entrypoints/serve/tokenize/protocol.py,
vllm/entrypoints/sagemaker/api_router.py): /tokenize {model?, prompt | messages, add_special_tokens,
add_generation_prompt, continue_final_message, return_token_strs} -> {count, max_model_len, tokens,
token_strs}; /detokenize {model?, tokens} -> {prompt}; /invocations answers the first request type
the body validates as: chat completion, completion, classification.
"""

from __future__ import annotations

import pytest
from test_app_classify import ADAPTER, check_vllm_error, check_vllm_response
from test_app_support import PROMPTS, assert_close, chat_templated, make_settings, ready_client

MESSAGES = [{"role": "user", "content": "a great film"}]


@pytest.fixture(scope="module")
def client(tiny):
    with ready_client(make_settings(tiny)) as c:
        yield c


@pytest.fixture()
def templated(client):
    with chat_templated(client) as tok:
        yield tok


def post(client, path, status=200, **body):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


# --- /tokenize, /detokenize --------------------------------------------------------------------------------
def test_tokenize_a_prompt(client, tokenizer):
    out = post(client, "/tokenize", prompt=PROMPTS[0])
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert out == {"count": len(ids), "max_model_len": 64, "tokens": ids, "token_strs": None}
    bare = post(client, "/tokenize", model=ADAPTER, prompt=PROMPTS[0], add_special_tokens=False,
                return_token_strs=True)
    assert bare["tokens"] == tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"] != ids
    assert bare["token_strs"] == tokenizer.convert_ids_to_tokens(bare["tokens"])
    # the ids /tokenize gives are what /classify reads: the same answer and prompt_tokens
    text = post(client, "/classify", input=PROMPTS[0], seed=1)
    given = post(client, "/classify", input=out["tokens"], seed=1)
    assert_close(text["data"][0]["probs"], given["data"][0]["probs"])
    assert text["usage"]["prompt_tokens"] == out["count"]
    # the loop's own copy of the tokenizer, not the worker's (a fast tokenizer is not shared across threads)
    engine = client.app.state.tfb.predictor.engine
    assert client.app.state.tfb.predictor.loop_tokenizer(engine) is not engine.classifier.tokenizer


def test_tokenize_a_chat(client, templated, tokenizer):
    out = post(client, "/tokenize", messages=MESSAGES)  # vLLM's defaults: generation prompt, no special tokens
    rendered = templated.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert out["tokens"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    open_ = post(client, "/tokenize", messages=MESSAGES, add_generation_prompt=False, continue_final_message=True)
    assert open_["count"] < out["count"]
    err = check_vllm_error(client.post("/tokenize", json={"messages": MESSAGES, "continue_final_message": True}),
                           400, "both")
    assert "add_generation_prompt" in err.message


def test_tokenize_errors(client):
    err = check_vllm_error(client.post("/tokenize", json={"messages": MESSAGES}), 400, "chat template")
    assert err.param == "messages"
    check_vllm_error(client.post("/tokenize", json={}), 400, "prompt")
    check_vllm_error(client.post("/tokenize", json={"prompt": "x", "messages": MESSAGES}), 400, "either")
    err = check_vllm_error(client.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404, "nope")
    assert err.param == "model"


def test_detokenize(client, tokenizer):
    ids = post(client, "/tokenize", prompt=PROMPTS[1])["tokens"]
    assert post(client, "/detokenize", tokens=ids) == {"prompt": tokenizer.decode(ids)}
    assert PROMPTS[1] in post(client, "/detokenize", model=ADAPTER, tokens=ids)["prompt"]
    err = check_vllm_error(client.post("/detokenize", json={"tokens": [1, 10**6]}), 400, "vocabulary")
    assert err.param == "tokens"
    check_vllm_error(client.post("/detokenize", json={"tokens": "abc"}), 400, "tokens")


def test_tokenize_needs_the_key(tiny):
    with ready_client(make_settings(tiny, api_key="k")) as c:
        for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]}),
                           ("/invocations", {"input": "x"})):
            check_vllm_error(c.post(path, json=body), 401, "API key")
        assert c.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer k"}).status_code == 200


# --- /invocations ----------------------------------------------------------------------------------------------
def test_invocations_answers_a_classify_body(client):
    body = {"model": ADAPTER, "input": PROMPTS[:2], "seed": 3, "n_samples": 4}
    inv = post(client, "/invocations", **body)
    check_vllm_response(inv, 2)
    direct = post(client, "/classify", **body)
    for a, b in zip(inv["data"], direct["data"], strict=True):
        assert_close(a["probs"], b["probs"])
    assert inv["usage"] == direct["usage"]
    # the rest of /classify's contract too: token ids, truncation
    ids = post(client, "/tokenize", prompt=PROMPTS[0])["tokens"]
    assert post(client, "/invocations", input=ids, truncate_prompt_tokens=3)["usage"]["prompt_tokens"] == 3


def test_invocations_answers_completion_bodies(client, templated):
    body = {"prompt": "Q: 2 + 2 =", "max_tokens": 3, "temperature": 0}
    inv = post(client, "/invocations", **body)
    assert inv["object"] == "text_completion" and inv["choices"][0]["text"] == post(
        client, "/v1/completions", **body)["choices"][0]["text"]
    chat = post(client, "/invocations", messages=MESSAGES, max_tokens=3, temperature=0)
    assert chat["object"] == "chat.completion"  # a messages body is a chat completion, first in vLLM's order


def test_info_lists_the_routes(client):
    assert {"/invocations", "/tokenize", "/detokenize", "/classify"} <= set(client.get("/info").json()["routes"])


def test_invocations_errors(client):
    err = check_vllm_error(client.post("/invocations", json={"foo": 1}), 400, "Cannot find suitable handler")
    assert "ClassifyRequest" in err.message and "CompletionRequest" in err.message
    # a body of one type with a bad value: that route's own 400, naming the field
    err = check_vllm_error(client.post("/invocations", json={"input": ""}), 400, "empty")
    assert err.param == "input"
    check_vllm_error(client.post("/invocations", json={"input": "x", "truncate_prompt_tokens": 65}), 400,
                     "truncate_prompt_tokens")
    check_vllm_error(client.post("/invocations", content=b'{"input": ',
                                 headers={"content-type": "application/json"}), 400, "JSON")
    check_vllm_error(client.post("/invocations", content=b"{}", headers={"content-type": "text/plain"}), 415)
