"""Acting on uncertainty: split-conformal prediction sets and abstention at a target risk.

Both are post-processing of mean probabilities (B, C) with a :class:`Calibration` computed once
from a labelled calibration set that the sigma search did not see:

* prediction sets (split conformal): with nonconformity score s(x, y) and the n calibration
  scores sorted, q = the ceil((n + 1)(1 - alpha))-th smallest; the set {y : s(x, y) <= q} holds
  the true label with probability >= 1 - alpha for data exchangeable with the calibration set.
  If ceil((n + 1)(1 - alpha)) > n (alpha < 1/(n + 1)) the data cannot support alpha: q = inf,
  the full label set, flagged. Scores:

  - LAC: s = 1 - p_y.
  - APS, *not* randomized: s = the sum of the probabilities ranked at or above y (ties by class
    index). Deterministic (the same input gets the same set), slightly conservative.

  Mondrian (class-conditional): q_y from the calibration inputs of class y only, so coverage
  holds per true class.

* abstention (Learn-then-Test, Angelopoulos et al. 2021): answer when confidence >= lambda. On a
  fixed grid of lambdas (high to low, chosen before seeing data), the null "selective error at
  lambda > max_risk" has the exact binomial p-value P(Binom(n_lambda, max_risk) <= k_lambda)
  (n_lambda answered, k_lambda wrong among them: given n_lambda, k_lambda is binomial). The nulls
  are tested from the highest lambda down by the fallback procedure (Wiens 2003; a graphical
  weighted-Bonferroni procedure, Bretz et al. 2009, so valid under any dependence between the
  p-values): delta is split equally over the ``LTT_FALLBACK`` confidences (fixed in advance, where
  a classifier's answer threshold usually lies; the top of the grid answers almost nothing, and
  delta spent there is wasted), and a null rejected at its level passes that level on to the next
  lambda, so a run of rejections from one of those points goes on down the grid at its level;
  a null not rejected stops the run (the points below it keep their own share). The family-wise
  error is <= delta. The lowest certified lambda is used: with probability >= 1 - delta over the
  calibration draw, the error among answered inputs is <= max_risk. None certified: abstain on
  everything, flagged. (Earlier versions started fixed-sequence runs at 8 evenly spaced grid
  points with delta / 8 each, which answered less at the same guarantee: benchmarks/RESULTS.md.)

* uncertainty reference: the calibration set's mean predictive entropy and mean mutual
  information, the label-free baseline that served traffic's uncertainty is compared with
  (drift monitoring: a rise means inputs less like the calibration data).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch

from tfb_core.decide.uncertainty import entropy

SCORES = ("lac", "aps")
#: confidences that share delta equally in Learn-then-Test's fallback procedure (the grid points nearest them)
LTT_FALLBACK = (0.999, 0.99, 0.95, 0.8)


def confidence_grid(n_classes: int) -> tuple[float, ...]:
    """Fixed confidence thresholds, high to low: fine near 1 (where LLM confidences crowd), then
    linear down to 1/C. Fixed before seeing data, as Learn-then-Test requires."""
    near_one = [1.0 - 10.0 ** (-e / 10) for e in range(60, 9, -1)]  # 1 - 1e-6 .. 0.9
    linear = [1.0 - k / 100 for k in range(10, 101)]  # 0.9 .. 0.0
    lo = 1.0 / n_classes
    return tuple(sorted({round(x, 12) for x in near_one + linear if x >= lo - 1e-12}, reverse=True))


def nonconformity(probs: torch.Tensor, score: str) -> torch.Tensor:
    """s(x, y) for every input and label: (B, C) probabilities -> (B, C) scores (float64)."""
    p = probs.double()
    if score == "lac":
        return 1.0 - p
    if score == "aps":
        order = torch.sort(-p, dim=1, stable=True).indices  # (B, C) labels by rank
        cum = torch.cumsum(p.gather(1, order), dim=1)  # (B, C) by rank
        return torch.empty_like(p).scatter_(1, order, cum)
    raise ValueError(f"unknown conformal score {score!r}, expected one of {SCORES}")


def finite_sample_quantile(sorted_scores: tuple[float, ...], alpha: float) -> tuple[float, bool]:
    """(the ceil((n + 1)(1 - alpha))-th smallest score, supported); (inf, False) if that rank > n."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = len(sorted_scores)
    # the small slack keeps (n + 1)(1 - alpha) that is an integer in exact arithmetic from rounding up
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    if k > n:
        return math.inf, False
    return sorted_scores[max(k, 1) - 1], True


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binom(n, p) <= k), summed in log space (exact up to float rounding)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    lg = math.lgamma
    terms = [lg(n + 1) - lg(i + 1) - lg(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)]
    m = max(terms)
    return min(1.0, math.exp(m) * math.fsum(math.exp(t - m) for t in terms))


@dataclass(frozen=True)
class SetResult:
    sets: list[list[int]]  # per input, the class indices in its prediction set
    supported: bool  # False: alpha < 1/(n+1) (for some class, Mondrian); those sets hold every label


@dataclass(frozen=True)
class Threshold:
    threshold: float  # answer when confidence >= threshold (inf: abstain on everything)
    supported: bool  # False: no grid threshold was certified at this max_risk and delta
    answered_fraction: float  # of the calibration set, at this threshold


@dataclass(frozen=True)
class Calibration:
    """Everything per-request sets and thresholds need, computed once (JSON-able for the cache)."""

    n: int
    n_classes: int
    source: str
    scores: dict[str, tuple[float, ...]]  # score -> sorted calibration scores (true labels)
    class_scores: dict[str, tuple[tuple[float, ...], ...]]  # score -> per class, sorted
    grid: tuple[float, ...]  # LTT thresholds, high to low
    answered: tuple[int, ...]  # per threshold, calibration inputs with confidence >= it
    errors: tuple[int, ...]  # per threshold, wrong predictions among those
    mean_predictive_entropy: float  # nats, of the mean probabilities
    mean_mutual_information: float | None = None  # nats; None: fitted without per-sample probabilities
    #: the posterior samples N and noise seed the probabilities were computed at: part of the score
    #: function, so the guarantees hold for requests at these only (None: not recorded, fitted
    #: outside an engine)
    n_samples: int | None = None
    seed: int | None = None
    #: sorted 1 - confidence of the calibration inputs (the predicted label's LAC score): the
    #: reference of the label-free drift test (:mod:`tfb_core.decide.drift`)
    predicted_scores: tuple[float, ...] = ()

    @classmethod
    def fit(cls, probs: torch.Tensor, target: torch.Tensor, source: str = "",
            mutual_information: torch.Tensor | None = None, *, n_samples: int | None = None,
            seed: int | None = None) -> Calibration:
        """From mean probabilities (n, C), true classes (n,) and, for the drift reference, the
        mutual information (n,) of the calibration set; ``n_samples`` and ``seed``: those the
        probabilities were computed at."""
        if probs.dim() != 2 or probs.shape[0] != target.shape[0] or probs.shape[0] == 0:
            raise ValueError(f"need (n, C) probabilities and n targets, n > 0; got {tuple(probs.shape)} "
                             f"and {tuple(target.shape)}")
        n, c = probs.shape
        t = target.long()
        scores, class_scores = {}, {}
        for s in SCORES:
            true = nonconformity(probs, s).gather(1, t.unsqueeze(1)).squeeze(1)  # (n,)
            scores[s] = tuple(sorted(true.tolist()))
            class_scores[s] = tuple(tuple(sorted(true[t == y].tolist())) for y in range(c))
        conf, pred = probs.double().max(1)  # (n,), (n,)
        grid = confidence_grid(c)
        answered, errors = grid_counts(conf, pred != t, grid)
        mi = float(mutual_information.double().mean()) if mutual_information is not None else None
        return cls(n, c, source, scores, class_scores, grid, answered, errors,
                   float(entropy(probs.double()).mean()), mi, n_samples, seed, tuple(sorted((1.0 - conf).tolist())))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(n=int(d["n"]), n_classes=int(d["n_classes"]), source=str(d["source"]),
                   scores={k: tuple(v) for k, v in d["scores"].items()},
                   class_scores={k: tuple(tuple(x) for x in v) for k, v in d["class_scores"].items()},
                   grid=tuple(d["grid"]), answered=tuple(d["answered"]), errors=tuple(d["errors"]),
                   # required: a cache written before the drift reference existed is recomputed
                   mean_predictive_entropy=float(d["mean_predictive_entropy"]),
                   mean_mutual_information=(None if d["mean_mutual_information"] is None
                                            else float(d["mean_mutual_information"])),
                   # required too: a cache that does not say which N and seed it was computed at is recomputed
                   n_samples=None if d["n_samples"] is None else int(d["n_samples"]),
                   seed=None if d["seed"] is None else int(d["seed"]),
                   # required too: a cache without the drift test's reference is recomputed
                   predicted_scores=tuple(float(x) for x in d["predicted_scores"]))

    # --- prediction sets ----------------------------------------------------------------------
    def quantiles(self, alpha: float, score: str, mondrian: bool = False) -> tuple[list[float], bool]:
        """Per class, the score threshold q_y (one shared q unless ``mondrian``); and whether every
        q is supported by the calibration data."""
        if score not in SCORES:
            raise ValueError(f"unknown conformal score {score!r}, expected one of {SCORES}")
        if not mondrian:
            q, ok = finite_sample_quantile(self.scores[score], alpha)
            return [q] * self.n_classes, ok
        qs = [finite_sample_quantile(s, alpha) for s in self.class_scores[score]]
        return [q for q, _ in qs], all(ok for _, ok in qs)

    def unsupported_classes(self, alpha: float, score: str, mondrian: bool = False) -> list[int]:
        """The classes whose q is inf at ``alpha`` (too few calibration inputs: alpha < 1/(n+1), per
        class with ``mondrian``): each of them is in every prediction set."""
        q, _ = self.quantiles(alpha, score, mondrian)
        return [y for y, qy in enumerate(q) if math.isinf(qy)]

    def prediction_sets(self, probs: torch.Tensor, alpha: float, score: str = "lac",
                        mondrian: bool = False) -> SetResult:
        """Split-conformal sets of mean probabilities (B, C) at level 1 - alpha."""
        if probs.shape[-1] != self.n_classes:
            raise ValueError(f"calibrated for {self.n_classes} classes, got probabilities over {probs.shape[-1]}")
        q, ok = self.quantiles(alpha, score, mondrian)
        return SetResult(sets_at(probs, q, score), ok)

    # --- abstention ---------------------------------------------------------------------------
    def threshold(self, max_risk: float, delta: float = 0.1) -> Threshold:
        """The Learn-then-Test confidence threshold for selective error <= max_risk w.p. >= 1 - delta."""
        if not 0.0 < max_risk < 1.0:
            raise ValueError(f"max_risk must be in (0, 1), got {max_risk}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        return ltt_threshold(self.grid, self.answered, self.errors, self.n, max_risk, delta)

    def abstain(self, confidence: torch.Tensor, max_risk: float, delta: float = 0.1) -> tuple[list[bool], Threshold]:
        """Per input (confidences (B,)), whether to abstain; and the threshold used."""
        th = self.threshold(max_risk, delta)
        return [not float(c) >= th.threshold for c in confidence], th


def sets_at(probs: torch.Tensor, thresholds: list[float], score: str) -> list[list[int]]:
    """Per input of mean probabilities (B, C), the classes y with s(x, y) <= thresholds[y]."""
    inside = nonconformity(probs, score) <= torch.tensor(thresholds, dtype=torch.float64)  # (B, C)
    return [torch.nonzero(row).flatten().tolist() for row in inside]


def grid_counts(certainty: torch.Tensor, wrong: torch.Tensor, grid: tuple[float, ...]
                ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per threshold of ``grid``: the inputs answered (certainty (n,) >= it) and the wrong ones
    (``wrong`` (n,)) among them: what Learn-then-Test tests (:func:`ltt_threshold`)."""
    c, w = certainty.double(), wrong.bool()
    answered = tuple(int((c >= g).sum()) for g in grid)
    errors = tuple(int((w & (c >= g)).sum()) for g in grid)
    return answered, errors


@lru_cache(maxsize=256)
def ltt_threshold(grid: tuple[float, ...], answered: tuple[int, ...], errors: tuple[int, ...], n: int,
                  max_risk: float, delta: float) -> Threshold:
    """The lowest threshold of ``grid`` (high to low) that Learn-then-Test certifies for selective
    error <= max_risk w.p. >= 1 - delta, from the :func:`grid_counts` of n calibration inputs: the
    fallback procedure with delta split over ``LTT_FALLBACK``."""
    level = fallback_levels(grid, delta)
    best: int | None = None  # lowest certified threshold = highest grid index
    carried = 0.0  # the level of the null just rejected, passed on to the next
    for j in range(len(grid)):
        alpha_j = level[j] + carried
        if alpha_j > 0.0 and binom_cdf(errors[j], answered[j], max_risk) <= alpha_j:
            best, carried = j, alpha_j
        else:
            carried = 0.0
    if best is None:
        return Threshold(math.inf, False, 0.0)
    return Threshold(grid[best], True, answered[best] / n)


def fallback_levels(grid: tuple[float, ...], delta: float) -> list[float]:
    """Each grid point's own share of delta: delta / len(LTT_FALLBACK) at the point nearest each
    ``LTT_FALLBACK`` confidence (points above the grid's lowest), 0 elsewhere."""
    points = [c for c in LTT_FALLBACK if c >= grid[-1]] or [grid[-1]]
    level = [0.0] * len(grid)
    for c in points:
        level[min(range(len(grid)), key=lambda j: abs(grid[j] - c))] += delta / len(points)
    return level
