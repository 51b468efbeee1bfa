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

from tfb_core.sampling import Job, rows_of

if TYPE_CHECKING:
    from tfb_core.engine import TFBEngine

log = logging.getLogger(__name__)

Labels = tuple[str, ...]
#: called after each forward with (inputs, rows, seconds)
ForwardHook = Callable[[int, int, float], None]


@dataclass(frozen=True)
class BatchRequest:
    """One caller's inputs: prompts, N, the seed of its posterior samples, and its label set."""

    prompts: Sequence[str]
    n_samples: int
    seed: int
    labels: Labels | None = None  # None: the engine's task labels
    #: True once nobody waits for the answer any more: the request's inputs are skipped before the
    #: next forward, and it is answered :class:`RequestCancelled`
    cancelled: Callable[[], bool] | None = None


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


def run_batch(engine: TFBEngine, requests: Sequence[BatchRequest], max_rows: int,
              on_forward: ForwardHook | None = None) -> list[torch.Tensor | Exception]:
    """Per request: its (B_i, N_i, C) per-sample probabilities, or the error it alone gets."""
    clf = engine.classifier
    out: list[torch.Tensor | Exception | None] = [None] * len(requests)
    tokens: dict[int, list[list[int]]] = {}
    groups: dict[Labels | None, list[int]] = {}
    for r, req in enumerate(requests):
        try:
            tokens[r] = clf.tokenize(req.prompts)
        except ValueError as exc:  # PromptTooLongError
            out[r] = exc
            continue
        key = None if req.labels is None or list(req.labels) == clf.labels else tuple(req.labels)
        groups.setdefault(key, []).append(r)
    for labels, members in groups.items():
        try:
            class_ids = None if labels is None else engine.class_ids.get(engine, labels)
        except ValueError as exc:  # TaskError
            for r in members:
                out[r] = exc
            continue
        found = _forward(engine, [requests[r] for r in members], [tokens[r] for r in members], class_ids,
                         max_rows, on_forward)
        for r, res in found.items():
            out[members[r]] = res
    return out  # type: ignore[return-value]


def _forward(engine: TFBEngine, requests: Sequence[BatchRequest], tokens: Sequence[list[list[int]]],
             class_ids: torch.Tensor | None, max_rows: int,
             on_forward: ForwardHook | None) -> dict[int, torch.Tensor | Exception]:
    """One label set's requests: planned forwards, results per request (its position in ``requests``)."""
    sigma = engine.sigma
    need: dict[int, int] = {}
    for req in requests:  # one draw per seed, big enough for every request that uses it
        need[req.seed] = max(need.get(req.seed, 0), req.n_samples)
    noise = {seed: engine.noise(seed, n) for seed, n in need.items()} if sigma > 0.0 else {}
    owners = [(r, i) for r, toks in enumerate(tokens) for i in range(len(toks))]
    units = [[Job(tokens[r][i], requests[r].n_samples, noise.get(requests[r].seed))] for r, i in owners]
    # inputs of one draw and N together where that is cheaper: they share the instruction's prefix
    keys = [(requests[r].seed, requests[r].n_samples) if sigma > 0.0 else 0 for r, _ in owners]
    # the task's instruction (one prefix for every batch, computed once per draw), else what the
    # batch's inputs share
    prefix = engine.prompt_prefix or engine.classifier.shared_prefix([u[0].tokens for u in units])
    hook = None
    if on_forward is not None:
        clock = [time.perf_counter()]

        def hook(n_units: int, n_rows: int) -> None:  # after each forward: its inputs, rows and time
            now = time.perf_counter()
            on_forward(n_units, n_rows, now - clock[0])
            clock[0] = now

    def skip(u: int) -> bool:
        cancelled = requests[owners[u][0]].cancelled
        return cancelled is not None and cancelled()

    try:
        results = engine.classifier.run_planned(units, max_rows, sigma, class_ids, prefix, keys, on_chunk=hook,
                                                skip=skip)
    except Exception as exc:  # noqa: BLE001 -- a failed forward (e.g. out of memory) fails these requests only
        log.exception("forward of %d inputs failed", len(units))
        return dict.fromkeys(range(len(requests)), exc)
    per: dict[int, list[torch.Tensor]] = {r: [] for r in range(len(requests))}
    skipped: set[int] = set()
    for (r, _), unit in zip(owners, results, strict=True):
        if unit:
            per[r].append(unit[0])  # (N, C)
        else:
            skipped.add(r)
    n_classes = len(engine.classifier.labels) if class_ids is None else len(class_ids)
    return {r: RequestCancelled("cancelled before all its inputs ran") if r in skipped else
            torch.stack(v) if v else torch.empty((0, requests[r].n_samples, n_classes))
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
