"""HTTP routes: /predict, /feedback, /info, /metrics, and the probes /healthz and /readyz."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import UnauthorizedError
from app.middleware import server_timing
from app.predictor import Predictor
from app.schemas import ERRORS, ErrorBody, FeedbackRequest, FeedbackResponse, Health, PredictRequest, PredictResponse, Ready
from app.state import AppState
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.response import pool_info

_bearer = HTTPBearer(auto_error=False, description="the API key, if the server has one (TFB_API_KEY)")


def get_state(request: Request) -> AppState:
    return request.app.state.tfb


StateDep = Annotated[AppState, Depends(get_state)]


def _check_key(state: AppState, credentials: HTTPAuthorizationCredentials | None) -> None:
    key = state.settings.api_key
    if key is None:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(),
                                                         key.get_secret_value().encode()):
        raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")


def require_key(state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                         Depends(_bearer)]) -> None:
    _check_key(state, credentials)


def require_metrics_key(state: StateDep, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                                 Depends(_bearer)]) -> None:
    if not state.settings.metrics_public:
        _check_key(state, credentials)


def get_predictor(state: StateDep, _: Annotated[None, Depends(require_key)]) -> Predictor:
    return state.require_predictor()


PredictorDep = Annotated[Predictor, Depends(get_predictor)]

router = APIRouter()


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
             responses={**ERRORS, 404: {"model": ErrorBody, "description": "unknown adapter"}}, tags=["inference"])
async def predict(body: PredictRequest, predictor: PredictorDep, response: Response) -> dict[str, Any]:
    """Classify inputs with N posterior samples: probabilities, confidence, entropy, mutual information.

    The ``Server-Timing`` header gives the request's time in the queue (waiting for the model worker
    and for other requests to share its forward), in its batch, and in the app (ms)."""
    timing: dict[str, float] = {}
    out = await predictor.predict(body, timing)
    if timing:
        response.headers["Server-Timing"] = server_timing(timing)
    return out


@router.post("/feedback", response_model=FeedbackResponse, tags=["inference"],
             responses={**ERRORS, 404: {"description": "unknown or expired prediction id"},
                        409: {"description": "this prediction already has a label"}})
async def feedback(body: FeedbackRequest, predictor: PredictorDep) -> dict[str, Any]:
    """Record the true label of an earlier prediction (feeds the calibration metrics)."""
    return await predictor.feedback(body)


@router.get("/healthz", response_model=Health, tags=["probes"])
async def healthz() -> dict[str, str]:
    """Liveness: 200 as soon as the process serves HTTP."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready, tags=["probes"], responses={503: {"model": Ready}})
async def readyz(state: StateDep) -> Response:
    """Readiness: 200 once the model is loaded and warmed up, else 503 with the reason."""
    if state.status == "ready":
        return JSONResponse({"status": "ready"})
    detail = state.error if state.status == "failed" else None
    return JSONResponse({"status": state.status, "detail": detail}, status_code=503,
                        headers={"Retry-After": "5"})


@router.get("/info", tags=["inference"], responses=ERRORS)
async def info(predictor: PredictorDep) -> dict[str, Any]:
    """Model, adapter, task, labels, sigma and how it was obtained, N, the search result, the routes that
    answer for it, the limits:
    the default adapter's at the top level, every served adapter's under ``adapters``."""
    s = predictor.settings
    limits = {"max_inputs": s.max_inputs, "max_samples": s.max_samples, "max_length": s.max_length,
              "max_body_bytes": s.max_body_bytes, "max_batch_rows": s.max_batch_rows, "max_wait_ms": s.max_wait_ms,
              "max_queue": s.max_queue, "request_timeout_s": s.request_timeout_s, "max_tokens": s.max_tokens}
    limits["max_loras"] = s.max_loras
    out = {**pool_info(predictor.adapters), "limits": limits,
           "runtime_lora_updating": s.allow_runtime_lora_updating}
    for entry in [out, *out["adapters"]]:
        name = entry.get("name") or out["default_adapter"]
        if name in predictor.adapters.engines:
            engine = predictor.resolve(name)
            entry["routes"] = served_routes(engine)
            if not engine.task.generative:  # what keeps its decisions honest after deployment
                online, drift = predictor.monitors.online_state(engine), predictor.monitors.drift_tests(engine)
                entry["online_conformal"] = online.info() if online is not None else (
                    {"state": "waiting for the calibration"} if engine.cfg.conformal_online else {"state": "off"})
                entry["drift"] = drift.info() if drift is not None else None
    return out


def served_routes(engine: TFBEngine) -> list[str]:
    """The routes that answer for ``engine``'s adapter: classification (not a generative adapter's),
    and generation (chat only with a chat template in the tokenizer)."""
    classify = [] if engine.task.generative else ["/predict", "/classify", "/v1/classify"]
    routes = [*classify, "/v1/completions", "/invocations", "/tokenize", "/detokenize"]
    if getattr(engine.classifier.tokenizer, "chat_template", None):
        routes.append("/v1/chat/completions")
    return routes


@router.get("/metrics", tags=["probes"], dependencies=[Depends(require_metrics_key)],
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics (text format)."""
    state.metrics.refresh_recent()
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)
