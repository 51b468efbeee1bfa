"""A batch of requests through shared forwards: what the server's worker (and any other caller) runs.

    requests ──tokenize──▶ by label set ──one draw per seed──▶ units (one input's job each)
             ──plan by length, run, put back (BayesianClassifier.run_planned)──▶ (B_i, N, C) each

Each request keeps its own seed's noise and N, so its answer does not depend on what shares its
forwards. A request whose prompts or labels cannot be run (too long, labels that are not one token
each) gets its own error; the others in the batch are answered. What a batch needs of an adapter is
the small :class:`Adapter` protocol (:class:`tfb_core.serving.engine.TFBEngine` is one): this module
does not import the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tfb_core.bayes.posterior import NoiseDraw
from tfb_core.forward.classifier import Prompt
from tfb_core.forward.layout import Job

log = logging.getLogger(__name__)

Labels = tuple[str, ...]
#: called after each forward with (inputs, rows, seconds)
ForwardHook = Callable[[int, int, float], None]


class Adapter(Protocol):
    """One served adapter, as a batch uses it: its noise, tokens, class ids and prefix, and the
    forwards of its base model (which other adapters of that model share)."""

    name: str
    sigma: float

    @property
    def adapter(self) -> int: ...  # its index among its base model's adapters

    @property
    def base_model(self) -> Any: ...  # adapters of one base model share forwards

    def tokenize(self, prompts: Sequence[Prompt], keep_last: int | None = None) -> list[list[int]]: ...
    # ^ PromptTooLongError, EmptyPromptError; keep_last: the last K tokens of each

    def class_ids_for(self, labels: Labels | None) -> torch.Tensor: ...  # TaskError: a label not one token

    def noise(self, seed: int, n_samples: int) -> NoiseDraw | None: ...  # None: the posterior mean

    def prefix_for(self, tokens: Sequence[list[int]]) -> int: ...  # what a forward of these tokens shares

    def run_planned(self, units: Sequence[Sequence[Job]], max_rows: int, prefix: Mapping[int, int] | int | None,
                    keys: Sequence[Hashable] | None = None, on_chunk: Callable[[int, int], None] | None = None,
                    skip: Callable[[int], bool] | None = None) -> list[list[torch.Tensor]]: ...


@dataclass(frozen=True)
class BatchRequest:
    """One caller's inputs: prompts, N, the seed of its posterior samples, its label set, and the
    adapter (engine) that answers it."""

    prompts: Sequence[Prompt]  # texts, or token ids taken as they are
    n_samples: int
    seed: int
    labels: Labels | None = None  # None: the engine's task labels
    #: True once nobody waits for the answer any more: the request's inputs are skipped before the
    #: next forward, and it is answered :class:`RequestCancelled`
    cancelled: Callable[[], bool] | None = None
    #: the adapter served on the batch's base model that answers it (None: the batch's own)
    engine: Adapter | None = None
    #: keep only the last K tokens of each prompt (vLLM's ``truncate_prompt_tokens``; None: all)
    keep_last: int | None = None


class RequestCancelled(Exception):
    """The request was cancelled before all its inputs ran."""


@dataclass
class _Input:
    """One input of the batch: whose (request, position) it is, under which adapter and class ids."""

    request: int
    engine: Adapter
    class_ids: torch.Tensor


def run_batch(engine: Adapter, requests: Sequence[BatchRequest], max_rows: int,
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
        if own.base_model is not engine.base_model:
            out[r] = ValueError(f"adapter {own.name!r} is not on this batch's base model")
            continue
        try:
            tokens[r] = own.tokenize(req.prompts, req.keep_last)
        except ValueError as exc:  # PromptTooLongError
            out[r] = exc
            continue
        try:
            ids = own.class_ids_for(req.labels)
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


def _forward(engine: Adapter, requests: Sequence[BatchRequest], tokens: dict[int, list[list[int]]],
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
                          adapter=own.adapter, sigma=own.sigma, class_ids=x.class_ids)])
        # inputs of one adapter, draw and N together where that is cheaper: they share the prefix
        keys.append((own.adapter, req.seed, req.n_samples) if own.sigma > 0.0 else (own.adapter,))
    # per adapter its task's instruction (one prefix for every batch, computed once per draw), else
    # what its inputs in this batch share
    prefix = {}
    for own in engines.values():
        mine = [u[0].tokens for u, x in zip(units, inputs, strict=True) if x.engine is own]
        prefix[own.adapter] = own.prefix_for(mine)
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
        results = engine.run_planned(units, max_rows, prefix=prefix, keys=keys, on_chunk=hook, skip=skip)
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

