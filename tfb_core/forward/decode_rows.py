"""The rows of one decode forward: which stream and posterior sample each row is, and its noise.

A decode step runs every active row once. A *stream* is one token history being decoded: in
Bayesian-model-averaging mode a sequence is one stream fed by its N sample rows (all get the
token chosen from p̄); in per-sample mode each sample row is its own stream. A row is
(stream, adapter, sample n of a :class:`~tfb_core.bayes.posterior.NoiseDraw`), or the posterior
mean (sample -1, no draw): at sigma = 0 one row stands for all N samples.

:func:`plan_rows` orders rows into one segment per adapter (the routing of
:mod:`tfb_core.bayes.routing` wants each adapter's rows consecutive). Where every row of a segment
is a sample of one draw and each sample 0..S-1 has the same number g of rows, the rows go
sample-major and the module noise is the draw's own (S, r, in) tensors with ``group`` = g (no
copy, as the classifier's layout); otherwise stream-major, with the draws gathered per row
(:func:`segment_noise`, a copy made again only when the set of rows changes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from tfb_core.bayes.posterior import NoiseDraw, TFBPosterior
from tfb_core.forward.layout import Segment


@dataclass(frozen=True)
class Row:
    """One row of a decode forward."""

    stream: int
    adapter: int
    sample: int  # index in ``noise``; -1: the posterior mean
    noise: NoiseDraw | None  # None: the posterior mean

    @property
    def noisy(self) -> bool:
        return self.noise is not None and self.sample >= 0


@dataclass(frozen=True)
class SegmentPlan:
    """The consecutive rows of one adapter in a forward: indices into the given rows, in order."""

    adapter: int
    rows: tuple[int, ...]
    uniform: bool  # rows n*group .. (n+1)*group - 1 are sample n of one draw, n = 0..S-1
    group: int  # rows per sample when uniform, else 1


def plan_rows(rows: Sequence[Row]) -> list[SegmentPlan]:
    """One segment per adapter (ascending), each sample-major where it can be (see module doc)."""
    by_adapter: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_adapter.setdefault(row.adapter, []).append(i)
    plans = []
    for adapter in sorted(by_adapter):
        members = by_adapter[adapter]
        first = rows[members[0]]
        samples: dict[int, int] = {}
        same_draw = all(rows[i].noisy and rows[i].noise is first.noise for i in members)
        if same_draw:
            for i in members:
                samples[rows[i].sample] = samples.get(rows[i].sample, 0) + 1
        counts = set(samples.values())
        if same_draw and len(counts) == 1 and sorted(samples) == list(range(len(samples))):
            order = sorted(members, key=lambda i: (rows[i].sample, rows[i].stream))
            plans.append(SegmentPlan(adapter, tuple(order), True, counts.pop()))
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
        out.append(SegmentPlan(plan.adapter, tuple(range(at, at + len(plan.rows))), plan.uniform, plan.group))
        at += len(plan.rows)
    return order, out


def segment_noise(plan: SegmentPlan, rows: Sequence[Row], posterior: TFBPosterior) -> list[torch.Tensor] | None:
    """Per module of ``posterior`` the (rows / group, r, in) draws of a segment's rows (zeros for
    rows of the posterior mean among noisy ones); None when no row is noisy."""
    members = [rows[i] for i in plan.rows]
    if not any(row.noisy for row in members):
        return None
    if plan.uniform:
        n = len(members) // plan.group
        return [z[:n] for z in members[0].noise.z]  # views: sample-major rows
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


def arm(segments: Sequence[Segment], posteriors: Sequence[TFBPosterior], routing) -> None:
    """Set each segment's noise on its adapter's posterior and the routing of rows to adapters."""
    bounds, start = [], 0
    for seg in segments:
        posteriors[seg.adapter].set_noise(seg.sigma, seg.z_rows, seg.group)
        bounds.append((seg.adapter, start, start + seg.rows))
        start += seg.rows
    routing.segments = None if len(bounds) == 1 and bounds[0][0] == 0 else bounds


def disarm(segments: Sequence[Segment], posteriors: Sequence[TFBPosterior], routing) -> None:
    for seg in segments:
        posteriors[seg.adapter].clear_noise()
    routing.segments = None
