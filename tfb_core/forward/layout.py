"""The rows of one forward, for the classifier and the generator alike: which input (stream),
adapter and posterior sample each row is, which noise it carries, and the padded tokens it reads.

Pure bookkeeping over token lists, samples and draws: no model runs here. A :class:`Row` is
(stream, adapter, sample n of a :class:`~tfb_core.bayes.posterior.NoiseDraw`), or the posterior mean
(sample -1, no draw: at sigma = 0 one row stands for all N samples). The classifier's stream is an
input (a :class:`Job`: its tokens, N and draw); the generator's is one token history being decoded
(in Bayesian-model-averaging mode a sequence is one stream fed by its N sample rows; in per-sample
mode each sample row is its own stream).

:func:`plan_rows` orders rows into one segment per adapter (the routing of
:mod:`tfb_core.bayes.routing` wants each adapter's rows consecutive). Where every row of a segment
is a sample of a draw, each draw's samples are 0..S_d-1 and each sample has the same number g of
rows, the rows go draw-major then sample-major and the module noise is the draws' own (S_d, r, in)
tensors (views of one draw; several draws concatenated) with ``group`` = g; otherwise
stream-major, with the draws gathered per row (:func:`segment_noise`). :func:`arm` sets a
forward's :class:`Segment` s on the posteriors and the routing; :func:`pad_left` pads the rows'
tokens on the left, positions counting real tokens only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from tfb_core.bayes.posterior import NoiseDraw, TFBPosterior


@dataclass
class Job:
    """One input of a batched forward: its tokens, its N, and the noise its samples use; and, where a
    forward mixes adapters or label sets, its adapter (index among the model's), sigma and class-token
    ids. A None among those three is the forward's: the classifier that runs it (its adapter and labels'
    ids, or the ids given to ``run_jobs``) and the sigma given to it."""

    tokens: list[int]
    n_samples: int
    noise: NoiseDraw | None  # None: the posterior mean (sigma = 0)
    adapter: int | None = None  # None: the adapter of the classifier that runs the forward
    sigma: float | None = None  # None: the sigma the forward is run at
    class_ids: torch.Tensor | None = None  # None: run_jobs' class_ids, by default the classifier's own


@dataclass(frozen=True)
class Row:
    """One row of a forward."""

    stream: int
    adapter: int
    sample: int  # index in ``noise``; -1: the posterior mean
    noise: NoiseDraw | None  # None: the posterior mean

    @property
    def noisy(self) -> bool:
        return self.noise is not None and self.sample >= 0


@dataclass
class Segment:
    """Consecutive rows of one forward that use one adapter: its posterior samples (per module
    (rows / group, r, in) draws, None: the posterior mean), sigma and rows per sample."""

    adapter: int
    rows: int
    z_rows: list[torch.Tensor] | None
    sigma: float
    group: int = 1

    @property
    def noisy(self) -> bool:
        return self.z_rows is not None and self.sigma != 0.0

    @property
    def distinct(self) -> int:
        """Distinct A' samples among the segment's rows."""
        return self.z_rows[0].shape[0] if self.noisy else 1


def rows_of(n_samples: int, sigma: float) -> int:
    """Rows an input of N samples takes in a forward: N, or 1 at sigma = 0 (every sample is the mean)."""
    return n_samples if sigma > 0.0 else 1


def job_rows(job: int, adapter: int, n_samples: int, noise: NoiseDraw | None, sigma: float) -> list[Row]:
    """The rows of one input: a row per sample of ``noise`` at sigma > 0, else one mean row."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if sigma > 0.0 and noise is not None:
        return [Row(job, adapter, n, noise) for n in range(n_samples)]
    return [Row(job, adapter, -1, None)]


@dataclass(frozen=True)
class SegmentPlan:
    """The consecutive rows of one adapter in a forward: indices into the given rows, in order."""

    adapter: int
    rows: tuple[int, ...]
    uniform: bool  # rows n*group .. (n+1)*group - 1 are sample n (of the draws, one after the other)
    group: int  # rows per sample when uniform, else 1
    draws: tuple[NoiseDraw, ...] = ()  # a uniform plan's draws, in row order
    samples: tuple[int, ...] = ()  # a uniform plan's samples of each draw (S_d)

    @property
    def key(self) -> Hashable | None:
        """What identifies the plan's samples (each draw's :attr:`NoiseDraw.key` and S_d): a kept
        prefix's key; None where the rows gather samples row by row."""
        return tuple(zip((d.key for d in self.draws), self.samples, strict=True)) if self.uniform else None


def _uniform(rows: Sequence[Row], members: Sequence[int]
             ) -> tuple[list[int], int, tuple[NoiseDraw, ...], tuple[int, ...]] | None:
    """(order, group, draws, S_d per draw) of sample-major rows, or None (see the module doc)."""
    counts: dict[Hashable, dict[int, int]] = {}
    draws: dict[Hashable, NoiseDraw] = {}
    for i in members:
        row = rows[i]
        if not row.noisy:
            return None
        key = row.noise.key
        draws.setdefault(key, row.noise)
        per = counts.setdefault(key, {})
        per[row.sample] = per.get(row.sample, 0) + 1
    groups = {g for per in counts.values() for g in per.values()}
    if len(groups) != 1 or any(sorted(per) != list(range(len(per))) for per in counts.values()):
        return None
    rank = {key: k for k, key in enumerate(draws)}
    order = sorted(members, key=lambda i: (rank[rows[i].noise.key], rows[i].sample, rows[i].stream))
    return order, groups.pop(), tuple(draws.values()), tuple(len(counts[key]) for key in draws)


def plan_rows(rows: Sequence[Row]) -> list[SegmentPlan]:
    """One segment per adapter (ascending), each sample-major where it can be (see module doc)."""
    by_adapter: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_adapter.setdefault(row.adapter, []).append(i)
    plans = []
    for adapter in sorted(by_adapter):
        members = by_adapter[adapter]
        uniform = _uniform(rows, members)
        if uniform is not None:
            order, group, draws, S = uniform
            plans.append(SegmentPlan(adapter, tuple(order), True, group, draws, S))
        else:
            order = sorted(members, key=lambda i: (rows[i].stream, rows[i].sample))
            plans.append(SegmentPlan(adapter, tuple(order), False, 1))
    return plans


def layout(rows: Sequence[Row]) -> tuple[list[int], list[SegmentPlan]]:
    """(order, plans): the forward order of ``rows`` (indices into them) and the segment plans over
    the rows *in that order* (``[rows[i] for i in order]``)."""
    plans = plan_rows(rows)
    order = [i for plan in plans for i in plan.rows]
    out, at = [], 0
    for plan in plans:
        out.append(SegmentPlan(plan.adapter, tuple(range(at, at + len(plan.rows))), plan.uniform, plan.group,
                               plan.draws, plan.samples))
        at += len(plan.rows)
    return order, out


def segment_noise(plan: SegmentPlan, rows: Sequence[Row], posterior: TFBPosterior) -> list[torch.Tensor] | None:
    """Per module of ``posterior`` the (rows / group, r, in) draws of a segment's rows (zeros for
    rows of the posterior mean among noisy ones); None when no row is noisy."""
    if plan.uniform:
        if len(plan.draws) == 1:
            S = plan.samples[0]
            return [z if z.shape[0] == S else z[:S] for z in plan.draws[0].z]  # views: sample-major rows
        return [torch.cat([d.z[k][:S] for d, S in zip(plan.draws, plan.samples, strict=True)])
                for k in range(len(plan.draws[0].z))]
    members = [rows[i] for i in plan.rows]
    if not any(row.noisy for row in members):
        return None
    modules = posterior.modules
    pieces: list[list[torch.Tensor]] = []  # per run of rows from one draw (or of mean rows): per module
    run: list[Row] = []
    for row in [*members, None]:
        if run and (row is None or row.noise is not run[0].noise or row.noisy != run[0].noisy):
            if run[0].noisy:
                idx = torch.tensor([r.sample for r in run], device=posterior.device)
                pieces.append([z.index_select(0, idx) for z in run[0].noise.z])
            else:
                pieces.append([torch.zeros((len(run), *m.lora_A.shape), dtype=m.lora_A.dtype, device=m.lora_A.device)
                               for m in modules])
            run = []
        if row is not None:
            run.append(row)
    return [torch.cat([p[k] for p in pieces]) for k in range(len(modules))]


def build_segments(plans: Sequence[SegmentPlan], rows: Sequence[Row], posteriors: Sequence[TFBPosterior],
                   sigmas: Mapping[int, float]) -> list[Segment]:
    """The forward's :class:`Segment` per plan: rows, noise, sigma (``sigmas[adapter]``), group."""
    out = []
    for plan in plans:
        sigma = float(sigmas.get(plan.adapter, 0.0))
        z = segment_noise(plan, rows, posteriors[plan.adapter]) if sigma > 0.0 else None
        out.append(Segment(plan.adapter, len(plan.rows), z, sigma if z is not None else 0.0,
                           plan.group if z is not None else 1))
    return out


def arm(segments: Sequence[Segment], posteriors: Sequence[TFBPosterior], routing, prefix_pass: bool = False) -> None:
    """Set each segment's noise on its adapter's posterior and the routing of rows to adapters.

    ``prefix_pass``: the forward of a shared prefix, one row per distinct sample of each segment."""
    bounds, start = [], 0
    for seg in segments:
        n = seg.distinct if prefix_pass else seg.rows
        posteriors[seg.adapter].set_noise(seg.sigma, seg.z_rows, 1 if prefix_pass else seg.group)
        bounds.append((seg.adapter, start, start + n))
        start += n
    routing.segments = None if len(bounds) == 1 and bounds[0][0] == 0 else bounds


def disarm(segments: Sequence[Segment], posteriors: Sequence[TFBPosterior], routing) -> None:
    for seg in segments:
        posteriors[seg.adapter].clear_noise()
    routing.segments = None


def union_ids(ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """One forward's class-token ids (the union of its jobs') and, per job, the columns of its own
    ids in it (None: the whole union, the common case of one label set)."""
    first = ids[0]
    distinct = {id(i): i for i in ids}  # jobs of one label set share its tensor: compare each set once
    if all(torch.equal(i, first) for i in distinct.values()):
        return first, [None] * len(ids)
    position: dict[int, int] = {}
    lists = {k: i.tolist() for k, i in distinct.items()}  # one copy to the host per label set
    for values in lists.values():
        for t in values:
            position.setdefault(t, len(position))
    union = torch.tensor(list(position), device=first.device)
    cols = {k: torch.tensor([position[t] for t in values]) for k, values in lists.items()}
    return union, [cols[id(i)] for i in ids]


# --- the tokens of the rows ------------------------------------------------------------------------
def pad_left(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (R, T), of token lists padded on the left
    (positions count real tokens only: left padding must not shift them)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    if device is None:
        return ids, mask, positions
    return ids.to(device), mask.to(device), positions.to(device)


def cache_keyword(forward: Callable) -> str:
    """The keyword a model's ``forward`` takes its key/value cache by: transformers renamed
    ``past_key_values`` to ``cache`` (5.2x; the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
