"""Deciding during and after generation: the averaged next-token distribution, its uncertainty, the
token it picks, sequence scores, and the clusters of N sampled answers.

Bayesian model averaging over N posterior samples, at every decode step, with p_n the next-token
distribution of sample n (nats)::

    p̄ = mean_n p_n                  the distribution decoded from (greedy: argmax p̄)
    predictive entropy   H[p̄]
    expected entropy     mean_n H[p_n]          (aleatoric)
    mutual information   H[p̄] - mean_n H[p_n]   (epistemic, >= 0, exactly 0 for one sample)

Per answer: NLL = -sum_t log p̄(y_t), mean and max token MI, mean token entropy.

Answers of the N samples (per-sample decoding) are clustered by a short-answer normalisation, the
usual stand-in for an entailment model on short answers (:func:`~tfb_core.decide.answers.normalize_answer`,
the one exact match uses: SQuAD's, with numbers compared as numbers); discrete semantic entropy is
-sum_c p(c) log p(c), p(c) the share of answers in cluster c (Farquhar et al., Nature 2024).
Functions over tensors and strings only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tfb_core.decide.answers import normalize_answer


# --- one decode step ------------------------------------------------------------------------------
@dataclass
class StepUncertainty:
    """The S streams of one decode step, each mixing its own rows."""

    probs: torch.Tensor  # (S, V) p̄, float32
    predictive_entropy: torch.Tensor  # (S,) float64
    expected_entropy: torch.Tensor  # (S,) float64
    mutual_information: torch.Tensor  # (S,) float64, >= 0
    single: torch.Tensor  # (S,) bool: the stream has one row (its p̄ is that row, its MI exactly 0)


def mix_rows(logits: torch.Tensor, row_stream: torch.Tensor, n_streams: int) -> StepUncertainty:
    """Average the next-token distributions of each stream's rows.

    logits (R, V); ``row_stream`` (R,) the stream of each row, every stream in [0, n_streams) with
    at least one row. A stream of one row (sigma = 0: the posterior mean) is that row exactly: its
    p̄ is the row's softmax bit for bit, its expected entropy its predictive entropy, its MI 0.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (R, V)
    p = logp.exp()  # (R, V)
    counts = torch.bincount(row_stream, minlength=n_streams)  # (S,)
    if counts.numel() != n_streams or bool((counts == 0).any()):
        raise ValueError(f"every stream needs rows: counts {counts.tolist()} for {n_streams} streams")
    single = counts == 1  # (S,)
    # 0 + p is p and p / 1 is p: a one-row stream's mean is its row exactly
    pbar = torch.zeros((n_streams, p.shape[1]), dtype=p.dtype, device=p.device).index_add_(0, row_stream, p)
    pbar = pbar / counts[:, None].to(p.dtype)  # (S, V)
    h_rows = -torch.special.xlogy(p, p).sum(-1, dtype=torch.float64)  # (R,)
    h_bar = -torch.special.xlogy(pbar, pbar).sum(-1, dtype=torch.float64)  # (S,)
    h_each = torch.zeros(n_streams, dtype=torch.float64, device=p.device).index_add_(0, row_stream, h_rows)
    h_each = torch.where(single, h_bar, h_each / counts.to(torch.float64))  # (S,)
    # Jensen makes this >= 0; the clamp only removes float rounding
    mi = torch.where(single, torch.zeros_like(h_bar), (h_bar - h_each).clamp_min(0.0))
    return StepUncertainty(pbar, h_bar, h_each, mi, single)


def nucleus(probs: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution a token is drawn from: p ** (1 / T), renormalised, cut to the smallest set
    of most probable tokens whose mass reaches ``top_p`` (at least one token), renormalised.

    probs (V,) -> (token ids (K,), their probabilities (K,) float64, summing to 1), most probable first.
    """
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logq = torch.log(probs.double()) / temperature  # (V,)
    q = torch.softmax(logq, dim=-1)
    q, ids = torch.sort(q, descending=True)
    before = torch.cumsum(q, 0) - q  # mass of the more probable tokens
    keep = int((before < top_p).sum().clamp_min(1))
    q = q[:keep]
    return ids[:keep], q / q.sum()


def choose_token(probs: torch.Tensor, temperature: float, top_p: float, u: float | None = None) -> int:
    """The next token from p̄ (V,): argmax at temperature 0; otherwise the token whose cumulative
    interval of :func:`nucleus` holds ``u`` (a uniform draw in [0, 1) from the caller's generator)."""
    if temperature == 0.0:
        return int(probs.argmax())
    if u is None or not 0.0 <= u < 1.0:
        raise ValueError(f"sampling needs a uniform draw u in [0, 1), got {u}")
    ids, q = nucleus(probs, temperature, top_p)
    k = int(torch.searchsorted(torch.cumsum(q, 0), torch.tensor(u, dtype=q.dtype, device=q.device), right=True))
    return int(ids[min(k, ids.numel() - 1)])


# --- one answer -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SequenceScores:
    """Uncertainty of one generated answer, from its tokens' (nats; 0 tokens: all 0)."""

    nll: float  # -sum_t log p̄(y_t)
    mean_nll: float  # nll / tokens
    mean_mutual_information: float
    max_mutual_information: float
    mean_predictive_entropy: float
    n_tokens: int


def sequence_scores(logprobs: Sequence[float], mutual_information: Sequence[float],
                    predictive_entropy: Sequence[float]) -> SequenceScores:
    """Scores of an answer from its tokens' log p̄(y_t), MI and H[p̄] (equal lengths)."""
    n = len(logprobs)
    if len(mutual_information) != n or len(predictive_entropy) != n:
        raise ValueError(f"one value per token: {n} logprobs, {len(mutual_information)} MIs, "
                         f"{len(predictive_entropy)} entropies")
    if n == 0:
        return SequenceScores(0.0, 0.0, 0.0, 0.0, 0.0, 0)
    nll = -math.fsum(logprobs)
    return SequenceScores(nll=nll, mean_nll=nll / n, mean_mutual_information=math.fsum(mutual_information) / n,
                          max_mutual_information=max(mutual_information),
                          mean_predictive_entropy=math.fsum(predictive_entropy) / n, n_tokens=n)


# --- N answers ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnswerCluster:
    """Answers with one normalised form: their indices among the N answers and their share."""

    key: str
    members: tuple[int, ...]
    share: float


@dataclass(frozen=True)
class AnswerSummary:
    """The N answers of the posterior samples, clustered."""

    clusters: tuple[AnswerCluster, ...]  # largest first; ties: the earlier first answer first
    majority: str  # the first answer of the largest cluster, as generated
    majority_share: float
    semantic_entropy: float  # nats: -sum_c p(c) log p(c); 0 when all agree, log N when all differ


def semantic_entropy(shares: Sequence[float]) -> float:
    """-sum_c p(c) log p(c) over cluster shares (summing to 1)."""
    return -math.fsum(p * math.log(p) for p in shares if p > 0.0)


def cluster_answers(answers: Sequence[str]) -> AnswerSummary:
    """Cluster answers by :func:`normalize_answer`: clusters, majority answer, semantic entropy."""
    if not answers:
        raise ValueError("no answers to cluster")
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(answers):
        groups.setdefault(normalize_answer(a), []).append(i)
    n = len(answers)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
    clusters = tuple(AnswerCluster(key, tuple(members), len(members) / n) for key, members in ordered)
    top = clusters[0]
    return AnswerSummary(clusters, answers[top.members[0]], top.share, semantic_entropy([c.share for c in clusters]))
