"""vLLM's runtime LoRA updating: ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``.

Off unless TFB_ALLOW_RUNTIME_LORA_UPDATING (vLLM registers the routes only with
VLLM_ALLOW_RUNTIME_LORA_UPDATING; here they answer 404 naming the setting); behind the API key.

    load    body: vLLM's lora_name, lora_path; ours: the fields of a TFB_ADAPTERS entry
            ─ checks (local paths under TFB_ALLOWED_LOCAL_PATHS or the bundled adapters, name
              free, TFB_MAX_LORAS)                                    event loop
            ─ read: config, weights (peft on a meta skeleton), files   a thread: 400 naming the field
            ─ install into the model's forwards                        the model worker, between batches
            ─ sigma fixed or cached: ready, 200
            ─ else 202, state "searching": the search in its own thread, each forward run by the worker
              between serving batches (tfb_core.serving.gate); /info shows its progress; requests for
              it answer 503 with Retry-After until it is ready; a failed search frees the adapter and
              shows "failed" with the reason in /info (the name is then free to load again)
    unload  body: lora_name. From now on 404 for it; the requests it accepted are answered; then its
            slots, posterior, noise draws, kept prefixes (the classifier's and the decode's) and
            metric series are freed (the worker frees them once no queued or decoding request
            holds it); 200 after that. An unload that meets a load in flight ends it: the load
            answers 409 and whatever it installed is freed before the unload answers 200.

Every state and transition is :mod:`tfb_core.serving.lifecycle`'s; this module only asks it.

The calibration of a runtime adapter runs in the background as at start-up (alpha and max_risk
answer 503 until it is done); with TFB_CALIBRATE_IN_BACKGROUND=false the adapter stays
"calibrating" (503) until it is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.classify import _ERRORS, OpenAIErrorRoute
from app.errors import NotReadyError, ServingError
from app.routes import PredictorDep, StateDep
from app.settings import ADAPTER_NAME, AdapterFields, AdapterSpec
from app.state import AppState
from tfb_core.data.loading import is_local_adapter
from tfb_core.serving import runtime
from tfb_core.serving.lifecycle import AdapterBusyError, AdapterUnloadedError, UnknownAdapterError

log = logging.getLogger("app")

PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


class LoraRequestError(ServingError):
    """A load or unload request that cannot be done; ``param`` names the field."""

    status_code = 400


class LoraNotFoundError(ServingError):
    status_code = 404


class LoadLoraRequest(AdapterFields):
    """vLLM's ``LoadLoRAAdapterRequest`` and, optionally, what a ``TFB_ADAPTERS`` entry may set."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [
        {"lora_name": "sst2-copy", "lora_path": "/adapters/sst2-mle"},
        {"lora_name": "yes-no", "lora_path": "/adapters/qa", "labels": ["yes", "no"], "sigma": 0.01}]})

    lora_name: str = Field(pattern=ADAPTER_NAME, description="the adapter's name (``model``, /predict's ``adapter``)")
    lora_path: str | None = Field(None, description="peft LoRA folder or hub id (or give ``published``)")
    load_inplace: bool = Field(False, description="vLLM: replace a loaded adapter of that name (not supported "
                                                  "here: unload it first)")

    def spec(self) -> AdapterSpec:
        fields = self.model_dump(exclude={"lora_name", "lora_path", "load_inplace"}, exclude_none=True)
        return AdapterSpec(name=self.lora_name, adapter=self.lora_path, **fields)


def check_local_paths(body: LoadLoraRequest, roots: Sequence[Path]) -> None:
    """:class:`LoraRequestError` naming the field of a local path the load would read outside
    ``roots`` (symlinks and ``..`` resolved first), in the same words whether or not it exists: a
    client learns nothing of the server's files. A hub id (``lora_path``) is not a local path."""
    local = body.lora_path is not None and is_local_adapter(body.lora_path)
    sub = Path(body.adapter_subfolder or "")
    if not local and (sub.is_absolute() or ".." in sub.parts):  # a hub snapshot's subfolder stays inside it
        raise LoraRequestError(f"adapter_subfolder {body.adapter_subfolder!r}: a folder inside the adapter's",
                               param="adapter_subfolder")
    paths = {"lora_path": str(Path(body.lora_path or "") / sub) if local else None,
             "anchor": body.anchor, "calibration": body.calibration}
    for param, value in paths.items():
        if value is not None and not _under(value, roots):
            raise LoraRequestError(f"{param}: {value!r} is not under the folders this server reads adapters and "
                                   "files from (TFB_ALLOWED_LOCAL_PATHS)", param=param)


def _under(value: str, roots: Sequence[Path]) -> bool:
    try:
        path = Path(value).expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop: not a path under a root
        return False
    return any(path.is_relative_to(root) for root in roots)


class UnloadLoraRequest(BaseModel):
    """vLLM's ``UnloadLoRAAdapterRequest`` (``lora_int_id`` accepted and ignored)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class LoraConflictError(ServingError):
    """The adapter was unloaded while it loaded: the load ended and left nothing behind."""

    status_code = 409


class RuntimeLoras:
    """Loads and unloads of one app, asked of the pool's lifecycle (:mod:`tfb_core.serving.lifecycle`,
    the one owner of an adapter's state)."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    # --- load -------------------------------------------------------------------------------------
    async def load(self, body: LoadLoraRequest) -> tuple[int, dict[str, Any]]:
        predictor = self.state.require_predictor()
        pool, settings = predictor.adapters, self.state.settings
        if body.load_inplace:
            raise LoraRequestError("load_inplace is not supported: unload the adapter first", param="load_inplace")
        check_local_paths(body, settings.local_roots())
        try:
            spec = body.spec()
            cfg = settings.adapter_config(spec)
        except ValidationError as exc:  # a field of the entry (e.g. search_criterion)
            loc = next((e["loc"][0] for e in exc.errors() if e.get("loc")), "lora_path")
            raise LoraRequestError(f"adapter {body.lora_name!r}: {exc}"[:1000],
                                   param="lora_path" if loc == "adapter" else str(loc)) from None
        except ValueError as exc:
            text = str(exc)
            raise LoraRequestError(f"adapter {body.lora_name!r}: {text}"[:1000], param=getattr(exc, "param", None) or (
                "published" if "published" in text else "lora_path")) from None
        lifecycle = pool.lifecycle
        try:
            record = lifecycle.begin(body.lora_name, cfg, limit=settings.max_loras)
        except AdapterBusyError as exc:
            if exc.state is None:
                raise LoraRequestError(f"{pool.occupied()} adapters are served, the limit is {settings.max_loras} "
                                       "(TFB_MAX_LORAS): unload one first", param="lora_name") from None
            said = "has already been loaded" if exc.state != "unloading" else "is being unloaded: retry later"
            raise LoraRequestError(f"The lora adapter '{body.lora_name}' {said}.", param="lora_name") from None
        log.info("loading adapter %s from %s", record.name, cfg.model.adapter or cfg.published)
        try:
            prepared = await asyncio.to_thread(runtime.prepare, pool.default, record)
        except BaseException as exc:  # a bad file, or the client went away: nothing was installed
            lifecycle.abandon(record)
            log.warning("loading adapter %s failed: %s", record.name, exc)
            raise
        # from here the worker's install step does the rest even if this handler is cancelled
        try:
            state = await self.state.worker.call(lambda: lifecycle.install(record, prepared))
        except AdapterUnloadedError as exc:
            raise LoraConflictError(str(exc), param="lora_name") from None
        except Exception as exc:
            log.warning("loading adapter %s failed: %s", record.name, exc)
            raise
        ready = state == "ready"
        message = (f"Success: LoRA adapter '{record.name}' added successfully." if ready else
                   f"LoRA adapter '{record.name}' accepted: {state}; GET /info shows its progress")
        return (200 if ready else 202), {"lora_name": record.name, "state": state, "message": message}

    # --- unload -----------------------------------------------------------------------------------
    async def unload(self, body: UnloadLoraRequest) -> dict[str, Any]:
        pool = self.state.require_predictor().adapters
        done = asyncio.get_running_loop().create_future()

        def gone() -> None:
            if not done.done():
                done.set_result(None)

        try:
            record = pool.lifecycle.unload(body.lora_name, on_gone=gone)
        except UnknownAdapterError:
            raise LoraNotFoundError(f"The lora adapter '{body.lora_name}' cannot be found.",
                                    param="lora_name") from None
        except ValueError as exc:
            raise LoraRequestError(str(exc), param="lora_name") from None
        # once its load is over and no queued or decoding request holds it: what it accepted is answered
        # first (during a drain too); the worker stopped before the free: 503
        await done
        self.state.metrics.remove_adapter(record.name)
        self.state.monitors.remove(record.name)
        if record.state != "gone":
            raise NotReadyError(f"the server is shutting down: adapter {record.name!r} was not unloaded")
        log.info("adapter %s unloaded", record.name)
        return {"lora_name": record.name, "message": f"Success: LoRA adapter '{record.name}' removed successfully."}


router = APIRouter(route_class=OpenAIErrorRoute, tags=["vLLM-compatible"])


def _loras(state: StateDep) -> RuntimeLoras:
    if not state.settings.allow_runtime_lora_updating:
        raise LoraNotFoundError("runtime LoRA updating is off: set TFB_ALLOW_RUNTIME_LORA_UPDATING=true to serve "
                                "/v1/load_lora_adapter and /v1/unload_lora_adapter")
    return state.runtime_loras  # type: ignore[no-any-return]


@router.post("/v1/load_lora_adapter", responses=_ERRORS)
async def load_lora_adapter(body: LoadLoraRequest, state: StateDep, _: PredictorDep) -> JSONResponse:
    """Load a LoRA adapter (vLLM's API; TFB_ALLOW_RUNTIME_LORA_UPDATING): 200 once it answers (sigma
    given or cached), 202 while its sigma search runs in the background (GET /info: its state and
    progress)."""
    status, out = await _loras(state).load(body)
    return JSONResponse(out, status_code=status)


@router.post("/v1/unload_lora_adapter", responses=_ERRORS)
async def unload_lora_adapter(body: UnloadLoraRequest, state: StateDep, _: PredictorDep) -> JSONResponse:
    """Unload an adapter (vLLM's API): new requests for it get 404, those it accepted are answered,
    then its memory and metric series are freed."""
    return JSONResponse(await _loras(state).unload(body))
