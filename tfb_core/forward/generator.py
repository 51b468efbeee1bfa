"""The generator: a causal LM with Bayesianized LoRA that continues prompts, N posterior samples per
sequence decoded together.

Every forward here runs the rows of :mod:`~tfb_core.forward.layout` (a row per sequence and
posterior sample, each with its own sample of A' through :mod:`tfb_core.bayes`, rows of several
adapters routed in one forward) and reads the full next-token logits at the last position only
(``logits_to_keep``). :meth:`BayesianGenerator.generate` prefills the prompts into a key/value
cache and then decodes one token per row per forward (:class:`~tfb_core.forward.decoding.Decoding`);
:meth:`BayesianGenerator.score_many` reads given continuations teacher-forced, several per forward,
a shared prompt head from the kept prefix rows (the NLL and uncertainty of reference answers, or of
the sigma = 0 model's own answers under sigma: the generative sigma search's criterion), with the
same p̄ as a decode step (:func:`~tfb_core.decide.generation.mix_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tfb_core.bayes.posterior import TFBPosterior
from tfb_core.bayes.routing import RoutedLinear, Routing, bayesianize_many
from tfb_core.data.loading import pad_token_id
from tfb_core.decide import generation as mixing
from tfb_core.decide.generation import SequenceScores, sequence_scores
from tfb_core.forward.completion import GenerationRequest, GenerationResult, TokenUncertainty
from tfb_core.forward.layout import (
    Row,
    SegmentPlan,
    arm,
    build_segments,
    cache_keyword,
    disarm,
    layout,
    pad_left,
    plan_rows,
)
from tfb_core.forward.planning import attention_window
from tfb_core.forward.prefix_cache import PrefixCache


@dataclass(frozen=True)
class ScoredContinuation:
    """A continuation read under p̄ (teacher-forced): each token's uncertainty, the sequence's
    scores, and whether greedy decoding from p̄ gives it back (argmax p̄ is its token at every
    position: ties aside, exactly when a greedy decode reproduces it)."""

    tokens: list[TokenUncertainty]
    sequence: SequenceScores
    greedy: bool


class BayesianGenerator:
    """A causal LM whose LoRA adapters are Bayesianized (one posterior per adapter), generating text."""

    def __init__(self, model: nn.Module, tokenizer: Any, posteriors: Sequence[TFBPosterior],
                 routing: Routing | None = None, eos_token_ids: Iterable[int] | None = None) -> None:
        if not posteriors:
            raise ValueError("no posterior: Bayesianize at least one adapter")
        self.model = model.eval()
        self.tokenizer = tokenizer
        # the classifier's own list (not a copy): adapters loaded at run time join it
        self.posteriors = posteriors if isinstance(posteriors, list) else list(posteriors)
        if routing is None:
            routing = next((m.routing for m in model.modules() if isinstance(m, RoutedLinear)), Routing())
        self.routing = routing
        #: tokens that many prompts start with (a chat template's head: :meth:`set_prefix`), whose keys
        #: and values are computed once per posterior sample and kept (``prefix_rows``, least recently
        #: used first out) for later prompts; None: every prompt is computed whole
        self.prefix_tokens: list[int] | None = None
        self.prefix_rows = PrefixCache(0, fork=None)
        #: runs each forward (None: here, now); a background search's view hands its forwards to the
        #: thread that owns the model (:class:`tfb_core.serving.gate.ForwardGate`), as the classifier's
        self.forward_runner: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None
        self.pad_id = pad_token_id(tokenizer)
        #: tokens that end an answer unless a request names its own: the model's generation
        #: config's end-of-sequence tokens (a chat model may have several) and the tokenizer's
        if eos_token_ids is None:
            found: list[int] = []
            gen_cfg = getattr(model, "generation_config", None)
            for value in (getattr(gen_cfg, "eos_token_id", None), tokenizer.eos_token_id):
                found += [value] if isinstance(value, int) else list(value or [])
            eos_token_ids = found
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self._cache_kw = cache_keyword(model.forward)

    @classmethod
    def from_peft(cls, peft_model: nn.Module, tokenizer: Any, adapters: Sequence[str | None] = (None,),
                  d_floor: float = 1e-6) -> BayesianGenerator:
        """Bayesianize adapters of a peft model in place (B'A' = BA; adapter i = its position in
        ``adapters``, None: the one active adapter) and wrap it."""
        model, posteriors, _, routing = bayesianize_many(peft_model, list(adapters), d_floor=d_floor)
        return cls(model, tokenizer, posteriors, routing)

    @classmethod
    def from_classifier(cls, classifier: Any) -> BayesianGenerator:
        """The generator over a :class:`~tfb_core.forward.classifier.BayesianClassifier`'s model: the
        same base model, posteriors (every adapter of it) and routing; nothing is copied."""
        gen = cls(classifier.model, classifier.tokenizer, classifier.posteriors, classifier.routing)
        gen.forward_runner = classifier.forward_runner
        return gen

    @property
    def device(self) -> torch.device:
        return self.posteriors[0].device

    # --- forwards ---------------------------------------------------------------------------------
    def make_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forward(self, rows: Sequence[Row], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, cache: Any | None, sigmas: dict[int, float],
                plans: Sequence[SegmentPlan] | None = None, keep: int = 1) -> torch.Tensor:
        """Next-token logits of the last ``keep`` positions of each row, each row with its own sample
        and adapter: (R, keep, V) in the model's dtype. One forward of the base model.

        ``rows`` in forward order, with their ``plans`` (:func:`~tfb_core.forward.layout.layout`;
        None: rows already in the order :func:`plan_rows` gives). input_ids, position_ids: (R, T);
        attention_mask covers the cache too, (R, past + T). ``cache``: extended in place (None: no cache).
        """
        if plans is None:
            plans = plan_rows(rows)
            if [i for plan in plans for i in plan.rows] != list(range(len(rows))):
                raise ValueError("rows must be in the order of their plan (see forward.layout.layout)")
        segments = build_segments(plans, rows, self.posteriors, sigmas)

        def forward() -> torch.Tensor:  # inference mode is per thread: set where it runs
            with torch.inference_mode():
                arm(segments, self.posteriors, self.routing)
                try:
                    kwargs = {self._cache_kw: cache} if cache is not None else {}
                    out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     use_cache=cache is not None, logits_to_keep=keep, **kwargs)
                finally:
                    disarm(segments, self.posteriors, self.routing)
                return out.logits  # (R, keep, V)

        return forward() if self.forward_runner is None else self.forward_runner(forward)

    def set_prefix(self, tokens: Sequence[int] | None, rows: int = 64) -> None:
        """Reuse the keys and values of ``tokens`` (the start of many prompts) across decodes, for up
        to ``rows`` posterior-sample rows (each: layers x 2 x P x kv-width numbers). Not on a model
        with sliding-window layers: a prompt's rest, padded after the kept head, would push its own
        tokens out of the window as the decode goes on (:func:`~tfb_core.forward.planning.attention_window`)."""
        if attention_window(self.model.config) is not None:
            tokens = None
        self.prefix_tokens = list(tokens) if tokens else None
        self.prefix_rows = PrefixCache(rows if tokens else 0, fork=None)

    def drop_prefixes(self, adapter: int) -> int:
        """Drop the kept prefix rows computed with adapter ``adapter`` (an unloaded adapter's keys and
        values go with it); returns how many."""
        return self.prefix_rows.drop(lambda key: not (isinstance(key, tuple) and key and key[0] == adapter))

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`~tfb_core.forward.layout.pad_left` with this model's pad token, on its device."""
        return pad_left(rows, self.pad_id, self.device)

    def prefix_cache_of(self, rows: Sequence[Row], sigmas: dict[int, float], tokens: Sequence[int] | None = None,
                        store: PrefixCache | None = None) -> Any:
        """A key/value cache of the prefix ``tokens`` (None: :attr:`prefix_tokens`) for ``rows`` (in
        their order): rows kept in ``store`` (None: :attr:`prefix_rows`) reused, the others computed
        in one forward (one row per distinct adapter, sample, draw and sigma) and kept."""
        tokens = list(self.prefix_tokens or []) if tokens is None else list(tokens)
        store = self.prefix_rows if store is None else store
        head = tuple(tokens)
        key_of = {id(row): (row.adapter, row.sample, None if row.noise is None else row.noise.key,
                            sigmas.get(row.adapter, 0.0) if row.noisy else 0.0, head) for row in rows}
        missing: dict[tuple, Row] = {}
        for row in rows:
            k = key_of[id(row)]
            if store.get(k) is None and k not in missing:
                missing[k] = Row(0, row.adapter, row.sample, row.noise)
        if missing:
            items = list(missing.items())
            order, plans = layout([row for _, row in items])
            items = [items[i] for i in order]
            ids, mask, positions = self.pad([tokens] * len(items))
            cache = self.make_cache()
            self.forward([row for _, row in items], ids, mask, positions, cache, sigmas, plans)
            for r, (k, _) in enumerate(items):  # copies: a kept row must not hold the whole forward's tensors
                store.put(k, [(layer.keys[r:r + 1].clone(), layer.values[r:r + 1].clone())
                              for layer in cache.layers])
        per_row = [store.get(key_of[id(row)]) for row in rows]
        if any(kv is None for kv in per_row):  # more rows than the store keeps: compute them all now
            ids, mask, positions = self.pad([tokens] * len(rows))
            cache = self.make_cache()
            self.forward(list(rows), ids, mask, positions, cache, sigmas, plan_rows(rows))
            return cache
        cache = self.make_cache()
        for i in range(len(per_row[0])):
            cache.update(torch.cat([kv[i][0] for kv in per_row]), torch.cat([kv[i][1] for kv in per_row]), i)
        assert cache.get_seq_length() == len(tokens)
        return cache

    def sigmas_of(self, requests: Sequence[GenerationRequest]) -> dict[int, float]:
        """The one sigma of each adapter's noisy requests (sigma = 0 requests join as mean rows)."""
        sigmas: dict[int, float] = {}
        for i, req in enumerate(requests):
            if not 0 <= req.adapter < len(self.posteriors):
                raise ValueError(f"request {i}: adapter {req.adapter} is not one of the model's "
                                 f"{len(self.posteriors)}")
            if req.noisy and sigmas.setdefault(req.adapter, req.sigma) != req.sigma:
                raise ValueError(f"adapter {req.adapter}: one sigma per forward, got {sigmas[req.adapter]} "
                                 f"and {req.sigma}")
        return sigmas

    @staticmethod
    def draw_key(request: GenerationRequest) -> tuple[int, int, int] | None:
        """What identifies the posterior draw :meth:`noise_of` makes for ``request`` (None: it makes
        none: sigma = 0, or the request brings its own ``noise``)."""
        if not request.noisy or request.noise is not None:
            return None
        return request.adapter, request.seed, request.n_samples

    def noise_of(self, request: GenerationRequest, draws: dict | None = None) -> Any:
        """The request's draw: its own ``noise``, else the posterior's draw of its seed (shared by
        requests of one adapter and seed through ``draws``: one draw, sample-major rows)."""
        if not request.noisy:
            return None
        key = self.draw_key(request)
        if key is None:
            return request.noise
        if draws is None or key not in draws:
            draw = self.posteriors[request.adapter].draw(request.seed, request.n_samples)
            if draws is None:
                return draw
            draws[key] = draw
        return draws[key]

    # --- generation -------------------------------------------------------------------------------
    @torch.inference_mode()
    def start(self, requests: Sequence[GenerationRequest]) -> Any:
        """A :class:`~tfb_core.forward.decoding.Decoding` of ``requests``, prefilled: call its
        :meth:`~tfb_core.forward.decoding.Decoding.step` until it is done (one token per stream per step)."""
        from tfb_core.forward.decoding import Decoding

        return Decoding(self, requests)

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Decode every request to its end, all in shared forwards; one result per request, in order."""
        decoding = self.start(requests)
        while not decoding.done:
            decoding.step()
        return decoding.results()

    # --- scoring given continuations -------------------------------------------------------------
    def _score_rows(self, request: GenerationRequest, stream: int, draws: dict) -> list[Row]:
        """The rows that read a continuation under p̄ of ``request``'s samples: its N samples, or one
        mean row at sigma = 0 (its mean mode's, whatever its mode)."""
        noise = self.noise_of(request, draws)
        samples = request.streams()[0] if request.mode == "mean" else [s[0] for s in request.streams()]
        return [Row(stream, request.adapter, n, noise) for n in samples]

    @torch.inference_mode()
    def teacher_forced(self, requests: Sequence[GenerationRequest], continuations: Sequence[Sequence[int]],
                       max_rows: int = 64, share_prefix: bool = True,
                       ) -> list[tuple[list[Row], torch.Tensor]]:
        """Per request, its rows (:meth:`_score_rows`, in sample order) and their next-token logits
        before each token of its continuation: (rows, L, V) float32. Several requests share a forward
        (up to ``max_rows`` rows; a request's rows are never split), left-padded, the last positions
        kept. ``share_prefix``: the tokens every prompt starts with (a chat template's head) are
        computed once per sample (:meth:`prefix_cache_of`, kept for the call) and the rest of each
        prompt attends to them: the same numbers as the whole forward, up to float rounding."""
        if len(requests) != len(continuations):
            raise ValueError(f"{len(requests)} requests and {len(continuations)} continuations")
        if any(not c for c in continuations):
            raise ValueError("nothing to score: a continuation is empty")
        sigmas = self.sigmas_of(requests)
        draws: dict = {}
        rows_of = [self._score_rows(req, j, draws) for j, req in enumerate(requests)]
        seqs = [list(req.tokens) + list(c[:-1]) for req, c in zip(requests, continuations, strict=True)]
        # every rest keeps >= 1 token (a continuation's first is predicted from the prompt's last)
        prompts = [req.tokens for req in requests]
        P = min(common_prefix(prompts), min(len(p) for p in prompts) - 1) if share_prefix else 0
        window = attention_window(self.model.config)
        if window is not None and max(len(s) for s in seqs) > window:
            P = 0  # the rests, padded after the prefix, would push their own tokens out of the window
        store = PrefixCache(max(len(r) for r in rows_of) * len(requests), fork=None) if P > 0 else None
        out: list[tuple[list[Row], torch.Tensor]] = []
        chunk: list[int] = []
        for j in range(len(requests) + 1):
            if chunk and (j == len(requests) or sum(len(rows_of[i]) for i in [*chunk, j]) > max_rows):
                out += self._teacher_forced_chunk(chunk, rows_of, seqs, continuations, sigmas, P, store)
                chunk = []
            if j < len(requests):
                chunk.append(j)
        return out

    def _teacher_forced_chunk(self, chunk: Sequence[int], rows_of: Sequence[list[Row]], seqs: Sequence[list[int]],
                              continuations: Sequence[Sequence[int]], sigmas: dict[int, float], P: int,
                              store: PrefixCache | None) -> list[tuple[list[Row], torch.Tensor]]:
        rows = [row for j in chunk for row in rows_of[j]]
        keep = max(len(continuations[j]) for j in chunk)
        order, plans = layout(rows)
        ordered = [rows[i] for i in order]
        if P > 0:
            cache = self.prefix_cache_of(ordered, sigmas, seqs[chunk[0]][:P], store)
            ids, mask, positions = self.pad([seqs[row.stream][P:] for row in ordered])
            mask = torch.cat([mask.new_ones((len(rows), P)), mask], dim=1)
            positions = positions + P
        else:
            cache = None
            ids, mask, positions = self.pad([seqs[row.stream] for row in ordered])
        logits = self.forward(ordered, ids, mask, positions, cache, sigmas, plans, keep=keep)  # (R, keep, V)
        back = torch.empty_like(logits)
        back[torch.tensor(order, device=logits.device)] = logits  # rows back in the requests' order
        out, at = [], 0
        for j in chunk:
            n, L = len(rows_of[j]), len(continuations[j])
            out.append((rows_of[j], back[at:at + n, keep - L:].float()))
            at += n
        return out

    def continuation_logits(self, request: GenerationRequest, continuation: Sequence[int]) -> torch.Tensor:
        """Per sample row the next-token logits before each token of ``continuation``: (rows, L, V)
        float32, one forward of prompt + continuation without a cache. Rows as the request's mean
        mode: its N samples, or one mean row at sigma = 0."""
        return self.teacher_forced([request], [continuation], share_prefix=False)[0][1]

    @torch.inference_mode()
    def score_many(self, requests: Sequence[GenerationRequest], continuations: Sequence[Sequence[int]],
                   max_rows: int = 64, share_prefix: bool = True) -> list[ScoredContinuation]:
        """Each continuation read after its request's prompt under p̄ of the request's samples, mixed
        as a decode step mixes them (:func:`~tfb_core.decide.generation.mix_rows`): per token its
        log p̄, entropies and MI, the sequence's scores (NLL = -sum_t log p̄(y_t)), and whether
        greedy decoding from p̄ gives it back. The one teacher-forced scorer: the generative sigma
        search's criterion (:mod:`tfb_core.search.generation`) and a reference answer's NLL."""
        scored = self.teacher_forced(requests, continuations, max_rows, share_prefix)
        out = []
        for (_, logits), continuation in zip(scored, continuations, strict=True):
            R, L, V = logits.shape
            per_pos = logits.transpose(0, 1).reshape(L * R, V)  # position-major: stream = position
            mixed = mixing.mix_rows(per_pos, torch.arange(L, device=logits.device).repeat_interleave(R), L)
            target = torch.tensor(list(continuation), device=logits.device)
            logp = torch.log(mixed.probs.gather(1, target[:, None]).squeeze(1)).tolist()
            greedy = bool((mixed.probs.argmax(-1) == target).all())
            h, eh, mi = (t.tolist() for t in (mixed.predictive_entropy, mixed.expected_entropy,
                                              mixed.mutual_information))
            tokens = [TokenUncertainty(int(t), logp[i], h[i], eh[i], mi[i]) for i, t in enumerate(continuation)]
            out.append(ScoredContinuation(tokens, sequence_scores(logp, mi, h), greedy))
        return out

    def score(self, request: GenerationRequest, continuation: Sequence[int]) -> tuple[list[TokenUncertainty],
                                                                                      SequenceScores]:
        """The uncertainty of each token of ``continuation`` after the request's prompt under p̄ of
        its samples, and the answer's scores (e.g. the NLL of a reference answer): :meth:`score_many`
        of one."""
        (scored,) = self.score_many([request], [continuation], share_prefix=False)
        return scored.tokens, scored.sequence


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """The length of the token prefix every sequence shares."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for k in range(n):
        if any(s[k] != first[k] for s in seqs):
            return k
    return n
