"""Sigma for a generative adapter: the anchor objective that :mod:`tfb_core.search.strategy` runs on.

The classification criterion (:mod:`tfb_core.search.classifier`) compares the sigma = 0 model's own
predictions on the anchor prompts with the mean of N posterior samples at sigma. For generation the
sigma = 0 model's own *greedy answers* play the pseudo-labels' part:

1. every anchor prompt is decoded greedily at sigma = 0 (the posterior mean, which is the plain peft
   adapter: :meth:`~tfb_core.forward.generator.BayesianGenerator.generate` with one mean row; the
   answer's tokens include the end-of-sequence token that ended it, if one did: whether to stop
   is part of the answer);
2. at each sigma, every answer is read under p̄ = mean of the N samples' next-token distributions,
   teacher-forced in one forward per chunk of anchors (prompt + answer, left-padded, N sample rows
   per anchor, ``logits_to_keep`` = the longest answer) by the generator's one scorer
   (:meth:`~tfb_core.forward.generator.BayesianGenerator.score_many`: p̄ mixed as a decode step
   mixes it, so the search reads the same p̄(y) as a served answer's and ``tfb eval``'s
   ``sequence.nll``): NLL_sigma = mean over anchors of -sum_t log p̄(y_t | prompt, y_<t).

Criteria (:class:`~tfb_core.config.SearchConfig`'s ``criterion``, ``tolerance``):

- ``nll``: |NLL_sigma - NLL_0| / NLL_0, the relative change of the answers' NLL (the mean over
  anchors, the sum over tokens, or the mean per token: the same ratio). Exactly 0 at sigma = 0.
- ``flip``: the fraction of anchors whose Bayesian-model-averaging greedy answer at sigma differs
  from the sigma = 0 answer. Read from the same teacher-forced forward, and exact: greedy decoding
  from p̄ reproduces the answer token for token iff argmax p̄ is the answer's token at every one of
  its positions (ties aside), so no decoding is needed.
- ``accuracy`` (anchor lines with a reference ``answer``): the drop of exact-match accuracy
  (:func:`tfb_core.decide.answers.exact_match`) of the BMA greedy answers against the references,
  accuracy_0 - accuracy_sigma; this one decodes the anchors at each sigma.

Common random numbers: one standard-normal draw Z (``cfg.seed``, ``cfg.n_samples``), scaled by each
sigma (the draw carries sigma, the forward runs at sigma 1, as the classifier's objective does), so
the criterion is a smooth, deterministic function of sigma and bisection is well posed. An anchor
line is what a client sends: ``{"prompt": ...}`` (plain text, as /v1/completions reads it) or
``{"messages": [...]}`` (chat messages through the tokenizer's chat template, as
/v1/chat/completions renders them: :func:`tfb_core.data.generation.encode_prompt`), with an optional
reference ``"answer"`` (a string or a list of aliases). ``chat=True`` reads a ``prompt`` as one user
message through the chat template (how the generative demo's evaluation reads its questions).

Usage::

    result = search_generation_sigma(generator, read_anchor(path), SearchConfig(), chat=True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfb_core.bayes.posterior import NoiseDraw
from tfb_core.config import SearchConfig
from tfb_core.data.generation import encode_prompt
from tfb_core.forward.completion import GenerationRequest
from tfb_core.search.strategy import Objective, SearchResult, search

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Anchor:
    """One anchor prompt (as the model reads it, tokenized) and its optional reference answers."""

    prompt: str
    tokens: list[int]
    answers: tuple[str, ...] = ()


def read_anchor(path: str | Path) -> list[dict[str, Any]]:
    """Anchor lines of a JSON Lines file: ``{"prompt": str}`` or ``{"messages": [{"role", "content"},
    ...]}``, each with an optional ``"answer"`` (a string or a list of aliases); ``LoadError`` naming
    the file and line of one that is neither."""
    from tfb_core.data.jsonl import read_jsonl
    from tfb_core.data.loading import LoadError

    records = read_jsonl(path)
    for i, r in enumerate(records, 1):
        if why := _bad_record(r):
            raise LoadError(f"{path}: record {i}: {why}")
    return records


def _bad_record(r: dict[str, Any]) -> str | None:
    """Why an anchor record is not one (None: it is)."""
    prompt, messages = r.get("prompt"), r.get("messages")
    if (prompt is None) == (messages is None):
        return "give one of 'prompt' (a string) or 'messages' (a list of chat messages)"
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        return "'prompt' must be a non-empty string"
    if messages is not None and (not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        return "'messages' must be a non-empty list of {\"role\": str, \"content\": str}"
    answer = r.get("answer", r.get("answers"))
    if answer is not None and not (isinstance(answer, str) or (
            isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer))):
        return "'answer' must be a string or a non-empty list of strings"
    return None


def make_anchors(tokenizer: Any, records: Sequence[dict[str, Any]], chat: bool = False) -> list[Anchor]:
    """:class:`Anchor` s of anchor records (``answer``: a string or a list of aliases, optional)."""
    out = []
    for r in records:
        answer = r.get("answer", r.get("answers"))
        answers = () if answer is None else (answer,) if isinstance(answer, str) else tuple(answer)
        prompt = r["prompt"] if "prompt" in r else r["messages"]
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        out.append(Anchor(shown, encode_prompt(tokenizer, prompt, chat), answers))
    return out


def scaled(draw: NoiseDraw, sigma: float) -> NoiseDraw:
    """The draw times sigma (common random numbers: every sigma scales the same Z)."""
    return NoiseDraw(draw.seed, [z * sigma for z in draw.z])


def greedy_answers(gen: Any, prompts: Sequence[Sequence[int]], max_tokens: int, adapter: int = 0,
                   noise: NoiseDraw | None = None, n_samples: int = 1, batch: int = 32) -> list[Any]:
    """Greedy completions of ``prompts``: at sigma = 0 (``noise`` None: one mean row each, the plain
    adapter's greedy decode), else Bayesian-model-averaging greedy under the rows of ``noise``
    (already scaled by sigma), ``n_samples`` rows each. ``batch`` prompts share one decode."""
    out = []
    for i in range(0, len(prompts), batch):
        reqs = [GenerationRequest(list(t), n_samples=n_samples, sigma=0.0 if noise is None else 1.0,
                                  max_tokens=max_tokens, adapter=adapter, noise=noise)
                for t in prompts[i:i + batch]]
        out += [r.completion for r in gen.generate(reqs)]
    return out


def answer_scores(gen: Any, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                  noise: NoiseDraw | None, n_samples: int, adapter: int = 0, max_rows: int = 64) -> list[Any]:
    """Each answer read after its prompt under p̄ of the ``n_samples`` rows of ``noise`` (already
    scaled by sigma; the forward runs at sigma 1), or of the one mean row at sigma = 0 (``noise``
    None): the generator's one teacher-forced scorer
    (:meth:`~tfb_core.forward.generator.BayesianGenerator.score_many`), with p̄ mixed as a decode
    step and ``tfb eval`` mix it. Prompts share forwards (up to ``max_rows`` rows) and a prompt head."""
    requests = [GenerationRequest(list(p), n_samples=n_samples if noise is not None else 1,
                                  sigma=1.0 if noise is not None else 0.0, adapter=adapter, noise=noise)
                for p in prompts]
    return gen.score_many(requests, answers, max_rows=max_rows)


def generation_objective(gen: Any, anchors: Sequence[Anchor], cfg: SearchConfig, max_tokens: int = 16,
                         adapter: int = 0, max_rows: int = 64) -> tuple[Objective, dict[str, Any]]:
    """(objective over sigmas, reference figures of the sigma = 0 model) on generative anchors.

    The reference: ``nll_pseudo`` (the mean over anchors of the sigma = 0 answers' NLL),
    ``mean_answer_tokens``, ``n_anchor`` and, with reference answers, the sigma = 0 greedy answers'
    exact-match ``accuracy``. Also ``answers``: the sigma = 0 answers' token ids (the pseudo-answers).
    """
    from tfb_core.decide.answers import exact_match

    if not anchors:
        raise ValueError("the anchor set is empty")
    labelled = all(a.answers for a in anchors)
    if cfg.criterion == "accuracy" and not labelled:
        raise ValueError("criterion 'accuracy' needs a reference 'answer' on every anchor line")
    prompts = [a.tokens for a in anchors]
    completions = greedy_answers(gen, prompts, max_tokens, adapter)
    pseudo = [c.token_ids for c in completions]
    ref = answer_scores(gen, prompts, pseudo, None, 1, adapter, max_rows)
    nll0 = _mean_nll(ref)
    acc0 = (sum(exact_match(c.text, list(a.answers)) for c, a in zip(completions, anchors, strict=True))
            / len(anchors)) if labelled else float("nan")
    reference: dict[str, Any] = {"nll_pseudo": nll0, "n_anchor": float(len(anchors)), "accuracy": acc0,
                                 "mean_answer_tokens": sum(map(len, pseudo)) / len(pseudo)}
    draw = gen.posteriors[adapter].draw(cfg.seed, cfg.n_samples)

    def value(sigma: float) -> float:
        noise = scaled(draw, sigma) if sigma > 0.0 else None
        if cfg.criterion == "accuracy":
            if noise is None:
                return 0.0
            answers = greedy_answers(gen, prompts, max_tokens, adapter, noise, cfg.n_samples)
            acc = sum(exact_match(c.text, list(a.answers)) for c, a in zip(answers, anchors, strict=True)) / len(anchors)
            return acc0 - acc
        scored = answer_scores(gen, prompts, pseudo, noise, cfg.n_samples, adapter, max_rows)
        if cfg.criterion == "flip":
            return sum(not s.greedy for s in scored) / len(scored)
        return abs(_mean_nll(scored) - nll0) / max(nll0, 1e-12)

    def objective(sigmas: Sequence[float]) -> list[float]:
        return [value(float(s)) for s in sigmas]

    reference["answers"] = pseudo
    return objective, reference


def _mean_nll(scored: Sequence[Any]) -> float:
    return math.fsum(s.sequence.nll for s in scored) / len(scored)


def search_generation_sigma(gen: Any, records: Sequence[dict[str, Any]] | Sequence[Anchor], cfg: SearchConfig,
                            chat: bool = False, max_tokens: int = 16, adapter: int = 0, max_rows: int = 64,
                            observe: Callable[[Sequence[float], list[float]], None] | None = None) -> SearchResult:
    """Run the search of ``cfg`` (:func:`tfb_core.search.search`, unchanged) on a generator's anchor
    records (or :class:`Anchor` s, already tokenized); ``result.reference`` holds the sigma = 0
    figures (without the pseudo-answers' ids). ``observe(sigmas, values)`` after each evaluation."""
    anchors = [r if isinstance(r, Anchor) else make_anchors(gen.tokenizer, [r], chat)[0] for r in records]
    objective, reference = generation_objective(gen, anchors, cfg, max_tokens, adapter, max_rows)
    result = search(objective, cfg, observe)
    reference.pop("answers")
    result.reference = reference
    log.info("generative sigma search (%s, %s <= %g): sigma=%.6g in %.1fs, %d evaluations", cfg.method,
             cfg.criterion, cfg.tolerance, result.sigma, result.seconds, result.n_evaluations)
    return result
