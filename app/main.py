"""The app factory: ``uvicorn --factory app.main:create_app`` (or ``tfb serve``).

The lifespan starts the model worker, which loads the engine (model, adapter, sigma from the
cache or a search, a warm-up forward) on its own thread: /healthz answers at once, /readyz and
/predict answer 503 until the model is ready. A start-up failure is logged with its cause and
ends the process with status 1 (``TFB_EXIT_ON_STARTUP_FAILURE=false`` keeps it up, serving the
cause on /readyz). On shutdown, accepted requests are answered before the worker stops, within
TFB_DRAIN_TIMEOUT_S; past it they are answered 503 with Retry-After (``app.server`` starts the
clock at the signal). The API docs (/docs, /redoc, /openapi.json) are public, as the probes: they
describe the API and serve no data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app.classify import OPENAI_PATHS
from app.classify import router as classify_router
from app.errors import install_error_handlers
from app.generate import GENERATION_PATHS
from app.generate import router as generate_router
from app.lora_updates import PATHS as LORA_PATHS
from app.lora_updates import RuntimeLoras
from app.lora_updates import router as lora_router
from app.middleware import ServingMiddleware
from app.predictor import LabelStore
from app.routes import router
from app.settings import Settings
from app.state import AppState
from app.vllm_extra import PATHS as VLLM_EXTRA_PATHS
from app.vllm_extra import router as vllm_extra_router
from tfb_core import __version__


def _configure_logging(level: str) -> None:
    # Under plain `uvicorn --factory` nobody configures the root logger: the load's progress
    # and a start-up failure's cause must still reach the log.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_app(settings: Settings | None = None, feedback_store: LabelStore | None = None,
               shared_online: Any = None) -> FastAPI:
    """A new app with its own settings, registry, worker and state (``Settings()`` reads TFB_*).

    ``feedback_store``: where predictions wait for /feedback (default: this process's own, bounded
    by ``feedback_store_size``; the Ray app shares one across replicas); ``shared_online``: where the
    online prediction sets' state lives when several replicas share it (:mod:`app.online`)."""
    settings = settings or Settings()
    _configure_logging(settings.log_level)
    state = AppState(settings, feedback_store, shared_online)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.worker.start(asyncio.get_running_loop())
        yield
        await state.shutdown()

    app = FastAPI(title="tfb-serve", version=__version__, lifespan=lifespan,
                  description="Uncertainty-aware LLM classification: Training-Free Bayesianization of a LoRA "
                              "adapter. Predictions carry predictive entropy and mutual information; "
                              "POST /feedback feeds the calibration metrics.")
    app.state.tfb = state
    state.runtime_loras = RuntimeLoras(state)  # type: ignore[attr-defined]
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(classify_router)  # vLLM's classify API, errors in vLLM's body
    app.include_router(generate_router)  # OpenAI's completions and chat completions, errors in its body
    app.include_router(vllm_extra_router)  # vLLM's /invocations, /tokenize, /detokenize
    app.include_router(lora_router)  # vLLM's runtime LoRA updating (TFB_ALLOW_RUNTIME_LORA_UPDATING)
    openai_paths = OPENAI_PATHS | GENERATION_PATHS | VLLM_EXTRA_PATHS | LORA_PATHS
    app.add_middleware(ServingMiddleware, metrics=state.metrics, max_body_bytes=settings.max_body_bytes,
                       routes={getattr(r, "path", "") for r in router.routes} | {app.docs_url, app.openapi_url,
                                                                                  app.redoc_url} | openai_paths,
                       body_timeout_s=settings.body_timeout_s, expiry=state.expiry,
                       max_header_bytes=settings.max_header_bytes, openai_paths=openai_paths)
    return app
