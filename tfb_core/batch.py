"""A batch of requests through one engine: what the server's worker (and any other caller) runs.

    requests ──tokenize──▶ by label set ──one draw per seed──▶ units (one input's job each)
             ──plan by length, run, put back (BayesianClassifier.run_planned)──▶ (B_i, N, C) each

Each request keeps its own seed's noise and N, so its answer does not depend on what shares its
forwards. A request whose prompts or labels cannot be run (too long, labels that are not one token
each) gets its own error; the others in the batch are answered.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tfb_core.forward.layout import Job, rows_of

if TYPE_CHECKING:
    from tfb_core.engine import TFBEngine

log = logging.getLogger(__name__)

Labels = tuple[str, ...]
#: called after each forward with (inputs, rows, seconds)
ForwardHook = Callable[[int, int, float], None]


@dataclass(frozen=True)
class BatchRequest:
    """One caller's inputs: prompts, N, the seed of its posterior samples, its label set, and the
    adapter (engine) that answers it."""

    prompts: Sequence[str]
    n_samples: int
    seed: int
    labels: Labels | None = None  # None: the engine's task labels
    #: True once nobody waits for the answer any more: the request's inputs are skipped before the
    #: next forward, and it is answered :class:`RequestCancelled`
    cancelled: Callable[[], bool] | None = None
    #: the adapter served on the batch's base model that answers it (None: the batch's engine)
    engine: TFBEngine | None = None


class RequestCancelled(Exception):
    """The request was cancelled before all its inputs ran."""


class ClassIds:
    """Class-token ids per label set (the task's, or a request's own), the last ``size`` kept."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._ids: OrderedDict[Labels, torch.Tensor] = OrderedDict()

    def get(self, engine: TFBEngine, labels: Labels) -> torch.Tensor:
        ids = self._ids.get(labels)
        if ids is None:
            ids = engine.classifier.class_ids_for(labels)  # TaskError: a label that is not one token
            self._ids[labels] = ids
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)
        self._ids.move_to_end(labels)
        return ids


@dataclass
class _Input:
    """One input of the batch: whose (request, position) it is, under which engine and class ids."""

    request: int
    engine: TFBEngine
    class_ids: torch.Tensor


def run_batch(engine: TFBEngine, requests: Sequence[BatchRequest], max_rows: int,
              on_forward: ForwardHook | None = None) -> list[torch.Tensor | Exception]:
    """Per request: its (B_i, N_i, C_i) per-sample probabilities, or the error it alone gets.

    Requests for other adapters of the same base model (``BatchRequest.engine``) and with other
    label sets share the forwards: each row carries its adapter's posterior sample and sigma, each
    input its own class tokens.
    """
    out: list[torch.Tensor | Exception | None] = [None] * len(requests)
    tokens: dict[int, list[list[int]]] = {}
    inputs: list[_Input] = []
    for r, req in enumerate(requests):
        own = req.engine or engine
        if own.classifier.model is not engine.classifier.model:
            out[r] = ValueError(f"adapter {own.name!r} is not on this batch's base model")
            continue
        clf = own.classifier
        try:
            tokens[r] = clf.tokenize(req.prompts)
        except ValueError as exc:  # PromptTooLongError
            out[r] = exc
            continue
        try:
            ids = (clf.class_ids if req.labels is None or list(req.labels) == clf.labels
                   else own.class_ids.get(own, tuple(req.labels)))
        except ValueError as exc:  # TaskError
            out[r] = exc
            continue
        if not tokens[r]:
            out[r] = torch.empty((0, req.n_samples, len(ids)))
        inputs += [_Input(r, own, ids) for _ in tokens[r]]
    if inputs:
        found = _forward(engine, requests, tokens, inputs, max_rows, on_forward)
        for r, res in found.items():
            out[r] = res
    return out  # type: ignore[return-value]


def _forward(engine: TFBEngine, requests: Sequence[BatchRequest], tokens: dict[int, list[list[int]]],
             inputs: Sequence[_Input], max_rows: int, on_forward: ForwardHook | None) -> dict[int, torch.Tensor | Exception]:
    """The batch's inputs in planned forwards; results per request (its position in ``requests``)."""
    need: dict[tuple[int, int], int] = {}  # (engine, seed) -> N: one draw per seed and adapter, big enough
    for x in inputs:
        req = requests[x.request]
        key = (id(x.engine), req.seed)
        need[key] = max(need.get(key, 0), req.n_samples)
    engines = {id(x.engine): x.engine for x in inputs}
    noise = {key: engines[key[0]].noise(key[1], n) for key, n in need.items() if engines[key[0]].sigma > 0.0}
    positions: dict[int, int] = {}
    units, keys = [], []
    for x in inputs:
        req, own = requests[x.request], x.engine
        i = positions.get(x.request, 0)
        positions[x.request] = i + 1
        units.append([Job(tokens[x.request][i], req.n_samples, noise.get((id(own), req.seed)),
                          adapter=own.classifier.adapter, sigma=own.sigma, class_ids=x.class_ids)])
        # inputs of one adapter, draw and N together where that is cheaper: they share the prefix
        keys.append((own.classifier.adapter, req.seed, req.n_samples) if own.sigma > 0.0 else (own.classifier.adapter,))
    # per adapter its task's instruction (one prefix for every batch, computed once per draw), else
    # what its inputs in this batch share
    prefix = {}
    for own in engines.values():
        mine = [u[0].tokens for u, x in zip(units, inputs, strict=True) if x.engine is own]
        prefix[own.classifier.adapter] = own.prompt_prefix or own.classifier.shared_prefix(mine)
    hook = None
    if on_forward is not None:
        clock = [time.perf_counter()]

        def hook(n_units: int, n_rows: int) -> None:  # after each forward: its inputs, rows and time
            now = time.perf_counter()
            on_forward(n_units, n_rows, now - clock[0])
            clock[0] = now

    def skip(u: int) -> bool:
        cancelled = requests[inputs[u].request].cancelled
        return cancelled is not None and cancelled()

    members = sorted(positions)
    try:
        results = engine.classifier.run_planned(units, max_rows, engine.sigma, prefix=prefix, keys=keys,
                                                on_chunk=hook, skip=skip)
    except Exception as exc:  # noqa: BLE001 -- a failed forward (e.g. out of memory) fails these requests only
        log.exception("forward of %d inputs failed", len(units))
        return dict.fromkeys(members, exc)
    per: dict[int, list[torch.Tensor]] = {r: [] for r in members}
    skipped: set[int] = set()
    for x, unit in zip(inputs, results, strict=True):
        if unit:
            per[x.request].append(unit[0])  # (N, C)
        else:
            skipped.add(x.request)
    return {r: RequestCancelled("cancelled before all its inputs ran") if r in skipped else torch.stack(v)
            for r, v in per.items()}  # (B_r, N, C)


def warm_up(engine: TFBEngine, max_rows: int) -> float | None:
    """One forward of one input; on a GPU also one of a full batch (``max_rows`` rows), so that the
    first real batch does not pay for loading kernels and growing the allocator's pool. Unless the
    engine's config fixes it, the fixed cost of a forward is then measured (forwards of 1 and up to
    8 inputs) for planning batches by length; returns it (None: not measured)."""
    t0 = time.perf_counter()
    clf = engine.classifier
    tokens = clf.tokenize([engine.task.format(engine.task.placeholder("warm-up"))])[0]
    n = engine.cfg.n_samples
    job = Job(tokens, n, engine.noise(engine.cfg.seed, n))
    prefix = engine.prompt_prefix or None
    clf.run_jobs([job], engine.sigma, prefix=prefix)
    inputs = max_rows // rows_of(n, engine.sigma)
    if clf.device.type != "cpu" and inputs > 1:
        clf.run_jobs([job] * inputs, engine.sigma, prefix=prefix)
    overhead = None
    if engine.cfg.forward_overhead_tokens is None:
        overhead = clf.measure_forward_overhead(job, engine.sigma, max_rows, prefix)
        if overhead is not None:
            log.info("a forward's fixed cost: %.0f tokens (measured)", overhead)
    log.info("warm-up forwards (N=%d) in %.2fs", n, time.perf_counter() - t0)
    return overhead
