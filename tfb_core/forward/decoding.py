"""A running batch of generations: prefill, then one forward of one token per active row per step.

Each request becomes streams (:meth:`GenerationRequest.streams`), each stream rows (its posterior
samples). Per step, every stream mixes its rows' next-token distributions into p̄
(:func:`~tfb_core.decide.generation.mix_rows`), picks a token from p̄ (greedy, or temperature and
top-p with the stream's own seeded ``torch.Generator``), records the token's uncertainty, and feeds
the token to all its rows; the key/value cache holds each row's own history.

Finished streams leave the batch at once: their rows are dropped from the cache
(``batch_select_indices``) rather than masked, so a step costs the rows still decoding, not the
batch's start; the cache is copied only when a stream ends, and a kept row's keys and values are
the same numbers, so no other stream's answer changes. Requests may :meth:`Decoding.join` between
steps (continuous batching): their prompts are prefilled in a forward of their own and their cache
rows appended, the shorter history padded on the left (masked). Columns that no row attends to any
more (the padding of a long prompt that has left) are cut off the left of the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from tfb_core.bayes.posterior import sample_seed
from tfb_core.decide.generation import choose_token, cluster_answers, mix_rows, sequence_scores
from tfb_core.forward.completion import Completion, GenerationRequest, GenerationResult, StopRule, TokenUncertainty
from tfb_core.forward.decode_rows import Row, layout


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


def _plain_layers(cache: Any) -> list[Any] | None:
    """The cache's layers if every one is a plain dynamic layer (keys, values (R, heads, T, d) that
    only ever get rebound), else None: those can be padded, joined and cut here."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    return layers


class Decoding:
    """The state of a batch of generations between steps (rows, cache, attention mask, positions,
    the last logits). Built and prefilled by :meth:`~tfb_core.forward.generator.BayesianGenerator.start`."""

    def __init__(self, generator: Any, requests: Sequence[GenerationRequest]) -> None:
        if not requests:
            raise ValueError("no requests to generate for")
        self.gen = generator
        self.requests: list[GenerationRequest] = []
        self.streams: list[_Stream] = []
        self.rows: list[Row] = []
        self.active: list[int] = []
        self.cache: Any = None
        self.mask = self.positions = self.logits = None
        self.steps = 0
        self._draws: dict = {}
        self._released: set[int] = set()
        self._by_request: list[list[int]] = []  # each request's streams
        self.join(requests)

    @property
    def done(self) -> bool:
        return not self.active

    def _new_streams(self, requests: Sequence[GenerationRequest]) -> list[Row]:
        rows = []
        for req in requests:
            r = len(self.requests)
            self.requests.append(req)
            noise = self.gen.noise_of(req, self._draws)
            stop_ids = self.gen.eos_token_ids if req.stop_token_ids is None else frozenset(req.stop_token_ids)
            self._by_request.append([])
            for i, samples in enumerate(req.streams()):
                self._by_request[r].append(len(self.streams))
                seed = req.sampling_seed if req.mode == "mean" else sample_seed(req.sampling_seed, i)
                g = torch.Generator().manual_seed(seed) if req.temperature > 0.0 else None
                s = len(self.streams)
                self.streams.append(_Stream(r, i, samples, StopRule(req.max_tokens, frozenset(stop_ids), tuple(req.stop)),
                                            g))
                rows += [Row(s, req.adapter, n, noise) for n in samples]
        return rows

    @torch.inference_mode()
    def join(self, requests: Sequence[GenerationRequest]) -> list[int]:
        """Add requests between steps: their prompts run in one prefill forward of their own, and
        their rows join the running ones for the next steps. Returns their request indices."""
        running = [self.requests[self.streams[s].request] for s in self.active]
        sigmas = self.gen.sigmas_of(running + list(requests))  # before any state changes
        if self.cache is not None and _plain_layers(self.cache) is None:
            raise ValueError("requests can join a running batch only with a plain dynamic key/value cache")
        first = len(self.requests)
        rows = self._new_streams(requests)
        order, plans = layout(rows)
        rows = [rows[i] for i in order]
        prompts = [self.requests[self.streams[row.stream].request].tokens for row in rows]
        prefix = self.gen.prefix_tokens or []
        P = len(prefix)
        if P and all(len(t) > P and t[:P] == prefix for t in prompts):
            # the shared prefix (a chat template's head) from the generator's kept rows, computed once
            # per sample; the rest of each prompt, left-padded after it, attends to it
            cache = self.gen.prefix_cache_of(rows, sigmas)
            ids, mask, positions = self.gen.pad_left([t[P:] for t in prompts])
            mask = torch.cat([mask.new_ones((len(rows), P)), mask], dim=1)
            positions = positions + P
        else:
            ids, mask, positions = self.gen.pad_left(prompts)
            cache = self.gen.make_cache()
        logits = self.gen.forward(rows, ids, mask, positions, cache, sigmas, plans)[:, -1]  # (R_new, V)
        self.sigmas = sigmas
        if self.cache is None:
            self.rows, self.cache, self.mask, self.positions, self.logits = rows, cache, mask, positions[:, -1], logits
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(self.cache.layers, cache.layers, strict=True):  # pad on the left, then stack rows
                for name in ("keys", "values"):
                    a, b = getattr(old, name), getattr(new, name)  # (R, heads, T, d)
                    setattr(old, name, torch.cat([F.pad(a, (0, 0, width - a.shape[2], 0)),
                                                  F.pad(b, (0, 0, width - b.shape[2], 0))]))
            self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                                   F.pad(mask, (width - mask.shape[1], 0))])
            self.positions = torch.cat([self.positions, positions[:, -1]])
            self.logits = torch.cat([self.logits, logits])
            self.rows = self.rows + rows
        self._relayout(list(range(len(self.rows))))
        return list(range(first, len(self.requests)))

    def _relayout(self, kept: list[int]) -> None:
        """Keep rows ``kept`` (indices into the current rows) in the order a forward wants them."""
        order, self.plans = layout([self.rows[r] for r in kept])
        idx = [kept[i] for i in order]
        if idx != list(range(len(self.rows))):
            sel = torch.tensor(idx, device=self.gen.device)
            self.cache.batch_select_indices(sel)
            self.mask, self.positions, self.logits = self.mask[sel], self.positions[sel], self.logits[sel]
            self.rows = [self.rows[r] for r in idx]
        # leading columns no row attends to: cut off the cache (a left-out prompt's padding)
        unused = int(self.mask.any(0).long().argmax())
        layers = _plain_layers(self.cache)
        if unused and layers is not None:
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]
        self.active = sorted({row.stream for row in self.rows})
        local = {s: k for k, s in enumerate(self.active)}
        device = self.gen.device
        self.row_stream = torch.tensor([local[row.stream] for row in self.rows], device=device, dtype=torch.long)
        first: dict[int, int] = {}
        for r, row in enumerate(self.rows):
            first.setdefault(local[row.stream], r)
        self.first_row = torch.tensor([first[k] for k in range(len(self.active))], device=device, dtype=torch.long)

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """Choose one token for every active stream, record it, drop the streams that ended, and
        run the next forward for the rest. Returns what each stream produced."""
        if self.done:
            raise RuntimeError("the decoding is done: every stream has ended")
        streams = [self.streams[s] for s in self.active]
        mixed = mix_rows(self.logits, self.row_stream, len(streams))
        # greedy: argmax of p̄; a one-row stream takes argmax of its logits, as a plain greedy
        # decode does (softmax may round two nearby logits to one probability)
        chosen = torch.where(mixed.single, self.logits.argmax(-1)[self.first_row], mixed.probs.argmax(-1))  # (S,)
        chosen_list = chosen.tolist()
        for k, st in enumerate(streams):
            req = self.requests[st.request]
            if req.temperature > 0.0:
                u = float(torch.rand((), generator=st.generator))
                chosen_list[k] = choose_token(mixed.probs[k], req.temperature, req.top_p, u)
        chosen = torch.tensor(chosen_list, device=mixed.probs.device)
        logp = torch.log(mixed.probs.gather(1, chosen[:, None]).squeeze(1)).tolist()
        k_top = max(self.requests[st.request].top_logprobs for st in streams)
        if k_top:
            top_prob, top_i = mixed.probs.topk(min(k_top, mixed.probs.shape[1]), dim=-1)
            top_v, top_i = torch.log(top_prob).tolist(), top_i.tolist()
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
        self._advance({s: chosen_list[k] for k, s in enumerate(self.active)})
        return events

    def _advance(self, next_token: dict[int, int]) -> None:
        """Drop the rows of ended streams and run the next token of the others."""
        if any(self.streams[s].finish is not None for s in self.active):
            kept = [r for r, row in enumerate(self.rows) if self.streams[row.stream].finish is None]
            if not kept:
                self.active, self.rows, self.logits, self.cache, self.mask, self.positions = [], [], None, None, None, None
                return
            self._relayout(kept)
        ids = torch.tensor([[next_token[row.stream]] for row in self.rows], device=self.gen.device)  # (R, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)  # (R, past + 1)
        self.positions = self.positions + 1
        self.logits = self.gen.forward(self.rows, ids, self.mask, self.positions[:, None], self.cache, self.sigmas,
                                       self.plans)[:, -1]  # (R, V)

    def _streams_of(self, request: int) -> list[_Stream]:
        if not 0 <= request < len(self.requests):
            raise IndexError(f"no request {request} in this decoding ({len(self.requests)})")
        return [self.streams[s] for s in self._by_request[request]]

    def stream_ids(self, request: int) -> list[int]:
        """Indices into :attr:`streams` of request ``request``'s streams."""
        self._streams_of(request)  # IndexError for a request not in this decoding
        return list(self._by_request[request])

    def finished(self, request: int) -> bool:
        """Whether every stream of request ``request`` (an index :meth:`join` returned) has ended."""
        return all(st.finish is not None for st in self._streams_of(request))

    @torch.inference_mode()
    def cancel(self, request: int) -> bool:
        """Stop request ``request`` between steps (its client left): its rows leave the batch at once,
        the other streams go on unchanged. Its streams end with finish reason "cancelled". Returns
        whether it was still decoding."""
        ended = {s for s in self.active if self.streams[s].request == request}
        for st in self._streams_of(request):
            if st.finish is None:
                st.finish = ("cancelled", None, -1)
        if not ended:
            return False
        kept = [r for r, row in enumerate(self.rows) if row.stream not in ended]
        if not kept:
            self.active, self.rows, self.logits, self.cache, self.mask, self.positions = [], [], None, None, None, None
        else:
            self._relayout(kept)
        return True

    def result(self, request: int) -> GenerationResult:
        """Request ``request``'s result, once its streams have all ended (:meth:`finished`)."""
        if not self.finished(request):
            raise RuntimeError(f"request {request} is still decoding")
        if request in self._released:
            raise RuntimeError(f"request {request} was released: its result is gone")
        req = self.requests[request]
        completions = [self._completion(st) for st in self._streams_of(request)]
        answers = None
        if req.mode == "per_sample":
            if len(completions) == 1 < req.n_samples:  # sigma = 0, greedy: one answer N times
                completions = completions * req.n_samples
            answers = cluster_answers([c.text for c in completions])
        return GenerationResult(req.mode, req.n_samples, completions, answers, len(req.tokens))

    def release(self, request: int) -> None:
        """Forget what an ended request holds (its tokens, its prompt, its noise draw: up to N x the
        adapter's A' in size) once its result has been read: a decode that requests keep joining may
        never end. Its :meth:`result` is gone afterwards."""
        if not self.finished(request):
            raise RuntimeError(f"request {request} is still decoding")
        for st in self._streams_of(request):
            st.token_ids, st.tokens, st.generator = [], [], None
        self.requests[request] = replace(self.requests[request], tokens=[0], noise=None, stop=())
        self._released.add(request)

    def results(self) -> list[GenerationResult]:
        """Every request's result, in the order they came (once :attr:`done`)."""
        if not self.done:
            raise RuntimeError("the decoding is still running")
        return [self.result(i) for i in range(len(self.requests))]

    def _completion(self, st: _Stream) -> Completion:
        reason, stop_reason, cut = st.finish
        ids = st.token_ids[:-1] if isinstance(stop_reason, int) else st.token_ids  # the stop token is no text
        text = self.gen.tokenizer.decode(ids, skip_special_tokens=True)
        if isinstance(stop_reason, str):
            text = text[:cut]
        scores = sequence_scores([t.logprob for t in st.tokens], [t.mutual_information for t in st.tokens],
                                 [t.predictive_entropy for t in st.tokens])
        return Completion(list(st.token_ids), text, reason, stop_reason, list(st.tokens), scores)
