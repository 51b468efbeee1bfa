"""The engine the CLI and the server share: load, obtain sigma (fixed, cache or search), predict.

    engine = TFBEngine.load(EngineConfig(model=ModelConfig(...), task="sst2"))
    engine.predict([{"sentence": "a gripping film"}], n_samples=10, seed=0)
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tfb_core import __version__, cache
from tfb_core.batch import BatchRequest, ClassIds, ForwardHook, run_batch, warm_up
from tfb_core.bayes.posterior import NoiseDraw
from tfb_core.calibrate import CalibrationData, CalibrationRun
from tfb_core.config import DEFAULT_MODEL, ModelConfig, PosteriorConfig, SearchConfig
from tfb_core.data.jsonl import read_jsonl
from tfb_core.data.loading import LoadError, default_cache_dir, load_classifiers
from tfb_core.data.published import PublishedError, reference_anchor, task_dataset
from tfb_core.data.published import parse as parse_published
from tfb_core.data.tasks import Record, Task, TaskError, get_task
from tfb_core.decide.conformal import SCORES, Calibration
from tfb_core.decide.uncertainty import summarize
from tfb_core.forward.classifier import BayesianClassifier
from tfb_core.forward.layout import Job, rows_of
from tfb_core.search import SearchResult, check_result, search_sigma

log = logging.getLogger(__name__)

#: The bundled demo adapter (an MLE LoRA for SST-2 on the embedded default model).
DEMO_ADAPTER = Path(__file__).parent / "adapters" / "sst2-mle"
#: what an adapter folder may carry beside its weights: its anchor set and its calibration set
ANCHOR_FILE = "anchor.jsonl"
CALIBRATION_FILE = "calibration.jsonl"
DEMO_ANCHOR = DEMO_ADAPTER / ANCHOR_FILE
#: the 272 labelled SST-2 sentences neither the adapter nor the sigma search saw (its held-out test
#: part, scripts/demo_calibration.py): the demo's calibration set for prediction sets and abstention
DEMO_CALIBRATION = DEMO_ADAPTER / CALIBRATION_FILE
NO_CALIBRATION = ("no labelled calibration data: set TFB_CALIBRATION (or TFB_CALIBRATION_SPLIT, to hold out part "
                  "of a labelled anchor)")


@dataclass(frozen=True)
class EngineConfig:
    """Everything :class:`TFBEngine` needs. ``sigma=None``: from the cache or a search on ``anchor``.

    ``published`` (``method/dataset/seed``) names one of the published TFB adapters: it sets the
    adapter, the base model (unless another is given, e.g. a local copy) and the task, and without
    ``anchor`` the search runs on the reference anchor set of its data set.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    published: str | None = None
    task: str | None = None
    labels: tuple[str, ...] | None = None
    sigma: float | None = None
    anchor: str | None = None
    search: SearchConfig = field(default_factory=SearchConfig)
    d_floor: float = 1e-6
    n_samples: int = 10
    seed: int = 0
    max_rows: int = 64
    #: fixed cost of a forward in prompt tokens, and most tokens per forward, for planning forwards
    #: by length (None: by device)
    forward_overhead_tokens: float | None = None
    max_batch_tokens: float | None = None
    #: labelled JSON Lines for conformal sets and abstention (None: a split of a labelled anchor)
    calibration: str | None = None
    #: fraction of a labelled anchor held out from the sigma search for calibration when no
    #: calibration file is given and sigma is searched (0, the default: sigma is searched on all of
    #: the anchor, as the reference does, and there is no calibration unless a file is given)
    calibration_split: float = 0.0
    conformal_score: str = "lac"
    conformal_mondrian: bool = False
    risk_delta: float = 0.1

    def __post_init__(self) -> None:
        if self.published is not None:
            spec = parse_published(self.published)  # PublishedError (a ValueError) listing the valid names
            if self.model.adapter is not None and (self.model.adapter, self.model.adapter_subfolder) != (
                    spec.repo, spec.subfolder):
                raise ValueError(f"published adapter {spec.name!r} and adapter {self.model.adapter!r} both given: "
                                 "name one (--published, or --adapter with --adapter-subfolder)")
            if self.task is not None and self.task.lower() not in (spec.task, spec.dataset.lower()):
                raise ValueError(f"published adapter {spec.name!r} is for task {spec.task!r}, got task {self.task!r}")
        if not 0.0 <= self.calibration_split < 1.0:
            raise ValueError(f"calibration_split must be in [0, 1), got {self.calibration_split}")
        if self.conformal_score not in SCORES:
            raise ValueError(f"conformal_score must be one of {SCORES}, got {self.conformal_score!r}")
        if not 0.0 < self.risk_delta < 1.0:
            raise ValueError(f"risk_delta must be in (0, 1), got {self.risk_delta}")
        if self.sigma is not None:
            PosteriorConfig(sigma=self.sigma, d_floor=self.d_floor)  # validates
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")
        if self.forward_overhead_tokens is not None and not self.forward_overhead_tokens >= 0:
            raise ValueError(f"forward_overhead_tokens must be >= 0, got {self.forward_overhead_tokens}")
        if self.max_batch_tokens is not None and not self.max_batch_tokens >= 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}")

    def with_defaults(self) -> EngineConfig:
        """Fill in the embedded default: the small real model, the demo adapter, its task and anchor.

        An adapter folder may carry its own ``anchor.jsonl`` and ``calibration.jsonl`` beside its
        weights: they are the defaults of its anchor (when sigma is not fixed) and calibration,
        wherever the folder is named from (the demo adapter's, by the default or by its path, also
        set the task, sst2)."""
        changes: dict[str, Any] = {}
        model = self.model
        if self.published is not None:
            spec = parse_published(self.published)
            base = spec.base_model if model.model == DEFAULT_MODEL else model.model
            model = ModelConfig(**{**asdict(model), "model": base, "adapter": spec.repo,
                                   "adapter_subfolder": spec.subfolder})
            changes.update(model=model, task=spec.task)
        if model.adapter is None and model.model == DEFAULT_MODEL:
            model = ModelConfig(**{**asdict(model), "adapter": str(DEMO_ADAPTER)})
            changes["model"] = model
        folder = local_adapter_folder(model)
        if folder is not None:
            if folder.resolve() == DEMO_ADAPTER.resolve() and self.task is None and self.labels is None:
                changes["task"] = "sst2"
            if self.anchor is None and self.sigma is None and (folder / ANCHOR_FILE).is_file():
                changes["anchor"] = str(folder / ANCHOR_FILE)
            if self.calibration is None and self.calibration_split == 0.0 and (folder / CALIBRATION_FILE).is_file():
                changes["calibration"] = str(folder / CALIBRATION_FILE)
        return EngineConfig(**{**self.__dict__, **changes}) if changes else self


def local_adapter_folder(model: ModelConfig) -> Path | None:
    """The local folder of ``model``'s adapter (its subfolder), or None (a hub id, none)."""
    if not model.adapter:
        return None
    folder = Path(model.adapter).expanduser() / (model.adapter_subfolder or "")
    return folder if folder.is_dir() else None


def anchor_prompts(task: Task, records: Sequence[Record], path: str = "anchor") -> tuple[list[str], torch.Tensor | None]:
    """(prompts, true classes or None) of an anchor set; labels are used only if every record has one."""
    prompts, targets = [], []
    for i, rec in enumerate(records, 1):
        try:
            prompts.append(task.format(rec))
            targets.append(task.target(rec))
        except TaskError as exc:
            raise LoadError(f"{path}: record {i}: {exc}") from exc
    labelled = all(t is not None for t in targets)
    return prompts, (torch.tensor(targets) if labelled else None)


def split_anchor(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(search indices, calibration indices): a seeded random ``fraction`` of n held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(round(n * fraction))
    return sorted(perm[k:]), sorted(perm[:k])


class TFBEngine:
    """A Bayesianized classifier with its task, sigma, and default Monte Carlo noise."""

    NOISE_CACHE = 3  # draws kept for reuse

    def __init__(self, cfg: EngineConfig, classifier: BayesianClassifier, task: Task, sigma: float,
                 sigma_source: str, search_result: SearchResult | None = None) -> None:
        self.cfg = cfg
        self.classifier = classifier
        self.task = task
        self.sigma = sigma
        self.sigma_source = sigma_source
        self.search_result = search_result
        #: the adapter's name where several are served on one base model
        self.name = "default"
        classifier.truncate = task.truncate
        #: conformal sets and abstention thresholds' data (None: no labelled calibration data, or
        #: not yet: see calibration_run)
        self.calibration: Calibration | None = None
        #: the calibration still to compute, when it was left to run in the background
        self.calibration_run: CalibrationRun | None = None
        self._noise: OrderedDict[int, NoiseDraw] = OrderedDict()
        #: class-token ids of request label sets other than the task's (generic task)
        self.class_ids = ClassIds()
        #: tokens of the task's instruction (what the prompts of any two inputs share; 0: none), run
        #: once per posterior sample and reused by every forward
        self.prompt_prefix = classifier.shared_prefix(
            classifier.tokenize([task.format(task.placeholder(t)) for t in ("alpha", "omega")]))

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: EngineConfig, progress: bool = True, background_calibration: bool = False) -> TFBEngine:
        return cls.load_many([("default", cfg)], progress, background_calibration)[0]

    @classmethod
    def load_many(cls, named: Sequence[tuple[str, EngineConfig]], progress: bool = True,
                  background_calibration: bool = False) -> list[TFBEngine]:
        """One engine per named adapter, all on one base model (loaded once): each with its own task,
        sigma (fixed, from the cache, or its own search) and calibration (``background_calibration``:
        one not in the cache is left to run later, :attr:`TFBEngine.calibration_run`). The adapters
        must agree on the base model's settings (:data:`tfb_core.data.loading.BASE_FIELDS`)."""
        if not named:
            raise LoadError("no adapter to serve")
        prepared = [_named(name, len(named), cls._prepare, cfg) for name, cfg in named]
        floors = {cfg.d_floor for cfg, _ in prepared}
        if len(floors) > 1:
            raise LoadError(f"adapters on one base model must share d_floor, got {sorted(floors)}")
        clfs = load_classifiers([cfg.model for cfg, _ in prepared], [task.labels for _, task in prepared],
                                PosteriorConfig(d_floor=prepared[0][0].d_floor))
        engines = []
        for (name, _), (cfg, task), clf in zip(named, prepared, clfs, strict=True):
            engine = _named(name, len(named), cls._finish, cfg, task, clf, progress, background_calibration)
            engine.name = name
            engines.append(engine)
        return engines

    @classmethod
    def _prepare(cls, cfg: EngineConfig) -> tuple[EngineConfig, Task]:
        """The config with its defaults and the task; the reference anchor fetched before any model."""
        cfg = cfg.with_defaults()
        try:
            task = get_task(cfg.task, cfg.labels)
        except TaskError as exc:
            raise LoadError(str(exc)) from exc
        if cfg.sigma is None and not cfg.anchor and (cfg.published or task_dataset(task.name)):
            # the reference anchor before the model: offline without it, start-up fails in seconds
            cfg = EngineConfig(**{**cfg.__dict__, "anchor": str(cls.default_anchor(cfg, task))})
        return cfg, task

    @classmethod
    def _finish(cls, cfg: EngineConfig, task: Task, clf: BayesianClassifier, progress: bool,
                background: bool = False) -> TFBEngine:
        """The engine of one loaded adapter: sigma (fixed, cache or search) and its calibration."""
        clf.forward_overhead_tokens = cfg.forward_overhead_tokens
        clf.truncate = task.truncate  # before the anchor is tokenized
        clf.max_batch_tokens = cfg.max_batch_tokens
        cal = cls._calibration_file(cfg, task, clf)
        if cfg.sigma is not None:
            if cal is None and cfg.anchor:  # the anchor was not used to fit sigma: all of it calibrates
                cal = anchor_prompts(task, read_jsonl(cfg.anchor), cfg.anchor) + (f"anchor {cfg.anchor}",)
            return cls(cfg, clf, task, cfg.sigma, "fixed").calibrated(cal, background=background)
        if not cfg.anchor:  # no reference anchor either: default_anchor raises, saying what to give
            cfg = EngineConfig(**{**cfg.__dict__, "anchor": str(cls.default_anchor(cfg, task))})
        prompts, targets = anchor_prompts(task, read_jsonl(cfg.anchor), cfg.anchor)
        try:
            clf.tokenize(prompts)
        except ValueError as exc:
            raise LoadError(f"anchor file {cfg.anchor!r}: {exc}") from exc
        if cal is None and targets is not None and cfg.calibration_split > 0 and len(prompts) >= 4:
            # sigma is fitted on the anchor: the conformal step needs inputs the search did not see
            keep, held = split_anchor(len(prompts), cfg.calibration_split, cfg.seed)
            cal = ([prompts[i] for i in held], targets[held],
                   f"anchor {cfg.anchor}: {len(held)} of {len(prompts)} held out of the sigma search (seed {cfg.seed})")
            prompts, targets = [prompts[i] for i in keep], targets[keep]
        if cfg.search.criterion == "accuracy" and targets is None:
            raise LoadError(f"criterion 'accuracy' needs labels on every record of {cfg.anchor!r}")
        key = cls.cache_key(cfg, clf, task, prompts, targets)
        cache_dir = default_cache_dir(cfg.model.cache_dir)
        result = cache.load(cache_dir, key, check=lambda r: check_result(r, cfg.search))
        if result is not None:
            log.info("sigma=%.6g from cache %s", result.sigma, cache.cache_path(cache_dir, key))
            return cls(cfg, clf, task, result.sigma, "cache", result).calibrated(cal, key, background)
        log.info("searching sigma on %d anchor inputs (%s <= %g, N=%d)", len(prompts), cfg.search.criterion,
                 cfg.search.tolerance, cfg.search.n_samples)
        result = search_sigma(clf, prompts, cfg.search, targets, progress=progress, max_rows=cfg.max_rows)
        # the search's prefixes were computed with its own draws and sigmas, none of which serving
        # uses: free them now (GPU memory on a large model), not when traffic evicts them
        clf.prefix_cache.clear()
        path = cache.save(cache_dir, key, result)
        log.info("sigma=%.6g searched in %.1fs, cached at %s", result.sigma, result.seconds, path)
        return cls(cfg, clf, task, result.sigma, "search", result).calibrated(cal, key, background)

    @staticmethod
    def _calibration_file(cfg: EngineConfig, task: Task, clf: BayesianClassifier
                          ) -> tuple[list[str], torch.Tensor | None, str] | None:
        """(prompts, labels, source) of ``cfg.calibration``; every record must carry a label."""
        if not cfg.calibration:
            return None
        prompts, targets = anchor_prompts(task, read_jsonl(cfg.calibration, what="calibration file"), cfg.calibration)
        if targets is None:
            raise LoadError(f"calibration file {cfg.calibration!r}: every record needs a label")
        try:
            clf.tokenize(prompts)
        except ValueError as exc:
            raise LoadError(f"calibration file {cfg.calibration!r}: {exc}") from exc
        return prompts, targets, f"file {cfg.calibration}"

    def calibrated(self, cal: tuple[list[str], torch.Tensor | None, str] | None,
                   sigma_key: dict[str, Any] | None = None, background: bool = False) -> TFBEngine:
        """The :class:`Calibration` of labelled ``cal`` under this engine's sigma and default samples:
        from the cache, else computed now, or (``background``) left as :attr:`calibration_run` for
        the server to run between its batches. Returns self."""
        if cal is None or cal[1] is None:
            return self
        prompts, targets, source = cal
        cfg = self.cfg
        # the data are identified by their content, not by where they were read from (``source``, shown
        # in /info, is not in the key): the same records under another path reuse the calibration
        key = {"sigma_key": sigma_key or self.cache_key(cfg, self.classifier, self.task, [], None),
               "sigma": self.sigma, "n_samples": cfg.n_samples, "seed": cfg.seed,
               "calibration_sha256": cache.sha256_text(list(prompts) + [str(targets.tolist())])}
        cache_dir = default_cache_dir(cfg.model.cache_dir)
        data = cache.load_json(cache_dir, key, "calibration")
        if data is not None:
            try:
                self.calibration = replace(Calibration.from_dict(data), source=source)
                return self
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("calibration cache unreadable (%s); recomputing", exc)
        # a few inputs a step: one step is one forward of at most max_rows rows
        chunk = max(1, cfg.max_rows // rows_of(cfg.n_samples, self.sigma))

        def forward(chunk: list[str]) -> torch.Tensor:  # (k, N, C)
            return self.classifier.sample_probs(chunk, cfg.n_samples, sigma=self.sigma,
                                                noise=self.noise(cfg.seed, cfg.n_samples), max_rows=cfg.max_rows,
                                                prefix=self.prompt_prefix or None)

        def done(calibration: Calibration) -> None:
            self.calibration = calibration

        run = CalibrationRun(CalibrationData(prompts, targets, source, cfg.n_samples, cfg.seed), forward, done, key,
                             cache_dir, chunk)
        if background:
            self.calibration_run = run
            log.info("calibration on %d labelled inputs (%s) runs in the background", len(prompts), source)
        else:
            run.run()
        return self

    @staticmethod
    def default_anchor(cfg: EngineConfig, task: Task) -> Path:
        """The reference anchor file of the published adapter's data set, or of a named task's."""
        dataset = parse_published(cfg.published).dataset if cfg.published else task_dataset(task.name)
        if dataset is None:
            hint = (" (WinoGrande: its training sets S and M differ; name the adapter with --published, e.g. "
                    "mle/winogrande_s/1)" if task.name == "winogrande" else "")
            raise LoadError("sigma is not set: give a fixed sigma, or an anchor file to search it on" + hint)
        cache_dir = default_cache_dir(cfg.model.cache_dir)
        try:
            return reference_anchor(dataset, cache_dir)
        except PublishedError as exc:
            raise LoadError(str(exc)) from exc

    @staticmethod
    def cache_key(cfg: EngineConfig, clf: BayesianClassifier, task: Task, prompts: Sequence[str],
                  targets: torch.Tensor | None) -> dict[str, Any]:
        """Everything a search result depends on (TFB.md section 3).

        The adapter is identified by what it computes: its modules' names, scalings and A', B'
        tensors, not by where it was read from (a moved folder or a hub snapshot of the same
        weights reuses the search; other weights at the same path do not)."""
        m = cfg.model
        tensors = [t for mod in clf.posterior.modules for t in (mod.lora_A, mod.lora_B)]
        modules = [f"{mod.name}:{mod.scaling!r}" for mod in clf.posterior.modules]
        model_config = getattr(clf.model, "config", None)
        return {
            "code_sha256": cache.code_sha256(),  # the code that computes it, not the package version
            "base_model": m.model, "model_revision": m.model_revision, "model_subfolder": m.model_subfolder,
            "gguf_file": m.gguf_file,
            "base_config": cache.sha256_text([model_config.to_json_string()]) if model_config is not None else None,
            "adapter_modules": cache.sha256_text(modules), "adapter_sha256": cache.tensors_sha256(tensors),
            "dtype": m.dtype, "device_type": torch.device(m.device).type, "load_in_8bit": m.load_in_8bit,
            "task": task.name, "labels": list(task.labels), "max_length": m.max_length, "truncate": task.truncate,
            "anchor_sha256": cache.sha256_text(list(prompts) + ([str(targets.tolist())] if targets is not None else [])),
            "search": asdict(cfg.search), "d_floor": cfg.d_floor,
        }

    # --- prediction ---------------------------------------------------------------------------
    def noise(self, seed: int, n_samples: int) -> NoiseDraw | None:
        """The standard-normal draw of ``seed`` with at least ``n_samples`` samples.

        The last few draws are kept (the configured seed's always): a draw is
        N x sum(r x in) numbers, about 0.3 GB in bf16 for N = 64 on Llama-3.1-8B with 65 modules.
        """
        if self.sigma == 0.0:
            return None
        draw = self._noise.get(seed)
        if draw is None or draw.n_samples < n_samples:
            draw = self.classifier.posterior.draw(seed, max(n_samples, self.cfg.n_samples))
            self._noise[seed] = draw
            while len(self._noise) > self.NOISE_CACHE:  # evict the oldest, never the configured seed's
                del self._noise[next(k for k in self._noise if k != self.cfg.seed)]
        self._noise.move_to_end(seed)
        return draw

    def rows(self, n_inputs: int, n_samples: int) -> int:
        """Rows of a forward that ``n_inputs`` inputs of N samples take (N each, 1 at sigma = 0)."""
        return n_inputs * rows_of(n_samples, self.sigma)

    def run_batch(self, requests: Sequence[BatchRequest], max_rows: int,
                  on_forward: ForwardHook | None = None) -> list[torch.Tensor | Exception]:
        """Many callers' requests in shared forwards of at most ``max_rows`` rows: per request its
        (B_i, N_i, C) per-sample probabilities, or the error it alone gets (:func:`tfb_core.batch.run_batch`)."""
        return run_batch(self, requests, max_rows, on_forward)

    def warm_up(self, max_rows: int) -> float | None:
        """First forwards (and the measured fixed cost of a forward): :func:`tfb_core.batch.warm_up`."""
        return warm_up(self, max_rows)

    def format_inputs(self, inputs: Sequence[str | Record]) -> list[str]:
        """Prompts of the inputs; raises ``TaskError`` naming the bad input's position."""
        prompts = []
        for i, x in enumerate(inputs):
            try:
                prompts.append(self.task.format(x))
            except TaskError as exc:
                raise TaskError(f"input {i}: {exc}", param="inputs") from exc
        return prompts

    def predict(self, inputs: Sequence[str | Record], n_samples: int | None = None, seed: int | None = None,
                return_samples: bool = False, alpha: float | None = None,
                max_risk: float | None = None) -> dict[str, Any]:
        """Predictions for inputs (prompt strings, or records with the task's fields), as JSON-able data."""
        n = n_samples or self.cfg.n_samples
        seed = self.cfg.seed if seed is None else seed
        self.check_conformal(alpha, max_risk, n, seed)  # before the forward
        noise = self.noise(seed, n)
        probs = self.classifier.sample_probs(self.format_inputs(inputs), n, sigma=self.sigma, noise=noise,
                                             max_rows=self.cfg.max_rows, prefix=self.prompt_prefix or None)  # (B, N, C)
        return self.response(probs, return_samples, alpha, max_risk, seed=seed)

    def check_conformal(self, alpha: float | None, max_risk: float | None, n_samples: int | None = None,
                        seed: int | None = None) -> None:
        """Raise ``TaskError`` (a 4xx, its ``param`` the field asked) if a request asks for sets or
        abstention without calibration data (:class:`CalibrationPendingError`, a 503, while it is still
        being computed), or at posterior samples ``n_samples`` or a ``seed``
        (None: the calibration's) other than those the calibration was computed at.

        N and the seed are part of the score function (the mean of N sampled probabilities): the
        calibration's quantiles and Learn-then-Test counts are valid for that function only (at
        N = 1, sets calibrated at N = 10 cover less than 1 - alpha). At sigma = 0 every sample is
        the mean, so neither changes the scores and any is accepted.
        """
        if alpha is None and max_risk is None:
            return
        asked = "alpha" if alpha is not None else "max_risk"
        cal = self.calibration
        if cal is None:
            if self.calibration_run is not None:
                raise self.calibration_run.pending_error(asked)
            raise TaskError(f"{asked}: prediction sets and abstention are off ({NO_CALIBRATION})", param=asked)
        if self.sigma == 0.0:
            return
        other = ([f"n_samples={n_samples}"] if n_samples is not None and n_samples != cal.n_samples else []) + (
            [f"seed={seed}"] if seed is not None and seed != cal.seed else [])
        if other:
            raise TaskError(f"{asked}: the calibration was computed at n_samples={cal.n_samples}, seed={cal.seed} "
                            f"(TFB_N_SAMPLES, TFB_SEED); this request asks {' and '.join(other)}: no guarantee holds "
                            "for another score function; omit n_samples and seed, or set them to the calibration's",
                            param=asked)

    def response(self, sample_probs: torch.Tensor, return_samples: bool = False, alpha: float | None = None,
                 max_risk: float | None = None, labels: Sequence[str] | None = None,
                 seed: int | None = None) -> dict[str, Any]:
        """(B, N, C) per-sample probabilities (drawn with ``seed``, None: the configured one) -> the
        JSON shape of ``tfb predict`` and ``/predict``; with ``alpha`` each prediction gets its
        conformal ``prediction_set``, with ``max_risk`` its ``abstain`` flag (post-processing with
        the calibration: no other forward). ``labels``: the request's own label set the C classes
        are (None: the task's)."""
        u = summarize(sample_probs)
        labels = list(self.task.labels if labels is None else labels)
        if len(labels) != sample_probs.shape[-1]:
            raise ValueError(f"{sample_probs.shape[-1]} class probabilities for {len(labels)} labels {labels}")
        self.check_conformal(alpha, max_risk, int(sample_probs.shape[1]), self.cfg.seed if seed is None else seed)
        if (alpha is not None or max_risk is not None) and labels != list(self.task.labels):
            raise TaskError("alpha and max_risk need the configured labels (the calibration is for them), "
                            f"got labels {labels}", param="labels")
        extra: dict[str, Any] = {}
        sets = abstain = None
        if alpha is not None and self.calibration is not None:
            res = self.calibration.prediction_sets(u.probs, alpha, self.cfg.conformal_score, self.cfg.conformal_mondrian)
            sets = res.sets
            extra["conformal"] = {"alpha": alpha, "score": self.cfg.conformal_score,
                                  "mondrian": self.cfg.conformal_mondrian, "supported": res.supported}
            if not res.supported:
                extra["conformal"]["detail"] = self._unsupported_detail(alpha, labels)
        if max_risk is not None and self.calibration is not None:
            abstain, th = self.calibration.abstain(u.confidence, max_risk, self.cfg.risk_delta)
            extra["abstention"] = {"max_risk": max_risk, "delta": self.cfg.risk_delta,
                                   "threshold": th.threshold if th.supported else None, "supported": th.supported,
                                   "calibration_answered_fraction": th.answered_fraction}
            if not th.supported:
                extra["abstention"]["detail"] = (f"no confidence threshold certifies max_risk {max_risk} at delta "
                                                 f"{self.cfg.risk_delta} on {self.calibration.n} calibration inputs: "
                                                 "abstaining on everything")
        preds = []
        for b in range(sample_probs.shape[0]):
            item = {
                "label": labels[int(u.index[b])], "index": int(u.index[b]),
                "probs": [float(x) for x in u.probs[b]], "confidence": float(u.confidence[b]),
                "predictive_entropy": float(u.predictive_entropy[b]),
                "expected_entropy": float(u.expected_entropy[b]),
                "mutual_information": float(u.mutual_information[b]),
            }
            if sets is not None:
                item["prediction_set"] = [labels[c] for c in sets[b]]
            if abstain is not None:
                item["abstain"] = abstain[b]
            if return_samples:
                item["samples"] = [[float(x) for x in row] for row in sample_probs[b]]
            preds.append(item)
        return {"labels": labels, "sigma": self.sigma, "n_samples": int(sample_probs.shape[1]), "predictions": preds,
                **extra}

    def _unsupported_detail(self, alpha: float, labels: Sequence[str]) -> str:
        """Why some (or all) prediction sets hold labels regardless of the input, and which."""
        cal, score, mondrian = self.calibration, self.cfg.conformal_score, self.cfg.conformal_mondrian
        assert cal is not None
        if not mondrian:
            return (f"alpha {alpha} is below 1/(n+1) for {cal.n} calibration inputs: the sets hold every label")
        classes = cal.unsupported_classes(alpha, score, mondrian)
        counts = {labels[y]: len(cal.class_scores[score][y]) for y in classes}
        return (f"alpha {alpha} is below 1/(n_y+1) for the calibration inputs of classes {list(counts)} "
                f"(Mondrian, per class: n_y = {counts}): every set holds those labels")

    def info(self) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "published": self.cfg.published, "model": m.model, "model_revision": m.model_revision, "adapter": m.adapter,
            "adapter_subfolder": m.adapter_subfolder, "dtype": m.dtype, "device": m.device,
            "task": self.task.name, "labels": list(self.task.labels), "input_fields": list(self.task.fields),
            "sigma": self.sigma, "sigma_source": self.sigma_source, "anchor": self.cfg.anchor,
            "n_samples": self.cfg.n_samples,
            "seed": self.cfg.seed, "lora_modules": len(self.classifier.posterior.modules),
            "search": self.search_result.to_dict() if self.search_result else None,
            "calibration": self.calibration_info(),
            "version": __version__,
        }


    def calibration_info(self) -> dict[str, Any]:
        """/info's calibration: where it came from and what it certifies; or its progress; or why there is none."""
        if self.calibration is None:
            if self.calibration_run is not None:
                return self.calibration_run.info()
            return {"state": "off", "n": 0, "detail": NO_CALIBRATION}
        cal = self.calibration
        return {"state": "ready", "n": cal.n, "source": cal.source, "score": self.cfg.conformal_score,
                "mondrian": self.cfg.conformal_mondrian, "risk_delta": self.cfg.risk_delta,
                # the guarantees hold for requests at these (others asking alpha or max_risk: 422)
                "n_samples": cal.n_samples, "seed": cal.seed,
                "abstention": "Learn-then-Test on confidence, exact binomial p-values",
                "mean_predictive_entropy": cal.mean_predictive_entropy,
                "mean_mutual_information": cal.mean_mutual_information}


def check_names(names: Sequence[str]) -> None:
    """Adapter names must be unique: ``ValueError`` naming the repeated ones."""
    dup = sorted(n for n, count in Counter(names).items() if count > 1)
    if dup:
        raise ValueError(f"adapter names must be unique, repeated: {dup}")


def _named(name: str, count: int, fn: Any, *args: Any) -> Any:
    """``fn(*args)``; with several adapters, a start-up error says which adapter it is about."""
    try:
        return fn(*args)
    except (LoadError, ValueError, OSError) as exc:  # TaskError, DataError, PublishedError are ValueErrors
        if count < 2:
            raise
        raise LoadError(f"adapter {name!r}: {exc}") from exc


class UnknownAdapterError(KeyError):
    """A request named an adapter that is not served."""

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return str(self.args[0])


class AdapterPool:
    """Named engines (adapters) on one base model, the first the default: what a server serves.

    Each engine is one adapter's whole state (weights, sigma, task, posterior, calibration); the
    pool routes a request to its engine and runs every engine's requests in shared forwards.
    """

    def __init__(self, engines: Sequence[TFBEngine]) -> None:
        if not engines:
            raise ValueError("no adapter to serve")
        check_names([e.name for e in engines])
        self.engines: dict[str, TFBEngine] = {e.name: e for e in engines}
        self.default = engines[0]

    @classmethod
    def load(cls, named: Sequence[tuple[str, EngineConfig]], progress: bool = True,
             background_calibration: bool = False) -> AdapterPool:
        try:
            check_names([n for n, _ in named])  # before loading anything
        except ValueError as exc:
            raise LoadError(str(exc)) from None
        return cls(TFBEngine.load_many(named, progress, background_calibration))

    @property
    def names(self) -> list[str]:
        return list(self.engines)

    def get(self, name: str | None) -> TFBEngine:
        """The engine of adapter ``name`` (None: the default); :class:`UnknownAdapterError` naming the served ones."""
        if name is None:
            return self.default
        engine = self.engines.get(name)
        if engine is None:
            raise UnknownAdapterError(f"unknown adapter {name!r}: this server serves {self.names}")
        return engine

    def rows(self, n_inputs: int, n_samples: int, name: str | None = None) -> int:
        return self.get(name).rows(n_inputs, n_samples)

    def run_batch(self, requests: Sequence[BatchRequest], max_rows: int,
                  on_forward: ForwardHook | None = None) -> list[torch.Tensor | Exception]:
        """Requests of any adapter (``BatchRequest.engine``, None: the default) in shared forwards."""
        return run_batch(self.default, requests, max_rows, on_forward)

    def warm_up(self, max_rows: int) -> float | None:
        """The default adapter's warm-up (and measured forward cost: one base model, one cost for
        all), then one forward of each other adapter."""
        overhead = warm_up(self.default, max_rows)
        for engine in list(self.engines.values())[1:]:
            if engine.cfg.forward_overhead_tokens is None:
                engine.classifier.forward_overhead_tokens = self.default.classifier.forward_overhead_tokens
            tokens = engine.classifier.tokenize([engine.task.format(engine.task.placeholder("warm-up"))])[0]
            n = engine.cfg.n_samples
            engine.classifier.run_jobs([Job(tokens, n, engine.noise(engine.cfg.seed, n))], engine.sigma,
                                       prefix=engine.prompt_prefix or None)
        return overhead

    def info(self) -> dict[str, Any]:
        """The default adapter's :meth:`TFBEngine.info`, and every adapter's under ``adapters``."""
        return {**self.default.info(), "default_adapter": self.default.name,
                "adapters": [{"name": name, **e.info()} for name, e in self.engines.items()]}
