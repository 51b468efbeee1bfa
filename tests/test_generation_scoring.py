"""One teacher-forced scorer under p̄ for the generative sigma search and ``tfb eval``: both go through
the same mixing of the samples' distributions, agree with each other on the same answers, and agree
with an independent oracle: N sequential plain forwards of a fresh peft model whose LoRA weights
are set by hand to each posterior sample (B', A' + (sigma / d) z_n), their probabilities averaged
in float64 here."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

from tfb_core.config import ModelConfig, SearchConfig
from tfb_core.data.loading import load_adapter, load_base_model
from tfb_core.decide import generation as mixing
from tfb_core.evaluation.generation import GenEvalOptions, evaluate_generation
from tfb_core.forward.completion import GenerationRequest
from tfb_core.forward.generator import BayesianGenerator
from tfb_core.search.generation import answer_scores, generation_objective, greedy_answers, make_anchors, scaled

PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again", "superb"]
L, N, SEED, SIGMA = 4, 3, 5, 0.4


@pytest.fixture(scope="module")
def models(tiny):
    cfg = ModelConfig(model=tiny["model"], adapter=tiny["adapter"], device=DEVICE)
    tok, model = load_base_model(cfg)
    gen = BayesianGenerator.from_peft(load_adapter(model, cfg), tok)
    _, plain = load_base_model(cfg)
    return gen, load_adapter(plain, cfg).eval()


def _oracle_nll(gen, peft_model, prompt: list[int], answer: list[int], z: list[torch.Tensor] | None, sigma: float
                ) -> float:
    """-sum_t log mean_n p_n(y_t), each p_n from a plain peft forward with its LoRA set to sample n."""
    modules = {m.name: m for m in gen.posteriors[0].modules}
    layers = {name.removeprefix("base_model.model."): layer for name, layer in peft_model.named_modules()
              if hasattr(layer, "lora_A") and "default" in getattr(layer, "lora_A", {})}
    assert set(layers) == set(modules)  # every LoRA module is set by hand below
    ids = torch.tensor([prompt + answer[:-1]], device=DEVICE)
    probs = []
    for n in range(1 if z is None else z[0].shape[0]):
        with torch.no_grad():
            for k, (name, m) in enumerate(modules.items()):
                a = m.lora_A if z is None else m.lora_A + sigma * m.inv_d_col * z[k][n]
                layers[name].lora_A["default"].weight.copy_(a)
                layers[name].lora_B["default"].weight.copy_(m.lora_B)
                assert layers[name].scaling["default"] == m.scaling
            logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt) - 1:]
        probs.append(torch.softmax(logits.double(), -1))  # (L, V)
    pbar = torch.stack(probs).mean(0)
    return -float(pbar.gather(1, torch.tensor(answer, device=pbar.device)[:, None]).log().sum())


def test_the_search_and_tfb_eval_score_with_one_function_and_agree_with_sequential_peft(models, monkeypatch):
    gen, peft_model = models
    calls = {"n": 0}
    mix = mixing.mix_rows

    def counted(*args, **kwargs):
        calls["n"] += 1
        return mix(*args, **kwargs)

    monkeypatch.setattr(mixing, "mix_rows", counted)
    prompts = [gen.tokenizer(p)["input_ids"] for p in PROMPTS]
    anchors = make_anchors(gen.tokenizer, [{"prompt": p} for p in PROMPTS])
    objective, ref = generation_objective(gen, anchors, SearchConfig(n_samples=N, seed=SEED), max_tokens=L)
    objective([SIGMA])
    searched = calls["n"]
    assert searched > 0  # the search's criterion reads p̄ through the one mixing
    records = [{"prompt": p, "answers": ["x"]} for p in PROMPTS]
    ev = evaluate_generation(gen, records, SIGMA, GenEvalOptions(n_samples=N, k_samples=2, max_tokens=L, seed=SEED,
                                                                 chat=False, n_boot=0))
    assert calls["n"] > searched  # and so do tfb eval's scores
    monkeypatch.setattr(mixing, "mix_rows", mix)

    # sigma = 0: the search's pseudo-answers are eval's MLE answers, with one NLL each, the oracle's
    mle = ref["answers"]
    at0 = answer_scores(gen, prompts, mle, None, 1)
    assert math.fsum(s.sequence.nll for s in at0) / len(at0) == pytest.approx(ref["nll_pseudo"], rel=1e-12)
    for p, y, s, row in zip(prompts, mle, at0, ev["rows"], strict=True):
        oracle = _oracle_nll(gen, peft_model, p, y, None, 0.0)
        assert s.sequence.nll == pytest.approx(oracle, rel=1e-4, abs=1e-5)
        assert row["scores"]["mle_nll"] == pytest.approx(oracle, rel=1e-4, abs=1e-5)
    # sigma > 0: eval's BMA answers scored by the search's scorer, by eval, and by the oracle
    draw = gen.posteriors[0].draw(SEED, N)
    bma = [r.completion.token_ids for r in gen.generate(
        [GenerationRequest(p, n_samples=N, sigma=SIGMA, seed=SEED, max_tokens=L) for p in prompts])]
    assert [c.token_ids for c in greedy_answers(gen, prompts, L, noise=scaled(draw, SIGMA), n_samples=N)] == bma
    at_sigma = answer_scores(gen, prompts, bma, scaled(draw, SIGMA), N)
    some_differ = False
    for p, y, s, row in zip(prompts, bma, at_sigma, ev["rows"], strict=True):
        oracle = _oracle_nll(gen, peft_model, p, y, draw.z, SIGMA)
        assert s.sequence.nll == pytest.approx(oracle, rel=1e-4, abs=1e-5)
        assert row["scores"]["tfb_nll"] == pytest.approx(oracle, rel=1e-4, abs=1e-5)
        assert s.greedy  # the BMA greedy answer is greedy on the scorer's p̄
        some_differ |= abs(oracle - _oracle_nll(gen, peft_model, p, y, None, 0.0)) > 1e-3
    assert some_differ  # sigma moves p̄: the oracle's samples are not the mean's
