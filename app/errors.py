"""The one place that maps errors to HTTP: engine and limit errors -> 4xx, overload -> 429/503.

Every error body is ``{"detail": "<message>"}`` (FastAPI's own 422 body keeps its list of
reasons). A limit's message names the limit and the setting that sets it. The vLLM-compatible
routes (app/classify.py) answer the same errors in vLLM's OpenAI-style body instead
(:func:`openai_error_response`).
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tfb_core.data.loading import LoadError
from tfb_core.data.tasks import TaskError
from tfb_core.forward.classifier import EmptyPromptError, PromptTooLongError
from tfb_core.serving.calibrate import CalibrationPendingError
from tfb_core.serving.pool import AdapterNotReadyError, UnknownAdapterError
from tfb_core.serving.runtime import AdapterLoadError

log = logging.getLogger(__name__)


class ServingError(Exception):
    """An error with its HTTP status and headers; the message is the response's ``detail``."""

    status_code = 500
    headers: dict[str, str] = {}

    def __init__(self, message: str, headers: dict[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field it is about, where known (vLLM's error ``param``)
        if headers is not None:
            self.headers = headers


class LimitError(ServingError):
    """A request over a configured limit (inputs, N, ...)."""

    status_code = 422


class BodyTooLargeError(ServingError):
    status_code = 413


class UnauthorizedError(ServingError):
    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}


class UnknownPredictionError(ServingError):
    status_code = 404


class DuplicateFeedbackError(ServingError):
    status_code = 409


class QueueFullError(ServingError):
    """The request queue is at capacity: back off and retry."""

    status_code = 429
    headers = {"Retry-After": "1"}


class NotReadyError(ServingError):
    """The model is still loading (or failed to load, or the server is shutting down)."""

    status_code = 503
    headers = {"Retry-After": "5"}


class RequestTimeoutError(ServingError):
    """The request was not answered within the per-request timeout: the server is overloaded."""

    status_code = 503
    headers = {"Retry-After": "1"}


def error_response(status_code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status_code, headers=headers)


def openai_error_body(status_code: int, message: str, err_type: str | None = None,
                      param: str | None = None) -> dict[str, dict[str, object]]:
    """vLLM's error body (vllm/entrypoints/openai/engine/protocol.py ``ErrorResponse``, the form current
    vLLM sends): ``{"error": {"message", "type", "param", "code"}}``; ``type`` defaults to vLLM's
    ``BadRequestError`` for every 400 (a validation error, a body that is not JSON, a task or limit
    error: one type, as the OpenAI client names the status), else the status's reason phrase, as vLLM's
    handler of FastAPI's HTTP errors writes it."""
    if err_type is None and status_code == 400:
        err_type = "BadRequestError"
    if err_type is None:
        try:
            err_type = HTTPStatus(status_code).phrase
        except ValueError:  # a status http.HTTPStatus does not name
            err_type = "Error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": status_code}}


def openai_error_response(status_code: int, message: str, headers: dict[str, str] | None = None,
                          err_type: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(openai_error_body(status_code, message, err_type, param), status_code=status_code,
                        headers=headers)


def status_of(exc: BaseException) -> tuple[int, str, dict[str, str] | None]:
    """(status, message, headers) of an exception raised while serving a request."""
    if isinstance(exc, ServingError):
        return exc.status_code, exc.message, exc.headers or None
    if isinstance(exc, PromptTooLongError):
        return 422, f"{exc} tokens (TFB_MAX_LENGTH)", None
    if isinstance(exc, (TaskError, EmptyPromptError)):
        return 422, str(exc), None
    if isinstance(exc, CalibrationPendingError):  # still running: retry then; failed: no Retry-After
        retry = exc.retry_after_s
        return 503, str(exc), None if retry is None else {"Retry-After": str(max(1, math.ceil(retry)))}
    if isinstance(exc, UnknownAdapterError):  # as vLLM and OpenAI answer an unknown model
        return 404, str(exc), None
    if isinstance(exc, AdapterNotReadyError):  # loaded at run time, its sigma search still running
        return 503, str(exc), {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    if isinstance(exc, AdapterLoadError):  # a load request's own problem (a path, a file, a shape)
        return 400, str(exc), None
    if isinstance(exc, LoadError):  # e.g. a search or load problem surfacing late
        return 503, str(exc), {"Retry-After": "5"}
    # the connection's state after an unexpected error is unknown: close it, so that a client reusing
    # it opens a new one instead of waiting on this one
    return 500, "internal error (see the server log)", {"Connection": "close"}


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app``; a 500 is logged with its traceback and never leaks it."""

    async def known(request: Request, exc: Exception) -> JSONResponse:
        status, message, headers = status_of(exc)
        if status >= 500 and status != 503:
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(status, message, headers)

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's body, with the input echoed only when small (a rejected body can be large).
        errors = [{k: v for k, v in e.items() if k not in ("input", "ctx", "url")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "error parsing the body" (invalid UTF-8, nesting too deep for the JSON parser):
            # an invalid request like malformed JSON, which FastAPI itself answers 422
            cause = exc.__cause__
            reason = f"{type(cause).__name__}: {cause}"
            return error_response(422, f"the request body is not valid JSON: {reason[:200]}")
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    for cls in (ServingError, PromptTooLongError, EmptyPromptError, TaskError, LoadError, UnknownAdapterError,
                CalibrationPendingError, AdapterNotReadyError):
        app.add_exception_handler(cls, known)
    app.add_exception_handler(RequestValidationError, validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, known)
