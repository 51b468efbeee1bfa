"""The rest of vLLM's serving routes that a vLLM client of this server uses: ``POST /invocations``
(SageMaker's), ``POST /tokenize`` and ``POST /detokenize``; errors in vLLM's body.

What vLLM defines (vllm-project/vllm; file @ commit of the version read):
- ``/invocations``: ``vllm/entrypoints/sagemaker/api_router.py`` @ be3e4d0e. The body is validated
  against each request type the model serves, in order (chat completion, completion, embedding,
  classification, rerank, score, pooling), and the first that validates is answered by its route;
  none: 400 "Cannot find suitable handler for request. Expected one of: [...]". Here the types are
  ours, in vLLM's order: ``ChatCompletionRequest``, ``CompletionRequest``, ``ClassifyRequest`` (so a
  body with ``messages`` is a chat completion, as on a vLLM model that generates; a body with
  ``input`` is /classify's). Where none validates but the body has one type's field (``messages``,
  ``prompt``, ``input``), the answer is that route's own 400 naming what is wrong, rather than
  vLLM's list of type names.
- ``/tokenize`` and ``/detokenize``: ``vllm/entrypoints/serve/tokenize/protocol.py`` @ 343bacaf:
  ``TokenizeCompletionRequest`` {model?, prompt, add_special_tokens=true, return_token_strs=false},
  ``TokenizeChatRequest`` {model?, messages, add_generation_prompt=true, continue_final_message=false
  (both true is an error), add_special_tokens=false, return_token_strs}; ``TokenizeResponse``
  {count, max_model_len, tokens, token_strs}; ``DetokenizeRequest`` {model?, tokens};
  ``DetokenizeResponse`` {prompt}. Here ``max_model_len`` is TFB_MAX_LENGTH, as /v1/models reports
  it; ``chat_template``, ``chat_template_kwargs`` and ``tools`` are ignored (unknown fields are).

The tokenizer here is a copy of the model's, for the event loop (the model worker's own is not
shared across threads); a chat is rendered with the model's own template.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.classify import _ERRORS, ClassifyRequest, OpenAIErrorRoute, _classify, resolve_model
from app.errors import LimitError, openai_error_response
from app.generate import ChatCompletionRequest, CompletionRequest, _run
from app.predictor import Predictor
from app.routes import PredictorDep
from app.schemas import check_messages
from tfb_core.serving.generation import GenerationInputError, render_chat

log = logging.getLogger(__name__)

PATHS = frozenset({"/invocations", "/tokenize", "/detokenize"})


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (``prompt``) or TokenizeChatRequest (``messages``)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"prompt": "a gripping, beautifully acted film"},
        {"messages": [{"role": "user", "content": "hello"}], "add_generation_prompt": True}]})

    model: str | None = Field(None, description="the adapter's name (all share the base model's tokenizer)")
    prompt: str | None = Field(None, description="a text (or give messages)")
    messages: list[dict[str, Any]] | None = Field(None, description="a chat, rendered with the model's template")
    add_special_tokens: bool | None = Field(None, description="default: true for prompt, false for messages")
    add_generation_prompt: bool = Field(True, description="chat: end with the assistant's turn header")
    continue_final_message: bool = Field(False, description="chat: leave the last message open")
    return_token_strs: bool | None = Field(False, description="also return each token's string")

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either `prompt` or `messages`")
        if self.messages is not None and self.add_generation_prompt and self.continue_final_message:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self

    @field_validator("messages", mode="after")
    @classmethod
    def _messages(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        return value if value is None else check_messages(value)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{"tokens": [1, 17, 42]}]})

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


router = APIRouter(route_class=OpenAIErrorRoute, tags=["vLLM-compatible"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest, predictor: PredictorDep) -> dict[str, Any]:
    """vLLM's /tokenize: the prompt's (or the rendered chat's) token ids, as the model reads them."""
    engine = predictor.resolve(resolve_model(predictor, body.model))
    tok = predictor.loop_tokenizer(engine)
    if body.messages is not None:
        try:
            text = render_chat(engine.classifier.tokenizer, body.messages, "send `prompt`", body.add_generation_prompt,
                               body.continue_final_message)
        except GenerationInputError as exc:
            raise LimitError(str(exc), param=exc.param) from None
        special = bool(body.add_special_tokens)
    else:
        text = body.prompt or ""
        special = body.add_special_tokens is not False
    ids = list(tok(text, add_special_tokens=special)["input_ids"])
    return {"count": len(ids), "max_model_len": predictor.settings.max_length, "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if body.return_token_strs else None}


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, predictor: PredictorDep) -> dict[str, Any]:
    """vLLM's /detokenize: the text of token ids."""
    engine = predictor.resolve(resolve_model(predictor, body.model))
    tok = predictor.loop_tokenizer(engine)
    bad = [t for t in body.tokens if not 0 <= t < len(tok)]
    if bad:
        raise LimitError(f"token id {bad[0]} is out of the vocabulary [0, {len(tok)})", param="tokens")
    return {"prompt": tok.decode(body.tokens)}


#: the request types /invocations tries, in vLLM's order, each with its route and the field that names it
_INVOCATION_TYPES: list[tuple[type[BaseModel], str]] = [
    (ChatCompletionRequest, "messages"), (CompletionRequest, "prompt"), (ClassifyRequest, "input")]


async def _answer(predictor: Predictor, request: Request, body: BaseModel) -> Response:
    if isinstance(body, ChatCompletionRequest):
        return await _run(predictor, request, body, chat=True)
    if isinstance(body, CompletionRequest):
        return await _run(predictor, request, body, chat=False)
    assert isinstance(body, ClassifyRequest)
    return await _classify(body, request, predictor)


@router.post("/invocations", responses=_ERRORS)
async def invocations(request: Request, predictor: PredictorDep) -> Response:
    """SageMaker's route, as vLLM serves it: a chat completion, completion or classify body (tried in
    that order) answered by its route."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return openai_error_response(400, f"the request body is not valid JSON: {exc}"[:300])
    errors: dict[str, ValidationError] = {}
    for kind, field in _INVOCATION_TYPES:
        try:
            body = kind.model_validate(data)
        except ValidationError as exc:
            errors[field] = exc
            continue
        return await _answer(predictor, request, body)
    for _, field in _INVOCATION_TYPES:  # the body's own type: its route's 400
        if isinstance(data, dict) and field in data:
            raise RequestValidationError(errors[field].errors())
    names = [kind.__name__ for kind, _ in _INVOCATION_TYPES]
    return openai_error_response(400, f"Cannot find suitable handler for request. Expected one of: {names}")
