"""The rows of one forward: which job and sample each row is, and which noise it carries.

Pure bookkeeping over token lists, Ns and draws: no model runs here. A :class:`Job` is one input
with its N and noise draw; :func:`row_layout` orders the rows of many jobs sample-major, so that
jobs sharing a draw share its samples; a :class:`Segment` is the consecutive rows of one adapter;
:func:`noise_rows` gathers each module's draws for a layout's rows (views where it can).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
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


@dataclass(frozen=True)
class RowLayout:
    """Where each row of one forward comes from, and which noise it carries.

    ``owner[r]`` = (job, sample) of row r; sample -1: the posterior mean, standing for all the job's
    samples. ``blocks``: the noise of consecutive rows, in row order: (job whose draw, its sample
    index per row), or (count, None) for rows of the posterior mean among noisy rows; empty when
    no row is noisy. ``uniform``: every draw has as many jobs, all with one N, so rows
    n*group .. (n+1)*group - 1 share sample n and each module gets the N samples as they are
    (views of the draw, ``group`` = jobs per draw) instead of one gathered copy per row.
    """

    owner: list[tuple[int, int]]
    blocks: list[tuple[int, list[int] | None]]
    uniform: bool
    group: int


def row_layout(n_samples: Sequence[int], draws: Sequence[Hashable | None]) -> RowLayout:
    """The rows of one forward of jobs with N ``n_samples[j]`` and noise ``draws[j]`` (a key that
    identifies the draw; None: the posterior mean). Pure: no model, no tensors."""
    groups: dict[Hashable | None, list[int]] = {}
    for j, (n, key) in enumerate(zip(n_samples, draws, strict=True)):
        if n < 1:
            raise ValueError(f"n_samples must be >= 1, got {n}")
        groups.setdefault(key, []).append(j)
    noisy = [m for key, m in groups.items() if key is not None]
    uniform = bool(noisy) and None not in groups and len({len(m) for m in noisy}) == 1 and all(
        len({n_samples[j] for j in m}) == 1 for m in noisy)
    owner: list[tuple[int, int]] = []
    blocks: list[tuple[int, list[int] | None]] = []
    for key, members in groups.items():
        if key is None:  # posterior mean: one row per job
            owner += [(j, -1) for j in members]
            if noisy:
                blocks.append((len(members), None))
            continue
        sample_idx = []
        for n in range(max(n_samples[j] for j in members)):  # sample-major
            for j in members:
                if n < n_samples[j]:
                    owner.append((j, n))
                    sample_idx.append(n)
        blocks.append((members[0], sample_idx))
    return RowLayout(owner, blocks, uniform, len(noisy[0]) if uniform else 1)


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


def noise_rows(jobs: Sequence[Job], layout: RowLayout, posterior: TFBPosterior
               ) -> tuple[list[torch.Tensor] | None, Hashable]:
    """Per module the (R / group, r, in) draws of a layout's rows, and the key of its samples."""
    if not layout.blocks:  # the posterior mean only
        return None, ("mean",)
    modules = posterior.modules
    if layout.uniform:
        parts = [(jobs[j].noise, jobs[j].n_samples) for j, _ in layout.blocks]  # (draw, N) per draw
        z_rows = []
        for k in range(len(modules)):
            zs = [draw.z[k] if n == draw.n_samples else draw.z[k][:n] for draw, n in parts]  # views
            z_rows.append(zs[0] if len(zs) == 1 else torch.cat(zs))  # (sum of N, r, in)
        return z_rows, tuple((draw.key, n) for draw, n in parts)
    pieces: list[list[torch.Tensor]] = []
    for j, idx in layout.blocks:
        if idx is None:  # rows of the posterior mean in a noisy forward: zero noise
            pieces.append([torch.zeros((j, *m.lora_A.shape), dtype=m.lora_A.dtype, device=m.lora_A.device)
                           for m in modules])
        else:
            sel = torch.tensor(idx, device=posterior.device)
            pieces.append([z.index_select(0, sel) for z in jobs[j].noise.z])  # per module (R_g, r, in)
    return [torch.cat([p[k] for p in pieces]) for k in range(len(modules))], None
