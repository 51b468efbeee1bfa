"""A running batch of generations: prefill once, then one forward of one token per active row per step.

Each request becomes streams (:meth:`GenerationRequest.streams`), each stream rows (its posterior
samples). Per step, every stream mixes its rows' next-token distributions into p̄
(:func:`~tfb_core.decide.generation.mix_rows`), picks a token from p̄ (greedy, or temperature and
top-p with the stream's own seeded ``torch.Generator``), records the token's uncertainty, and feeds
the token to all its rows; the key/value cache holds each row's own history.

Finished streams leave the batch at once: their rows are dropped from the cache
(``batch_select_indices``) rather than masked, so a step costs the rows still decoding, not the
batch's start; the cache is copied only when a stream ends (at most once per stream), and a kept
row's keys and values are the same numbers, so no other stream's answer changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tfb_core.bayes.posterior import sample_seed
from tfb_core.decide.generation import choose_token, cluster_answers, mix_rows, sequence_scores
from tfb_core.forward.completion import (
    Completion,
    GenerationRequest,
    GenerationResult,
    StopRule,
    TokenUncertainty,
)
from tfb_core.forward.decode_rows import Row, plan_rows


@dataclass
class _Stream:
    """One token history being decoded, and what it has produced."""

    request: int
    index: int  # among its request's streams
    samples: list[int]  # its rows' posterior samples (-1: the mean)
    rule: StopRule
    generator: torch.Generator | None  # token draws at temperature > 0
    token_ids: list[int] = field(default_factory=list)
    tokens: list[TokenUncertainty] = field(default_factory=list)
    finish: tuple[str, int | str | None, int] | None = None  # (finish_reason, stop_reason, text cut)


@dataclass(frozen=True)
class StepEvent:
    """A token one stream produced in a step (for streaming): its request, its stream's index
    among the request's, the token, and the finish reason if the stream ended with it."""

    request: int
    stream: int
    token: TokenUncertainty
    finish_reason: str | None


class Decoding:
    """The state of one batch of generations between steps. Built by
    :meth:`~tfb_core.forward.generator.BayesianGenerator.start` (which prefills the prompts)."""

    def __init__(self, generator, requests: Sequence[GenerationRequest]) -> None:
        if not requests:
            raise ValueError("no requests to generate for")
        self.gen = generator
        self.requests = list(requests)
        self.sigmas = generator.sigmas_of(self.requests)
        draws: dict = {}
        self.noise = [generator.noise_of(req, draws) for req in self.requests]
        self.streams: list[_Stream] = []
        for r, req in enumerate(self.requests):
            stop_ids = generator.eos_token_ids if req.stop_token_ids is None else frozenset(req.stop_token_ids)
            for i, samples in enumerate(req.streams()):
                seed = req.sampling_seed if req.mode == "mean" else sample_seed(req.sampling_seed, i)
                g = torch.Generator().manual_seed(seed) if req.temperature > 0.0 else None
                self.streams.append(_Stream(r, i, samples, StopRule(req.max_tokens, frozenset(stop_ids), tuple(req.stop)),
                                            g))
        self.steps = 0
        rows = [Row(s, self.requests[st.request].adapter, n, self.noise[st.request])
                for s, st in enumerate(self.streams) for n in st.samples]
        self._layout(rows)
        ids, self.mask, positions = generator.pad_left([self.requests[self.streams[row.stream].request].tokens
                                                        for row in self.rows])
        self.positions = positions[:, -1]  # (R,) position of each row's last token
        self.cache = generator.make_cache()
        self.logits = generator.forward(self.rows, ids, self.mask, positions, self.cache, self.sigmas,
                                        self.plans)[:, -1]  # (R, V)

    def _layout(self, rows: list[Row]) -> list[int]:
        """Order ``rows`` as the forward wants them; returns the order (indices into ``rows``)."""
        self.plans = plan_rows(rows)
        order = [i for plan in self.plans for i in plan.rows]
        self.rows = [rows[i] for i in order]
        # plans index the rows as given: renumber them to the forward's order
        at = 0
        renumbered = []
        for plan in self.plans:
            renumbered.append(type(plan)(plan.adapter, tuple(range(at, at + len(plan.rows))), plan.uniform, plan.group))
            at += len(plan.rows)
        self.plans = renumbered
        active = sorted({row.stream for row in self.rows})
        self.active = active  # stream ids in step order
        local = {s: k for k, s in enumerate(active)}
        device = self.gen.device
        self.row_stream = torch.tensor([local[row.stream] for row in self.rows], device=device)  # (R,)
        first: dict[int, int] = {}
        for r, row in enumerate(self.rows):
            first.setdefault(local[row.stream], r)
        self.first_row = torch.tensor([first[k] for k in range(len(active))], device=device)  # (S,)
        return order

    @property
    def done(self) -> bool:
        return not self.active

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """Choose one token for every active stream, record it, drop the streams that ended, and
        run the next forward for the rest. Returns what each stream produced."""
        if self.done:
            raise RuntimeError("the decoding is done: every stream has ended")
        S = len(self.active)
        mixed = mix_rows(self.logits, self.row_stream, S)
        streams = [self.streams[s] for s in self.active]
        # greedy: argmax of p̄; a one-row stream takes argmax of its logits, as a plain greedy
        # decode does (softmax may round two nearby logits to one probability)
        chosen = mixed.probs.argmax(-1)  # (S,)
        own = self.logits.argmax(-1)[self.first_row]  # (S,)
        chosen = torch.where(mixed.single, own, chosen)
        chosen_list = chosen.tolist()
        for k, st in enumerate(streams):
            temperature = self.requests[st.request].temperature
            if temperature > 0.0:
                u = float(torch.rand((), generator=st.generator))
                chosen_list[k] = choose_token(mixed.probs[k], temperature, self.requests[st.request].top_p, u)
        chosen = torch.tensor(chosen_list, device=mixed.probs.device)
        logp_all = torch.log(mixed.probs)  # (S, V)
        logp = logp_all.gather(1, chosen[:, None]).squeeze(1).tolist()
        k_top = max(self.requests[st.request].top_logprobs for st in streams)
        if k_top:
            top_v, top_i = logp_all.topk(min(k_top, logp_all.shape[1]), dim=-1)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        h, eh, mi = (t.tolist() for t in (mixed.predictive_entropy, mixed.expected_entropy, mixed.mutual_information))
        events = []
        for k, st in enumerate(streams):
            n_top = self.requests[st.request].top_logprobs
            top = tuple(zip(top_i[k][:n_top], top_v[k][:n_top], strict=True)) if n_top else ()
            token = TokenUncertainty(chosen_list[k], logp[k], h[k], eh[k], mi[k], top)
            st.token_ids.append(chosen_list[k])
            st.tokens.append(token)
            text = self.gen.tokenizer.decode(st.token_ids, skip_special_tokens=True) if st.rule.stop else None
            st.finish = st.rule.check(chosen_list[k], len(st.token_ids), text)
            events.append(StepEvent(st.request, st.index, token, None if st.finish is None else st.finish[0]))
        self.steps += 1
        next_token = {s: chosen_list[k] for k, s in enumerate(self.active)}
        self._advance(next_token)
        return events

    def _advance(self, next_token: dict[int, int]) -> None:
        """Drop the rows of ended streams and run the next token of the others."""
        if any(self.streams[s].finish is not None for s in self.active):
            kept = [r for r, row in enumerate(self.rows) if self.streams[row.stream].finish is None]
            if not kept:
                self.active, self.logits, self.cache = [], None, None
                return
            order = self._layout([self.rows[r] for r in kept])
            idx = torch.tensor([kept[i] for i in order], device=self.gen.device)
            self.cache.batch_select_indices(idx)
            self.mask, self.positions = self.mask[idx], self.positions[idx]
        ids = torch.tensor([[next_token[row.stream]] for row in self.rows], device=self.gen.device)  # (R, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)  # (R, past + 1)
        self.positions = self.positions + 1
        self.logits = self.gen.forward(self.rows, ids, self.mask, self.positions[:, None], self.cache, self.sigmas,
                                       self.plans)[:, -1]  # (R, V)

    def results(self) -> list[GenerationResult]:
        """Every request's result (once :attr:`done`)."""
        if not self.done:
            raise RuntimeError("the decoding is still running")
        per_request: list[list[Completion]] = [[] for _ in self.requests]
        for st in self.streams:
            per_request[st.request].append(self._completion(st))
        out = []
        for req, completions in zip(self.requests, per_request, strict=True):
            if req.mode == "per_sample":
                if len(completions) == 1 < req.n_samples:  # sigma = 0, greedy: N identical answers
                    completions = completions * req.n_samples
                answers = cluster_answers([c.text for c in completions])
            else:
                answers = None
            out.append(GenerationResult(req.mode, req.n_samples, completions, answers, len(req.tokens)))
        return out

    def _completion(self, st: _Stream) -> Completion:
        reason, stop_reason, cut = st.finish
        ids = st.token_ids[:-1] if isinstance(stop_reason, int) else st.token_ids  # the stop token is no text
        text = self.gen.tokenizer.decode(ids, skip_special_tokens=True)
        if isinstance(stop_reason, str):
            text = text[:cut]
        scores = sequence_scores([t.logprob for t in st.tokens], [t.mutual_information for t in st.tokens],
                                 [t.predictive_entropy for t in st.tokens])
        return Completion(list(st.token_ids), text, reason, stop_reason, list(st.tokens), scores)
