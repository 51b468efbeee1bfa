"""The classifier: a causal LM with Bayesianized LoRA, read at the class tokens of the last position.

One :class:`BayesianClassifier` per adapter (several may share one base model and its forwards). It
tokenizes prompts, plans them into forwards (:mod:`~tfb_core.forward.planning`), lays out their rows
(:mod:`~tfb_core.forward.layout`), arms each adapter's posterior with its rows' noise
(:mod:`tfb_core.bayes`) and runs the base model once per forward. Rows are replicated sample-major
(row = n * B + b for one noise draw); every row carries its own sample of A', so prompts with
different seeds or different N can share one forward and a prompt's answer never depends on what
else is in the batch. Only the last position is read, and only the class-token rows of ``lm_head``
(and of its LoRA) are computed. A shared prompt prefix runs once per posterior sample and is kept
for later forwards (:mod:`~tfb_core.forward.prefix_cache`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tfb_core.bayes.posterior import NoiseDraw, TFBLinear, TFBPosterior
from tfb_core.bayes.routing import RoutedLinear, Routing, add_adapter, bayesianize_many, output_rows, remove_adapter
from tfb_core.data.loading import pad_token_id
from tfb_core.data.tasks import class_token_ids
from tfb_core.forward.layout import (
    Job,
    Row,
    Segment,
    arm,
    build_segments,
    cache_keyword,
    disarm,
    job_rows,
    layout,
    pad_left,
    rows_of,
    union_ids,
)
from tfb_core.forward.planning import (
    FORWARD_OVERHEAD_TOKENS,
    MAX_BATCH_TOKENS,
    MIN_SHARED_PREFIX,
    _common_prefix,
    attention_window,
    measure_forward_overhead,
    plan_chunks,
    shared_prefix,
)
from tfb_core.forward.prefix_cache import PREFIX_CACHE_SIZE, PrefixCache


class PromptTooLongError(ValueError):
    """A prompt with more tokens than the configured maximum."""


class EmptyPromptError(ValueError):
    """A prompt with no tokens at all (e.g. blank, with a tokenizer that adds no BOS): nothing to
    classify, and padded into a batch it would read only padding."""



class RawText(str):
    """A prompt text tokenized without the tokenizer's special tokens (a rendered chat template
    holds its own; vLLM's ``add_special_tokens: false``)."""


#: a prompt: a text (special tokens added), a :class:`RawText`, or token ids taken as they are
Prompt = str | Sequence[int]



def final_logits(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """What the model's own head does to its logits after ``lm_head``, elementwise (so it commutes
    with reading only the class tokens' columns): Cohere's ``logit_scale`` (multiplies), Granite's
    ``logits_scaling`` (divides), Gemma 2's ``final_logit_softcapping`` (cap · tanh(x / cap))."""
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    divide = getattr(config, "logits_scaling", None)
    if divide is not None:
        logits = logits / divide
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits

class BayesianClassifier:
    """A causal LM with a Bayesianized LoRA, classifying by the class tokens at the last position."""

    def __init__(self, model: nn.Module, tokenizer: Any, posterior: TFBPosterior, head: TFBLinear | None,
                 labels: Sequence[str], max_length: int = 300) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.posterior = posterior
        self.head = head  # this adapter's LoRA on lm_head, if any
        #: this classifier's adapter: its index among the model's (one base model can serve several,
        #: each through its own classifier: :meth:`for_adapter`), and every adapter's posterior
        self.adapter = 0
        #: every adapter's posterior by index (None: an adapter unloaded at run time; indices never move)
        self.posteriors: list[TFBPosterior | None] = [posterior]
        #: which rows use which adapter in a forward, read by every RoutedLinear of the model
        self.routing: Routing = next((m.routing for m in model.modules() if isinstance(m, RoutedLinear)), Routing())
        self.max_length = max_length
        self.truncate = False  # set by the engine from its task
        self.set_labels(labels)
        self.pad_id = pad_token_id(tokenizer)
        #: run a prefix shared by all rows once per posterior sample (see :meth:`_last_hidden`)
        self.share_prefix = True
        #: rows wider than a sliding attention window are not padded after a shared prefix
        self.window = attention_window(model.config)
        #: fixed cost of a forward in prompt tokens, and most tokens per forward, for :meth:`plan`
        #: (None: by device type)
        self.forward_overhead_tokens: float | None = None
        self.max_batch_tokens: float | None = None
        #: recent shared prefixes' keys and values per posterior sample, reused by later forwards
        self.prefix_cache = PrefixCache()
        self.backbone = model.base_model  # the decoder stack without lm_head
        #: runs one forward of the model (``run(fn) -> fn()``): a background thread's view hands its
        #: forwards to the thread that owns the model (None: called here)
        self.forward_runner: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None
        self._cache_kw = cache_keyword(self.backbone.forward)

    @classmethod
    def from_peft(cls, peft_model: nn.Module, tokenizer: Any, labels: Sequence[str],
                  d_floor: float = 1e-6, max_length: int = 300) -> BayesianClassifier:
        """Bayesianize a peft model in place (B'A' = BA) and wrap it."""
        return cls.from_peft_many(peft_model, tokenizer, [None], [labels], d_floor, max_length)[0]

    @classmethod
    def from_peft_many(cls, peft_model: nn.Module, tokenizer: Any, adapters: Sequence[str | None],
                       labels: Sequence[Sequence[str]], d_floor: float = 1e-6,
                       max_length: int = 300) -> list[BayesianClassifier]:
        """Bayesianize several adapters of one peft model (peft adapter names) and return one
        classifier per adapter, all sharing the base model, its forwards and its prefix cache."""
        model, posteriors, heads, _ = bayesianize_many(peft_model, list(adapters), d_floor=d_floor)
        first = cls(model, tokenizer, posteriors[0], heads[0], labels[0], max_length=max_length)
        first.posteriors = posteriors
        # as many kept prefixes per adapter as one adapter has: adapters taking turns must not evict
        # each other's (six adapters in four entries would miss every time)
        first.prefix_cache = PrefixCache(PREFIX_CACHE_SIZE * len(posteriors))
        return [first] + [first.for_adapter(a, labels[a], heads[a]) for a in range(1, len(posteriors))]

    def for_adapter(self, adapter: int, labels: Sequence[str], head: TFBLinear | None = None) -> BayesianClassifier:
        """The classifier of another adapter of this model: same base model, prefix cache and
        forwards (a forward may mix rows of both), its own posterior and labels."""
        view = copy.copy(self)
        view.adapter, view.posterior, view.head = adapter, self.posteriors[adapter], head
        view.set_labels(labels)
        return view

    @property
    def device(self) -> torch.device:
        return self.posterior.device

    @property
    def output_embeddings(self) -> nn.Module:
        """``lm_head``: a RoutedLinear where some adapter has LoRA on it (looked up each time: an
        adapter loaded or unloaded at run time may wrap or unwrap it)."""
        return self.model.get_output_embeddings()

    # --- adapters at run time -----------------------------------------------------------------------
    def add_adapter(self, posterior: TFBPosterior, head: TFBLinear | None, labels: Sequence[str]) -> BayesianClassifier:
        """Put another adapter's posterior (:func:`tfb_core.bayes.routing.fit_adapter`) into this
        model's forwards under the next unused index, and return its classifier (:meth:`for_adapter`).
        On the thread that owns the model."""
        index = len(self.posteriors)
        add_adapter(self.model, posterior, index, self.routing)
        self.posteriors.append(posterior)  # the list every view and the generator share
        self.prefix_cache.capacity += PREFIX_CACHE_SIZE
        try:
            return self.for_adapter(index, labels, head)
        except Exception:
            self.remove_adapter(index)
            raise

    def remove_adapter(self, index: int) -> None:
        """Take adapter ``index`` out of the model's forwards and free it: its layers' slots, its
        posterior, its kept prefixes. On the thread that owns the model."""
        if index == 0 or not 0 < index < len(self.posteriors) or self.posteriors[index] is None:
            raise ValueError(f"adapter index {index} is not a removable adapter of this model")
        remove_adapter(self.model, index)
        self.posteriors[index] = None
        self.drop_prefixes(index)
        self.prefix_cache.capacity = max(PREFIX_CACHE_SIZE, self.prefix_cache.capacity - PREFIX_CACHE_SIZE)

    def drop_prefixes(self, index: int) -> int:
        """Drop the kept prefixes computed with adapter ``index``'s samples; returns how many."""
        def keep(key: Hashable) -> bool:
            samples = key[0] if isinstance(key, tuple) and key else None
            return not (isinstance(samples, tuple) and any(isinstance(s, tuple) and s and s[0] == index
                                                           for s in samples))

        return self.prefix_cache.drop(keep)

    def set_labels(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self.class_ids = torch.tensor(class_token_ids(self.tokenizer, self.labels), dtype=torch.long, device=self.device)

    def class_ids_for(self, labels: Sequence[str] | None) -> torch.Tensor:
        if labels is None or list(labels) == self.labels:
            return self.class_ids
        return torch.tensor(class_token_ids(self.tokenizer, labels), device=self.device)

    # --- tokens -------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[Prompt], keep_last: int | None = None) -> list[list[int]]:
        """Token ids of each prompt (with the tokenizer's special tokens, except a :class:`RawText`;
        token ids as given). Too long is an error, or, with :attr:`truncate`, cut from the right at
        ``max_length`` by the tokenizer as the reference code did (the paper's tasks: the adapters
        were trained and evaluated so). ``keep_last``: only the last K tokens of each prompt are
        kept (vLLM's ``truncate_prompt_tokens``), before the length check."""
        out: list[list[int]] = [[] for _ in prompts]
        for special in (True, False):
            idx = [i for i, p in enumerate(prompts) if isinstance(p, str) and isinstance(p, RawText) != special]
            if not idx:
                continue
            texts = [str(prompts[i]) for i in idx]
            if self.truncate and keep_last is None:
                toks = self.tokenizer(texts, add_special_tokens=special, truncation=True,
                                      max_length=self.max_length)["input_ids"]
            else:
                toks = self.tokenizer(texts, add_special_tokens=special)["input_ids"]
            for i, t in zip(idx, toks, strict=True):
                out[i] = list(t)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                out[i] = [int(t) for t in p]
        if keep_last is not None:
            out = [t[-keep_last:] if keep_last > 0 else [] for t in out]
        for i, toks in enumerate(out):
            if not toks:
                raise EmptyPromptError(f"input {i} has no tokens: nothing to classify")
            if len(toks) > self.max_length:
                raise PromptTooLongError(f"input {i} is {len(toks)} tokens, more than the maximum of "
                                         f"{self.max_length}")
        return out

    def plan(self, token_lists: Sequence[Sequence[int]], rows: Sequence[int], max_rows: int,
             keys: Sequence[Any] | None = None) -> list[list[int]]:
        """:func:`plan_chunks` with this model's forward overhead and token cap."""
        kind = "cpu" if self.device.type == "cpu" else "other"
        overhead = self.forward_overhead_tokens
        if overhead is None:
            overhead = FORWARD_OVERHEAD_TOKENS[kind]
        cap = self.max_batch_tokens if self.max_batch_tokens is not None else MAX_BATCH_TOKENS[kind]
        return plan_chunks(token_lists, rows, max_rows, overhead, keys, cap)

    def run_planned(self, units: Sequence[Sequence[Job]], max_rows: int, sigma: float,
                    prefix: int | Mapping[int, int] | None = None, keys: Sequence[Any] | None = None,
                    on_chunk: Callable[[int, int], None] | None = None,
                    skip: Callable[[int], bool] | None = None) -> list[list[torch.Tensor]]:
        """Plan forwards by length (:meth:`plan`), run them, and return the results in input order.

        A unit is what must share a forward: one input's jobs (one job, or the same tokens under
        several draws, as the sigma search has). All jobs of a unit have its first job's tokens.
        Returns per unit the (n_i, C) per-sample probabilities of each of its jobs. ``keys``: per
        unit, what keeps units apart where a forward of one key is cheaper (a draw and its N);
        ``on_chunk(units, rows)`` after each forward. ``skip(unit)``, asked just before the forward a
        unit is planned in: True leaves it out (its result is an empty list); the others' answers do
        not depend on it.
        """
        rows = [sum(rows_of(job.n_samples, sigma if job.sigma is None else job.sigma) for job in unit)
                for unit in units]
        out: list[list[torch.Tensor]] = [[] for _ in units]
        for chunk in self.plan([unit[0].tokens for unit in units], rows, max_rows, keys):
            if skip is not None:
                chunk = [u for u in chunk if not skip(u)]
                if not chunk:
                    continue
            jobs = [job for u in chunk for job in units[u]]
            results = iter(self.run_jobs(jobs, sigma, prefix=prefix))
            for u in chunk:
                out[u] = [next(results) for _ in units[u]]
            if on_chunk is not None:
                on_chunk(len(chunk), sum(rows[u] for u in chunk))
        return out

    def measure_forward_overhead(self, job: Job, sigma: float, max_rows: int, prefix: int | None = None,
                                 repeats: int = 2) -> float | None:
        """Fixed cost of a forward in tokens, from timing forwards of 1 and k copies of ``job``
        (best of ``repeats``, :func:`~tfb_core.forward.planning.measure_forward_overhead`); sets
        :attr:`forward_overhead_tokens`. None (and nothing set) when the timings do not resolve it
        (k = 1, or the bigger forward was not slower)."""
        rows = rows_of(job.n_samples, sigma)
        share = prefix if prefix and prefix >= MIN_SHARED_PREFIX else 0
        overhead = measure_forward_overhead(lambda count: self.run_jobs([job] * count, sigma, prefix=prefix),
                                            rows * (len(job.tokens) - share), min(8, max_rows // rows), repeats)
        if overhead is not None:
            self.forward_overhead_tokens = overhead
        return overhead

    #: the batch's shared prefix (:func:`shared_prefix`): pass it to every :meth:`run_jobs` of a
    #: planned batch, so that its forwards reuse one prefix computation
    shared_prefix = staticmethod(shared_prefix)

    # --- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def class_logits(self, rows: Sequence[list[int]], z_rows: list[torch.Tensor] | None, sigma: float,
                     class_ids: torch.Tensor | None = None, group: int = 1, prefix: int | None = None,
                     samples: Hashable | None = None) -> torch.Tensor:
        """Class-token logits at the last position of each row, with this classifier's adapter: (R, C) float32.

        ``z_rows[k]`` (R / group, r, in) are the standard-normal draws of module k, one per
        ``group`` consecutive rows; the deviation of A' is (sigma / d) * z. ``None`` is the posterior mean.
        ``prefix``, ``samples``: see :meth:`_last_hidden`.
        """
        segment = Segment(self.adapter, len(rows), z_rows, sigma, group)
        return self.segment_logits(rows, [segment], self.class_ids if class_ids is None else class_ids,
                                   prefix, None if samples is None else ((self.adapter, samples, float(sigma)),))

    def segment_logits(self, rows: Sequence[list[int]], segments: Sequence[Segment], class_ids: torch.Tensor,
                       prefix: int | None = None, samples: Hashable | None = None) -> torch.Tensor:
        """Logits of ``class_ids`` at the last position of rows whose consecutive ``segments`` use
        their own adapter, samples and sigma: (R, C) float32. One forward of the base model."""
        def forward() -> torch.Tensor:  # inference mode is per thread: set where it runs
            with torch.inference_mode():
                return self._segment_logits(rows, segments, class_ids, prefix, samples)

        return forward() if self.forward_runner is None else self.forward_runner(forward)

    def _segment_logits(self, rows: Sequence[list[int]], segments: Sequence[Segment], class_ids: torch.Tensor,
                        prefix: int | None, samples: Hashable | None) -> torch.Tensor:
        try:
            hidden = self._last_hidden(rows, segments, prefix, samples)  # (R, H)
            logits = final_logits(self.model.config, output_rows(self.output_embeddings, hidden, class_ids))  # (R, C)
        finally:
            self._disarm(segments)
        return logits.float()

    def _arm(self, segments: Sequence[Segment], prefix_pass: bool = False) -> None:
        arm(segments, self.posteriors, self.routing, prefix_pass)

    def _disarm(self, segments: Sequence[Segment]) -> None:
        disarm(segments, self.posteriors, self.routing)

    def _last_hidden(self, rows: Sequence[list[int]], segments: Sequence[Segment], prefix: int | None = None,
                     samples: Hashable | None = None) -> torch.Tensor:
        """Final hidden state at the last position of each row: (R, H).

        Rows that start with the same tokens (a task's instruction) and use S distinct posterior
        samples (over all segments: an adapter's samples, or its mean) share that prefix: it runs
        once per sample (S rows), its keys and values are copied to the rows of that sample, and
        only the suffixes run on all R rows. ``prefix`` caps the shared length: a task's instruction
        or a batch's common prefix, the same for all its forwards. With such a ``prefix`` and
        ``samples`` (a key that identifies the segments' samples: their adapters, draws'
        :attr:`NoiseDraw.key` and N, and sigmas), the prefix's keys and values are kept in
        :attr:`prefix_cache` and reused by the next forward with the same samples and prefix tokens,
        also when S = R (one input).
        """
        n_rows = len(rows)
        if sum(seg.rows for seg in segments) != n_rows:
            raise ValueError(f"segments cover {sum(seg.rows for seg in segments)} rows, the forward has {n_rows}")
        n_distinct = sum(seg.distinct for seg in segments)
        shared = _common_prefix(rows)
        key = None
        if prefix:  # remembered for the next forwards
            shared = min(shared, prefix)
            key = None if samples is None else (samples, n_distinct, tuple(rows[0][:shared]))
        memo = self.prefix_cache.get(key) if key is not None else None  # the forward's own fork
        if not (self.share_prefix and shared >= MIN_SHARED_PREFIX and (n_distinct < n_rows or key is not None)
                and all(not seg.noisy or seg.distinct * seg.group == seg.rows for seg in segments)
                and (self.window is None or max(len(r) for r in rows) <= self.window)):
            input_ids, mask, position_ids = pad_left(rows, self.pad_id, self.device)  # (R, T)
            self._arm(segments)
            return self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state[:, -1]
        from transformers import DynamicCache

        if memo is not None:
            cache = memo  # (S, heads, P, d) per layer, shared with the kept entry: no copy
        else:
            head_ids = torch.tensor(rows[0][:shared], device=self.device).expand(n_distinct, shared)  # (S, P)
            cache = DynamicCache(config=self.model.config)
            self._arm(segments, prefix_pass=True)  # one row per sample
            positions = torch.arange(shared, device=self.device).expand(n_distinct, shared)
            self.backbone(input_ids=head_ids, position_ids=positions, use_cache=True, **{self._cache_kw: cache})
            if key is not None:
                self.prefix_cache.put(key, cache)
        owner, base = [], 0  # row -> its sample's row of the prefix
        for seg in segments:
            local = torch.arange(seg.rows, device=self.device)
            owner.append(base + (local // seg.group if seg.noisy else local * 0))
            base += seg.distinct
        cache.reorder_cache(owner[0] if len(owner) == 1 else torch.cat(owner))  # (R, heads, P, d) per layer
        tail_ids, tail_mask, tail_positions = pad_left([r[shared:] for r in rows], self.pad_id, self.device)  # (R, T - P)
        mask = torch.cat([torch.ones((n_rows, shared), dtype=tail_mask.dtype, device=self.device), tail_mask], 1)
        position_ids = shared + tail_positions
        self._arm(segments)
        return self.backbone(input_ids=tail_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                             **{self._cache_kw: cache}).last_hidden_state[:, -1]

    def run_jobs(self, jobs: Sequence[Job], sigma: float, class_ids: torch.Tensor | None = None,
                 prefix: int | Mapping[int, int] | None = None) -> list[torch.Tensor]:
        """One batched forward for all jobs; per job its per-sample probabilities (n_i, C).

        Jobs that share a :class:`NoiseDraw` share its sample-major rows; at sigma = 0 (or with no
        noise) each job needs one row whose result stands for all its samples (:func:`~tfb_core.forward.layout.plan_rows`).
        Jobs of other adapters (``Job.adapter``) get their own segment of rows, with their own sigma
        and class ids: one forward of the base model for all. ``class_ids``: those of the jobs that
        carry none (:attr:`Job.class_ids` None; default: this classifier's labels', :attr:`class_ids`).
        ``prefix``: the shared prefix of the whole batch these jobs belong to (:meth:`shared_prefix`),
        or per adapter its instruction's (a forward of several adapters shares the shortest).
        """
        default_ids = self.class_ids if class_ids is None else class_ids
        by_adapter: dict[int, list[int]] = {}
        for j, job in enumerate(jobs):
            if not job.tokens:
                raise EmptyPromptError(f"job {j} has no tokens: nothing to classify")
            by_adapter.setdefault(self.adapter if job.adapter is None else job.adapter, []).append(j)
        rows: list[Row] = []
        sigmas: dict[int, float] = {}
        for adapter, members in by_adapter.items():
            seg_sigmas = {sigma if jobs[j].sigma is None else jobs[j].sigma for j in members}
            if len(seg_sigmas) != 1:
                raise ValueError(f"adapter {adapter}: one sigma per forward, got {sorted(seg_sigmas)}")
            sigmas[adapter] = seg_sigma = seg_sigmas.pop()
            for j in members:
                job = jobs[j]
                if seg_sigma > 0.0 and job.noise is not None and job.noise.n_samples < job.n_samples:
                    raise ValueError(f"noise has {job.noise.n_samples} samples, job needs {job.n_samples}")
                rows += job_rows(j, adapter, job.n_samples, job.noise, seg_sigma)
        order, plans = layout(rows)
        owner = [rows[i] for i in order]  # rows in forward order
        segments = build_segments(plans, owner, self.posteriors, sigmas)
        samples = [(seg.adapter, ("mean",) if not seg.noisy else plan.key, seg.sigma)
                   for seg, plan in zip(segments, plans, strict=True)]
        if isinstance(prefix, Mapping):
            prefix = min(prefix.get(a, 0) for a in by_adapter) or None
        ids = [default_ids if job.class_ids is None else job.class_ids for job in jobs]
        union, cols = union_ids(ids)
        tokens = [jobs[row.stream].tokens for row in owner]
        keyed = all(key[1] is not None for key in samples)
        logits = self.segment_logits(tokens, segments, union, prefix, tuple(samples) if keyed else None)
        if all(c is None for c in cols):  # one label set: one softmax, one copy to the host
            probs = torch.softmax(logits, dim=-1).cpu()  # (R, C)
        else:
            logits = logits.cpu()  # (R, U)
            probs = [torch.softmax(logits[r, cols[row.stream]], dim=-1) for r, row in enumerate(owner)]
        out = [torch.empty((job.n_samples, len(ids[j]))) for j, job in enumerate(jobs)]
        for r, row in enumerate(owner):
            if row.sample < 0:
                out[row.stream][:] = probs[r]
            else:
                out[row.stream][row.sample] = probs[r]
        return out

    def sample_probs(self, prompts: Sequence[str], n_samples: int, seed: int | None = None, *, sigma: float,
                     noise: NoiseDraw | None = None, max_rows: int = 64, class_ids: torch.Tensor | None = None,
                     progress: Iterable[Any] | None = None, prefix: int | None = None) -> torch.Tensor:
        """Per-sample probabilities (B, N, C) of many prompts, in forwards of at most ``max_rows`` rows.

        The randomness is ``noise`` (a draw of at least N samples: e.g. common random numbers across
        sigmas) or the draw of ``seed`` (None: 0); both given is a ``ValueError``. ``class_ids``: the
        classes read (None: this classifier's labels'). ``prefix``: the prompts' shared instruction
        in tokens, reused by all forwards (default: what the prompts share).
        """
        if noise is not None and seed is not None:
            raise ValueError("give seed or noise, not both: noise fixes the samples, a seed draws them")
        tokens = self.tokenize(prompts)
        if sigma > 0.0 and noise is None:
            noise = self.posterior.draw(seed or 0, n_samples)
        prefix = self.shared_prefix(tokens) if prefix is None else prefix
        def update(units: int, rows: int) -> None:
            if progress is not None:
                progress.update(units)  # type: ignore[attr-defined]

        results = self.run_planned([[Job(t, n_samples, noise, class_ids=class_ids)] for t in tokens], max_rows, sigma,
                                   prefix, on_chunk=update)
        n_classes = len(self.labels if class_ids is None else class_ids)
        if not results:
            return torch.empty((0, n_samples, n_classes))
        return torch.stack([unit[0] for unit in results])  # (B, N, C)
