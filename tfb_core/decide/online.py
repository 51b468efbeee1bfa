"""Online conformal prediction sets: long-run coverage under arbitrary shift, from labelled feedback.

Split conformal (:mod:`tfb_core.decide.conformal`) promises P(y in set) >= 1 - alpha for inputs
exchangeable with the calibration set, and nothing once the data drift. Quantile tracking
(Angelopoulos, Barber & Bates 2023, "Conformal PID control for time series prediction", the P
part; the score-scale form of Gibbs & Candès 2021's adaptive conformal inference) keeps a threshold
q on the nonconformity score and moves it after each labelled prediction:

    set_t = {y : s(x_t, y) <= q_t},    err_t = 1{s(x_t, y_t) > q_t},    q <- q + eta (err_t - alpha)

With scores in [0, B] (LAC and APS: B = 1) and q_1 in [0, B], the updates telescope:
sum_t (err_t - alpha) = (q_{T+1} - q_1) / eta, and q never leaves [-eta alpha, B + eta (1 - alpha)],
so for EVERY sequence of inputs and labels (no exchangeability, adversarial shift included)

    |(1/T) sum_{t<=T} err_t - alpha| <= (B + eta max(alpha, 1 - alpha)) / (eta T)

and over any window of W consecutive labels |mean err - alpha| <= (B + eta) / (eta W).

Delayed, out-of-order and partial feedback: err_t is computed against the threshold the
prediction was *served* with (stored with its id: the coverage is that of the sets users saw), and
its update is added to the *current* q. If at most D other labels were applied while a prediction
waited for its label, q stays in [-(D + 1) eta alpha, B + (D + 1) eta (1 - alpha)] and the bound
becomes (B + (D + 1) eta max(alpha, 1 - alpha)) / (eta T), T the labels received, in the order they
arrived; D is measured exactly (each tracker counts its updates) and reported. The guarantee is
about the labelled predictions: one never labelled is not counted, and if labels are withheld
depending on the outcome, nothing is promised for the unlabelled.

Why quantile tracking rather than ACI (alpha_{t+1} = alpha_t + gamma (alpha - err_t), bound
(max(alpha_1, 1 - alpha_1) + gamma) / (gamma T)): ACI reads the set from the calibration
quantile at level alpha_t, so its sets move in the calibration set's discrete steps (272 scores on
the demo) and are the full label set whenever alpha_t <= 0 or below 1/(n + 1); quantile tracking
moves the score threshold itself, needs the calibration set only for its start (q_1 = the split
conformal quantile, so before any label the online set is the split-conformal set), and has the
same deterministic bound. The strongly adaptive variants (SAOCP, Bhatnagar et al. 2023; FACI)
aggregate many such trackers for regret over every interval; the fixed-eta tracker already has the
window bound above, which is what a shifted stream needs, at a fraction of the state.

Mondrian: one tracker per true class (the set is {y : s(x, y) <= q_y}; a label of class y moves q_y
only), so the bound holds per class among the labelled inputs of that class.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: LAC (1 - p_y) and APS (a cumulative probability) scores lie in [0, 1]
SCORE_BOUND = 1.0


@dataclass
class Tracker:
    """One quantile tracker: its threshold, its start, and what it has been told."""

    q: float
    q0: float
    labelled: int = 0  # T: labels applied
    errors: int = 0  # of those, sets that missed the true label
    max_delay: int = 0  # D: most updates applied while one prediction waited for its label

    def realised_coverage(self) -> float | None:
        return None if self.labelled == 0 else 1.0 - self.errors / self.labelled


@dataclass
class Served:
    """What a prediction set was made with: the thresholds (one per class, or one shared) and each
    tracker's update count then; stored with the prediction for its label."""

    alpha: float
    thresholds: list[float]
    counts: list[int]
    state_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Served:
        return cls(float(d["alpha"]), [float(x) for x in d["thresholds"]], [int(x) for x in d["counts"]],
                   str(d["state_id"]))


def coverage_bound(alpha: float, eta: float, labelled: int, max_delay: int = 0, bound: float = SCORE_BOUND) -> float:
    """The deterministic bound on |realised miscoverage - alpha| after ``labelled`` labels (inf at 0)."""
    if labelled <= 0:
        return math.inf
    return (bound + (max_delay + 1) * eta * max(alpha, 1.0 - alpha)) / (eta * labelled)


@dataclass
class OnlineSets:
    """Quantile tracking at one alpha: one tracker, or one per class (Mondrian)."""

    alpha: float
    eta: float
    mondrian: bool
    trackers: list[Tracker] = field(default_factory=list)
    bound: float = SCORE_BOUND

    @classmethod
    def start(cls, alpha: float, eta: float, initial: Sequence[float], mondrian: bool,
              bound: float = SCORE_BOUND) -> OnlineSets:
        """Trackers starting at ``initial`` (one threshold per class; the split-conformal quantiles),
        clipped into [0, bound] (an unsupported inf starts at ``bound``: every label in the set)."""
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not eta > 0.0 or not math.isfinite(eta):
            raise ValueError(f"eta must be a finite number > 0, got {eta}")
        starts = [min(max(float(q), 0.0), bound) for q in (initial if mondrian else initial[:1])]
        return cls(alpha, eta, mondrian, [Tracker(q, q) for q in starts], bound)

    def tracker_of(self, true_class: int) -> int:
        return true_class if self.mondrian else 0

    def thresholds(self, n_classes: int) -> list[float]:
        """Per class, the threshold in force now."""
        return [t.q for t in self.trackers] if self.mondrian else [self.trackers[0].q] * n_classes

    def update(self, true_class: int, score: float, served: Served) -> bool:
        """Apply the label of a prediction served with ``served``: ``score`` is its true label's
        nonconformity. Returns whether its set held the true label."""
        k = self.tracker_of(true_class)
        tr = self.trackers[k]
        err = score > served.thresholds[true_class]  # the set the user saw: {y : s(x, y) <= q_served[y]}
        tr.max_delay = max(tr.max_delay, tr.labelled - served.counts[k])
        tr.q += self.eta * ((1.0 if err else 0.0) - self.alpha)
        tr.labelled += 1
        tr.errors += int(err)
        return not err

    def summary(self) -> dict[str, Any]:
        """Labels, realised coverage and the bound: pooled, and per tracker."""
        labelled = sum(t.labelled for t in self.trackers)
        errors = sum(t.errors for t in self.trackers)
        per = [{"threshold": t.q, "labelled": t.labelled,
                "realised_coverage": t.realised_coverage(), "max_delay": t.max_delay,
                "bound": _finite(coverage_bound(self.alpha, self.eta, t.labelled, t.max_delay, self.bound))}
               for t in self.trackers]
        return {"labelled": labelled, "realised_coverage": None if labelled == 0 else 1.0 - errors / labelled,
                "trackers": per}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnlineSets:
        trackers = [Tracker(float(t["q"]), float(t["q0"]), int(t["labelled"]), int(t["errors"]), int(t["max_delay"]))
                    for t in d["trackers"]]
        out = cls(float(d["alpha"]), float(d["eta"]), bool(d["mondrian"]), trackers, float(d["bound"]))
        for t in trackers:  # a state that breaks its own invariant is not restored
            if not (0 <= t.errors <= t.labelled and t.max_delay >= 0 and math.isfinite(t.q)):
                raise ValueError(f"implausible tracker {t}")
            lo = -(t.max_delay + 1) * out.eta * out.alpha - 1e-9
            hi = out.bound + (t.max_delay + 1) * out.eta * (1 - out.alpha) + 1e-9
            if not lo <= t.q <= hi:
                raise ValueError(f"threshold {t.q} outside [{lo:.4g}, {hi:.4g}]")
        return out


def effective_alpha(sorted_scores: Sequence[float], q: float) -> float:
    """The miscoverage the calibration set gives threshold ``q``: the share of its (true-label)
    scores above q (ACI's alpha_t, read off the score scale; NaN without scores)."""
    n = len(sorted_scores)
    return math.nan if n == 0 else 1.0 - bisect_right(list(sorted_scores), q) / n


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
