"""The rest of vLLM's classify contract (app/classify.py): token ids, truncate_prompt_tokens, chat
``messages``, ``use_activation: false``, on the tiny model (generic task unless said).

vLLM's meanings, restated independently of the app: ``truncate_prompt_tokens`` keeps the last K
tokens of the prompt, -1 (or less) meaning the model's limit and a K over it an error
(``_validate_truncation_size`` in vllm/entrypoints/utils.py); token ids are the prompt as given;
chat requests are rendered with the chat template, ``add_generation_prompt`` and
``continue_final_message`` both true being an error.
"""

from __future__ import annotations

import math

import pytest
from test_app_classify import check_vllm_error, check_vllm_response, classify
from test_app_support import PROMPTS, assert_close, chat_templated, make_settings, ready_client

MESSAGES = [{"role": "user", "content": "a great film with a wonderful cast"}]


@pytest.fixture(scope="module")
def client(tiny):
    with ready_client(make_settings(tiny)) as c:
        yield c


def _ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


# --- token ids ---------------------------------------------------------------------------------------------
def test_token_ids_are_the_prompt_as_given(client, tokenizer):
    """The ids of a text (with the special tokens the generic task adds) answer as the text; a list of
    such lists answers each; usage counts the ids."""
    text = classify(client, input=PROMPTS[:2], seed=3)
    ids = [_ids(tokenizer, p) for p in PROMPTS[:2]]
    assert ids[0][0] == tokenizer.bos_token_id or tokenizer.bos_token_id is None
    many = classify(client, input=ids, seed=3)
    check_vllm_response(many, 2)
    for a, b in zip(many["data"], text["data"], strict=True):
        assert_close(a["probs"], b["probs"])
        assert a["label"] == b["label"]
    assert many["usage"]["prompt_tokens"] == text["usage"]["prompt_tokens"] == sum(map(len, ids))
    one = classify(client, input=ids[1], seed=3)
    check_vllm_response(one, 1)
    assert_close(one["data"][0]["probs"], text["data"][1]["probs"])
    # the ids without the BOS are another prompt: not a text's ids silently re-tokenized
    bare = classify(client, input=ids[1][1:], seed=3)
    assert bare["usage"]["prompt_tokens"] == len(ids[1]) - 1
    assert bare["data"][0]["probs"] != one["data"][0]["probs"]


def test_token_ids_out_of_the_vocabulary_name_input(client, tokenizer):
    err = check_vllm_error(client.post("/classify", json={"input": [[5, 6], [len(tokenizer)]]}), 400, "vocabulary")
    assert err.param == "input" and "input 1" in err.message
    check_vllm_error(client.post("/classify", json={"input": [-1, 5]}), 400, "vocabulary")
    assert classify(client, input=[len(tokenizer) - 1])["data"]


def test_named_task_needs_text(tiny):
    with ready_client(make_settings(tiny, labels=None, task="sst2", max_length=200)) as c:
        err = check_vllm_error(c.post("/classify", json={"input": [1, 2, 3]}), 400, "text")
        assert err.param == "input" and "sst2" in err.message
        err = check_vllm_error(c.post("/classify", json={"messages": MESSAGES}), 400, "text")
        assert err.param == "messages"
        assert classify(c, input="a great film")["data"]


# --- truncate_prompt_tokens --------------------------------------------------------------------------------
def test_truncation_keeps_the_last_k_tokens(client, tokenizer):
    ids = _ids(tokenizer, PROMPTS[0])
    k = 4
    cut = classify(client, input=PROMPTS[0], truncate_prompt_tokens=k, seed=5)
    assert cut["usage"]["prompt_tokens"] == k
    tail = classify(client, input=ids[-k:], seed=5)
    assert_close(cut["data"][0]["probs"], tail["data"][0]["probs"])
    whole = classify(client, input=PROMPTS[0], seed=5)
    assert whole["data"][0]["probs"] != cut["data"][0]["probs"]
    # token ids are cut the same way; a K over the prompt keeps it whole
    assert_close(classify(client, input=ids, truncate_prompt_tokens=k, seed=5)["data"][0]["probs"],
                 cut["data"][0]["probs"])
    longer = classify(client, input=PROMPTS[0], truncate_prompt_tokens=len(ids) + 3, seed=5)
    assert longer["usage"]["prompt_tokens"] == len(ids)
    assert_close(longer["data"][0]["probs"], whole["data"][0]["probs"])


def test_truncation_makes_a_long_prompt_fit(client, tokenizer):
    """A prompt over TFB_MAX_LENGTH (64 here) is refused, and read from its last tokens when truncated;
    -1 is the model's limit, as in vLLM."""
    long = "word " * 200
    check_vllm_error(client.post("/classify", json={"input": long}), 400, "TFB_MAX_LENGTH")
    out = classify(client, input=long, truncate_prompt_tokens=-1)
    assert out["usage"]["prompt_tokens"] == 64
    ids = _ids(tokenizer, long)
    assert_close(out["data"][0]["probs"], classify(client, input=ids[-64:])["data"][0]["probs"])
    err = check_vllm_error(client.post("/classify", json={"input": "x", "truncate_prompt_tokens": 65}), 400, "65")
    assert err.param == "truncate_prompt_tokens"
    check_vllm_error(client.post("/classify", json={"input": "x", "truncate_prompt_tokens": -2}), 400)


# --- chat messages -----------------------------------------------------------------------------------------
@pytest.fixture()
def templated(client):
    with chat_templated(client) as tok:
        yield tok


def test_messages_without_a_template_say_so(client):
    err = check_vllm_error(client.post("/classify", json={"messages": MESSAGES}), 400, "chat template")
    assert err.param == "messages"


@pytest.mark.parametrize("flags", [{}, {"add_generation_prompt": True}, {"continue_final_message": True}])
def test_messages_rendered_with_the_chat_template(client, templated, tokenizer, flags):
    """The rendering's tokens (no special tokens added: the template has its own, vLLM's default for
    chat) answer as those token ids."""
    rendered = templated.apply_chat_template(MESSAGES, tokenize=False, **{"add_generation_prompt": False,
                                                                           "continue_final_message": False, **flags})
    ids = _ids(tokenizer, rendered, special=False)
    chat = classify(client, messages=MESSAGES, seed=2, **flags)
    check_vllm_response(chat, 1)
    assert chat["usage"]["prompt_tokens"] == len(ids)
    assert_close(chat["data"][0]["probs"], classify(client, input=ids, seed=2)["data"][0]["probs"])
    with_bos = classify(client, messages=MESSAGES, seed=2, add_special_tokens=True, **flags)
    assert with_bos["usage"]["prompt_tokens"] == len(_ids(tokenizer, rendered))


def test_messages_flags(client, templated):
    plain = classify(client, messages=MESSAGES)["usage"]["prompt_tokens"]
    assert classify(client, messages=MESSAGES, add_generation_prompt=True)["usage"]["prompt_tokens"] > plain
    err = check_vllm_error(client.post("/classify", json={"messages": MESSAGES, "add_generation_prompt": True,
                                                          "continue_final_message": True}), 400, "both")
    assert "continue_final_message" in err.message and "add_generation_prompt" in err.message
    check_vllm_error(client.post("/classify", json={"messages": [{"content": "x"}]}), 400, "role")
    check_vllm_error(client.post("/classify", json={"messages": []}), 400, "message")


# --- use_activation: false -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["use_activation", "softmax", "activation"])
def test_no_activation_is_log_mean_probs(client, flag):
    """probs is log p̄: its softmax is the averaged probabilities; the rest of the answer is unchanged."""
    on = classify(client, input=PROMPTS[:2], seed=4)
    off = classify(client, input=PROMPTS[:2], seed=4, **{flag: False})
    for a, b in zip(off["data"], on["data"], strict=True):
        assert all(x <= 0.0 for x in a["probs"]) and a["num_classes"] == len(a["probs"])
        z = sum(math.exp(x) for x in a["probs"])
        assert_close([math.exp(x) / z for x in a["probs"]], b["probs"])
        assert_close([math.exp(x) for x in a["probs"]], b["probs"])
        assert a["label"] == b["label"] and a["confidence"] == b["confidence"]
        assert a["mutual_information"] == b["mutual_information"]
    assert classify(client, input="x", use_activation=True)["data"][0]["probs"][0] > 0.0


def test_predict_is_unchanged(client):
    """/predict still takes texts only (token ids are /classify's)."""
    assert client.post("/predict", json={"inputs": [[1, 2, 3]]}).status_code == 422
    assert client.post("/predict", json={"inputs": PROMPTS[:1]}).status_code == 200
