"""Start-up of served adapters: the classifiers, what sigma is and where it came from, the calibration.

    load_engines([(name, cfg), ...])
      per adapter: the config's defaults, its task; the reference anchor fetched before any model
      one base model with every adapter, Bayesianized: a classifier each   (load_classifiers)
      per adapter: sigma fixed | from the cache | searched on the anchor    (plan_sigma, run_search, cache_key)
                   (a classifier: search.classifier's objective; a generative adapter: search.generation's,
                   on its own greedy answers to the anchor prompts)
                   the calibration from the cache | computed now | left to run in the background

The same plan / search / engine steps serve an adapter loaded at run time (serving.runtime); a
server leaves the search of an adapter other than the default to run in the background
(``load_adapters(..., search_later=True)``, then serving.lifecycle), as a runtime load's.

What runs once, before any request; the run time is :mod:`tfb_core.serving.engine`'s. The caches'
keys are everything a result depends on (:func:`cache_key`), so a changed adapter, anchor, setting
or computing module is searched or calibrated again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from tfb_core.config import ModelConfig, PosteriorConfig
from tfb_core.data.jsonl import read_jsonl
from tfb_core.data.loading import LoadError, base_mismatch, default_cache_dir, load_adapter, load_base_model
from tfb_core.data.published import PublishedError, reference_anchor, task_dataset
from tfb_core.data.published import parse as parse_published
from tfb_core.data.tasks import Record, Task, TaskError, class_token_ids, get_task
from tfb_core.decide.conformal import Calibration
from tfb_core.forward.classifier import BayesianClassifier
from tfb_core.forward.generator import BayesianGenerator
from tfb_core.forward.layout import rows_of
from tfb_core.search import cache
from tfb_core.search.classifier import search_sigma
from tfb_core.search.generation import Anchor, make_anchors, read_anchor, search_generation_sigma
from tfb_core.search.strategy import SearchResult
from tfb_core.serving.calibrate import CalibrationData, CalibrationRun
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.risk import calibrate_generation

log = logging.getLogger(__name__)

#: labelled prompts to calibrate on: (prompts, true classes or None, where they came from)
CalibrationSet = tuple[list[str], torch.Tensor | None, str]
T = TypeVar("T")


# --- the classifiers ---------------------------------------------------------------------------
def load_classifier(cfg: ModelConfig, labels: Sequence[str], posterior: PosteriorConfig | None = None
                    ) -> BayesianClassifier:
    """Base model + adapter, Bayesianized, ready to classify with ``labels``."""
    return load_classifiers([cfg], [labels], posterior)[0]


def load_classifiers(cfgs: Sequence[ModelConfig], labels: Sequence[Sequence[str]],
                     posterior: PosteriorConfig | None = None) -> list[BayesianClassifier]:
    """One base model with every adapter of ``cfgs`` (which must agree on
    :data:`~tfb_core.data.loading.BASE_FIELDS`), Bayesianized: a classifier per adapter, all sharing the base."""
    if not cfgs:
        raise LoadError("no adapter to load")
    first = cfgs[0]
    if bad := base_mismatch(cfgs):
        cfg, f = cfgs[bad[0]], bad[1]
        raise LoadError(f"adapters on one base model must share its settings: {f} is {getattr(first, f)!r} "
                        f"for adapter {first.adapter!r} and {getattr(cfg, f)!r} for adapter {cfg.adapter!r}")
    posterior = posterior or PosteriorConfig()
    tokenizer, model = load_base_model(first)
    for these in labels:
        try:
            class_token_ids(tokenizer, these)
        except TaskError as exc:  # the labels do not fit the tokenizer: not the adapter's fault
            raise LoadError(f"labels {list(these)} with the tokenizer of {first.model!r}: {exc}") from exc
    names = [f"tfb{i}" for i in range(len(cfgs))]  # peft's keys (module names: no dots)
    for cfg, name in zip(cfgs, names, strict=True):
        model = load_adapter(model, cfg, name)
    try:
        clfs = BayesianClassifier.from_peft_many(model, tokenizer, names, labels, d_floor=posterior.d_floor,
                                                 max_length=first.max_length)
    except ValueError as exc:
        raise LoadError(f"adapter {', '.join(repr(c.adapter) for c in cfgs)}: {exc}") from exc
    for cfg, clf in zip(cfgs, clfs, strict=True):
        if all(float(m.d.max()) == 0.0 for m in clf.posterior.modules):
            log.warning("adapter %s has B = 0 everywhere (untrained?): TFB adds no uncertainty to it", cfg.adapter)
    return clfs


# --- the engines -------------------------------------------------------------------------------
def load_engine(cfg: EngineConfig, progress: bool = True, background_calibration: bool = False) -> TFBEngine:
    """The engine of one adapter (:func:`load_engines`)."""
    return load_engines([("default", cfg)], progress, background_calibration)[0]


def load_engines(named: Sequence[tuple[str, EngineConfig]], progress: bool = True,
                 background_calibration: bool = False) -> list[TFBEngine]:
    """One engine per named adapter, all on one base model (loaded once): each with its own task,
    sigma (fixed, from the cache, or its own search) and calibration (``background_calibration``:
    one not in the cache is left to run later, :attr:`TFBEngine.calibration_run`). The adapters
    must agree on the base model's settings (:data:`tfb_core.data.loading.BASE_FIELDS`)."""
    return load_adapters(named, progress, background_calibration)  # type: ignore[return-value]


@dataclass
class Unsearched:
    """An adapter loaded with the others whose sigma search is left to run later (a server's, in
    the background: :meth:`tfb_core.serving.lifecycle.Lifecycle.adopt`)."""

    name: str
    plan: SigmaPlan
    classifier: BayesianClassifier


def load_adapters(named: Sequence[tuple[str, EngineConfig]], progress: bool = True,
                  background_calibration: bool = False, search_later: bool = False
                  ) -> list[TFBEngine | Unsearched]:
    """:func:`load_engines`; with ``search_later``, an adapter other than the first (the default)
    whose sigma must be searched is planned but not searched: :class:`Unsearched` in its place."""
    if not named:
        raise LoadError("no adapter to serve")
    prepared = [_named(name, len(named), prepare_config, cfg) for name, cfg in named]
    floors = {cfg.d_floor for cfg, _ in prepared}
    if len(floors) > 1:
        raise LoadError(f"adapters on one base model must share d_floor, got {sorted(floors)}")
    clfs = load_classifiers([cfg.model for cfg, _ in prepared], [task.labels for _, task in prepared],
                            PosteriorConfig(d_floor=prepared[0][0].d_floor))
    out: list[TFBEngine | Unsearched] = []
    for i, ((name, _), (cfg, task), clf) in enumerate(zip(named, prepared, clfs, strict=True)):
        plan = _named(name, len(named), plan_sigma, cfg, task, clf)
        if search_later and i > 0 and plan.source == "search":
            out.append(Unsearched(name, plan, clf))
            continue
        engine = _named(name, len(named), finish_engine, plan, clf, progress, background_calibration)
        engine.name = name
        out.append(engine)
    return out


def _named(name: str, count: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``; with several adapters, a start-up error says which adapter it is about."""
    try:
        return fn(*args)
    except (LoadError, ValueError, OSError) as exc:  # TaskError, DataError, PublishedError are ValueErrors
        if count < 2:
            raise
        raise LoadError(f"adapter {name!r}: {exc}") from exc


def prepare_config(cfg: EngineConfig) -> tuple[EngineConfig, Task]:
    """The config with its defaults and the task; the reference anchor fetched before any model."""
    cfg = cfg.with_defaults()
    try:
        task = get_task(cfg.task, cfg.labels)
    except TaskError as exc:
        raise LoadError(str(exc)) from exc
    if cfg.sigma is None and not cfg.anchor and (cfg.published or task_dataset(task.name)):
        # the reference anchor before the model: offline without it, start-up fails in seconds
        cfg = EngineConfig(**{**cfg.__dict__, "anchor": str(default_anchor(cfg, task))})
    return cfg, task


@dataclass
class SigmaPlan:
    """What an adapter's sigma and calibration need, read before any forward (:func:`plan_sigma`):
    the config (its anchor filled in), the calibration set, the anchor prompts the search runs on
    and their cache key, and the result if sigma is fixed (None) or cached."""

    cfg: EngineConfig
    task: Task
    cal: CalibrationSet | None
    prompts: list[str] = field(default_factory=list)
    targets: torch.Tensor | None = None
    key: dict[str, Any] | None = None
    result: SearchResult | None = None
    searched: bool = False  # the result is this process's search's (not the cache's)
    #: a generative adapter's anchor prompts (its search reads its own greedy answers to them)
    anchors: list[Anchor] | None = None
    #: a generative adapter's labelled calibration questions, for max_risk (:mod:`tfb_core.serving.risk`)
    questions: list[Anchor] | None = None

    @property
    def source(self) -> str:
        """Where sigma comes from: "fixed", "cache", or "search" (done, or still to run)."""
        if self.cfg.sigma is not None:
            return "fixed"
        return "cache" if self.result is not None and not self.searched else "search"


def finish_engine(plan: SigmaPlan, clf: BayesianClassifier, progress: bool = False, background: bool = False
                  ) -> TFBEngine:
    """The engine of one loaded, planned adapter: sigma (fixed, cache or search, here and now) and its
    calibration (:func:`make_engine`)."""
    if plan.source == "search":
        run_search(plan, clf, progress)
        # the search's prefixes were computed with its own draws and sigmas, none of which serving
        # uses: free them now (GPU memory on a large model), not when traffic evicts them
        clf.prefix_cache.clear()
    return make_engine(plan, clf, background)


def plan_sigma(cfg: EngineConfig, task: Task, clf: BayesianClassifier) -> SigmaPlan:
    """Read what sigma and the calibration need (files, the cache); no forward. ``LoadError`` (or
    a ``ValueError``) naming a file that cannot be read."""
    if task.generative:
        return _plan_generation(cfg, task, clf)
    clf.forward_overhead_tokens = cfg.forward_overhead_tokens
    clf.truncate = task.truncate  # before the anchor is tokenized
    clf.max_batch_tokens = cfg.max_batch_tokens
    cal = _calibration_file(cfg, task, clf)
    if cfg.sigma is not None:
        if cal is None and cfg.anchor:  # the anchor was not used to fit sigma: all of it calibrates
            cal = anchor_prompts(task, read_jsonl(cfg.anchor), cfg.anchor) + (f"anchor {cfg.anchor}",)
        return SigmaPlan(cfg, task, cal)
    if not cfg.anchor:  # no reference anchor either: default_anchor raises, saying what to give
        cfg = EngineConfig(**{**cfg.__dict__, "anchor": str(default_anchor(cfg, task))})
    prompts, targets = _read_prompts(task, clf, cfg.anchor, "anchor file")
    if cal is None and targets is not None and cfg.calibration_split > 0 and len(prompts) >= 4:
        # sigma is fitted on the anchor: the conformal step needs inputs the search did not see
        keep, held = split_anchor(len(prompts), cfg.calibration_split, cfg.seed)
        cal = ([prompts[i] for i in held], targets[held],
               f"anchor {cfg.anchor}: {len(held)} of {len(prompts)} held out of the sigma search (seed {cfg.seed})")
        prompts, targets = [prompts[i] for i in keep], targets[keep]
    if cfg.search.criterion == "accuracy" and targets is None:
        raise LoadError(f"criterion 'accuracy' needs labels on every record of {cfg.anchor!r}")
    key = cache_key(cfg, clf, task, prompts, targets)
    return SigmaPlan(cfg, task, cal, prompts, targets, key, cached_sigma(cfg, key))


def cached_sigma(cfg: EngineConfig, key: dict[str, Any]) -> SearchResult | None:
    """The cached search result of ``key`` (checked against ``cfg``'s search settings), or None
    (:func:`tfb_core.search.cache.cached_sigma` in ``cfg``'s cache folder)."""
    return cache.cached_sigma(default_cache_dir(cfg.model.cache_dir), key, cfg.search)


def run_search(plan: SigmaPlan, clf: BayesianClassifier, progress: bool = False,
               observe: Callable[[Sequence[float], list[float]], None] | None = None) -> SearchResult:
    """The sigma search of ``plan`` on ``clf`` (its forwards wherever ``clf.forward_runner`` runs
    them), cached; sets ``plan.result``. ``observe``: see :func:`~tfb_core.search.classifier.search_sigma`."""
    cfg = plan.cfg
    assert plan.key is not None
    what = (f"the greedy answers to {len(plan.anchors)} anchor prompts" if plan.anchors is not None
            else f"{len(plan.prompts)} anchor inputs")
    log.info("searching sigma on %s (%s <= %g, N=%d)", what, cfg.search.criterion, cfg.search.tolerance,
             cfg.search.n_samples)
    if plan.anchors is not None:
        result = search_generation_sigma(BayesianGenerator.from_classifier(clf), plan.anchors, cfg.search,
                                         max_tokens=cfg.anchor_max_tokens, adapter=clf.adapter,
                                         max_rows=cfg.max_rows, observe=observe)
    else:
        result = search_sigma(clf, plan.prompts, cfg.search, plan.targets, progress=progress, max_rows=cfg.max_rows,
                              observe=observe)
    path = cache.save(default_cache_dir(cfg.model.cache_dir), plan.key, result)
    log.info("sigma=%.6g searched in %.1fs, cached at %s", result.sigma, result.seconds, path)
    plan.result, plan.searched = result, True
    return result


def make_engine(plan: SigmaPlan, clf: BayesianClassifier, background: bool = False) -> TFBEngine:
    """The engine of a planned adapter whose sigma is known, and its calibration (``background``:
    left to run later, :func:`calibrate`; a generative adapter's max_risk calibration, unless cached,
    always is: the server steps it, the library and CLI never use it). On the thread that owns the
    model (it tokenizes)."""
    if plan.cfg.sigma is not None:
        engine = TFBEngine(plan.cfg, clf, plan.task, plan.cfg.sigma, "fixed")
    else:
        assert plan.result is not None, "sigma is neither fixed nor searched"
        engine = TFBEngine(plan.cfg, clf, plan.task, plan.result.sigma, plan.source, plan.result)
    if plan.task.generative:  # max_risk's calibration decodes every question: always left to a server's steps
        sigma_key = plan.key or cache_key(plan.cfg, clf, plan.task, [], None)
        calibrate_generation(engine, plan.questions, f"file {plan.cfg.calibration}", sigma_key, background=True)
    else:
        calibrate(engine, plan.cal, plan.key if plan.cfg.sigma is None else None, background)
    return engine


def _plan_generation(cfg: EngineConfig, task: Task, clf: BayesianClassifier) -> SigmaPlan:
    """:func:`plan_sigma` of a generative adapter: sigma fixed, or from the cache or a search on the
    sigma = 0 model's own greedy answers to the anchor prompts (:mod:`tfb_core.search.generation`).
    Its calibration, for max_risk: labelled questions (:func:`tfb_core.serving.risk.calibration_questions`)."""
    questions = calibration_questions(clf, cfg.calibration) if cfg.calibration else None
    if cfg.sigma is not None:
        return SigmaPlan(cfg, task, None, questions=questions)
    if not cfg.anchor:
        raise LoadError("sigma is not set: give a fixed sigma, or an anchor file to search it on (JSON Lines of "
                        '{"prompt": ...} or {"messages": [...]}, as the completion routes take them)')
    assert cfg.search is not None  # with_defaults
    anchors = generation_anchors(clf, cfg.anchor)
    key = cache_key(cfg, clf, task, [f"{a.tokens}\t{list(a.answers)}" for a in anchors], None)
    key["anchor_max_tokens"] = cfg.anchor_max_tokens
    return SigmaPlan(cfg, task, None, key=key, result=cached_sigma(cfg, key), anchors=anchors, questions=questions)


def generation_anchors(clf: BayesianClassifier, path: str) -> list[Anchor]:
    """The anchor prompts of a generative adapter (``{"prompt"}`` or ``{"messages"}`` lines),
    tokenized as the completion routes read them; an error names the file and line."""
    records = read_anchor(path)
    out = []
    for i, record in enumerate(records, 1):
        try:
            anchor = make_anchors(clf.tokenizer, [record])[0]
        except Exception as exc:  # noqa: BLE001 -- the chat template's own error: the file's
            raise LoadError(f"{path}: record {i}: the chat template refused its messages: {exc}"[:500]) from None
        if not anchor.tokens or len(anchor.tokens) > clf.max_length:
            raise LoadError(f"{path}: record {i}: the prompt has {len(anchor.tokens)} tokens, not within 1 to "
                            f"{clf.max_length} (TFB_MAX_LENGTH)")
        out.append(anchor)
    if not out:
        raise LoadError(f"{path}: the anchor set is empty")
    return out


def calibration_questions(clf: Any, path: str) -> list[Anchor]:
    """The labelled questions of a generative adapter's calibration file (the anchor's format:
    ``{"prompt"}`` or ``{"messages"}``, each with ``"answers"`` or ``"answer"``), tokenized as the
    completion routes read them; ``LoadError`` naming the file and a line without an answer."""
    records = read_anchor(path)
    out = []
    for i, (r, a) in enumerate(zip(records, generation_anchors(clf, path), strict=True), 1):
        answers = r.get("answers", r.get("answer"))
        if answers is None:
            raise LoadError(f"calibration file {path}: record {i} has no 'answers' (or 'answer'): max_risk needs "
                            "every calibration question's answer")
        out.append(Anchor(a.prompt, a.tokens, (answers,) if isinstance(answers, str) else tuple(answers)))
    return out


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


def _read_prompts(task: Task, clf: BayesianClassifier, path: str, what: str,
                  labelled: bool = False) -> tuple[list[str], torch.Tensor | None]:
    """:func:`anchor_prompts` of a JSON Lines file (``labelled``: every record must carry a label),
    every prompt tokenized: an error names the file."""
    prompts, targets = anchor_prompts(task, read_jsonl(path, what), path)
    if labelled and targets is None:
        raise LoadError(f"{what} {path!r}: every record needs a label")
    try:
        clf.tokenize(prompts)
    except ValueError as exc:
        raise LoadError(f"{what} {path!r}: {exc}") from exc
    return prompts, targets


def split_anchor(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(search indices, calibration indices): a seeded random ``fraction`` of n held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(round(n * fraction))
    return sorted(perm[k:]), sorted(perm[:k])


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


def cache_key(cfg: EngineConfig, clf: BayesianClassifier, task: Task, prompts: Sequence[str],
              targets: torch.Tensor | None) -> dict[str, Any]:
    """Everything a search result depends on (TFB.md section 3).

    The adapter is identified by what it is: its modules' names, scalings and A, B tensors as peft
    read them (not A', B', whose SVD rounding varies with threads and machines), not by where it was
    read from (a moved folder or a hub snapshot of the same weights reuses the search; other weights
    at the same path do not)."""
    m = cfg.model
    modules = [f"{mod.name}:{mod.scaling!r}" for mod in clf.posterior.modules]
    if clf.posterior.weights_sha256 is None:  # a posterior built by hand, not from peft
        raise ValueError("the adapter's posterior has no weights_sha256: build it with bayesianize_many")
    return {
        # the code that computes it, not the package version (a generative adapter's: its decoder's)
        "code_sha256": cache.code_sha256(cache.GENERATION_SEARCH if task.generative else cache.CLASSIFIER_SEARCH),
        **cache.model_key(m, clf.model),
        "adapter_modules": cache.sha256_text(modules), "adapter_sha256": clf.posterior.weights_sha256,
        "dtype": m.dtype, "device_type": torch.device(m.device).type, "load_in_8bit": m.load_in_8bit,
        "task": task.name, "labels": list(task.labels), "max_length": m.max_length, "truncate": task.truncate,
        "anchor_sha256": cache.sha256_text(list(prompts) + ([str(targets.tolist())] if targets is not None else [])),
        "search": asdict(cfg.search), "d_floor": cfg.d_floor,
    }


# --- the calibration ---------------------------------------------------------------------------
def _calibration_file(cfg: EngineConfig, task: Task, clf: BayesianClassifier) -> CalibrationSet | None:
    """(prompts, labels, source) of ``cfg.calibration``; every record must carry a label."""
    if not cfg.calibration:
        return None
    prompts, targets = _read_prompts(task, clf, cfg.calibration, "calibration file", labelled=True)
    return prompts, targets, f"file {cfg.calibration}"


def calibrate(engine: TFBEngine, cal: CalibrationSet | None, sigma_key: dict[str, Any] | None = None,
              background: bool = False) -> None:
    """Set ``engine.calibration``: the :class:`Calibration` of labelled ``cal`` under the engine's
    sigma and default samples, from the cache, else computed now; or (``background``) set
    ``engine.calibration_run`` for the server to run between its batches. Nothing without labels."""
    if cal is None or cal[1] is None:
        return
    prompts, targets, source = cal
    cfg = engine.cfg
    # the data are identified by their content, not by where they were read from (``source``, shown
    # in /info, is not in the key): the same records under another path reuse the calibration
    key = {"sigma_key": sigma_key or cache_key(cfg, engine.classifier, engine.task, [], None),
           "sigma": engine.sigma, "n_samples": cfg.n_samples, "seed": cfg.seed,
           "calibration_sha256": cache.sha256_text(list(prompts) + [str(targets.tolist())]),
           "code_sha256": cache.code_sha256(cache.CALIBRATION)}
    cache_dir = default_cache_dir(cfg.model.cache_dir)
    data = cache.load_json(cache_dir, key, "calibration")
    if data is not None:
        try:
            engine.calibration = replace(Calibration.from_dict(data), source=source)
            return
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("calibration cache unreadable (%s); recomputing", exc)
    # a few inputs a step: one step is one forward of at most max_rows rows
    chunk = max(1, cfg.max_rows // rows_of(cfg.n_samples, engine.sigma))

    def forward(chunk: list[str]) -> torch.Tensor:  # (k, N, C)
        return engine.sample(chunk, cfg.n_samples, cfg.seed)

    def done(calibration: Calibration) -> None:
        engine.calibration = calibration

    run = CalibrationRun(CalibrationData(prompts, targets, source, cfg.n_samples, cfg.seed), forward, done, key,
                         cache_dir, chunk)
    if background:
        engine.calibration_run = run
        log.info("calibration on %d labelled inputs (%s) runs in the background", len(prompts), source)
    else:
        run.run()
