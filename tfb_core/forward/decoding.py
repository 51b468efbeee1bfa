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
steps (continuous batching): their prompts are prefilled in forwards of their own (prompts that start
with the generator's kept prefix apart from the others: a request's path does not depend on its
company, see :meth:`Decoding.join`) and their cache rows appended, the shorter history padded on the
left (masked). A released request leaves no entry behind: a decode that never ends holds what its
live requests need, not a trace of every request it served. Columns that no row attends to any
more (the padding of a long prompt that has left) are cut off the left of the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tfb_core.bayes.posterior import sample_seed
from tfb_core.decide import generation as mixing
from tfb_core.decide.generation import choose_token, cluster_answers, sequence_scores
from tfb_core.forward.completion import Completion, GenerationRequest, GenerationResult, StopRule, TokenUncertainty
from tfb_core.forward.layout import Row, layout


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
        # the requests and streams not released yet, by the ids join gave them (0, 1, ... in the order
        # they came); released ones are removed, so what a decode holds follows the requests still in
        # it, not every request it ever served (under continuous traffic a decode may never end)
        self.requests: dict[int, GenerationRequest] = {}
        self.streams: dict[int, _Stream] = {}
        self._by_request: dict[int, list[int]] = {}  # each request's streams
        self._draws: dict = {}  # posterior draws of the requests here, shared by requests of one seed
        self._joined = 0  # requests ever joined: an id below it that is not in requests was released
        self._next_stream = 0
        self.rows: list[Row] = []
        self.active: list[int] = []
        self.cache: Any = None
        self.mask = self.positions = self.logits = None
        self.steps = 0
        self.join(requests)

    @property
    def done(self) -> bool:
        return not self.active

    def _new_streams(self, requests: Sequence[GenerationRequest], draws: dict
                     ) -> tuple[dict[int, GenerationRequest], dict[int, _Stream], dict[int, list[int]], list[Row]]:
        """The requests' entries and rows, under the next free ids; nothing here changes until join
        commits them (a request that fails, e.g. a seed torch refuses, leaves no trace)."""
        reqs: dict[int, GenerationRequest] = {}
        streams: dict[int, _Stream] = {}
        by_request: dict[int, list[int]] = {}
        rows: list[Row] = []
        s = self._next_stream
        for r, req in enumerate(requests, start=self._joined):
            reqs[r] = req
            noise = self.gen.noise_of(req, draws)
            stop_ids = self.gen.eos_token_ids if req.stop_token_ids is None else frozenset(req.stop_token_ids)
            by_request[r] = []
            for i, samples in enumerate(req.streams()):
                # the stream's index among its request's, never its place in the decode: a request's
                # draws do not depend on what else is decoding
                seed = req.sampling_seed if req.mode == "mean" else sample_seed(req.sampling_seed, i)
                g = torch.Generator().manual_seed(seed) if req.temperature > 0.0 else None
                by_request[r].append(s)
                streams[s] = _Stream(r, i, samples, StopRule(req.max_tokens, frozenset(stop_ids), tuple(req.stop)), g)
                rows += [Row(s, req.adapter, n, noise) for n in samples]
                s += 1
        return reqs, streams, by_request, rows

    def _has_head(self, tokens: Sequence[int]) -> bool:
        """Whether a prompt starts with the generator's kept prefix (and goes on after it)."""
        prefix = self.gen.prefix_tokens
        return bool(prefix) and len(tokens) > len(prefix) and list(tokens[:len(prefix)]) == prefix

    @torch.inference_mode()
    def join(self, requests: Sequence[GenerationRequest]) -> list[int]:
        """Add requests between steps: their prompts run in prefill forwards of their own, and their
        rows join the running ones for the next steps. Returns their request ids. Atomic: when it
        raises, the decode is as it was.

        A request's path does not depend on its company: a prompt that starts with the generator's kept
        prefix (a chat template's head) reads it from the kept rows and prefills only its rest, any
        other prompt is computed whole, and the two kinds prefill in separate forwards. What that
        guarantees, precisely: a request's prefill forward holds only the rows of requests of its own
        kind joining in the same call, so its prefill logits (its first token's distribution) are
        bit-identical whether or not requests of the other kind join beside it (given the same kept
        prefix rows, on a deterministic device). Beside requests of its own kind, and from the first
        decode step on (its rows share each forward with every stream still decoding, whose batch size
        and padded width vary with them), its numbers equal its decode alone up to float rounding, not
        bit for bit: a greedy token differs only where two tokens tie within that rounding.
        """
        running = [self.requests[self.streams[s].request] for s in self.active]
        sigmas = self.gen.sigmas_of(running + list(requests))  # before any state changes
        if self.cache is not None and _plain_layers(self.cache) is None:
            raise ValueError("requests can join a running batch only with a plain dynamic key/value cache")
        draws = dict(self._draws)
        reqs, streams, by_request, rows = self._new_streams(requests, draws)
        head = [row for row in rows if self._has_head(reqs[streams[row.stream].request].tokens)]
        whole = [row for row in rows if not self._has_head(reqs[streams[row.stream].request].tokens)]
        prefills = []
        for group, skip in ((head, len(self.gen.prefix_tokens or [])), (whole, 0)):
            if group:
                prefills.append(self._prefill(group, [reqs[streams[row.stream].request].tokens for row in group],
                                              sigmas, skip))
        if (self.cache is not None or len(prefills) > 1) and _plain_layers(prefills[0][1]) is None:
            raise ValueError("requests can join a running batch only with a plain dynamic key/value cache")
        # commit: nothing above changed the decode
        self.requests.update(reqs)
        self.streams.update(streams)
        self._by_request.update(by_request)
        self._draws = draws
        self._joined += len(requests)
        self._next_stream += len(streams)
        self.sigmas = sigmas
        for prefill in prefills:
            self._append(*prefill)
        self._relayout(list(range(len(self.rows))))
        return list(reqs)

    def _prefill(self, rows: list[Row], prompts: list[list[int]], sigmas: dict[int, float], skip: int
                 ) -> tuple[list[Row], Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prefill forward of ``rows`` (with their ``prompts``): (rows in forward order, cache,
        mask (R, T), last positions (R,), last logits (R, V)). ``skip`` > 0: the prompts' first
        ``skip`` tokens are the generator's kept prefix, read from its kept rows."""
        order, plans = layout(rows)
        rows, prompts = [rows[i] for i in order], [prompts[i] for i in order]
        if skip:
            # the shared prefix (a chat template's head) from the generator's kept rows, computed once
            # per sample; the rest of each prompt, left-padded after it, attends to it
            cache = self.gen.prefix_cache_of(rows, sigmas)
            ids, mask, positions = self.gen.pad([t[skip:] for t in prompts])
            mask = torch.cat([mask.new_ones((len(rows), skip)), mask], dim=1)
            positions = positions + skip
        else:
            ids, mask, positions = self.gen.pad(prompts)
            cache = self.gen.make_cache()
        logits = self.gen.forward(rows, ids, mask, positions, cache, sigmas, plans)[:, -1]  # (R_new, V)
        return rows, cache, mask, positions[:, -1], logits

    def _append(self, rows: list[Row], cache: Any, mask: torch.Tensor, positions: torch.Tensor,
                logits: torch.Tensor) -> None:
        """Add prefilled rows to the decode's: their cache rows below the running ones, the shorter
        history padded on the left (masked)."""
        if self.cache is None:
            self.rows, self.cache, self.mask, self.positions, self.logits = rows, cache, mask, positions, logits
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):  # pad on the left, then stack rows
            for name in ("keys", "values"):
                a, b = getattr(old, name), getattr(new, name)  # (R, heads, T, d)
                setattr(old, name, torch.cat([F.pad(a, (0, 0, width - a.shape[2], 0)),
                                              F.pad(b, (0, 0, width - b.shape[2], 0))]))
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                               F.pad(mask, (width - mask.shape[1], 0))])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])
        self.rows = self.rows + rows

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
        mixed = mixing.mix_rows(self.logits, self.row_stream, len(streams))
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
        if request not in self._by_request:
            if 0 <= request < self._joined:
                raise RuntimeError(f"request {request} was released: its result is gone")
            raise IndexError(f"no request {request} in this decoding ({self._joined})")
        return [self.streams[s] for s in self._by_request[request]]

    def stream_ids(self, request: int) -> list[int]:
        """Ids (keys of :attr:`streams`) of request ``request``'s streams."""
        self._streams_of(request)  # IndexError for a request never here, RuntimeError once released
        return list(self._by_request[request])

    def released(self, request: int) -> bool:
        """Whether request ``request`` (an id :meth:`join` returned) was released."""
        return 0 <= request < self._joined and request not in self._by_request

    def finished(self, request: int) -> bool:
        """Whether every stream of request ``request`` (an id :meth:`join` returned) has ended."""
        return self.released(request) or all(st.finish is not None for st in self._streams_of(request))

    @torch.inference_mode()
    def cancel(self, request: int) -> bool:
        """Stop request ``request`` between steps (its client left): its rows leave the batch at once,
        the other streams go on unchanged. Its streams end with finish reason "cancelled". Returns
        whether it was still decoding."""
        if self.released(request):
            return False
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
        completions = [self._completion(st) for st in self._streams_of(request)]  # RuntimeError once released
        req = self.requests[request]
        answers = None
        if req.mode == "per_sample":
            if len(completions) == 1 < req.n_samples:  # sigma = 0, greedy: one answer N times
                completions = completions * req.n_samples
            answers = cluster_answers([c.text for c in completions])
        return GenerationResult(req.mode, req.n_samples, completions, answers, len(req.tokens))

    def release(self, request: int) -> None:
        """Forget an ended request once its result has been read: its entry, its streams (their
        tokens), its prompt and its posterior draw (up to N x the adapter's A' in size) when no other
        request here shares it. A decode that requests keep joining may never end: what it holds is
        bounded by the requests still in it. Its :meth:`result` is gone afterwards."""
        if not self.finished(request):
            raise RuntimeError(f"request {request} is still decoding")
        if self.released(request):
            return
        for s in self._by_request.pop(request):
            del self.streams[s]
        del self.requests[request]
        kept = {self.gen.draw_key(req) for req in self.requests.values()}
        for key in [k for k in self._draws if k not in kept]:
            del self._draws[key]

    def results(self) -> list[GenerationResult]:
        """Every request's result (those not released), in the order they came (once :attr:`done`)."""
        if not self.done:
            raise RuntimeError("the decoding is still running")
        return [self.result(i) for i in self.requests]

    def _completion(self, st: _Stream) -> Completion:
        reason, stop_reason, cut = st.finish
        ids = st.token_ids[:-1] if isinstance(stop_reason, int) else st.token_ids  # the stop token is no text
        text = self.gen.tokenizer.decode(ids, skip_special_tokens=True)
        if isinstance(stop_reason, str):
            text = text[:cut]
        scores = sequence_scores([t.logprob for t in st.tokens], [t.mutual_information for t in st.tokens],
                                 [t.predictive_entropy for t in st.tokens])
        return Completion(list(st.token_ids), text, reason, stop_reason, list(st.tokens), scores)
