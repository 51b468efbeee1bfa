"""``tfb eval`` for generation: AUROC / AURC / bootstrap on hand-checkable cases, the cost count, and
an end-to-end run on the tiny Llama whose accuracy and scores are checked against the generator."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

from tfb_core.config import ModelConfig
from tfb_core.data.loading import load_adapter, load_base_model
from tfb_core.decide.generation import SequenceScores
from tfb_core.evaluation.generation import (
    SCORES,
    GenEvalOptions,
    confidence_calibration,
    decode_cost,
    evaluate_generation,
    format_generation_table,
    rank_scores,
    shift_auroc,
)
from tfb_core.forward.completion import Completion, GenerationRequest, GenerationResult
from tfb_core.forward.generator import BayesianGenerator

PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again", "superb",
           "the plot is thin", "what a cast", "never again", "a triumph"]


def _t(*xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


def test_auroc_and_aurc_by_hand():
    correct = _t(True, False, True, False, dtype=torch.bool)
    scores = {"mixed": _t(0.1, 0.9, 0.5, 0.3),  # wrong 0.9 beats both right, wrong 0.3 beats 0.1 only: 3/4
              "perfect": _t(0.0, 1.0, 0.0, 1.0), "reversed": _t(1.0, 0.0, 1.0, 0.0), "constant": _t(1, 1, 1, 1),
              "distinct": _t(0.0, 1.0, 0.1, 0.9)}
    out = rank_scores(scores, {k: correct for k in scores}, n_boot=200, seed=1, pairs=[("perfect", "mixed")])
    assert out["mixed"]["auroc"] == pytest.approx(0.75)
    assert out["perfect"]["auroc"] == pytest.approx(1.0) and out["reversed"]["auroc"] == pytest.approx(0.0)
    assert out["constant"]["auroc"] == pytest.approx(0.5)
    # answering by certainty, ties together: the perfect ranker answers both right ones (risk 0 over
    # half the questions), then all (risk 1/2); the reversed one both wrong ones first (risk 1)
    assert out["perfect"]["aurc"] == pytest.approx(out["perfect"]["aurc_optimal"])
    assert out["perfect"]["aurc"] == pytest.approx((0 * 2 + 1 / 2 * 2) / 4)
    assert out["reversed"]["aurc"] == pytest.approx((1 * 2 + 1 / 2 * 2) / 4)
    # distinct values: one answer at a time, risk 0, 0, 1/3, 1/2
    assert out["distinct"]["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
    assert out["distinct"]["auroc"] == pytest.approx(1.0)
    assert out["constant"]["aurc"] == pytest.approx(0.5)  # everything answered at once: risk 1/2
    for k in scores:
        assert out[k]["n"] == 4 and out[k]["n_wrong"] == 2 and out[k]["accuracy"] == 0.5
        assert out[k]["auroc_lo"] <= out[k]["auroc"] <= out[k]["auroc_hi"] or k == "mixed"
    assert out["perfect"]["auroc_lo"] == out["perfect"]["auroc_hi"] == 1.0  # every resample with both classes: 1
    d = out["perfect-mixed"]
    assert d["diff"] == pytest.approx(0.25) and d["lo"] >= 0.0


def test_shift_auroc_by_hand():
    row = lambda v: {"scores": {k: v for k in SCORES}}  # noqa: E731
    out = shift_auroc([row(0.1), row(0.4)], [row(0.3), row(0.9)])  # shifted above 0.1 both, above 0.4 once: 3/4
    assert set(out) == set(SCORES) and out["tfb_mean_mi"] == pytest.approx(0.75)


def test_auroc_is_none_without_wrong_answers():
    out = rank_scores({"s": _t(0.1, 0.2)}, {"s": _t(True, True, dtype=torch.bool)}, n_boot=10)
    assert out["s"]["auroc"] is None and math.isnan(out["s"]["auroc_lo"]) and out["s"]["n_wrong"] == 0


def _completion(n_tokens: int) -> Completion:
    return Completion(list(range(n_tokens)), "x", "length", None, [], SequenceScores(0, 0, 0, 0, 0, n_tokens))


def _row(mle_p: float, mle_ok: bool, tfb_p: float, tfb_ok: bool) -> dict:
    return {"mle_correct": mle_ok, "tfb_correct": tfb_ok,
            "scores": {"mle_nll": -math.log(mle_p), "tfb_nll": -math.log(tfb_p)}}


def test_answer_confidence_calibration_by_hand():
    rows = [_row(0.9, True, 0.8, True), _row(0.9, False, 0.4, False), _row(0.3, False, 0.2, True),
            _row(0.6, True, 0.6, True)]
    out = confidence_calibration(rows, n_boot=50)
    m = out["metrics"]
    # each confidence alone in its 15-bin bin (0.9 twice: one bin, accuracy 1/2): ECE by hand
    assert m["mle"]["ece"] == pytest.approx((2 * abs(0.9 - 0.5) + 0.3 + 0.4) / 4, abs=1e-6)
    assert m["tfb"]["ece"] == pytest.approx((0.2 + 0.4 + 0.8 + 0.4) / 4, abs=1e-6)
    assert m["tfb"]["brier"] == pytest.approx((0.04 + 0.16 + 0.64 + 0.16) / 4)
    assert m["mle"]["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.1) + math.log(0.7) + math.log(0.6)) / 4)
    assert set(out["differences"]) == {"tfb-mle"} and out["temperature"] == {}
    assert out["differences"]["tfb-mle"]["brier"]["diff"] == pytest.approx(m["tfb"]["brier"] - m["mle"]["brier"])
    # calibration questions all at confidence 0.9 with 3 of 4 right: the NLL-optimal temperature makes
    # sigmoid(logit(0.9) / T) = 0.75, T = logit(0.9) / logit(0.75) = 2 (the MLE's); TFB's 0.8, 1 of 2 right: T = inf
    # in the limit, capped by the search's bound
    cal = [_row(0.9, True, 0.8, True), _row(0.9, True, 0.8, False), _row(0.9, True, 0.8, True),
           _row(0.9, False, 0.8, False)]
    out = confidence_calibration(rows, cal, n_boot=50)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert out["temperature"]["mle"] == pytest.approx(logit(0.9) / logit(0.75), rel=1e-4)
    scaled = out["metrics"]["mle+temperature"]
    c = [1 / (1 + math.exp(-logit(p) / out["temperature"]["mle"])) for p in (0.9, 0.9, 0.3, 0.6)]
    assert c[0] == pytest.approx(0.75, rel=1e-4)
    assert scaled["brier"] == pytest.approx(((c[0] - 1) ** 2 + c[1] ** 2 + c[2] ** 2 + (c[3] - 1) ** 2) / 4)
    assert set(out["differences"]) == {"tfb-mle", "tfb+temperature-mle", "mle+temperature-mle",
                                       "tfb-mle+temperature", "tfb+temperature-mle+temperature", "mle-mle+temperature"}


def test_decode_cost_by_hand():
    mean = GenerationResult("mean", 10, [_completion(4)], prompt_tokens=20)
    per_sample = GenerationResult("per_sample", 3, [_completion(2), _completion(5), _completion(1)], prompt_tokens=7)
    # mean: 10 rows of 20 prompt tokens + 3 fed back each, 4 forwards
    assert decode_cost([mean], mean_rows=10) == {"rows": 10, "forwards": 4, "row_tokens": 10 * 20 + 10 * 3}
    assert decode_cost([mean], mean_rows=1) == {"rows": 1, "forwards": 4, "row_tokens": 23}
    # per sample: 3 rows of 7 prompt tokens, (1 + 4 + 0) fed back, the longest stream's 5 forwards
    assert decode_cost([per_sample], 10) == {"rows": 3, "forwards": 5, "row_tokens": 21 + 5}
    assert decode_cost([mean, per_sample], 10)["row_tokens"] == 230 + 26


@pytest.fixture(scope="module")
def gen(tiny):
    cfg = ModelConfig(model=tiny["model"], adapter=tiny["adapter"], device=DEVICE)
    tok, model = load_base_model(cfg)
    return BayesianGenerator.from_peft(load_adapter(model, cfg), tok)


def test_evaluate_generation_end_to_end_on_the_tiny_model(gen):
    L, N, K, sigma = 4, 4, 5, 0.5
    greedy = gen.generate([GenerationRequest(gen.tokenizer(p)["input_ids"], n_samples=1, max_tokens=L)
                           for p in PROMPTS])
    # the MLE's own greedy answer is the reference of every other question: accuracy 1/2 exactly
    records = [{"id": str(i), "prompt": p, "answers": [greedy[i].completion.text if i % 2 == 0 else "zzz qqq"]}
               for i, p in enumerate(PROMPTS)]
    opts = GenEvalOptions(n_samples=N, k_samples=K, max_tokens=L, chat=False, batch=3, n_boot=50)
    seen = []
    res = evaluate_generation(gen, records, sigma, opts, checkpoint=lambda rows, costs: seen.append(
        (len(rows), costs["tfb"]["rows"])))
    assert seen == [(3, 3 * N), (6, 6 * N), (8, 8 * N)]  # after each batch: the rows and costs so far
    assert res["n"] == len(PROMPTS) and res["accuracy"]["mle"] == 0.5
    assert set(res["scores"]) == set(SCORES)
    for i, row in enumerate(res["rows"]):
        assert row["mle_answer"] == greedy[i].completion.text
        assert row["scores"]["mle_nll"] == pytest.approx(greedy[i].completion.sequence.nll)
        tok = gen.tokenizer(PROMPTS[i])["input_ids"]
        bma = gen.generate([GenerationRequest(tok, n_samples=N, sigma=sigma, seed=0, max_tokens=L)])[0].completion
        assert row["tfb_answer"] == bma.text
        assert row["scores"]["tfb_mean_mi"] == pytest.approx(bma.sequence.mean_mutual_information)
    s = res["scores"]
    assert s["mle_msp"]["auroc"] == pytest.approx(s["mle_nll"]["auroc"])  # one ranking, two scales
    assert any(r["scores"]["tfb_mean_mi"] > 0 for r in res["rows"])
    assert any(r["scores"]["mle_semantic_entropy"] > 0 for r in res["rows"])  # temperature-1 samples differ
    n = len(PROMPTS)
    cost = res["cost_per_question"]
    assert cost["mle"]["rows"] == 1 and cost["tfb"]["rows"] == N
    assert cost["mle_samples"]["rows"] == K and cost["tfb_samples"]["rows"] == N
    assert s["mle_semantic_entropy"]["cost"]["rows"] == 1 + K and s["tfb_mean_mi"]["cost"]["rows"] == N
    prompt_tokens = sum(len(gen.tokenizer(p)["input_ids"]) for p in PROMPTS) / n
    assert cost["tfb"]["row_tokens"] >= N * prompt_tokens
    table = format_generation_table("tiny", res)
    assert "tfb_mean_mi" in table and "best TFB" in table
