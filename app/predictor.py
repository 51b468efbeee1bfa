"""Request -> work for the model worker -> response; and the store that /feedback labels.

Validation that needs no model (limits, label sets, the task's input fields) happens here, on the
event loop, so that a bad request is refused before it queues; what needs the tokenizer (prompt
length, labels that are not one token) is checked on the worker and comes back as its error.
"""

from __future__ import annotations

import copy
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from app.batching import ModelWorker, Work
from app.errors import DuplicateFeedbackError, LimitError, UnknownPredictionError
from app.metrics import Metrics
from app.online import Monitors
from app.schemas import FeedbackRequest, PredictRequest
from app.settings import Settings
from tfb_core.data.tasks import TaskError, generic_task
from tfb_core.decide.online import Served
from tfb_core.forward.classifier import Prompt, RawText
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.pool import AdapterPool
from tfb_core.serving.response import respond


@dataclass
class FeedbackRecord:
    """What /feedback needs of one prediction."""

    labels: tuple[str, ...]
    probs: list[float]
    index: int
    labelled: bool = False
    adapter: str = "default"  # the adapter that made it
    prediction_set: tuple[str, ...] | None = None  # and the alpha it was made at
    alpha: float | None = None
    abstain: bool | None = None  # and the max_risk it was decided at
    max_risk: float | None = None
    online: dict[str, Any] | None = None  # an online set's thresholds when served (Served's fields)
    reference: bool = False  # made with the calibration's score function (its N, seed and labels)


class LabelStore(Protocol):
    """Where /predict leaves its predictions and /feedback labels them (one process, or shared)."""

    capacity: int

    def __len__(self) -> int: ...

    def add(self, pred_id: str, record: FeedbackRecord) -> None: ...

    async def label(self, pred_id: str, target: Callable[[FeedbackRecord], int]) -> tuple[FeedbackRecord, int]: ...


class FeedbackStore:
    """The last ``capacity`` predictions by id (older ones expire: 404 on /feedback)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, FeedbackRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, pred_id: str, record: FeedbackRecord) -> None:
        self._items[pred_id] = record
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, pred_id: str) -> FeedbackRecord:
        record = self._items.get(pred_id)
        if record is None:
            raise UnknownPredictionError(f"unknown or expired prediction id {pred_id!r} (the server keeps the last "
                                         f"{self.capacity} predictions, TFB_FEEDBACK_STORE_SIZE)")
        return record

    async def label(self, pred_id: str, target: Callable[[FeedbackRecord], int]) -> tuple[FeedbackRecord, int]:
        """The prediction's record and its true class ``target(record)``, marked labelled only once
        ``target`` accepted the label: a mistyped label (422) leaves it open for the right one.
        Unknown id: 404; labelled before: 409."""
        record = self.get(pred_id)
        if record.labelled:
            raise DuplicateFeedbackError(f"prediction {pred_id!r} already has a label")
        index = target(record)  # TaskError -> 422, nothing recorded
        record.labelled = True  # no await since the check above: no other label can slip in between
        return record, index


class Predictor:
    """Serves /predict and /feedback on the loaded adapters through the model worker."""

    def __init__(self, adapters: AdapterPool | TFBEngine, worker: ModelWorker, settings: Settings, metrics: Metrics,
                 store: LabelStore, monitors: Monitors | None = None) -> None:
        self.adapters = adapters if isinstance(adapters, AdapterPool) else AdapterPool([adapters])
        self.engine = self.adapters.default  # the default adapter's
        self.worker = worker
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.monitors = monitors if monitors is not None else Monitors.of(settings, metrics)
        self._loop_tokenizers: dict[int, Any] = {}

    def loop_tokenizer(self, engine: TFBEngine) -> Any:
        """A copy of ``engine``'s tokenizer for the event loop's own use (/tokenize): the model
        worker's is not safe to share across threads. One per tokenizer, made on first use."""
        tok = engine.classifier.tokenizer
        own = self._loop_tokenizers.get(id(tok))
        if own is None:
            own = self._loop_tokenizers[id(tok)] = copy.deepcopy(tok)
        return own

    @property
    def adapter_names(self) -> list[str]:
        """The served adapters' names, the default first."""
        return self.adapters.names

    def resolve(self, name: str | None, base_model_alias: bool = False) -> TFBEngine:
        """The engine of adapter ``name`` (:meth:`AdapterPool.get`); unknown: a 404 naming the served ones."""
        return self.adapters.get(name, base_model_alias)

    @staticmethod
    def _labels(engine: TFBEngine, requested: list[str] | None) -> tuple[str, ...] | None:
        """None for the adapter's configured labels; another label set only for the generic task (else 422)."""
        labels = tuple(engine.task.labels)
        if requested is None or tuple(requested) == labels:
            return None
        if engine.task.formatter is not None:
            raise TaskError(f"task {engine.task.name!r} has fixed labels {list(labels)}, got {list(requested)}",
                            param="labels")
        return generic_task(requested).labels  # >= 2, distinct, non-empty (one token each: on the worker)

    def prepare(self, req: PredictRequest, count_tokens: bool = False, prompts: list[Prompt] | None = None,
                keep_last: int | None = None, special_tokens: bool = True) -> Work:
        """The worker's share of a request; raises a 4xx error naming the problem. ``count_tokens``:
        the result also has ``prompt_tokens``, each input's prompt length in tokens (counted on the
        worker thread: the tokenizer is not safe to share across threads). ``prompts``: the prompts
        as given, in place of the task's of ``req.inputs`` (token ids, a rendered chat), only for
        the generic task; ``keep_last``: only the last K tokens of each prompt are read;
        ``special_tokens=False``: texts are tokenized without the tokenizer's special tokens."""
        s = self.settings
        engine = self.resolve(req.adapter)
        if engine.task.generative:
            raise TaskError(f"adapter {engine.name!r} is a generative adapter (it has no labels to classify into): "
                            "send its prompts to /v1/completions or /v1/chat/completions", param="adapter")
        if len(req.inputs) > s.max_inputs:
            raise LimitError(f"too many inputs: {len(req.inputs)}, the limit is {s.max_inputs} per request "
                             "(TFB_MAX_INPUTS)", param="inputs")
        n = s.n_samples if req.n_samples is None else req.n_samples
        if n > s.max_samples:
            raise LimitError(f"n_samples {n} is over the limit of {s.max_samples} (TFB_MAX_SAMPLES)", param="n_samples")
        labels = self._labels(engine, req.labels)
        if prompts is None:
            prompts = list(engine.format_inputs(req.inputs))
        else:
            self._check_given(engine, prompts)
        if not special_tokens:
            prompts = [RawText(p) if isinstance(p, str) else p for p in prompts]
        seed = engine.cfg.seed if req.seed is None else req.seed
        return_samples = req.return_samples
        alpha, max_risk = req.alpha, req.max_risk
        engine.check_conformal(alpha, max_risk, n, seed, labels)
        online = None
        if alpha is not None and (state := self.monitors.online_state(engine)) is not None:
            online = state.serve(alpha)  # the thresholds in force now: stored with each prediction

        def finish(sample_probs: torch.Tensor) -> dict[str, Any]:  # (B, N, C), on the worker thread
            out = respond(engine, sample_probs, return_samples, alpha, max_risk, labels, seed, online)
            if online is not None:
                out["online"] = online[0].to_dict()
            if count_tokens:
                out["prompt_tokens"] = [len(t) for t in engine.tokenize(prompts, keep_last)]
            return out

        return Work(prompts=prompts, n_samples=n, seed=seed, labels=labels, finish=finish, engine=engine,
                    keep_last=keep_last)

    @staticmethod
    def _check_given(engine: TFBEngine, prompts: list[Prompt]) -> None:
        """Prompts as given (not the task's): the generic task's only, token ids within the vocabulary."""
        if engine.task.formatter is not None:
            raise TaskError(f"task {engine.task.name!r} formats its prompts from text: send its inputs as text "
                            "(or objects with its fields), not token ids or chat messages", param="inputs")
        vocab = len(engine.classifier.tokenizer)
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                continue
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise TaskError(f"input {i}: token id {bad[0]} is out of the vocabulary [0, {vocab})", param="inputs")
            if not p:
                raise TaskError(f"input {i} has no token ids: nothing to classify", param="inputs")

    async def predict(self, req: PredictRequest, timing: dict[str, float] | None = None,
                      count_tokens: bool = False, **given: Any) -> dict[str, Any]:
        """The response body; ``timing`` (if given) receives the request's queue and batch seconds;
        ``count_tokens`` and ``given`` (prompts, keep_last, special_tokens): see :meth:`prepare`."""
        work = self.prepare(req, count_tokens, **given)
        engine = work.engine
        assert engine is not None
        out = await self.worker.submit(work)
        if timing is not None:
            timing.update(work.timing())
        labels = tuple(out["labels"])
        online = out.pop("online", None)
        reference = self._at_calibration(engine, work.n_samples, work.seed, work.labels)
        predictions = []
        for p in out["predictions"]:
            pred_id = uuid.uuid4().hex
            self.store.add(pred_id, FeedbackRecord(
                labels, p["probs"], p["index"], adapter=engine.name,
                prediction_set=tuple(p["prediction_set"]) if "prediction_set" in p else None,
                alpha=req.alpha, abstain=p.get("abstain"), max_risk=req.max_risk, online=online,
                reference=reference))
            predictions.append({"id": pred_id, **p})
        out["adapter"] = engine.name
        out["predictions"] = predictions
        if self.adapters.engines.get(engine.name) is engine:  # not while it is unloaded: its series go
            self.metrics.observe_predictions(predictions, tuple(engine.task.labels), engine.name)
            drift = self.monitors.drift_tests(engine) if reference else None
            if drift is not None:  # label-free: the predicted label's score, 1 - confidence
                test = drift.monitors["label_free"]
                for p in predictions:
                    test.observe(1.0 - p["confidence"])
                self.metrics.observe_drift(engine.name, "label_free", test)
        return out

    @staticmethod
    def _at_calibration(engine: TFBEngine, n_samples: int, seed: int, labels: tuple[str, ...] | None) -> bool:
        """Whether a prediction's scores are the calibration's score function: its labels, N and
        seed (any N and seed at sigma = 0, where every sample is the mean): only those are compared
        with the calibration set by the drift tests."""
        cal = engine.calibration
        if cal is None or labels is not None:
            return False
        return engine.sigma == 0.0 or (n_samples == cal.n_samples and seed == cal.seed)

    async def feedback(self, req: FeedbackRequest) -> dict[str, Any]:
        record, target = await self.store.label(req.id, lambda r: generic_task(r.labels).label_index(req.label))
        if record.adapter not in self.adapters.engines:  # unloaded since: its metric series are gone
            return self._feedback_answer(req, record, target)
        self.metrics.observe_feedback(record.probs, target, record.adapter)
        covered = None if record.prediction_set is None else record.labels[target] in record.prediction_set
        answered = None if record.abstain is None else not record.abstain
        self.metrics.observe_feedback_conformal(covered, record.alpha, answered, record.index == target, record.max_risk,
                                                record.adapter)
        engine = self.adapters.engines[record.adapter]
        if record.online is not None and (state := self.monitors.online_state(engine)) is not None:
            served = Served.from_dict(record.online)
            if await state.label(served, record.probs, target) is not None:
                self.metrics.observe_online(record.adapter, state, served.alpha)
        if record.reference and (drift := self.monitors.drift_tests(engine)) is not None:
            test = drift.monitors["labelled"]
            test.observe(1.0 - record.probs[target])  # the true label's LAC score
            self.metrics.observe_drift(record.adapter, "labelled", test)
        return self._feedback_answer(req, record, target)

    @staticmethod
    def _feedback_answer(req: FeedbackRequest, record: FeedbackRecord, target: int) -> dict[str, Any]:
        return {"id": req.id, "label": record.labels[target], "index": target, "correct": record.index == target,
                "confidence": max(record.probs)}
