"""Predictive uncertainty of Monte Carlo samples, and calibration metrics.

With p_n the class probabilities of sample n and p = mean_n p_n::

    predictive entropy   H[p]
    expected entropy     mean_n H[p_n]            (aleatoric)
    mutual information   H[p] - mean_n H[p_n]     (epistemic, >= 0, 0 when all samples agree)

Metrics follow the reference: accuracy, ECE with 15 equal-width bins on the top-label confidence
(L1), NLL = mean -log p[y], Brier = mean sum_c (p_c - 1[y=c])^2. Fractions. The bins are
:func:`confidence_bin`'s, the one binning of the ECE, the reliability diagram (``tfb eval``) and the
server's calibration metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchmetrics.functional.classification import multiclass_accuracy

ECE_BINS = 15
_EPS = 1e-12


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last dimension: (..., C) -> (...)."""
    return -torch.special.xlogy(p, p).sum(-1)


@dataclass
class Uncertainty:
    """Per-input summary of N Monte Carlo samples; every field has a leading batch dimension B."""

    probs: torch.Tensor  # (B, C) mean over samples
    index: torch.Tensor  # (B,) argmax of probs
    confidence: torch.Tensor  # (B,) max of probs
    predictive_entropy: torch.Tensor  # (B,)
    expected_entropy: torch.Tensor  # (B,)
    mutual_information: torch.Tensor  # (B,)


def summarize(sample_probs: torch.Tensor) -> Uncertainty:
    """(B, N, C) per-sample probabilities -> :class:`Uncertainty`."""
    if sample_probs.dim() != 3:
        raise ValueError(f"expected (B, N, C) probabilities, got shape {tuple(sample_probs.shape)}")
    p = sample_probs.double()
    # An input whose N rows are bitwise one row (sigma = 0: the samples are one model) is summarised
    # by that row itself: a mean over N copies is not always bit-identical to the copy (its rounding
    # depends on the CPU's summation order), and MI must be exactly 0 there, probs exactly the row.
    one = (p == p[:, :1]).all(-1).all(-1, keepdim=True)  # (B, 1)
    mean = torch.where(one, p[:, 0], p.mean(1))  # (B, C)
    h_mean = entropy(mean)  # (B,)
    h_each = torch.where(one.squeeze(1), h_mean, entropy(p).mean(1))  # (B,)
    conf, index = mean.max(-1)
    return Uncertainty(
        probs=mean.float(),
        index=index,
        confidence=conf.float(),
        predictive_entropy=h_mean.float(),
        expected_entropy=h_each.float(),
        # Jensen makes this >= 0; clamp only float rounding.
        mutual_information=(h_mean - h_each).clamp_min(0.0).float(),
    )


def nll(probs: torch.Tensor, target: torch.Tensor) -> float:
    """Mean -log p[y]: probs (B, C), target (B,)."""
    p = probs.double().gather(1, target.long().unsqueeze(1)).squeeze(1)
    return float(-torch.log(p.clamp_min(_EPS)).mean())


def brier(probs: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over inputs of sum_c (p_c - 1[y=c])^2."""
    onehot = torch.nn.functional.one_hot(target.long(), probs.shape[1]).double()
    return float(((probs.double() - onehot) ** 2).sum(1).mean())


def confidence_bin(confidence: float | torch.Tensor, n_bins: int = ECE_BINS) -> torch.Tensor:
    """The calibration bin of each top-label confidence: floor(confidence * n_bins), 1.0 in the last
    (equal-width bins [k/n, (k+1)/n), the last closed), as a long tensor of ``confidence``'s shape."""
    c = torch.as_tensor(confidence, dtype=torch.float64)
    return torch.floor(c * n_bins).clamp_(0, n_bins - 1).long()


def _bin_sums(probs: torch.Tensor, target: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, ...]:
    """Per confidence bin: (inputs, sum of top-label confidences, correct predictions), float64 (n_bins,)."""
    conf, pred = probs.double().max(1)  # (B,), (B,)
    which = confidence_bin(conf, n_bins)  # (B,)
    count = torch.bincount(which, minlength=n_bins).double()
    return count, torch.bincount(which, conf, minlength=n_bins), torch.bincount(
        which, (pred == target).double(), minlength=n_bins)


def reliability_bins(probs: torch.Tensor, target: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per confidence bin (:func:`confidence_bin`): mean confidence, accuracy and count (empty bins: NaN)."""
    count, conf, correct = _bin_sums(probs, target, n_bins)
    return {"edges": torch.linspace(0, 1, n_bins + 1).tolist(), "confidence": (conf / count).tolist(),
            "accuracy": (correct / count).tolist(), "count": count.tolist()}


def ece(probs: torch.Tensor, target: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (L1): sum over the confidence bins of the share of inputs in the bin
    times |accuracy - mean confidence| there."""
    count, conf, correct = _bin_sums(probs, target, n_bins)
    return float((correct - conf).abs().sum() / count.sum())


def accuracy(probs: torch.Tensor, target: torch.Tensor) -> float:
    return float(multiclass_accuracy(probs.float(), target.long(), num_classes=probs.shape[1], average="micro"))


def classification_metrics(probs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Accuracy, ECE, NLL and Brier of mean probabilities (B, C) against true classes (B,)."""
    if probs.shape[0] != target.shape[0] or probs.shape[0] == 0:
        raise ValueError(f"need as many targets as predictions (> 0), got {probs.shape[0]} and {target.shape[0]}")
    return {"accuracy": accuracy(probs, target), "ece": ece(probs, target), "nll": nll(probs, target),
            "brier": brier(probs, target)}


def fit_temperature(probs: torch.Tensor, target: torch.Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the NLL of softmax(log p / T) on a labelled set (one scalar).

    Golden-section search on log T: the NLL is unimodal in T for fixed logits.
    """
    logp = torch.log(probs.double().clamp_min(_EPS))

    def loss(log_t: float) -> float:
        return nll(torch.softmax(logp / math.exp(log_t), dim=1), target)

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def apply_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T): temperature scaling of (mean) probabilities (B, C)."""
    return torch.softmax(torch.log(probs.double().clamp_min(_EPS)) / temperature, dim=1).to(probs.dtype)
