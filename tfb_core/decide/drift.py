"""Drift alarms with a false-alarm bound: a conformal test martingale (Vovk) on served scores.

Each observation's nonconformity a_t (label-free: 1 - confidence, the predicted label's LAC score;
with a label: 1 - p[true label]) gets the smoothed conformal p-value against the calibration set's
scores and every observation before it (the bag):

    p_t = (#{bag > a_t} + theta_t (#{bag = a_t} + 1)) / (|bag| + 1),   theta_t ~ U(0, 1)

then a_t joins the bag. If the calibration inputs and the stream are exchangeable, p_1, p_2, ...
are independent and uniform on [0, 1] (Vovk, Gammerman & Shafer 2005, Theorem 8.1 / the smoothed
conformal p-values), so any product of betting functions f with integral 1 over [0, 1] is a test
martingale, and Ville's inequality bounds the chance that it EVER reaches 1/delta by delta, over
an unbounded stream. The alarm is that crossing; it stays raised until the monitor is reset (a
recalibration: a new calibration set, a new test).

The martingale is the Simple Jumper (Vovk, Nouretdinov, Manokhin & Gammerman 2021, "Retrain or not
retrain: conformal test martingales for change-point detection", Algorithm 1): betting functions
f_eps(p) = 1 + eps (p - 1/2), eps in {-1, 0, 1}, capital moved between them at rate J per step, so
that a long quiet stretch does not bury it (a plain product or a mixture power martingale shrinks
for as long as there is no drift and then needs as long to recover): eps = -1 bets on small p (the
inputs stranger than the calibration set's), eps = +1 on large p (inputs more familiar: also a
change).

Scores are binned on [0, 1] (``BINS`` equal bins: a function of the score, so still a
nonconformity measure; ties are what the smoothing is for): the bag is a Fenwick tree of counts,
constant memory and O(log BINS) per observation, over an unbounded stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

BINS = 1 << 16
JUMP = 0.01
_EPS = (-1.0, 0.0, 1.0)


class ConformalPValues:
    """Smoothed conformal p-values of a stream against a growing bag of scores in [0, 1]."""

    def __init__(self, reference: Iterable[float], seed: int = 0, bins: int = BINS) -> None:
        self.bins = bins
        self._tree = [0] * (bins + 1)  # Fenwick tree of counts per bin
        self.size = 0
        self._rng = np.random.default_rng(seed)
        for a in reference:
            self._add(self.bin(a))

    def bin(self, a: float) -> int:
        if not math.isfinite(a):
            raise ValueError(f"a nonconformity score must be finite, got {a}")
        return min(max(int(a * self.bins), 0), self.bins - 1)

    def _add(self, b: int) -> None:
        i = b + 1
        while i <= self.bins:
            self._tree[i] += 1
            i += i & -i
        self.size += 1

    def _at_most(self, b: int) -> int:
        """Scores in bins 0..b."""
        i, total = b + 1, 0
        while i > 0:
            total += self._tree[i]
            i -= i & -i
        return total

    def pvalue(self, a: float) -> float:
        """p-value of ``a`` (then added to the bag)."""
        b = self.bin(a)
        upto = self._at_most(b)
        greater = self.size - upto
        equal = upto - (self._at_most(b - 1) if b > 0 else 0)
        p = (greater + float(self._rng.random()) * (equal + 1)) / (self.size + 1)
        self._add(b)
        return p


@dataclass
class SimpleJumper:
    """Vovk et al.'s Simple Jumper test martingale, in log space (the capital's share per eps)."""

    jump: float = JUMP
    log_value: float = 0.0  # log S_t; S_0 = 1
    weights: list[float] = field(default_factory=lambda: [1 / 3, 1 / 3, 1 / 3])

    def update(self, p: float) -> float:
        """Bet on ``p``: the new log S."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"a p-value must be in [0, 1], got {p}")
        w = [(1.0 - self.jump) * x + self.jump / 3 for x in self.weights]
        bets = [x * (1.0 + e * (p - 0.5)) for x, e in zip(w, _EPS, strict=True)]
        gain = math.fsum(bets)
        self.weights = [b / gain for b in bets]
        self.log_value += math.log(gain)
        return self.log_value


@dataclass
class DriftMonitor:
    """A conformal test martingale on one stream of scores, alarmed at 1/delta (Ville: false
    alarm probability <= delta on exchangeable data, however long it runs)."""

    reference: tuple[float, ...]
    delta: float = 0.01
    jump: float = JUMP
    seed: int = 0
    observations: int = 0
    alarm_at: int | None = None  # the observation at which the martingale first reached 1/delta
    max_log_value: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not 0.0 <= self.jump <= 1.0:
            raise ValueError(f"jump must be in [0, 1], got {self.jump}")
        self._p = ConformalPValues(self.reference, self.seed)
        self._m = SimpleJumper(self.jump)

    @property
    def log_value(self) -> float:
        return self._m.log_value

    @property
    def alarm(self) -> bool:
        return self.alarm_at is not None

    def observe(self, score: float) -> bool:
        """One observation's score; returns whether the alarm is (now or already) raised."""
        log_s = self._m.update(self._p.pvalue(score))
        self.observations += 1
        self.max_log_value = max(self.max_log_value, log_s)
        if self.alarm_at is None and log_s >= math.log(1.0 / self.delta):
            self.alarm_at = self.observations
        return self.alarm
