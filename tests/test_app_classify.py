"""The vLLM-compatible classify API (app/classify.py) on the tiny model, checked against vLLM's own
definition of it, restated here independently of the app's code.

vLLM's documentation, docs/serving/openai_compatible_server.md, section "Classification API"
(vllm-project/vllm @ 237a2653), gives the request (``model``, ``input``: a string or a list of
strings, POST /classify) and the response of its examples: ``{"id": "classify-<hex>", "object":
"list", "created", "model", "data": [{"index", "label", "probs", "num_classes"}], "usage":
{"prompt_tokens", "total_tokens", "completion_tokens": 0, "prompt_tokens_details": null}}``. The
models below restate vllm/entrypoints/pooling/classify/protocol.py (@ dff4cad3) and the error body
of vllm/entrypoints/openai/engine/protocol.py (@ d7e52523): ``{"error": {"message", "type",
"param", "code"}}``, 400 for a request that fails validation (vllm/entrypoints/openai/api_server.py
@ 048027fb), 404 NotFoundError for an unknown model (vllm/entrypoints/openai/engine/serving.py
@ 619e4b31). A client is the OpenAI Python client (what vLLM's docs use), and the flow of vLLM's
own example client (examples/pooling/classify: GET /v1/models, then POST /classify).
"""

from __future__ import annotations

import re

import pytest
from conftest import require
from pydantic import BaseModel, ConfigDict
from test_app_support import LABELS, PROMPTS, assert_close, make_settings, metric, metric_samples, ready_client


# --- vLLM's schema, restated (extra fields allowed, as vLLM's OpenAIBaseModel allows them) --------------
class _VllmModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class VllmClassificationData(_VllmModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class VllmPromptTokenUsageInfo(_VllmModel):
    cached_tokens: int | None = None


class VllmUsageInfo(_VllmModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: VllmPromptTokenUsageInfo | None = None


class VllmClassificationResponse(_VllmModel):
    id: str
    object: str
    created: int
    model: str
    data: list[VllmClassificationData]
    usage: VllmUsageInfo


class VllmErrorInfo(_VllmModel):
    message: str
    type: str
    param: str | None = None
    code: int


class VllmErrorResponse(_VllmModel):
    error: VllmErrorInfo


#: the documentation's second example response (a string input), as the docs print it
DOC_EXAMPLE = {
    "id": "classify-9bf17f2847b046c7b2d5495f4b4f9682", "object": "list", "created": 1745383213,
    "model": "jason9693/Qwen2.5-1.5B-apeach",
    "data": [{"index": 0, "label": "Default", "probs": [0.565970778465271, 0.4340292513370514], "num_classes": 2}],
    "usage": {"prompt_tokens": 10, "total_tokens": 10, "completion_tokens": 0, "prompt_tokens_details": None}}
DOC_RESPONSE_FIELDS = {"id", "object", "created", "model", "data", "usage"}
DOC_DATA_FIELDS = {"index", "label", "probs", "num_classes"}
DOC_USAGE_FIELDS = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"}
OURS = {"prediction_id", "confidence", "predictive_entropy", "expected_entropy", "mutual_information"}
ADAPTER = "adapter"  # the tiny adapter's folder name (tests/conftest.py)


@pytest.fixture(scope="module")
def settings(tiny):
    return make_settings(tiny)


@pytest.fixture(scope="module")
def client(settings):
    with ready_client(settings) as c:
        yield c


def classify(client, path="/classify", status=200, **body):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def check_vllm_response(out: dict, n: int, model: str = ADAPTER) -> VllmClassificationResponse:
    """``out`` is vLLM's response with n items, and ours beside vLLM's fields."""
    resp = VllmClassificationResponse.model_validate(out)
    assert DOC_RESPONSE_FIELDS <= set(out) and set(out["usage"]) == DOC_USAGE_FIELDS
    assert re.fullmatch(r"classify-[0-9a-f]{32}", resp.id) and resp.object == "list" and resp.model == model
    assert len(resp.data) == n and [d.index for d in resp.data] == list(range(n))
    for item, d in zip(out["data"], resp.data, strict=True):
        assert set(item) >= DOC_DATA_FIELDS | OURS
        assert d.num_classes == len(d.probs) == len(LABELS) and abs(sum(d.probs) - 1.0) < 1e-5
        assert d.label == LABELS[max(range(len(d.probs)), key=d.probs.__getitem__)]
        assert item["confidence"] == max(d.probs)
    assert resp.usage.completion_tokens == 0 and resp.usage.prompt_tokens_details is None
    assert resp.usage.total_tokens == resp.usage.prompt_tokens
    return resp


def check_vllm_error(r, status: int, needle: str = "") -> VllmErrorInfo:
    assert r.status_code == status, r.text
    err = VllmErrorResponse.model_validate(r.json()).error
    assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert err.code == status and err.message and needle.lower() in err.message.lower(), err
    return err


def test_restated_schema_accepts_the_documented_example():
    assert VllmClassificationResponse.model_validate(DOC_EXAMPLE).data[0].num_classes == 2
    assert set(DOC_EXAMPLE) == DOC_RESPONSE_FIELDS and set(DOC_EXAMPLE["data"][0]) == DOC_DATA_FIELDS


# --- the response ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/classify", "/v1/classify"])
def test_list_and_string_input(client, tokenizer, path):
    out = classify(client, path, model=ADAPTER, input=PROMPTS)
    resp = check_vllm_response(out, len(PROMPTS))
    # prompt tokens: the generic task's prompt is the input itself, with the tokenizer's special tokens
    assert resp.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    one = classify(client, path, model=ADAPTER, input=PROMPTS[1])
    check_vllm_response(one, 1)
    # the default draw: the same answer alone, up to the last bits (a batch of one is another matrix
    # product than a row of a padded batch of four: its summation order is the CPU's kernel's choice)
    assert_close(one["data"][0]["probs"], out["data"][1]["probs"])
    assert one["usage"]["prompt_tokens"] == len(tokenizer(PROMPTS[1])["input_ids"])


@pytest.mark.parametrize("n_samples,seed", [(None, None), (5, 3)])
def test_same_answer_as_predict(client, n_samples, seed):
    """probs, label and every uncertainty equal /predict's for the same inputs, N and seed."""
    out = classify(client, input=PROMPTS[:3], n_samples=n_samples, seed=seed, return_samples=True)
    pred = client.post("/predict", json={"inputs": PROMPTS[:3], "n_samples": n_samples, "seed": seed,
                                         "return_samples": True}).json()
    assert out["labels"] == pred["labels"] and out["n_samples"] == pred["n_samples"] == (n_samples or 10)
    assert out["sigma"] == pred["sigma"]
    for item, p in zip(out["data"], pred["predictions"], strict=True):
        same = {k: item[k] for k in ("label", "probs", "confidence", "predictive_entropy", "expected_entropy",
                                     "mutual_information", "samples")}
        assert_close(same, {k: p[k] for k in same})


def test_prediction_id_takes_feedback(client):
    item = classify(client, input="a great film with a wonderful cast")["data"][0]
    r = client.post("/feedback", json={"id": item["prediction_id"], "label": "positive"})
    assert r.status_code == 200 and r.json()["confidence"] == item["confidence"]
    assert client.post("/feedback", json={"id": item["prediction_id"], "label": "positive"}).status_code == 409


def test_model_names(client, tiny):
    """Unset, empty, the adapter's name and the base model's id (an alias) all mean the one adapter."""
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [ADAPTER]
    assert models["data"][0]["parent"] == tiny["model"] and models["data"][0]["object"] == "model"
    for model in (None, "", ADAPTER, tiny["model"]):
        body = {"input": "fine"} if model is None else {"model": model, "input": "fine"}
        assert classify(client, **body)["model"] == ADAPTER


def test_unknown_model_is_vllms_404(client):
    err = check_vllm_error(client.post("/classify", json={"model": "nope", "input": "x"}), 404)
    assert err.message == "The model `nope` does not exist." and err.type == "NotFoundError" and err.param == "model"


def test_vllm_fields_and_unknown_fields_are_accepted(client):
    """What a vLLM client may send: vLLM's optional fields, and fields vLLM would log and ignore."""
    out = classify(client, model=ADAPTER, input=["fine"], user="u", truncate_prompt_tokens=-1, priority=0,
                   request_id="r1", add_special_tokens=True, use_activation=True, softmax=None, unknown_field=1)
    check_vllm_response(out, 1)
    r = client.post("/classify", json={"input": "fine"}, headers={"X-Request-Id": "abc123"})
    assert r.json()["id"] == "classify-abc123"  # vLLM's id from the X-Request-Id header


# --- errors: vLLM's body, vLLM's status (400 for what /predict answers 422) --------------------------------
BAD = [
    ("no input", {"json": {"model": ADAPTER}}, "input"),
    ("empty text", {"json": {"input": ""}}, "empty"),
    ("empty list", {"json": {"input": []}}, "at least one"),  # as vLLM's "please provide at least one prompt"
    ("blank item", {"json": {"input": ["fine", "  "]}}, "item 1"),
    ("number", {"json": {"input": 5}}, "string"),
    ("token id out of the vocabulary", {"json": {"input": [1, 10**9]}}, "vocabulary"),
    ("empty token id list", {"json": {"input": [[1, 2], []]}}, "item 1"),
    ("bools are not token ids", {"json": {"input": [True, 1]}}, "item 0"),
    ("truncation over the limit", {"json": {"input": "x", "truncate_prompt_tokens": 65}}, "truncate_prompt_tokens"),
    ("input and messages", {"json": {"input": "x", "messages": [{"role": "user", "content": "hi"}]}}, "either"),
    ("too many samples", {"json": {"input": "x", "n_samples": 999}}, "TFB_MAX_SAMPLES"),
    ("too many inputs", {"json": {"input": ["x"] * 9}}, "TFB_MAX_INPUTS"),
    ("too long", {"json": {"input": "word " * 200}}, "TFB_MAX_LENGTH"),
    ("no calibration", {"json": {"input": "x", "alpha": 0.1}}, "calibration"),
    ("malformed JSON", {"content": b'{"input": ', "headers": {"content-type": "application/json"}}, "not valid JSON"),
    ("not UTF-8", {"content": b'{"input": "\xff"}', "headers": {"content-type": "application/json"}}, "JSON"),
]


@pytest.mark.parametrize("name,kwargs,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_vllms_400(client, name, kwargs, needle):
    check_vllm_error(client.post("/v1/classify", **kwargs), 400, needle)
    assert classify(client, input="still answering")["data"]


def test_middleware_errors_in_vllms_body(client):
    """413 and 415 come from the middleware, before the route: vLLM's body on the classify paths,
    /predict's own body elsewhere."""
    big = {"content": b"x" * 20_000, "headers": {"content-type": "application/json"}}
    text = {"content": b"{}", "headers": {"content-type": "text/plain"}}
    for kwargs, status in ((big, 413), (text, 415)):
        check_vllm_error(client.post("/classify", **kwargs), status)
        r = client.post("/predict", **kwargs)
        assert r.status_code == status and set(r.json()) == {"detail"}


def test_not_ready_and_unauthorized_in_vllms_body(tiny):
    with ready_client(make_settings(tiny, api_key="k")) as c:
        err = check_vllm_error(c.post("/classify", json={"input": "x"}), 401, "API key")
        assert err.type == "Unauthorized"
        check_vllm_error(c.get("/v1/models"), 401)
        r = c.post("/classify", json={"input": "x"}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200
        c.app.state.tfb.status = "draining"
        r = c.post("/classify", json={"input": "x"}, headers={"Authorization": "Bearer k"})
        check_vllm_error(r, 503, "shutting down")
        assert r.headers["retry-after"]
        c.app.state.tfb.status = "ready"


def test_named_task_takes_strings_and_objects(tiny):
    """sst2: a text is its one field (the sentence); an object with the task's fields works too."""
    with ready_client(make_settings(tiny, labels=None, task="sst2", max_length=200)) as c:
        out = classify(c, input=["a great film", {"sentence": "a great film"}])
        # one prompt twice: within the float rounding of two rows of one forward (a row's summation
        # order may depend on its place in the CPU kernel's tiles), and of a forward of one input
        assert_close(out["data"][0]["probs"], out["data"][1]["probs"])
        pred = c.post("/predict", json={"inputs": [{"sentence": "a great film"}]}).json()["predictions"][0]
        assert_close(out["data"][0]["probs"], pred["probs"])
        check_vllm_error(c.post("/classify", json={"input": [{"text": "x"}]}), 400, "sentence")


# --- real clients ------------------------------------------------------------------------------------------
def test_vllm_example_client_flow(client):
    """vLLM's example client: the model from GET /v1/models, then POST /classify with a list of texts."""
    model = client.get("/v1/models", headers={"accept": "application/json"}).json()["data"][0]["id"]
    prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is"]
    r = client.post("/classify", json={"model": model, "input": prompts},
                    headers={"accept": "application/json", "Content-Type": "application/json"})
    check_vllm_response(r.json(), len(prompts), model)
    assert {"queue", "batch", "app"} <= {t.split(";")[0].strip() for t in r.headers["server-timing"].split(",")}
    samples = metric_samples(client.get("/metrics").text)
    assert metric(samples, "tfb_requests_total", route="/classify", status="200") >= 1


def test_openai_client(client):
    """The OpenAI Python client, as vLLM's docs use it (base URL .../v1): results, models, and errors
    parsed from vLLM's body into its exception types."""
    openai = require("openai", "the openai package is not installed (pip install -e '.[dev]')")
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    assert [m.id for m in oai.models.list().data] == [ADAPTER]
    out = oai.post("/classify", cast_to=object, body={"model": ADAPTER, "input": PROMPTS[:2], "n_samples": 4})
    check_vllm_response(out, 2)
    assert out["n_samples"] == 4
    with pytest.raises(openai.NotFoundError) as e:
        oai.post("/classify", cast_to=object, body={"model": "nope", "input": "x"})
    assert e.value.body["message"] == "The model `nope` does not exist." and e.value.param == "model"
    assert e.value.type == "NotFoundError" and str(e.value.code) == "404"
    with pytest.raises(openai.BadRequestError) as e:
        oai.post("/classify", cast_to=object, body={"model": ADAPTER, "input": [1, 10**9]})
    assert "vocabulary" in e.value.body["message"] and e.value.param == "input"
