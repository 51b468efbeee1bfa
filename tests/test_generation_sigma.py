"""Sigma for a generative adapter on the tiny Llama with a non-zero-B LoRA: the pseudo-answers are
the peft model's greedy generation, the criterion is exactly 0 at sigma = 0 and grows with sigma,
the batched teacher-forced p̄ equals the generator's own scoring, ``flip`` is the decoded answers'
change, and the search satisfies the tolerance while a little more sigma breaks it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEVICE

from tfb_core.config import ModelConfig, SearchConfig
from tfb_core.data.loading import load_adapter, load_base_model
from tfb_core.forward.completion import GenerationRequest
from tfb_core.forward.generator import BayesianGenerator, common_prefix
from tfb_core.search.generation import (
    answer_scores,
    generation_objective,
    greedy_answers,
    make_anchors,
    read_anchor,
    scaled,
    search_generation_sigma,
)

PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again", "superb",
           "the plot is thin", "what a cast"]
L = 5


def _cfg(tiny) -> ModelConfig:
    return ModelConfig(model=tiny["model"], adapter=tiny["adapter"], device=DEVICE)


@pytest.fixture(scope="module")
def gen(tiny):
    cfg = _cfg(tiny)
    tok, model = load_base_model(cfg)
    return BayesianGenerator.from_peft(load_adapter(model, cfg), tok)


@pytest.fixture(scope="module")
def anchors(gen):
    return make_anchors(gen.tokenizer, [{"prompt": p} for p in PROMPTS])


def test_pseudo_answers_are_the_peft_models_greedy_generate(tiny, gen, anchors):
    cfg = _cfg(tiny)
    tok, model = load_base_model(cfg)
    peft_model = load_adapter(model, cfg)
    got = greedy_answers(gen, [a.tokens for a in anchors], L, batch=4)  # 2 decodes, left-padded batches
    for a, c in zip(anchors, got, strict=True):
        ids = torch.tensor([a.tokens], device=DEVICE)
        with torch.no_grad():
            out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=L, pad_token_id=tok.pad_token_id)
        assert c.token_ids == out[0, len(a.tokens):].tolist()
    _, ref = generation_objective(gen, anchors, SearchConfig(n_samples=3), max_tokens=L)
    assert ref["answers"] == [c.token_ids for c in got] and ref["nll_pseudo"] > 0


@pytest.mark.parametrize("shared", ["", "the film review reads as follows: "])
@pytest.mark.parametrize("sigma", [0.0, 0.2])
def test_teacher_forced_pbar_is_the_generators_own_scoring_and_batching_changes_nothing(gen, shared, sigma):
    prompts = [gen.tokenizer(shared + p)["input_ids"] for p in PROMPTS]
    assert common_prefix(prompts) >= (5 if shared else 1)  # the cached prefix is used
    answers = [c.token_ids for c in greedy_answers(gen, prompts, L)]
    draw = scaled(gen.posteriors[0].draw(7, 4), sigma) if sigma else None
    n = 4 if sigma else 1
    one = answer_scores(gen, prompts, answers, draw, n, max_rows=4)  # a prompt per forward
    many = answer_scores(gen, prompts, answers, draw, n, max_rows=64)  # all in one forward
    reqs = [GenerationRequest(p, n_samples=n, sigma=1.0 if sigma else 0.0, noise=draw) for p in prompts]
    full = gen.score_many(reqs, answers, max_rows=8, share_prefix=False)  # no prefix cache
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        tokens, _ = gen.score(GenerationRequest(p, n_samples=4, sigma=1.0 if sigma else 0.0, noise=draw), a)
        expected = torch.tensor([t.logprob for t in tokens], dtype=torch.float64)
        for got in (one, many, full):
            torch.testing.assert_close(torch.tensor([t.logprob for t in got[i].tokens], dtype=torch.float64),
                                       expected, atol=2e-5, rtol=1e-4)
            assert got[i].greedy == one[i].greedy
        if not sigma:
            assert one[i].greedy  # the sigma = 0 answer is its own greedy decode


@pytest.mark.parametrize("criterion", ["nll", "flip"])
def test_the_criterion_is_exactly_zero_at_sigma_zero_and_grows_with_sigma(gen, anchors, criterion):
    objective, _ = generation_objective(gen, anchors, SearchConfig(criterion=criterion, n_samples=4, seed=1),
                                        max_tokens=L)
    values = objective([0.0, 0.03, 0.3, 1.0, 3.0])
    assert values[0] == 0.0
    if criterion == "nll":
        assert all(0 < a < b for a, b in zip(values[1:], values[2:], strict=False)), values
    else:
        assert values[-1] > 0 and values == sorted(values), values
    assert objective([0.3]) == [values[2]]  # common random numbers: deterministic


def test_flip_is_the_fraction_of_bma_greedy_answers_that_change(gen, anchors):
    cfg = SearchConfig(criterion="flip", n_samples=4, seed=2)
    objective, ref = generation_objective(gen, anchors, cfg, max_tokens=L)
    draw = gen.posteriors[0].draw(cfg.seed, cfg.n_samples)
    seen = []
    for sigma in (0.5, 2.0):
        decoded = greedy_answers(gen, [a.tokens for a in anchors], L, noise=scaled(draw, sigma), n_samples=4)
        changed = sum(c.token_ids != p for c, p in zip(decoded, ref["answers"], strict=True)) / len(anchors)
        assert objective([sigma]) == [changed]
        seen.append(changed)
    assert seen[-1] > 0  # some answers did change


def test_the_searched_sigma_satisfies_the_tolerance_and_a_little_more_does_not(gen, tmp_path):
    path = tmp_path / "anchor.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "answer": "x"}) for p in PROMPTS) + "\n")
    cfg = SearchConfig(criterion="nll", tolerance=0.2, low=0.01, high=0.5, iters=8, n_samples=4, seed=3)
    res = search_generation_sigma(gen, read_anchor(path), cfg, max_tokens=L)
    assert res.satisfied and res.sigma > 0 and res.value <= cfg.tolerance
    assert res.reference["nll_pseudo"] > 0 and res.reference["accuracy"] == 0.0
    objective, _ = generation_objective(gen, make_anchors(gen.tokenizer, read_anchor(path)), cfg, max_tokens=L)
    at, above = objective([res.sigma, res.sigma * (1 + 0.1)])
    assert at == pytest.approx(res.value, rel=1e-6)
    # the search's contract: it stopped within rtol of the tolerance, so 10% more sigma breaks it
    assert at >= (1 - cfg.rtol) * cfg.tolerance and above > cfg.tolerance


def test_accuracy_criterion_needs_reference_answers(gen, anchors):
    with pytest.raises(ValueError, match="reference 'answer'"):
        generation_objective(gen, anchors, SearchConfig(criterion="accuracy"), max_tokens=L)
