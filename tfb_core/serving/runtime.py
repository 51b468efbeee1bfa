"""Adapters loaded and unloaded while the server serves (vLLM's runtime LoRA updating).

    prepare(default, record)        any thread: config, task, weights read by peft onto a meta
                                    skeleton, Bayesianized over the served layers, files read, the
                                    sigma cache looked up; nothing of the served model changes
    install(default, prepared)      the model's thread: the adapter joins the model's forwards under a
                                    new index; with sigma fixed or cached, its engine at once
    search(prepared, view, gate)    a thread of its own: the sigma search, each of its forwards run
                                    by the model's thread through ``gate`` between serving batches
    unload(clf, engine, generators) the model's thread: slots, posterior, noise draws, prefixes (the
                                    classifier's and the generators' kept rows) freed

What happens when is :mod:`tfb_core.serving.lifecycle`'s (the state machine of a load and an unload).

A synchronous failure (a path, a file, a shape, a task) is an :class:`AdapterLoadError` naming the
request field, raised before anything changed. No web imports: the server wires these to its worker.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tfb_core.bayes.lora import read_lora
from tfb_core.bayes.posterior import TFBLinear, TFBPosterior
from tfb_core.bayes.routing import fit_adapter
from tfb_core.data.loading import BASE_FIELDS, LoadError, adapter_folder, is_local_adapter, meta_skeleton
from tfb_core.data.tasks import Task, TaskError, class_token_ids
from tfb_core.forward.classifier import BayesianClassifier
from tfb_core.forward.generator import BayesianGenerator
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.gate import ForwardGate
from tfb_core.serving.startup import SigmaPlan, make_engine, plan_sigma, prepare_config, run_search

log = logging.getLogger(__name__)


class AdapterLoadError(LoadError):
    """A load request that cannot be served; ``param`` names the request field it is about."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class Loading(Protocol):
    """What this module reads and writes of a load's record (:class:`tfb_core.serving.lifecycle.RuntimeAdapter`)."""

    name: str
    cfg: EngineConfig
    weights_bytes: int
    progress: dict[str, Any]


@dataclass
class Prepared:
    """An adapter read and Bayesianized, not yet in the model's forwards."""

    record: Loading
    task: Task
    posterior: TFBPosterior
    head: TFBLinear | None
    plan: SigmaPlan
    #: a tokenizer of its own: this adapter's threads never share the model thread's (not thread-safe)
    tokenizer: Any


def weights_bytes(posterior: TFBPosterior) -> int:
    """Bytes of an adapter's A', B', d (and 1/d) tensors."""
    return sum(t.numel() * t.element_size() for m in posterior.modules for t in m.buffers(recurse=False))


def prepare(served: TFBEngine, record: Loading) -> Prepared:
    """Read ``record.cfg``'s adapter for the model of ``served`` (an engine on it: the default
    adapter's) on any thread: the model is only read. :class:`AdapterLoadError` naming the field
    of a synchronous failure."""
    default = served.classifier
    # a local folder is checked before the task: what is wrong with the path comes first
    local = record.cfg.model.adapter is not None and is_local_adapter(record.cfg.model.adapter)
    folder = _folder(record.cfg.with_defaults(), default.model) if local else None
    try:
        cfg, task = prepare_config(record.cfg)
    except (LoadError, ValueError) as exc:
        cause = exc.__cause__ if isinstance(exc, LoadError) else exc
        param = ("labels" if record.cfg.labels and not record.cfg.task else "task") if isinstance(cause, TaskError) \
            else "anchor" if "sigma is not set" in str(exc) else "published"
        raise AdapterLoadError(str(exc), param) from exc
    record.cfg = cfg
    for f in BASE_FIELDS:  # one base model per server
        mine, theirs = getattr(cfg.model, f), getattr(served.cfg.model, f)
        if mine != theirs:
            raise AdapterLoadError(f"the adapter needs base model {f} {mine!r}; this server serves {theirs!r}",
                                   "published" if cfg.published else "lora_path")
    tokenizer = copy.deepcopy(default.tokenizer)
    try:
        class_token_ids(tokenizer, task.labels)
    except TaskError as exc:
        raise AdapterLoadError(f"labels {list(task.labels)}: {exc}", "labels") from exc
    folder = folder or _folder(cfg, default.model)
    try:
        loras = read_lora(meta_skeleton(default.model), str(folder), "runtime", "cpu")
        posterior, head = fit_adapter(default.model, loras, cfg.d_floor)
    except (LoadError, ValueError, OSError) as exc:
        raise AdapterLoadError(f"adapter {cfg.model.adapter!r}: {exc}", "lora_path") from exc
    except Exception as exc:  # safetensors' and peft's own errors: a corrupt or foreign file
        raise AdapterLoadError(f"adapter {cfg.model.adapter!r}: cannot read it: {type(exc).__name__}: {exc}"[:800],
                               "lora_path") from exc
    record.weights_bytes = weights_bytes(posterior)
    # a detached view for reading files: the served model's, with this adapter's posterior and
    # tokenizer; it runs no forward
    view = copy.copy(default)
    view.posterior, view.head, view.tokenizer = posterior, head, tokenizer
    try:
        plan = plan_sigma(cfg, task, view)
    except (LoadError, ValueError, OSError) as exc:
        text = str(exc)
        param = "calibration" if cfg.calibration and cfg.calibration in text else "anchor"
        raise AdapterLoadError(text, param) from exc
    return Prepared(record, task, posterior, head, plan, tokenizer)


def _folder(cfg: EngineConfig, model: Any) -> Path:
    """The adapter's checked local folder (a hub adapter fetched), or :class:`AdapterLoadError`."""
    try:
        return adapter_folder(cfg.model, model)[0]
    except (LoadError, ValueError, OSError) as exc:
        raise AdapterLoadError(f"adapter {cfg.model.adapter!r}: {exc}", "lora_path") from exc


def prepared_of(record: Loading, plan: SigmaPlan, clf: BayesianClassifier) -> Prepared:
    """An adapter loaded with the others at start-up, its sigma still to search: what :func:`search`
    needs (a tokenizer of its own: the search's thread never shares the model thread's)."""
    record.weights_bytes = weights_bytes(clf.posterior)
    return Prepared(record, plan.task, clf.posterior, clf.head, plan, copy.deepcopy(clf.tokenizer))


def install(default: BayesianClassifier, prepared: Prepared, background_calibration: bool = True
            ) -> tuple[BayesianClassifier, TFBEngine | None]:
    """Put the adapter into the model's forwards (on the model's thread): (its classifier, its engine
    when sigma is fixed or cached, else None: :func:`search` next)."""
    cfg = prepared.plan.cfg
    clf = default.add_adapter(prepared.posterior, prepared.head, prepared.task.labels)
    clf.forward_overhead_tokens = default.forward_overhead_tokens if cfg.forward_overhead_tokens is None \
        else cfg.forward_overhead_tokens
    clf.truncate, clf.max_batch_tokens = prepared.task.truncate, cfg.max_batch_tokens
    if prepared.plan.source == "search":
        return clf, None
    try:
        return clf, make_engine(prepared.plan, clf, background_calibration)
    except Exception:
        default.remove_adapter(clf.adapter)
        raise


def search(prepared: Prepared, clf: BayesianClassifier, gate: ForwardGate, background_calibration: bool = True,
           then: Callable[[TFBEngine], Any] | None = None) -> TFBEngine:
    """The sigma search of an installed adapter, on the calling thread, every forward run through
    ``gate`` by the model's thread; then its engine (built on the model's thread, and handed to
    ``then`` in that same step). Progress in ``prepared.record.progress``."""
    record = prepared.record
    view = copy.copy(clf)
    view.tokenizer, view.forward_runner = prepared.tokenizer, gate.run
    progress = record.progress
    progress.update(evaluations=0, sigmas=[], forwards=0)

    def observe(sigmas: Sequence[float], values: list[float]) -> None:
        progress["evaluations"] += 1
        progress["sigmas"] = progress["sigmas"] + [float(s) for s in sigmas]
        progress["values"] = progress.get("values", []) + [float(v) for v in values]
        progress["forwards"] = gate.forwards

    run_search(prepared.plan, view, observe=observe)
    progress["forwards"] = gate.forwards

    def finish() -> TFBEngine:  # on the model's thread
        # the search's kept prefixes hold its own draws and sigmas, none of which serving uses
        clf.drop_prefixes(clf.adapter)
        engine = make_engine(prepared.plan, clf, background_calibration)
        if then is not None:
            then(engine)
        return engine

    return gate.run(finish)


def unload(clf: BayesianClassifier, engine: TFBEngine | None = None,
           generators: Sequence[BayesianGenerator] = ()) -> None:
    """Free an adapter (on the model's thread): its layers' slots, posterior, kept prefixes (the
    classifier's, and the kept rows of ``generators``: a served decode's chat head) and noise draws;
    the model is as it was before it was loaded."""
    clf.remove_adapter(clf.adapter)
    for generator in generators:
        generator.drop_prefixes(clf.adapter)
    if engine is not None:
        engine.clear_noise()
