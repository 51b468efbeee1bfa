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
            slots, posterior, noise draws, kept prefixes and metric series are freed (the worker
            frees them once no queued or decoding request holds it); 200 after that.

The calibration of a runtime adapter runs in the background as at start-up (alpha and max_risk
answer 503 until it is done); with TFB_CALIBRATE_IN_BACKGROUND=false the adapter stays
"calibrating" (503) until it is done.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.classify import _ERRORS, OpenAIErrorRoute
from app.errors import ServingError
from app.routes import PredictorDep, StateDep
from app.settings import ADAPTER_NAME, AdapterFields, AdapterSpec
from app.state import AppState
from tfb_core.data.loading import is_local_adapter
from tfb_core.serving import runtime
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.gate import ForwardGate, GateClosedError
from tfb_core.serving.pool import RuntimeAdapter, UnknownAdapterError

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


class RuntimeLoras:
    """Loads and unloads of one app: the threads of its sigma searches and what frees an adapter."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    @property
    def _worker(self) -> Any:
        return self.state.worker

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
        if body.lora_name in pool.engines or (body.lora_name in pool.pending
                                              and pool.pending[body.lora_name].state != "failed"):
            raise LoraRequestError(f"The lora adapter '{body.lora_name}' has already been loaded.", param="lora_name")
        if pool.occupied() >= settings.max_loras:
            raise LoraRequestError(f"{pool.occupied()} adapters are served, the limit is {settings.max_loras} "
                                   "(TFB_MAX_LORAS): unload one first", param="lora_name")
        record = RuntimeAdapter(body.lora_name, cfg)
        pool.begin(record)
        background = settings.calibrate_in_background
        log.info("loading adapter %s from %s", record.name, cfg.model.adapter or cfg.published)
        try:
            prepared = await asyncio.to_thread(runtime.prepare, pool.default, record)
            if record.state != "loading":
                raise LoraRequestError(f"adapter {record.name!r} was unloaded while it loaded", param="lora_name")
            clf, engine = await self._worker.call(lambda: runtime.install(pool.default.classifier, prepared))
        except BaseException as exc:
            pool.forget(record)  # nothing was installed: the server is as it was, the name free
            log.warning("loading adapter %s failed: %s", record.name, exc)
            raise
        record.classifier = clf
        if engine is not None:
            self._serve(record, engine, background)
            return self._answer(record)
        gate = ForwardGate(on_queued=self._worker.wake)
        record.state, record.cancel = "searching", gate.close
        self._worker.add_background(gate.step, lambda: None, ready=gate.ready)
        record.gate = gate
        loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._search, args=(loop, record, prepared, clf, gate),
                                  name=f"tfb-sigma-search-{record.name}", daemon=True)
        thread.start()
        return self._answer(record)

    def _answer(self, record: RuntimeAdapter) -> tuple[int, dict[str, Any]]:
        ready = record.state == "ready"
        message = (f"Success: LoRA adapter '{record.name}' added successfully." if ready else
                   f"LoRA adapter '{record.name}' accepted: {record.state}; GET /info shows its progress")
        return (200 if ready else 202), {"lora_name": record.name, "state": record.state, "message": message}

    def _search(self, loop: asyncio.AbstractEventLoop, record: RuntimeAdapter, prepared: runtime.Prepared,
                clf: Any, gate: ForwardGate) -> None:
        """The sigma search, on its own thread; the outcome is settled on the event loop."""
        try:
            engine = runtime.search(prepared, clf, gate)
        except BaseException as exc:  # noqa: BLE001 -- every failure is the adapter's, shown in /info
            reason = str(exc) if isinstance(exc, GateClosedError) else f"sigma search: {type(exc).__name__}: {exc}"
            if not isinstance(exc, GateClosedError):
                log.exception("adapter %s: the sigma search failed", record.name)
            self._on_loop(loop, lambda: self._search_failed(record, reason))
            return
        finally:
            gate.close("the sigma search is over")
        self._on_loop(loop, lambda: self._searched(record, engine))

    @staticmethod
    def _on_loop(loop: asyncio.AbstractEventLoop, fn: Any) -> None:
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def _searched(self, record: RuntimeAdapter, engine: TFBEngine) -> None:
        if record.state != "searching":  # unloaded meanwhile: the unload frees it
            return
        self._serve(record, engine, self.state.settings.calibrate_in_background)

    def _search_failed(self, record: RuntimeAdapter, reason: str) -> None:
        if record.state != "searching":  # unloaded meanwhile (the unload closed the gate)
            return
        pool = self.state.require_predictor().adapters
        pool.fail(record, reason)
        log.error("adapter %s failed to load: %s", record.name, reason)
        clf = record.classifier
        self._worker.add_background(lambda: self._free(clf, None), lambda: None)

    def _serve(self, record: RuntimeAdapter, engine: TFBEngine, background: bool) -> None:
        """The adapter answers from now on (or once its calibration is done, if the server calibrates
        before serving)."""
        engine.name = record.name
        run = engine.calibration_run
        if run is not None and run.state == "running" and not background:
            record.state, record.engine = "calibrating", engine

            def calibrated() -> None:
                if record.state == "calibrating":
                    self._ready(record, engine)

            self._worker.add_background(run.step, calibrated)
            return
        self._ready(record, engine)

    def _ready(self, record: RuntimeAdapter, engine: TFBEngine) -> None:
        pool = self.state.require_predictor().adapters
        pool.ready(record, engine)
        self.state.serve_engine(engine)
        log.info("adapter %s ready in %.1fs: sigma=%.6g (%s)", record.name, time.monotonic() - record.started,
                 engine.sigma, engine.sigma_source)

    # --- unload -----------------------------------------------------------------------------------
    async def unload(self, body: UnloadLoraRequest) -> dict[str, Any]:
        pool = self.state.require_predictor().adapters
        try:
            record = pool.unlisted(body.lora_name)
        except UnknownAdapterError:
            raise LoraNotFoundError(f"The lora adapter '{body.lora_name}' cannot be found.",
                                    param="lora_name") from None
        except ValueError as exc:
            raise LoraRequestError(str(exc), param="lora_name") from None
        if record.cancel is not None:
            record.cancel(f"adapter {record.name!r} was unloaded")
        engine = record.engine
        run = engine.calibration_run if engine is not None else None
        if run is not None and run.state == "running":  # its next step does nothing
            run.state, run.error = "failed", f"adapter {record.name!r} was unloaded"
        clf = record.classifier if record.classifier is not None else (engine.classifier if engine else None)
        worker = self._worker
        try:
            if clf is not None:
                # once no queued or decoding request holds it: what it accepted is answered first (during
                # a drain too; 503 if the server stops first)
                await worker.call(lambda: self._free(clf, engine),
                                  ready=None if engine is None else (lambda: not worker.holds(engine)))
        finally:  # a failed free (500) or the shutdown (503): the name is free all the same, as before
            pool.forget(record)
            self.state.metrics.remove_adapter(record.name)
        log.info("adapter %s unloaded", record.name)
        return {"lora_name": record.name, "message": f"Success: LoRA adapter '{record.name}' removed successfully."}

    @staticmethod
    def _free(clf: Any, engine: TFBEngine | None) -> bool:
        """On the worker thread: the adapter's slots, posterior, prefixes and noise draws."""
        runtime.unload(clf, engine)
        return True


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
