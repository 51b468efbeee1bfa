"""The pure parts of generation against hand-computed values: mixing N rows into p̄ and its
uncertainty, choosing a token, sequence scores, semantic entropy (the normalisation: tests/test_answers.py),
stop rules, and the rows of a decode forward."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tfb_core.bayes.posterior import TFBLinear, TFBPosterior
from tfb_core.decide.generation import (
    choose_token,
    cluster_answers,
    mix_rows,
    nucleus,
    semantic_entropy,
    sequence_scores,
)
from tfb_core.forward.completion import GenerationRequest, StopRule
from tfb_core.forward.layout import Row, build_segments, plan_rows


# --- p̄ and its uncertainty ------------------------------------------------------------------------
def test_mix_rows_against_hand_computed_values():
    """Stream 0: rows p = (0.5, 0.5) and (0.9, 0.1), interleaved with stream 1's single row (0.2, 0.8).
    p̄ = (0.7, 0.3); H[p̄] = 0.610864; E[H] = (ln 2 + 0.325083) / 2; MI = 0.101749."""
    probs = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
    mixed = mix_rows(torch.log(probs), torch.tensor([0, 1, 0]), 2)
    torch.testing.assert_close(mixed.probs[0], torch.tensor([0.7, 0.3]), atol=1e-6, rtol=0)
    assert mixed.predictive_entropy[0].item() == pytest.approx(0.6108643020548935, abs=1e-6)
    assert mixed.expected_entropy[0].item() == pytest.approx((math.log(2) + 0.3250829733914482) / 2, abs=1e-6)
    assert mixed.mutual_information[0].item() == pytest.approx(0.10174922507919681, abs=1e-6)
    # the one-row stream is its row exactly: p̄ bit for bit the row's own distribution, MI exactly 0
    assert torch.equal(mixed.probs[1], torch.log_softmax(torch.log(probs[1]), -1).exp())
    assert mixed.mutual_information[1].item() == 0.0
    assert mixed.expected_entropy[1].item() == mixed.predictive_entropy[1].item()
    assert mixed.single.tolist() == [False, True]


def test_mix_rows_identity_and_nonnegative_mi_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 50, generator=gen) * 3
    rows = torch.arange(6).repeat_interleave(4)[torch.randperm(24, generator=gen)]
    mixed = mix_rows(logits, rows, 6)
    assert torch.all(mixed.mutual_information > 0)  # 4 different rows each: strictly positive
    torch.testing.assert_close(mixed.predictive_entropy, mixed.expected_entropy + mixed.mutual_information,
                               atol=1e-9, rtol=0)
    p = torch.softmax(logits, -1)
    for s in range(6):  # against a direct computation per stream
        ps = p[rows == s]
        mean = ps.mean(0)
        h = lambda q: float(-(q * q.log()).sum(-1).mean())  # noqa: E731
        assert mixed.predictive_entropy[s].item() == pytest.approx(h(mean[None]), abs=1e-5)
        assert mixed.expected_entropy[s].item() == pytest.approx(h(ps), abs=1e-5)
    with pytest.raises(ValueError, match="every stream needs rows"):
        mix_rows(logits, rows, 7)


# --- choosing a token -------------------------------------------------------------------------------
def test_choose_token_against_hand_computed_nucleus():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert choose_token(p, 0.0, 1.0) == 0
    ids, q = nucleus(p, 1.0, 0.7)  # 0.5 < 0.7, 0.8 >= 0.7: two tokens, renormalised
    assert ids.tolist() == [0, 1]
    torch.testing.assert_close(q, torch.tensor([0.625, 0.375], dtype=torch.float64))
    assert choose_token(p, 1.0, 0.7, u=0.6) == 0
    assert choose_token(p, 1.0, 0.7, u=0.63) == 1
    # temperature 0.5: q ∝ p², = (0.68493, 0.24658, 0.06164, 0.00685), cumulative 0.68493, 0.93151, 0.99315
    assert choose_token(p, 0.5, 1.0, u=0.68) == 0
    assert choose_token(p, 0.5, 1.0, u=0.93) == 1
    assert choose_token(p, 0.5, 1.0, u=0.95) == 2
    assert choose_token(p, 0.5, 1.0, u=0.999) == 3
    assert choose_token(p, 1.0, 1e-9, u=0.999) == 0  # top_p ~ 0 keeps the most probable token
    with pytest.raises(ValueError, match="uniform draw"):
        choose_token(p, 1.0, 1.0)


def test_sequence_scores_against_hand_computed_values():
    s = sequence_scores([-0.5, -1.0, -0.25], [0.1, 0.0, 0.4], [1.0, 2.0, 3.0])
    assert s.nll == pytest.approx(1.75) and s.mean_nll == pytest.approx(1.75 / 3)
    assert s.mean_mutual_information == pytest.approx(0.5 / 3) and s.max_mutual_information == 0.4
    assert s.mean_predictive_entropy == pytest.approx(2.0) and s.n_tokens == 3
    assert sequence_scores([], [], []).n_tokens == 0


# --- answers ----------------------------------------------------------------------------------------
def test_cluster_answers_and_semantic_entropy_against_hand_computed_values():
    answers = ["Paris", "paris.", "London", "The Paris", "Rome", " london"]
    summary = cluster_answers(answers)
    assert [(c.key, c.members) for c in summary.clusters] == [("paris", (0, 1, 3)), ("london", (2, 5)),
                                                               ("rome", (4,))]
    assert [c.share for c in summary.clusters] == [0.5, 2 / 6, 1 / 6]
    assert summary.majority == "Paris" and summary.majority_share == 0.5
    # -(1/2 ln 1/2 + 1/3 ln 1/3 + 1/6 ln 1/6)
    assert summary.semantic_entropy == pytest.approx(1.0114042647073516, abs=1e-12)
    assert cluster_answers(["1,000", "1000.0", "1000"]).semantic_entropy == 0.0
    assert cluster_answers(list("abcd")).semantic_entropy == pytest.approx(math.log(4))
    assert semantic_entropy([1.0]) == 0.0
    # a tie: the cluster whose first answer comes first is the majority
    assert cluster_answers(["7", "8", "8.0", "seven", "7"]).majority == "7"


# --- stopping ---------------------------------------------------------------------------------------
def test_stop_rule_finds_a_stop_string_across_tokens_and_cuts_before_it():
    rule = StopRule(10, frozenset({1}), ("END", "##"))
    assert rule.check(5, 1, "abcE") is None
    assert rule.check(6, 2, "abcEND and more") == ("stop", "END", 3)  # straddles the two tokens
    assert StopRule(10, frozenset({1}), ("x",)).check(1, 1, "x") == ("stop", 1, -1)  # a stop token first
    assert StopRule(2, frozenset(), ()).check(7, 2, None) == ("length", None, -1)
    assert StopRule(2, frozenset(), ("b", "a")).check(7, 1, "xab") == ("stop", "a", 1)  # the earliest


def test_request_validation_names_the_bad_value():
    for kwargs, msg in [(dict(tokens=[]), "no tokens"), (dict(n_samples=0), "n_samples"),
                        (dict(sigma=float("nan")), "sigma"), (dict(temperature=-1.0), "temperature"),
                        (dict(top_p=0.0), "top_p"), (dict(max_tokens=0), "max_tokens"),
                        (dict(mode="beam"), "mode"), (dict(stop=("",)), "stop string")]:
        with pytest.raises(ValueError, match=msg):
            GenerationRequest(**{"tokens": [1, 2], **kwargs})


def test_request_streams():
    req = lambda **kw: GenerationRequest([1], n_samples=3, **kw)  # noqa: E731
    assert req(sigma=0.1).streams() == [[0, 1, 2]]
    assert req().streams() == [[-1]]  # sigma = 0: one row stands for the N samples
    assert req(sigma=0.1, mode="per_sample").streams() == [[0], [1], [2]]
    assert req(mode="per_sample").streams() == [[-1]]  # N identical greedy answers
    assert req(mode="per_sample", temperature=1.0).streams() == [[-1], [-1], [-1]]  # K samples of the MLE


# --- rows of a decode forward -----------------------------------------------------------------------
def _posterior(seed: int = 0) -> TFBPosterior:
    gen = torch.Generator().manual_seed(seed)
    mods = []
    for k in range(2):
        A, B = torch.randn(2, 3 + k, generator=gen), torch.randn(4, 2, generator=gen)
        mods.append(TFBLinear(f"m{k}", nn.Linear(3 + k, 4), A, B, torch.ones(2), 1.0, 1e-6, torch.float32))
    return TFBPosterior(mods)


def test_plan_rows_sample_major_views_when_uniform_else_gathered_copies():
    post = _posterior()
    draw, other = post.draw(1, 3), post.draw(2, 3)
    # two streams of samples 0..2 of one draw: sample-major, the draw's tensors as they are
    rows = [Row(s, 0, n, draw) for s in (0, 1) for n in range(3)]
    (plan,) = plan_rows(rows)
    assert plan.uniform and plan.group == 2
    assert [(rows[i].sample, rows[i].stream) for i in plan.rows] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    (seg,) = build_segments([plan], rows, [post], {0: 0.5})
    assert seg.group == 2 and all(z.data_ptr() == d.data_ptr() for z, d in zip(seg.z_rows, draw.z, strict=True))
    # a stream lost sample 2, another draw, a mean row, a second adapter: stream-major, gathered
    rows = [Row(0, 0, 0, draw), Row(0, 0, 1, draw), Row(1, 1, -1, None), Row(2, 0, 2, other), Row(3, 0, -1, None)]
    plans = plan_rows(rows)
    assert [(p.adapter, p.uniform, p.rows) for p in plans] == [(0, False, (0, 1, 3, 4)), (1, False, (2,))]
    segs = build_segments(plans, rows, [post, post], {0: 0.5})
    assert segs[1].z_rows is None and segs[1].sigma == 0.0  # adapter 1 at sigma = 0: the posterior mean
    for k, z in enumerate(segs[0].z_rows):
        expect = torch.stack([draw.z[k][0], draw.z[k][1], other.z[k][2], torch.zeros_like(draw.z[k][0])])
        assert torch.equal(z, expect)
