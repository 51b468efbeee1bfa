"""vLLM-compatible classification: ``POST /classify`` (and ``/v1/classify``) and ``GET /v1/models``.

A client written for vLLM's Classification API works unchanged: the request, the response and the
error bodies are vLLM's, and every data item carries our uncertainty beside vLLM's fields. The
route translates to the /predict path (:class:`app.schemas.PredictRequest`, the same worker, the
same /feedback store and metrics), so the probabilities equal /predict's for the same input and seed.

What vLLM defines (vllm-project/vllm; file @ commit of the version read):
- request: ``vllm/entrypoints/pooling/base/protocol.py`` @ 65772ef1 (``PoolingBasicRequestMixin``:
  model, user, truncate_prompt_tokens, request_id, priority; ``CompletionRequestMixin``: input,
  add_special_tokens; ``ClassifyRequestMixin``: softmax, activation, use_activation). Its base
  ``OpenAIBaseModel`` (``vllm/entrypoints/openai/engine/protocol.py`` @ d7e52523) has
  ``extra="allow"``: unknown fields are logged and ignored, not refused; so here.
- response: ``vllm/entrypoints/pooling/classify/protocol.py`` @ dff4cad3: ``ClassificationResponse``
  {id "classify-<hex>", object "list", created, model, data, usage}; ``ClassificationData`` {index
  (the input's position), label, probs, num_classes}; ``UsageInfo`` {prompt_tokens, total_tokens,
  completion_tokens 0, prompt_tokens_details null}.
- errors: ``ErrorResponse`` = ``{"error": {"message", "type", "param", "code"}}`` (engine/protocol.py
  @ d7e52523; older releases, in vllm/entrypoints/openai/protocol.py, sent a flat ``{"object": "error",
  "message", ...}``: the OpenAI client reads both). A request that fails
  validation is 400 (``vllm/entrypoints/openai/api_server.py`` @ 048027fb), type "BadRequestError"
  here for every 400 (vLLM's name of the status in its serving code; older handlers wrote "Bad Request");
  an unknown model 404 NotFoundError "The model `x` does not exist.", param "model"; a missing or
  empty model is the default (``vllm/entrypoints/openai/engine/serving.py`` @ 619e4b31).

- ``truncate_prompt_tokens``: ``_validate_truncation_size`` in ``vllm/entrypoints/utils.py`` @ 97c10e44:
  -1 (or less) is ``max_model_len``, a K over it an error ("truncate_prompt_tokens value (K) is
  greater than max_model_len"), else the prompt is tokenized with ``truncation=True, max_length=K``
  by vLLM's tokenizer, which truncates from the left: the last K tokens are kept (token ids too),
  and ``usage.prompt_tokens`` counts them.
- chat: ``ChatRequestMixin`` (the same pooling/base/protocol.py): ``messages``, ``add_generation_prompt``
  false, ``continue_final_message`` false, ``add_special_tokens`` false (the template adds its own);
  "Cannot set both `continue_final_message` and `add_generation_prompt` to True." is a 400.

Here: our 422s (validation, limits, task errors) are vLLM's 400; the other statuses (401, 408, 413,
415, 429, 431, 503) keep their code and headers with vLLM's body. As vLLM: ``input`` may be token ids
(``list[int]`` or ``list[list[int]]``), the prompt as given, for the generic task (a named task needs
text and says so; an id outside the vocabulary is a 400 naming ``input``); ``truncate_prompt_tokens``
keeps the last K tokens (-1: TFB_MAX_LENGTH, over it a 400 naming it); chat ``messages`` are rendered
with the base model's chat template (:func:`tfb_core.serving.generation.render_chat`, shared with
/v1/chat/completions; no template: a 400 saying so), generic task only; ``add_special_tokens`` is
honoured (default true for ``input``, false for ``messages``). ``use_activation: false`` (and the
deprecated ``softmax``/``activation: false``) answers log p̄ in ``probs``, so that softmax of it is
the probabilities averaged over the posterior samples: there are no single logits of a Bayesian
average, and log p̄ is the logits whose softmax it is (up to a constant); a p̄ of 0 is the least
finite float, JSON having no -inf; ``label``, ``confidence``, the entropies, the prediction set and
``samples`` (per-sample probabilities) are as with the activation. ``priority``, ``request_id`` and ``user`` are accepted and
ignored. Our extensions (``extra_body`` in the OpenAI client): ``n_samples``, ``seed``, ``labels``,
``alpha``, ``max_risk``, ``return_samples``; an input may also be an object with the task's fields
(the multi-field tasks need it). ``POST /invocations``, ``/tokenize`` and ``/detokenize``:
:mod:`app.vllm_extra`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import LimitError, ServingError, openai_error_response, status_of
from app.middleware import server_timing
from app.predictor import Predictor
from app.routes import PredictorDep
from app.schemas import PredictOptions, PredictRequest, check_messages
from tfb_core.data.tasks import TaskError
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.generation import GenerationInputError, render_chat
from tfb_core.serving.pool import UnknownAdapterError

log = logging.getLogger(__name__)

#: the paths whose errors (middleware's included) are answered in vLLM's body
OPENAI_PATHS = frozenset({"/classify", "/v1/classify", "/v1/models"})


# --- request and response (vLLM's fields, then ours) -----------------------------------------------
class ClassifyRequest(PredictOptions):
    """vLLM's classification request; unknown fields are ignored, as vLLM does. Our extensions
    (labels, n_samples, seed, return_samples, alpha, max_risk) are /predict's own fields
    (:class:`app.schemas.PredictOptions`), validated as strictly as there."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "sst2-mle", "input": ["a gripping, beautifully acted film", "it is a film"]},
        {"input": "a gripping, beautifully acted film", "n_samples": 16, "seed": 7, "alpha": 0.1}]})

    model: str | None = Field(None, description="the adapter's name (GET /v1/models); unset: the default adapter")
    input: str | list[str | dict[str, Any]] | list[int] | list[list[int]] | dict[str, Any] | None = Field(
        None, description="a text, a list of texts, token ids (a list of ints, or a list of such lists: "
                          "the generic task's prompts as given); tfb extension: objects with the configured "
                          "task's fields")
    messages: list[dict[str, Any]] | None = Field(
        None, description="vLLM's chat form (instead of input): rendered with the base model's chat template, "
                          "one input; the generic task only")
    add_generation_prompt: bool = Field(False, description="vLLM (chat): end the rendering with the assistant's "
                                                           "turn header")
    continue_final_message: bool = Field(False, description="vLLM (chat): leave the last message open")
    user: str | None = Field(None, description="accepted and ignored (vLLM)")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="vLLM: read only the last K tokens of each "
                                               "prompt; -1: the model's limit (TFB_MAX_LENGTH)")
    request_id: str | None = Field(None, description="accepted and ignored (vLLM)")
    priority: int = Field(0, description="accepted and ignored (vLLM)")
    add_special_tokens: bool | None = Field(None, description="vLLM: add the tokenizer's special tokens to texts "
                                            "(default: true for input, false for messages, whose template "
                                            "has its own)")
    softmax: bool | None = Field(None, description="vLLM (deprecated): use_activation")
    activation: bool | None = Field(None, description="vLLM (deprecated): use_activation")
    use_activation: bool | None = Field(None, description="vLLM: false answers log p̄ in probs (softmax of it is "
                                                          "the probabilities averaged over posterior samples)")

    @model_validator(mode="after")
    def _one_form(self) -> ClassifyRequest:
        if self.input is None and self.messages is None:
            raise ValueError("give `input` (text or token ids) or chat `messages`")
        if self.input is not None and self.messages is not None:
            raise ValueError("give either `input` or `messages`, not both")
        if self.add_generation_prompt and self.continue_final_message:  # vLLM's words
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self

    @field_validator("messages", mode="after")
    @classmethod
    def _messages(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value is not None:
            if not value:
                raise ValueError("an empty list: give at least one message")
            check_messages(value)
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        """Refuse empty texts and empty lists, by name; token ids are ints (not bools)."""
        def is_id(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if isinstance(value, list) and value and all(is_id(v) for v in value):
            return value
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            for i, v in enumerate(value):
                if not v:
                    raise ValueError(f"item {i} is an empty list of token ids: nothing to classify")
                if not all(map(is_id, v)):
                    raise ValueError(f"item {i} must be a list of token ids (integers)")
            return value
        if isinstance(value, str) and not value.strip():
            raise ValueError("an empty text: nothing to classify")
        if isinstance(value, list) and not value:  # vLLM: "please provide at least one prompt" (400)
            raise ValueError("an empty list: give at least one text to classify")
        if isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, str) and not v.strip():
                    raise ValueError(f"item {i} is an empty text: nothing to classify")
                if not isinstance(v, (str, dict)):
                    raise ValueError(f"item {i} must be a string (or an object with the task's fields), "
                                     f"got {type(v).__name__}")
        elif value is not None and not isinstance(value, (str, dict)):
            raise ValueError(f"must be a string, a list of strings or token ids, got {type(value).__name__}")
        return value

    @property
    def activation_on(self) -> bool:
        """False when any of vLLM's three names of it is false: probs are then log p̄."""
        return not any(getattr(self, name) is False for name in ("use_activation", "softmax", "activation"))

    def token_ids(self) -> list[list[int]] | None:
        """The inputs as token ids, if they are."""
        x = self.input
        if isinstance(x, list) and x and all(isinstance(v, int) for v in x):
            return [list(x)]  # type: ignore[arg-type]
        if isinstance(x, list) and x and all(isinstance(v, list) for v in x):
            return [list(v) for v in x]  # type: ignore[misc]
        return None


class ClassifyData(BaseModel):
    index: int = Field(description="the input's position in the request")
    label: str = Field(description="the predicted label")
    probs: list[float] = Field(description="class probabilities averaged over the posterior samples")
    num_classes: int
    # --- ours
    prediction_id: str = Field(description="id of this prediction, for POST /feedback")
    confidence: float = Field(description="max of probs")
    predictive_entropy: float = Field(description="H[mean p] in nats (total uncertainty)")
    expected_entropy: float = Field(description="mean of H[p_n] in nats (aleatoric)")
    mutual_information: float = Field(description="predictive minus expected entropy (epistemic)")
    prediction_set: list[str] | None = Field(None, description="conformal prediction set, if alpha was given")
    abstain: bool | None = Field(None, description="whether to abstain at max_risk, if it was given")
    samples: list[list[float]] | None = Field(None, description="per-sample probabilities, if asked")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens of the prompts the model read (task instruction included), "
                                           "once per input")
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class ClassifyResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str = Field(description="the adapter that answered")
    data: list[ClassifyData]
    usage: Usage
    # --- ours
    labels: list[str] = Field(description="the labels probs are aligned with")
    sigma: float
    n_samples: int
    conformal: dict[str, Any] | None = None
    abstention: dict[str, Any] | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "tfb-serve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[dict[str, Any]] = []
    state: str = Field("ready", description="tfb: ready, or (loaded at run time) loading, searching, calibrating")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


# --- errors in vLLM's body ---------------------------------------------------------------------------
class UnknownModelError(ServingError):
    status_code = 404


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param): each error as ``field: reason``; param: the first error's field."""
    parts, param = [], None
    for e in exc.errors():
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON: {e.get('ctx', {}).get('error', msg)}")
            continue
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return "; ".join(parts)[:1000] or "invalid request", param


def openai_error(request: Request, exc: Exception) -> JSONResponse:
    """Any error of these routes in vLLM's body: 422 -> 400 as vLLM answers, never a traceback."""
    if isinstance(exc, RequestValidationError):
        message, param = _validation_message(exc)
        return openai_error_response(400, message, param=param)
    if isinstance(exc, UnknownModelError):
        return openai_error_response(404, exc.message, err_type="NotFoundError", param="model")
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
            return openai_error_response(400, f"the request body is not valid JSON: {exc.__cause__}"[:300])
        return openai_error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))
    status, message, headers = status_of(exc)
    if status >= 500 and status != 503:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    if status == 422:  # param: the field in the client's terms (/classify's ``input`` is /predict's ``inputs``)
        param = getattr(exc, "param", None)
        return openai_error_response(400, message, headers, param={"inputs": "input", "adapter": "model"}.get(param, param))
    return openai_error_response(status, message, headers, param=getattr(exc, "param", None) if status < 500 else None)


class OpenAIErrorRoute(APIRoute):
    """A route whose errors, from body validation to the model worker, come in vLLM's body (the
    app's handlers, app/errors.py, answer every other route)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 -- every error is answered, in vLLM's body
                return openai_error(request, exc)

        return route


# --- translation -------------------------------------------------------------------------------------
def resolve_model(predictor: Predictor, model: str | None) -> str:
    """The served adapter a request's ``model`` names: unset, empty or the base model's id is the
    default (vLLM serves the base model under its id), else the adapter of that name
    (:meth:`tfb_core.serving.pool.AdapterPool.get`, where names resolve); anything else is vLLM's 404."""
    try:
        return predictor.resolve(model, base_model_alias=True).name
    except UnknownAdapterError:
        raise UnknownModelError(f"The model `{model}` does not exist.") from None


def predict_request(body: ClassifyRequest, adapter: str | None = None) -> PredictRequest:
    """The /predict request of a classify request for ``adapter`` (a pydantic error here is a 400);
    token ids and chat messages, whose prompts are given (:func:`given_prompts`), stand in as
    placeholders that the task never formats."""
    if body.messages is not None or body.token_ids() is not None:
        n = 1 if body.messages is not None else len(body.token_ids() or ())
        inputs: list[Any] = ["(given prompt)"] * n
    else:
        inputs = body.input if isinstance(body.input, list) else [body.input]
    return PredictRequest(inputs=inputs, adapter=adapter, labels=body.labels, n_samples=body.n_samples, seed=body.seed,
                          return_samples=body.return_samples, alpha=body.alpha, max_risk=body.max_risk)


def given_prompts(body: ClassifyRequest, engine: TFBEngine, max_length: int) -> dict[str, Any]:
    """What :meth:`Predictor.prepare` takes besides the request: the prompts as given (token ids, or
    the chat rendered with the base model's template), ``keep_last`` (vLLM's truncate_prompt_tokens,
    -1 being the model's limit) and whether texts get the tokenizer's special tokens."""
    out: dict[str, Any] = {}
    k = body.truncate_prompt_tokens
    if k is not None:  # vLLM: _validate_truncation_size (see the module's docstring)
        k = max_length if k <= -1 else k
        if k > max_length:
            raise LimitError(f"truncate_prompt_tokens value ({k}) is greater than the model's limit of {max_length} "
                             "tokens (TFB_MAX_LENGTH): select a smaller truncation size", param="truncate_prompt_tokens")
        out["keep_last"] = k
    ids = body.token_ids()
    if ids is not None:
        out["prompts"] = ids
    elif body.messages is not None:
        if engine.task.formatter is not None:
            raise TaskError(f"task {engine.task.name!r} formats its prompts from text: send `input` (text or objects "
                            "with its fields), not chat messages", param="messages")
        try:
            text = render_chat(engine.classifier.tokenizer, body.messages, "send `input` (text or token ids)",
                               body.add_generation_prompt, body.continue_final_message)
        except GenerationInputError as exc:
            raise LimitError(str(exc), param=exc.param) from None
        out["prompts"] = [text]
    special = body.add_special_tokens if body.add_special_tokens is not None else body.messages is None
    if not special:
        out["special_tokens"] = False
    return out


def log_mean(out: dict[str, Any]) -> None:
    """probs -> log p̄ in place (vLLM's use_activation=false: softmax of it is p̄); -inf, not JSON,
    is the least finite float."""
    for p in out["predictions"]:
        p["probs"] = [math.log(x) if x > 0.0 else -sys.float_info.max for x in p["probs"]]


def _client_loc(loc: tuple[Any, ...], listed: bool) -> tuple[Any, ...]:
    """A /predict error location in the client's terms: ``inputs.i`` is ``input.i`` (``input`` for a string)."""
    if loc and loc[0] == "inputs":
        return ("input", *loc[1:]) if listed else ("input", *loc[2:])
    return loc


def classify_response(out: dict[str, Any], model: str, request_id: str) -> dict[str, Any]:
    """vLLM's response from /predict's answer (with ``prompt_tokens``): vLLM's fields, then ours."""
    data = []
    for i, p in enumerate(out["predictions"]):
        item = {"index": i, "label": p["label"], "probs": p["probs"], "num_classes": len(p["probs"]),
                "prediction_id": p["id"], "confidence": p["confidence"],
                "predictive_entropy": p["predictive_entropy"], "expected_entropy": p["expected_entropy"],
                "mutual_information": p["mutual_information"]}
        item.update({k: p[k] for k in ("prediction_set", "abstain", "samples") if k in p})
        data.append(item)
    tokens = sum(out.get("prompt_tokens", ()))
    body = {"id": request_id, "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None},
            "labels": out["labels"], "sigma": out["sigma"], "n_samples": out["n_samples"]}
    body.update({k: out[k] for k in ("conformal", "abstention") if k in out})
    return body


# --- routes ------------------------------------------------------------------------------------------
router = APIRouter(route_class=OpenAIErrorRoute, tags=["vLLM-compatible"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "invalid request (vLLM answers validation errors 400): the message names the field"),
        (401, "missing or wrong API key"), (404, "unknown model"), (408, "body not received in time"),
        (413, "body too large"), (415, "body not JSON"), (429, "queue full (Retry-After)"),
        (431, "headers too large"), (503, "not ready, shutting down, or timed out (Retry-After)"))}


async def _classify(body: ClassifyRequest, request: Request, predictor: Predictor) -> Response:
    model = resolve_model(predictor, body.model)
    extra = sorted(body.model_extra or ())
    if extra:  # vLLM logs them too
        log.info("/classify: ignoring unknown fields %s", extra)
    request_id = "classify-" + (request.headers.get("x-request-id") or uuid.uuid4().hex)
    try:
        req = predict_request(body, model)
    except ValidationError as exc:  # e.g. an empty text: named as the client sent it
        errors = [{**e, "loc": _client_loc(e.get("loc", ()), isinstance(body.input, list))} for e in exc.errors()]
        raise RequestValidationError(errors) from exc
    given = given_prompts(body, predictor.resolve(model), predictor.settings.max_length)
    timing: dict[str, float] = {}
    out = await predictor.predict(req, timing, count_tokens=True, **given)
    if not body.activation_on:
        log_mean(out)
    headers = {"Server-Timing": server_timing(timing)} if timing else None
    return JSONResponse(classify_response(out, model, request_id), headers=headers)


@router.post("/classify", response_model=ClassifyResponse, responses=_ERRORS)
async def classify(body: ClassifyRequest, request: Request, predictor: PredictorDep) -> Response:
    """vLLM's Classification API: probabilities, label and usage per input, with confidence, entropies
    and mutual information beside them (``prediction_id`` for POST /feedback)."""
    return await _classify(body, request, predictor)


@router.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS)
async def classify_v1(body: ClassifyRequest, request: Request, predictor: PredictorDep) -> Response:
    """The same as POST /classify, under the OpenAI client's ``/v1`` base URL."""
    return await _classify(body, request, predictor)


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def models(predictor: PredictorDep) -> dict[str, Any]:
    """The served adapters, as vLLM lists its LoRA adapters (``parent``: the base model); the first
    is the default. The base model's id is accepted as ``model`` too, meaning the default adapter."""
    created = int(time.time())
    pool = predictor.adapters

    def cfg(name: str) -> Any:
        return (pool.engines[name] if name in pool.engines else pool.pending[name]).cfg.model

    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "tfb-serve",
         "root": model.adapter, "parent": model.model, "max_model_len": predictor.settings.max_length,
         "permission": [], "state": pool.state(name)}
        for name in pool.listed() for model in (cfg(name),)]}
