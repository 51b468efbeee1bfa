"""Selective prediction measured on labelled data: what ``tfb eval`` reports about acting on uncertainty.

* risk-coverage: answer the inputs most certain first; at each certainty threshold, coverage =
  the fraction answered and risk = the error rate among them. AURC = the mean risk over coverage
  levels, sum over thresholds of risk x (share of inputs added there): with distinct scores the
  mean of risk(k) over k = 1..n (Geifman et al. 2019). Lower is better; a perfect ranker's is
  :func:`aurc_optimal`.
* AUROC of an uncertainty score (higher = more uncertain) separating errors (or OOD inputs) from
  the rest.
* prediction sets and abstention, offline: fitted on calibration data with
  :class:`tfb_core.decide.conformal.Calibration` (the server's code), measured on held-out data.

Certainty scores, all in [1/C, 1] and higher = answer first: ``confidence`` (max p), and
``entropy`` and ``mutual_information`` put on the confidence scale by one fixed decreasing map,
:func:`confidence_equivalent` (the top probability of the distribution (c, (1-c)/(C-1), ...)
whose entropy is the given value; MI <= H <= log C). So all three use the server's
Learn-then-Test grid and differ only in how they order inputs: with two classes the entropy of
p maps back to max p exactly, and entropy gives confidence's threshold and coverage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tfb_core.decide.conformal import Calibration, Threshold, confidence_grid, grid_counts, ltt_threshold
from tfb_core.decide.uncertainty import entropy

ALPHAS = (0.05, 0.1, 0.2)
MAX_RISKS = (0.02, 0.05, 0.1)
CERTAINTIES = ("confidence", "entropy", "mutual_information")


def confidence_equivalent(h: torch.Tensor, n_classes: int, iters: int = 60) -> torch.Tensor:
    """The c in [1/C, 1] whose distribution (c, (1-c)/(C-1), ..., (1-c)/(C-1)) has entropy ``h``
    (nats, (B,)): a fixed decreasing map from [0, log C] onto [1/C, 1] (bisection, float64)."""
    k = n_classes - 1
    target = h.double().clamp(0.0, math.log(n_classes))
    lo = torch.full_like(target, 1.0 / n_classes)
    hi = torch.ones_like(target)
    for _ in range(iters):
        mid = (lo + hi) / 2
        rest = (1.0 - mid) / k
        h_mid = -(torch.special.xlogy(mid, mid) + k * torch.special.xlogy(rest, rest))
        above = h_mid > target  # entropy falls as c grows: the root is above mid
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def certainties(probs: torch.Tensor, mutual_information: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Certainty scores (B,) in [1/C, 1] of mean probabilities (B, C), and of MI (B,) where given."""
    c = probs.shape[1]
    out = {"confidence": probs.double().max(1).values,
           "entropy": confidence_equivalent(entropy(probs.double()), c)}
    if mutual_information is not None:
        out["mutual_information"] = confidence_equivalent(mutual_information.double(), c)
    return out


def auroc(uncertainty: torch.Tensor, positive: torch.Tensor) -> float | None:
    """AUROC of ``uncertainty`` (B,) for ``positive`` (B,) bool (errors, OOD inputs); None if one class is absent."""
    from torchmetrics.functional.classification import binary_auroc

    pos = positive.bool()
    if bool(pos.all()) or not bool(pos.any()):
        return None
    return float(binary_auroc(uncertainty.double(), pos.long()))


def risk_coverage(certainty: torch.Tensor, correct: torch.Tensor) -> dict[str, Any]:
    """The risk-coverage curve of answering by decreasing ``certainty`` (B,), one point per distinct
    value (ties are answered together), and its area: ``{"coverage", "risk", "threshold", "aurc"}``."""
    n = certainty.shape[0]
    if n == 0 or correct.shape[0] != n:
        raise ValueError(f"need as many correctness flags as scores (> 0), got {n} and {correct.shape[0]}")
    values, inverse = torch.unique(certainty.double(), sorted=True, return_inverse=True)  # ascending
    g = values.shape[0]
    size = torch.bincount(inverse, minlength=g).flip(0).double()  # (G,) per threshold, high to low
    wrong = torch.bincount(inverse, (~correct.bool()).double(), minlength=g).flip(0)  # (G,)
    answered, errors = size.cumsum(0), wrong.cumsum(0)
    risk = errors / answered
    return {"coverage": (answered / n).tolist(), "risk": risk.tolist(), "threshold": values.flip(0).tolist(),
            "aurc": float((risk * size).sum() / n)}


def aurc_optimal(correct: torch.Tensor) -> float:
    """AURC of a ranker that answers every correct input before any wrong one (the floor at this accuracy)."""
    return risk_coverage(correct.double(), correct)["aurc"]


def certified_threshold(certainty: torch.Tensor, wrong: torch.Tensor, max_risk: float, delta: float,
                        grid: tuple[float, ...]) -> Threshold:
    """Learn-then-Test threshold on calibration ``certainty`` (n,) with errors ``wrong`` (n,):
    answer when certainty >= it, selective error <= max_risk with probability >= 1 - delta."""
    answered, errors = grid_counts(certainty, wrong, grid)
    return ltt_threshold(grid, answered, errors, int(certainty.shape[0]), max_risk, delta)


def conformal_report(cal_probs: torch.Tensor, cal_target: torch.Tensor, probs: torch.Tensor, target: torch.Tensor,
                     alphas: Sequence[float] = ALPHAS, score: str = "lac", mondrian: bool = False) -> dict[str, Any]:
    """Per alpha: realised coverage and mean set size on (probs, target) of the sets fitted on the calibration data."""
    cal = Calibration.fit(cal_probs.double(), cal_target)
    out: dict[str, Any] = {}
    for alpha in alphas:
        res = cal.prediction_sets(probs.double(), alpha, score, mondrian)
        hits = [int(y) in s for s, y in zip(res.sets, target.tolist(), strict=True)]
        out[str(alpha)] = {"target": 1.0 - alpha, "coverage": sum(hits) / len(hits),
                           "mean_set_size": sum(len(s) for s in res.sets) / len(res.sets),
                           "supported": res.supported}
    return out


def abstention_report(cal: Mapping[str, torch.Tensor], cal_wrong: torch.Tensor, test: Mapping[str, torch.Tensor],
                      test_wrong: torch.Tensor, n_classes: int, max_risks: Sequence[float] = MAX_RISKS,
                      delta: float = 0.1) -> dict[str, Any]:
    """Per certainty score and max_risk: the Learn-then-Test threshold fitted on ``cal`` scores and
    what it does on ``test``: the fraction answered (coverage) and the error among those."""
    out: dict[str, Any] = {}
    grid = confidence_grid(n_classes)
    for name, cert in cal.items():
        rows: dict[str, Any] = {}
        for r in max_risks:
            th = certified_threshold(cert, cal_wrong, r, delta, grid)
            answer = test[name].double() >= th.threshold
            k = int(answer.sum())
            rows[str(r)] = {"certified": th.supported, "threshold": th.threshold if th.supported else None,
                            "coverage": k / answer.shape[0],
                            "selective_risk": float(test_wrong.bool()[answer].double().mean()) if k else None}
        out[name] = rows
    return out


def plot_risk_coverage(curves: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Any, title: str = "") -> Any:
    """Risk-coverage curves: one panel per method, one line per certainty score (AURC in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.4), sharey=True, squeeze=False)
    styles = {"confidence": ("#4C72B0", "-"), "entropy": ("#55A868", "--"), "mutual_information": ("#C44E52", ":")}
    for ax, name in zip(axes[0], names, strict=True):
        for score, curve in curves[name].items():
            color, ls = styles.get(score, ("black", "-"))
            ax.step(curve["coverage"], curve["risk"], where="post", color=color, ls=ls,
                    label=f"{score} (AURC {curve['aurc']:.4f})")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("coverage (fraction answered)")
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("risk (error among answered)")
    return save_figure(fig, path, title)


def save_figure(fig: Any, path: Any, title: str = "") -> Any:
    """Title, lay out, write (folders made) and close a matplotlib figure: every plot of ``tfb eval``."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
