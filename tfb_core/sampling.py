"""The batched Monte Carlo forward: N adapter samples for B prompts in one forward of N*B rows.

Rows are replicated sample-major (row = n * B + b for one noise draw); every row carries its own
sample of A' (see :mod:`tfb_core.posterior`), so prompts with different seeds or different N can
share one forward and a prompt's answer never depends on what else is in the batch. Only the last
position is read, and only the class-token rows of ``lm_head`` (and of its LoRA) are computed.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tfb_core.posterior import NoiseDraw, TFBLinear, TFBPosterior, bayesianize
from tfb_core.tasks import class_token_ids

#: Shorter common prefixes are not worth a separate forward.
MIN_SHARED_PREFIX = 8
#: Shared prefixes kept for reuse (one per set of posterior samples: the default draw, a few seeds).
PREFIX_MEMO_SIZE = 4


def _common_prefix(rows: Sequence[list[int]]) -> int:
    """Length of the token prefix all rows share, leaving every row at least one token of its own."""
    first, shortest = rows[0], min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def shared_prefix(token_lists: Sequence[Sequence[int]]) -> int:
    """Tokens all inputs share (0 if fewer than MIN_SHARED_PREFIX, or only one input)."""
    n = _common_prefix(token_lists) if len(token_lists) > 1 else 0
    return n if n >= MIN_SHARED_PREFIX else 0


#: Default fixed cost of one forward, in prompt tokens (what a forward of this many more tokens costs):
#: measured about 30 for SmolLM2 on one CPU core, about 1000 for a Llama-3.1-8B shape on an H200,
#: where small forwards are bound by kernel launches (benchmarks/RESULTS.md).
FORWARD_OVERHEAD_TOKENS = {"cpu": 32, "other": 1024}
#: Default cap on the tokens one forward computes (rows x padded length past the shared prefix): on
#: a CPU, forwards past about a thousand tokens run slower per token (SmolLM2, one core: 4.1-4.8 ms
#: per token at 256-640 tokens, 5.0-5.1 at 2048-5120); a GPU has no such knee below its row limit.
MAX_BATCH_TOKENS: dict[str, float | None] = {"cpu": 1024, "other": None}


def plan_chunks(token_lists: Sequence[Sequence[int]], rows: Sequence[int], max_rows: int,
                overhead_tokens: float, keys: Sequence[Any] | None = None,
                max_tokens: float | None = None) -> list[list[int]]:
    """Group inputs into forwards of at most ``max_rows`` rows (and ``max_tokens`` tokens past the
    shared prefix, padding included), as cheaply as padding allows.

    Input i has ``rows[i]`` rows (its samples) and is padded to the longest input of its forward.
    Inputs are ordered by (key, length) and cut into consecutive chunks that minimise

        sum over forwards of  overhead_tokens + rows * longest  - rows * common prefix (one key)

    (dynamic programming, O(n * inputs per forward)). A forward whose inputs all have one key (one
    noise draw and N) runs only their suffixes: the common prefix (a task's instruction) runs once
    per posterior sample and is reused by every forward (:meth:`BayesianClassifier.run_jobs`). A
    small overhead (CPU) buckets inputs by length; a large one (GPU) packs as many rows as allowed.
    An input over either limit gets a forward of its own. Returns lists of indices.
    """
    n = len(token_lists)
    if n == 0:
        return []
    key_of = [0] * n if keys is None else list(keys)
    order = sorted(range(n), key=lambda i: (str(key_of[i]), len(token_lists[i])))
    prefix = shared_prefix(token_lists)
    inf = float("inf")
    best = [0.0] + [inf] * n  # best[j]: cheapest plan of the first j inputs (in order)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        last = order[j - 1]
        longest = len(token_lists[last])  # the longest of any chunk ending at j (sorted per key)
        total = 0
        one_key = True
        for i in range(j - 1, -1, -1):  # chunk order[i:j], growing to the left
            item = order[i]
            total += rows[item]
            if total > max_rows and i < j - 1:
                break
            one_key = one_key and key_of[item] == key_of[last]
            longest = max(longest, len(token_lists[item]))
            tokens = total * (longest - (prefix if one_key else 0))  # grows as the chunk grows
            if max_tokens is not None and tokens > max_tokens and i < j - 1:
                break
            cost = overhead_tokens + tokens
            if best[i] + cost <= best[j]:  # ties: the bigger chunk (fewer forwards)
                best[j] = best[i] + cost
                cut[j] = i
    chunks: list[list[int]] = []
    j = n
    while j > 0:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


class PromptTooLongError(ValueError):
    """A prompt with more tokens than the configured maximum."""


class EmptyPromptError(ValueError):
    """A prompt with no tokens at all (e.g. blank, with a tokenizer that adds no BOS): nothing to
    classify, and padded into a batch it would read only padding."""


@dataclass
class Job:
    """One input of a batched forward: its tokens, its N, and the noise its samples use."""

    tokens: list[int]
    n_samples: int
    noise: NoiseDraw | None  # None: the posterior mean (sigma = 0)


class BayesianClassifier:
    """A causal LM with a Bayesianized LoRA, classifying by the class tokens at the last position."""

    def __init__(self, model: nn.Module, tokenizer: Any, posterior: TFBPosterior, head: TFBLinear | None,
                 labels: Sequence[str], sigma: float = 0.0, max_length: int = 300) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.posterior = posterior
        self.head = head
        self.sigma = float(sigma)
        self.max_length = max_length
        self.set_labels(labels)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.bos_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has no pad, bos or eos token to pad with")
        self.pad_id = int(pad)
        #: run a prefix shared by all rows once per posterior sample (see :meth:`_last_hidden`)
        self.share_prefix = True
        #: fixed cost of a forward in prompt tokens, and most tokens per forward, for :meth:`plan`
        #: (None: by device type)
        self.forward_overhead_tokens: float | None = None
        self.max_batch_tokens: float | None = None
        # recent shared prefixes' keys and values per posterior sample, reused by later forwards with
        # the same prefix and samples: key -> (the draws it used (kept alive: ids are in the key), cache)
        self._prefix_memo: OrderedDict[Any, tuple[Any, Any]] = OrderedDict()
        self.backbone = model.base_model  # the decoder stack without lm_head
        self.output_embeddings = model.get_output_embeddings()
        # transformers renamed `past_key_values` to `cache` (5.2x; the old name goes in 5.40)
        params = inspect.signature(self.backbone.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_peft(cls, peft_model: nn.Module, tokenizer: Any, labels: Sequence[str], sigma: float = 0.0,
                  d_floor: float = 1e-6, max_length: int = 300) -> BayesianClassifier:
        """Bayesianize a peft model in place (B'A' = BA) and wrap it."""
        model, posterior, head = bayesianize(peft_model, d_floor=d_floor)
        return cls(model, tokenizer, posterior, head, labels, sigma=sigma, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return self.posterior.device

    def set_labels(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self.class_ids = torch.tensor(class_token_ids(self.tokenizer, self.labels), device=self.device)

    def class_ids_for(self, labels: Sequence[str] | None) -> torch.Tensor:
        if labels is None or list(labels) == self.labels:
            return self.class_ids
        return torch.tensor(class_token_ids(self.tokenizer, labels), device=self.device)

    # --- tokens -------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt (with the tokenizer's special tokens); too long is an error."""
        out = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        for i, toks in enumerate(out):
            if not toks:
                raise EmptyPromptError(f"input {i} has no tokens: nothing to classify")
            if len(toks) > self.max_length:
                raise PromptTooLongError(f"input {i} is {len(toks)} tokens, more than the maximum of "
                                         f"{self.max_length}")
        return out

    def _pad_left(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)  # (R, T), (R, T)

    def plan(self, token_lists: Sequence[Sequence[int]], rows: Sequence[int], max_rows: int,
             keys: Sequence[Any] | None = None) -> list[list[int]]:
        """:func:`plan_chunks` with this model's forward overhead and token cap."""
        kind = "cpu" if self.device.type == "cpu" else "other"
        overhead = self.forward_overhead_tokens
        if overhead is None:
            overhead = FORWARD_OVERHEAD_TOKENS[kind]
        cap = self.max_batch_tokens if self.max_batch_tokens is not None else MAX_BATCH_TOKENS[kind]
        return plan_chunks(token_lists, rows, max_rows, overhead, keys, cap)

    def measure_forward_overhead(self, job: Job, max_rows: int, prefix: int | None = None,
                                 repeats: int = 2) -> float | None:
        """Fixed cost of a forward in tokens, from timing forwards of 1 and k copies of ``job``
        (best of ``repeats``); sets :attr:`forward_overhead_tokens`. None (and nothing set) when
        the timings do not resolve it (k = 1, or the bigger forward was not slower)."""
        rows = job.n_samples if self.sigma > 0.0 else 1
        k = min(8, max_rows // rows)
        if k < 2:
            return None
        share = prefix if prefix and prefix >= MIN_SHARED_PREFIX else 0
        per_input = rows * (len(job.tokens) - share)  # tokens the planner counts for one input

        def best(count: int) -> float:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.run_jobs([job] * count, prefix=prefix)  # ends with a copy to the host: synchronised
                times.append(time.perf_counter() - t0)
            return min(times)

        one, many = best(1), best(k)
        slope = (many - one) / ((k - 1) * per_input)  # seconds per token
        if slope <= 0:
            return None
        self.forward_overhead_tokens = max(0.0, one / slope - per_input)
        return self.forward_overhead_tokens

    #: the batch's shared prefix (:func:`shared_prefix`): pass it to every :meth:`run_jobs` of a
    #: planned batch, so that its forwards reuse one prefix computation
    shared_prefix = staticmethod(shared_prefix)

    def clear_prefix_memo(self) -> None:
        """Forget the reused prefix keys and values (the next forward computes them again)."""
        self._prefix_memo.clear()

    # --- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def class_logits(self, rows: Sequence[list[int]], z_rows: list[torch.Tensor] | None, sigma: float,
                     class_ids: torch.Tensor | None = None, group: int = 1, prefix: int | None = None,
                     samples: tuple[Any, Any] | None = None) -> torch.Tensor:
        """Class-token logits at the last position of each row: (R, C) float32.

        ``z_rows[k]`` (R / group, r, in) are the standard-normal draws of module k, one per
        ``group`` consecutive rows; the deviation of A' is (sigma / d) * z. ``None`` is the posterior mean.
        ``prefix``, ``samples``: see :meth:`_last_hidden`.
        """
        ids = self.class_ids if class_ids is None else class_ids
        try:
            hidden = self._last_hidden(rows, z_rows, sigma, group, prefix, samples)  # (R, H)
            if self.head is not None:
                logits = self.head.rows(hidden, ids)  # (R, C)
            else:
                weight = self.output_embeddings.weight[ids]  # (C, H)
                logits = hidden.to(weight.dtype) @ weight.T
                if getattr(self.output_embeddings, "bias", None) is not None:
                    logits = logits + self.output_embeddings.bias[ids]
        finally:
            self.posterior.clear_noise()
        return logits.float()

    def _last_hidden(self, rows: Sequence[list[int]], z_rows: list[torch.Tensor] | None, sigma: float,
                     group: int, prefix: int | None = None, samples: tuple[Any, Any] | None = None) -> torch.Tensor:
        """Final hidden state at the last position of each row: (R, H).

        Rows that start with the same tokens (a task's instruction) and use S distinct posterior
        samples share that prefix: it runs once per sample (S rows), its keys and values are copied
        to the rows of that sample, and only the suffixes run on all R rows. ``prefix`` caps the
        shared length: a task's instruction or a batch's common prefix, the same for all its forwards.
        With such a ``prefix`` and ``samples`` = (a key that identifies the S samples, e.g. the ids
        of the draws and their N; the objects it refers to, kept alive while the key is remembered),
        the prefix's keys and values are kept and reused by the next forward with the same samples
        and prefix tokens, also when S = R (one input).
        """
        n_rows = len(rows)
        noisy = z_rows is not None and sigma != 0.0
        n_distinct = z_rows[0].shape[0] if noisy else 1  # distinct A' samples, one per `group` rows
        shared = _common_prefix(rows)
        key = None
        if prefix:  # remembered for the next forwards
            shared = min(shared, prefix)
            key = None if samples is None else (samples[0], float(sigma), n_distinct, tuple(rows[0][:shared]))
        memo = self._prefix_memo.get(key) if key is not None else None
        if memo is not None:
            self._prefix_memo.move_to_end(key)
        if not (self.share_prefix and shared >= MIN_SHARED_PREFIX and (n_distinct < n_rows or key is not None)
                and (not noisy or n_distinct * group == n_rows)):
            input_ids, mask = self._pad_left(rows)  # (R, T)
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding must not shift positions
            self.posterior.set_noise(sigma, z_rows, group)
            return self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state[:, -1]
        from transformers import DynamicCache

        if memo is not None:
            cache = copy.deepcopy(memo[1])  # (S, heads, P, d) per layer; reorder below must not touch the memo
        else:
            head_ids = torch.tensor(rows[0][:shared], device=self.device).expand(n_distinct, shared)  # (S, P)
            cache = DynamicCache(config=self.model.config)
            self.posterior.set_noise(sigma, z_rows, 1)  # one row per sample
            positions = torch.arange(shared, device=self.device).expand(n_distinct, shared)
            self.backbone(input_ids=head_ids, position_ids=positions, use_cache=True, **{self._cache_kw: cache})
            if key is not None:
                self._prefix_memo[key] = (samples[1], copy.deepcopy(cache))
                while len(self._prefix_memo) > PREFIX_MEMO_SIZE:
                    self._prefix_memo.popitem(last=False)
        owner = torch.arange(n_rows, device=self.device) // (group if noisy else n_rows)  # row -> its sample
        cache.reorder_cache(owner)  # (R, heads, P, d) per layer
        tail_ids, tail_mask = self._pad_left([r[shared:] for r in rows])  # (R, T - P)
        mask = torch.cat([torch.ones((n_rows, shared), dtype=tail_mask.dtype, device=self.device), tail_mask], 1)
        position_ids = shared + (tail_mask.cumsum(-1) - 1).clamp_min(0)
        self.posterior.set_noise(sigma, z_rows, group)
        return self.backbone(input_ids=tail_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                             **{self._cache_kw: cache}).last_hidden_state[:, -1]

    def run_jobs(self, jobs: Sequence[Job], sigma: float | None = None,
                 class_ids: torch.Tensor | None = None, prefix: int | None = None) -> list[torch.Tensor]:
        """One batched forward for all jobs; per job its per-sample probabilities (n_i, C).

        Jobs that share a :class:`NoiseDraw` share its sample-major rows; at sigma = 0 (or with no
        noise) each job needs one row whose result stands for all its samples. ``prefix``: the
        shared prefix of the whole batch these jobs belong to (:meth:`shared_prefix`).
        """
        sigma = self.sigma if sigma is None else sigma
        noisy = sigma > 0.0
        groups: dict[int, list[int]] = {}
        for j, job in enumerate(jobs):
            if not job.tokens:
                raise EmptyPromptError(f"job {j} has no tokens: nothing to classify")
            if job.n_samples < 1:
                raise ValueError(f"n_samples must be >= 1, got {job.n_samples}")
            if noisy and job.noise is not None and job.noise.n_samples < job.n_samples:
                raise ValueError(f"noise has {job.noise.n_samples} samples, job needs {job.n_samples}")
            key = id(job.noise) if (noisy and job.noise is not None) else 0
            groups.setdefault(key, []).append(j)
        # every draw's jobs share one N, and every draw has as many jobs: rows n*G .. n*G+G-1 all use
        # sample n, so each module gets the N samples (views of the draw), not one copy per row
        uniform = noisy and 0 not in groups and len({len(m) for m in groups.values()}) == 1 and all(
            len({jobs[j].n_samples for j in m}) == 1 for m in groups.values())
        rows: list[list[int]] = []
        owner: list[tuple[int, int]] = []  # (job, sample) of each row
        z_parts: list[list[torch.Tensor]] = []
        for key, members in groups.items():
            if key == 0:  # posterior mean: one row per job
                rows += [jobs[j].tokens for j in members]
                owner += [(j, -1) for j in members]
                if noisy:  # mixed batch: zero noise for these rows
                    z_parts.append([torch.zeros((len(members), *m.lora_A.shape), dtype=m.lora_A.dtype,
                                                device=m.lora_A.device) for m in self.posterior.modules])
                continue
            noise = jobs[members[0]].noise
            assert noise is not None
            n_max = max(jobs[j].n_samples for j in members)
            sample_idx = []
            for n in range(n_max):  # sample-major
                for j in members:
                    if n < jobs[j].n_samples:
                        rows.append(jobs[j].tokens)
                        owner.append((j, n))
                        sample_idx.append(n)
            if not uniform:
                idx = torch.tensor(sample_idx, device=self.device)
                z_parts.append([z.index_select(0, idx) for z in noise.z])  # per module (R_g, r, in)
        z_rows = None
        group = 1
        samples: tuple[Any, Any] | None = (("mean",), None) if not noisy or list(groups) == [0] else None
        if uniform:
            group = len(next(iter(groups.values())))
            parts = [(jobs[m[0]].noise, jobs[m[0]].n_samples) for m in groups.values()]  # (draw, N) per group
            samples = tuple((id(draw), n) for draw, n in parts), [draw for draw, _ in parts]
            z_rows = []
            for k in range(len(self.posterior.modules)):
                zs = [draw.z[k] if n == draw.n_samples else draw.z[k][:n] for draw, n in parts]  # views
                z_rows.append(zs[0] if len(zs) == 1 else torch.cat(zs))  # (sum of N, r, in)
        elif noisy and any(k != 0 for k in groups):
            z_rows = [torch.cat([part[k] for part in z_parts]) for k in range(len(self.posterior.modules))]
        # one copy to the host, not one per row (each a device sync on a GPU)
        probs = torch.softmax(self.class_logits(rows, z_rows, sigma, class_ids, group, prefix, samples),
                              dim=-1).cpu()  # (R, C)
        out = [torch.empty((job.n_samples, probs.shape[1])) for job in jobs]
        for r, (j, n) in enumerate(owner):
            if n < 0:
                out[j][:] = probs[r]
            else:
                out[j][n] = probs[r]
        return out

    def sample_probs(self, prompts: Sequence[str], n_samples: int, seed: int = 0, sigma: float | None = None,
                     noise: NoiseDraw | None = None, max_rows: int = 64, class_ids: torch.Tensor | None = None,
                     progress: Iterable[Any] | None = None, prefix: int | None = None) -> torch.Tensor:
        """Per-sample probabilities (B, N, C) of many prompts, in forwards of at most ``max_rows`` rows.

        ``noise`` (a draw of at least N samples) fixes the randomness, e.g. common random numbers
        across sigmas; otherwise it is drawn from ``seed``. ``prefix``: the prompts' shared
        instruction in tokens, reused by all forwards (default: what the prompts share).
        """
        sigma = self.sigma if sigma is None else sigma
        tokens = self.tokenize(prompts)
        if sigma > 0.0 and noise is None:
            noise = self.posterior.draw(seed, n_samples)
        rows_per_prompt = n_samples if sigma > 0.0 else 1
        # forwards of similar lengths (little padding); results go back in input order
        out = torch.empty((len(tokens), n_samples, len(self.labels if class_ids is None else class_ids)))
        prefix = self.shared_prefix(tokens) if prefix is None else prefix
        for chunk in self.plan(tokens, [rows_per_prompt] * len(tokens), max_rows):
            results = self.run_jobs([Job(tokens[i], n_samples, noise) for i in chunk], sigma, class_ids, prefix)
            for i, res in zip(chunk, results, strict=True):
                out[i] = res
            if progress is not None:
                progress.update(len(chunk))  # type: ignore[attr-defined]
        return out
