"""OpenAI-compatible Bayesian generation: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Requests and responses in OpenAI's shapes as vLLM serves them (see /work's GENERATION.md notes and
vLLM's ``vllm/entrypoints/openai/protocol.py``): the OpenAI client works unchanged, unknown fields
are ignored (vLLM's ``extra="allow"``), errors come in OpenAI's body (app/classify.py's
:class:`OpenAIErrorRoute`). Decoding is Bayesian model averaging over N posterior samples of the
adapter: the token is chosen from p̄ (greedy at temperature 0), OpenAI's logprobs are p̄'s, and each
choice carries ``uncertainty``: per token (``prob`` = p̄, predictive and expected entropy, mutual
information, nats) and per answer (``sequence``: nll = -sum log p̄, mean and max token MI...).

Extensions (``extra_body`` in the OpenAI client): ``n_samples`` (N, default TFB_N_SAMPLES),
``posterior_seed`` (the seed of the N posterior samples, /predict's ``seed``: OpenAI's ``seed`` here
is the token sampling's), ``answers``: "mean" (BMA, default) or "per_sample" (each posterior sample
decodes its own greedy answer; the choice is the majority answer and ``uncertainty.answers`` has the
N answers, their clusters and the semantic entropy), ``stop_token_ids`` (vLLM's), ``max_risk``
(risk-controlled answers: :mod:`tfb_core.serving.risk`; a withheld choice has ``abstained: true``, the
refusal TFB_ABSTAIN_TEXT as its text and the answer in ``uncertainty.risk``). Every choice's
``uncertainty.confidence`` is the probability that its answer is right.

Streaming (``stream: true``): server-sent events, one chunk per generated token with its text (text
a stop string may still cut is held back until it is safe) and ``uncertainty.token``; a last chunk
with ``finish_reason`` and ``uncertainty.sequence``; a usage chunk with ``stream_options.include_usage``;
then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.batching import GenWork
from app.classify import _ERRORS, OpenAIErrorRoute, resolve_model
from app.errors import LimitError, RequestTimeoutError, openai_error_body, status_of
from app.predictor import Predictor
from app.routes import PredictorDep
from app.schemas import check_messages
from tfb_core.bayes.posterior import SEED_LIMIT
from tfb_core.decide.generation_risk import risk_score
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.generation import GenerationInputError, GenerationService, GenerationSettings, GenerationUpdate
from tfb_core.serving.risk import check_risk, decide, served_confidence

log = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


class GenerationInputHTTPError(LimitError):
    """A request the model cannot take, found on the worker (prompt too long, no chat template): 400."""


# --- requests ------------------------------------------------------------------------------------
class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="the adapter's name (GET /v1/models); unset: the default adapter")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="applied to p̄ (0: greedy argmax of p̄)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus of p̄")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="OpenAI's: the token sampling's seed, below 2**64 "
                             "(unset: random)")
    stop: str | list[str] | None = Field(None, description="strings that end the answer (not returned)")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, description="answers per prompt: only 1")
    user: str | None = None
    # --- tfb extensions
    n_samples: int | None = Field(None, ge=1, description="posterior samples N (default TFB_N_SAMPLES)")
    posterior_seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="seed of the N posterior samples, below "
                                       "2**64 (default TFB_SEED)")
    answers: Literal["mean", "per_sample"] = Field(
        "mean", description="mean: one answer from p̄; per_sample: each posterior sample's own greedy answer, "
                            "clustered (the majority answer is the choice)")
    stop_token_ids: list[int] | None = Field(None, description="vLLM: token ids that end the answer too")
    max_risk: float | None = Field(None, gt=0.0, lt=1.0, allow_inf_nan=False,
                                   description="answer only where the adapter's calibrated threshold certifies that "
                                               "the error rate among answered requests is <= max_risk (w.p. >= 1 - "
                                               "delta); otherwise the choice is abstained (docs/generation.md)")

    @field_validator("stop", mode="after")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        if stops is not None and len(stops) > 4:
            raise ValueError(f"at most 4 stop strings (OpenAI's limit), got {len(stops)}")
        return stops

    @field_validator("n", mode="after")
    @classmethod
    def _n(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported (got {value}): the uncertainty is over posterior samples, "
                             "set n_samples for those")
        return value


class CompletionRequest(_Common):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "default", "prompt": "Q: What is 2 + 3?\nA:", "max_tokens": 8, "temperature": 0}]})

    prompt: str | list[str] = Field(description="the text to continue, or a list of texts (one choice each, "
                                               "at most TFB_MAX_INPUTS)")
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default 16; at most TFB_MAX_TOKENS")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="top-k log p̄ per token")
    echo: bool = Field(False, description="true is refused")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty list: give one prompt")
            if any(isinstance(v, (int, list)) for v in value):
                raise ValueError("token ids are not supported by this server: send text")
            for i, v in enumerate(value):
                if not isinstance(v, str) or not v:
                    raise ValueError(f"prompt {i} must be a non-empty string")
        if isinstance(value, str) and not value:
            raise ValueError("an empty prompt: nothing to continue")
        return value

    @field_validator("echo", mode="after")
    @classmethod
    def _echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo=true is not supported by this server")
        return value


class ChatCompletionRequest(_Common):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "default", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "temperature": 0}]})

    messages: list[dict[str, Any]] = Field(min_length=1, description="rendered with the model's chat template")
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="unset: TFB_MAX_TOKENS")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("messages", mode="after")
    @classmethod
    def _messages(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return check_messages(value)


# --- translation ---------------------------------------------------------------------------------
def _settings(body: CompletionRequest | ChatCompletionRequest, predictor: Predictor, max_tokens: int,
              top_logprobs: int, fit_context: bool = False, mle: bool = False) -> GenerationSettings:
    s = predictor.settings
    if max_tokens > s.max_tokens:
        raise LimitError(f"max_tokens {max_tokens} is over the limit of {s.max_tokens} (TFB_MAX_TOKENS)",
                         param="max_completion_tokens" if isinstance(body, ChatCompletionRequest)
                         and body.max_completion_tokens is not None else "max_tokens")
    if body.n_samples is not None and body.n_samples > s.max_samples:
        raise LimitError(f"n_samples {body.n_samples} is over the limit of {s.max_samples} (TFB_MAX_SAMPLES)",
                         param="n_samples")
    if body.stream and body.answers == "per_sample":
        raise LimitError("stream=true is not supported with answers=per_sample (the N answers end together)",
                         param="stream")
    extra = sorted(body.model_extra or ())
    if extra:  # vLLM logs them too
        log.info("ignoring unknown fields %s", extra)
    return GenerationSettings(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        sampling_seed=body.seed if body.seed is not None else secrets.randbits(31), stop=tuple(body.stop or ()),
        stop_token_ids=None if body.stop_token_ids is None else tuple(body.stop_token_ids),
        top_logprobs=top_logprobs, n_samples=body.n_samples, posterior_seed=body.posterior_seed, mode=body.answers,
        fit_context=fit_context, mle=mle)


def _prepare(engine: TFBEngine, settings: GenerationSettings, prompt: str | None,
             messages: list[dict[str, Any]] | None, which: str = ""):
    """What the worker runs to build the request (tokenizing on its thread); ``which`` names the
    prompt in an error ("prompt 2: ") where a request has several."""
    def prepare(service: GenerationService):
        try:
            tokens = service.encode_chat(messages) if messages is not None else service.encode_prompt(prompt or "")
            return service.request(engine, tokens, settings)
        except GenerationInputError as exc:
            raise GenerationInputHTTPError(which + str(exc), param=exc.param) from None
        except ValueError as exc:  # GenerationRequest's own check of a value
            raise GenerationInputHTTPError(which + str(exc)) from None

    return prepare


def _uncertainty_token(t: dict[str, Any]) -> dict[str, Any]:
    return {k: t[k] for k in ("token", "token_id", "prob", "logprob", "predictive_entropy", "expected_entropy",
                              "mutual_information")}


def _confidence(engine: TFBEngine, info: dict[str, Any], body: CompletionRequest | ChatCompletionRequest,
                mle: bool) -> dict[str, Any]:
    return served_confidence(engine, info, n_samples=body.n_samples, posterior_seed=body.posterior_seed,
                             temperature=body.temperature, mode=body.answers, mle=mle)


def _uncertainty(info: dict[str, Any], confidence: dict[str, Any]) -> dict[str, Any]:
    c = info["completion"]
    out = {"tokens": [_uncertainty_token(t) for t in c["tokens"]], "sequence": c["sequence"], **confidence,
           "n_samples": info["n_samples"], "mode": info["mode"]}
    if "answers" in info:
        out["answers"] = info["answers"]
    return out


def _abstain(choice: dict[str, Any], decision: dict[str, Any], chat: bool, predictor: Predictor) -> None:
    """Mark ``choice`` with its max_risk decision: ``abstained`` on the choice (OpenAI clients keep
    unknown fields), ``uncertainty.risk``; an abstained answer's text is the configured refusal
    (TFB_ABSTAIN_TEXT) unless TFB_ABSTAIN_KEEP_TEXT, the answer itself in ``uncertainty.risk.answer``."""
    choice["abstained"] = decision["abstained"]
    choice["uncertainty"]["risk"] = decision
    if not decision["abstained"] or predictor.settings.abstain_keep_text:
        return
    if chat:
        decision["answer"] = choice["message"]["content"]
        choice["message"]["content"] = predictor.settings.abstain_text
    else:
        decision["answer"] = choice["text"]
        choice["text"] = predictor.settings.abstain_text


def _completion_logprobs(tokens: list[dict[str, Any]], k: int | None) -> dict[str, Any] | None:
    """OpenAI's completions logprobs; ``text_offset``: characters of the answer's text before the
    character the token's first byte belongs to (the service's ``text_offsets``: the pieces of one
    character split over tokens share its offset), the same streamed or not."""
    if k is None:
        return None
    return {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [_top_dict(t["top_logprobs"]) for t in tokens],
            "text_offset": [t["text_offset"] for t in tokens]}


def _top_dict(top: list[dict[str, Any]]) -> dict[str, float]:
    """OpenAI's completions form of p̄'s top tokens, text -> logprob: where two tokens read as one text
    (pieces of one character), the more probable one's."""
    out: dict[str, float] = {}
    for x in top:
        out.setdefault(x["token"], x["logprob"])
    return out


def _chat_logprobs(tokens: list[dict[str, Any]], on: bool) -> dict[str, Any] | None:
    if not on:
        return None
    return {"content": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"],
                         "top_logprobs": [{"token": x["token"], "logprob": x["logprob"], "bytes": x["bytes"]}
                                          for x in t["top_logprobs"]]} for t in tokens]}


def _finish(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


def _usage(info: dict[str, Any]) -> dict[str, int]:
    n = len(info["completion"]["token_ids"])
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": n, "total_tokens": info["prompt_tokens"] + n}


# --- the routes ----------------------------------------------------------------------------------
router = APIRouter(route_class=OpenAIErrorRoute, tags=["OpenAI-compatible generation"])


async def _next(work: GenWork, timeout_s: float) -> GenerationUpdate:
    assert work.updates is not None
    try:
        return await asyncio.wait_for(work.updates.get(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"no progress within the request timeout of {timeout_s:g}s "
                                  "(TFB_REQUEST_TIMEOUT_S): the server is overloaded, retry later") from None


async def _collect(worker: Any, work: GenWork, deadline: float) -> dict[str, Any]:
    """The work's result (its tokens' updates skipped); abandoned if this is cancelled or times out."""
    try:
        while True:
            update = await _next(work, max(0.0, deadline - time.monotonic()))
            if update.error is not None:
                raise update.error
            if update.result is not None:
                return update.result
    except asyncio.CancelledError:  # the client went away, or the drain's deadline passed
        worker.abandon_generation(work, "disconnect" if worker.accepting else "shutdown")
        raise
    except RequestTimeoutError:
        worker.abandon_generation(work, "timeout")
        raise
    except BaseException:
        worker.abandon_generation(work, "error", count=False)
        raise


async def _run(predictor: Predictor, request: Request, body: CompletionRequest | ChatCompletionRequest,
               chat: bool) -> Response:
    model = resolve_model(predictor, body.model)
    engine = predictor.resolve(model)
    risk = check_risk(engine, body.max_risk, n_samples=body.n_samples, posterior_seed=body.posterior_seed,
                      temperature=body.temperature, mode=body.answers, stream=body.stream)
    mle = risk is not None and risk_score(risk.score).mle  # the score is the sigma = 0 answer's: decode that one
    if chat:
        assert isinstance(body, ChatCompletionRequest)
        max_tokens = body.max_completion_tokens or body.max_tokens or predictor.settings.max_tokens
        k = (body.top_logprobs or 0) if body.logprobs else 0
        settings = _settings(body, predictor, max_tokens, k,
                             fit_context=body.max_completion_tokens is None and body.max_tokens is None, mle=mle)
        prepares = [_prepare(engine, settings, None, body.messages)]
    else:
        assert isinstance(body, CompletionRequest)
        k = body.logprobs or 0
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if len(prompts) > predictor.settings.max_inputs:
            raise LimitError(f"too many prompts: {len(prompts)}, the limit is {predictor.settings.max_inputs} per "
                             "request (TFB_MAX_INPUTS)", param="prompt")
        if body.stream and len(prompts) > 1:
            raise LimitError("stream=true takes one prompt: send several prompts without stream, or one request "
                             "per prompt", param="prompt")
        settings = _settings(body, predictor, body.max_tokens or 16, k, mle=mle)
        prepares = [_prepare(engine, settings, p, None, f"prompt {i}: " if len(prompts) > 1 else "")
                    for i, p in enumerate(prompts)]
    worker = predictor.worker
    works = [GenWork(prepare=prepare, stream=body.stream, engine=engine) for prepare in prepares]
    try:
        for work in works:
            worker.submit_generation(work)
    except BaseException:  # e.g. the queue is full: none of them runs
        for work in works:
            worker.abandon_generation(work, "error", count=False)
        raise
    rid = ("chatcmpl-" if chat else "cmpl-") + (request.headers.get("x-request-id") or uuid.uuid4().hex)
    created = int(time.time())
    timeout_s = predictor.settings.request_timeout_s
    if body.stream:
        work = works[0]
        try:  # the first update: an error before any token is an ordinary error response
            first = await _next(work, timeout_s)
        except RequestTimeoutError:
            worker.abandon_generation(work, "timeout")
            raise
        except BaseException:
            worker.abandon_generation(work, "disconnect" if worker.accepting else "shutdown")
            raise
        if first.error is not None:
            raise first.error
        return StreamingResponse(_stream(predictor, work, first, body, chat, model, rid, created, timeout_s),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    deadline = time.monotonic() + timeout_s
    tasks = [asyncio.ensure_future(_collect(worker, work, deadline)) for work in works]
    try:
        infos = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:  # one failed (or all were cancelled): the others' rows leave the decode
            task.cancel()
        for work in works:
            worker.abandon_generation(work, "error", count=False)
        raise
    choices = []
    for i, info in enumerate(infos):
        decision = None if risk is None else decide(risk, info, body.max_risk, engine.cfg.risk_delta)
        if predictor.adapters.engines.get(model) is engine:  # not while it is unloaded: its series go
            predictor.metrics.observe_generation(info, model, None if decision is None else decision["abstained"])
        c = info["completion"]
        choice: dict[str, Any] = {"index": i}
        if chat:
            choice.update(message={"role": "assistant", "content": c["text"]},
                          logprobs=_chat_logprobs(c["tokens"], bool(body.logprobs)))
        else:
            choice.update(text=c["text"], logprobs=_completion_logprobs(c["tokens"], body.logprobs))
        choice.update(finish_reason=_finish(c["finish_reason"]), stop_reason=c["stop_reason"],
                      uncertainty=_uncertainty(info, _confidence(engine, info, body, mle)))
        if decision is not None:
            _abstain(choice, decision, chat, predictor)
        choices.append(choice)
    usages = [_usage(info) for info in infos]
    usage = {key: sum(u[key] for u in usages) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                         "model": model, "choices": choices, "usage": usage, "sigma": 0.0 if mle else engine.sigma,
                         "n_samples": infos[0]["n_samples"]})


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, allow_nan=False, separators=(',', ':'))}\n\n".encode()


async def _stream(predictor: Predictor, work: GenWork, first: GenerationUpdate,
                  body: CompletionRequest | ChatCompletionRequest, chat: bool, model: str, rid: str, created: int,
                  timeout_s: float) -> AsyncIterator[bytes]:
    """The SSE body: a chunk per token, the finish chunk, the usage chunk if asked, [DONE]. A client
    that leaves (the response's task is cancelled) takes its rows out of the decode."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": rid, "object": obj, "created": created, "model": model}
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    try:
        if chat:
            yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
        update: GenerationUpdate | None = first
        while True:
            if update is None:
                try:
                    update = await _next(work, timeout_s)
                except RequestTimeoutError as exc:
                    predictor.worker.abandon_generation(work, "timeout")
                    update = GenerationUpdate(work, error=exc)
            if update.error is not None:  # after the stream began: an error event, then the end
                status, message, _ = status_of(update.error)
                yield _sse(openai_error_body(status, message))
                break
            if update.token is not None:
                t = update.token
                unc = {"token": _uncertainty_token(t)}
                if chat:
                    choice = {"index": 0, "delta": {"content": update.text},
                              "logprobs": _chat_logprobs([t], bool(body.logprobs)), "finish_reason": None,
                              "uncertainty": unc}
                else:
                    choice = {"index": 0, "text": update.text, "logprobs": _completion_logprobs([t], body.logprobs),
                              "finish_reason": None, "uncertainty": unc}
                yield _sse({**head, "choices": [choice]})
            if update.result is not None:
                info = update.result
                if predictor.adapters.engines.get(model) is work.engine:  # not while it is unloaded
                    predictor.metrics.observe_generation(info, model)
                c = info["completion"]
                end = {"index": 0, "finish_reason": _finish(c["finish_reason"]), "stop_reason": c["stop_reason"],
                       "uncertainty": {"sequence": c["sequence"], **_confidence(work.engine, info, body, False),
                                       "n_samples": info["n_samples"], "mode": info["mode"]}}
                end.update({"delta": {}, "logprobs": None} if chat else {"text": "", "logprobs": None})
                yield _sse({**head, "choices": [end]})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(info)})
                break
            update = None
        yield b"data: [DONE]\n\n"
    finally:
        if not work.ended:
            predictor.worker.abandon_generation(work, "disconnect")


@router.post("/v1/completions", responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request, predictor: PredictorDep) -> Response:
    """OpenAI's completions: the prompt continued by Bayesian model averaging over N posterior samples;
    each choice carries ``uncertainty`` (per token and per answer)."""
    return await _run(predictor, request, body, chat=False)


@router.post("/v1/chat/completions", responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, predictor: PredictorDep) -> Response:
    """OpenAI's chat completions: the messages rendered with the model's chat template, then as
    /v1/completions."""
    return await _run(predictor, request, body, chat=True)
