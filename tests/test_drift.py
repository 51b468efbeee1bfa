"""Drift alarms (tfb_core.decide.drift) against independent oracles: p-values counted by brute force,
the Simple Jumper written as in the paper (capital, not log shares), Ville's bound on null streams
over many seeds, and a shifted stream that is detected."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tfb_core.decide.drift import BINS, ConformalPValues, DriftMonitor, SimpleJumper


def test_pvalues_are_the_smoothed_conformal_pvalues() -> None:
    """p = (#{bag > a} + theta (#{bag = a} + 1)) / (|bag| + 1) on binned scores, counted here with the
    same theta draws; the bag grows with each observation."""
    rng = np.random.default_rng(1)
    ref = rng.uniform(size=50).round(2)  # ties on purpose
    stream = rng.uniform(size=200).round(2)
    pv = ConformalPValues(ref, seed=7)
    thetas = np.random.default_rng(7)
    bag = [min(int(a * BINS), BINS - 1) for a in ref]
    for a in stream:
        b = min(int(a * BINS), BINS - 1)
        greater = sum(x > b for x in bag)
        equal = sum(x == b for x in bag)
        want = (greater + thetas.random() * (equal + 1)) / (len(bag) + 1)
        assert pv.pvalue(float(a)) == pytest.approx(want, abs=1e-12)
        bag.append(b)


def test_pvalues_are_uniform_on_exchangeable_data() -> None:
    rng = np.random.default_rng(2)
    pv = ConformalPValues(rng.beta(2, 5, 300), seed=0)
    p = [pv.pvalue(float(a)) for a in rng.beta(2, 5, 3000)]
    assert stats.kstest(p, "uniform").pvalue > 0.01


def test_simple_jumper_is_the_papers_algorithm() -> None:
    """Vovk et al. 2021, Algorithm 1, with capital C_eps, not log shares."""
    rng = np.random.default_rng(3)
    jump = 0.05
    c = {e: 1 / 3 for e in (-1, 0, 1)}
    total = 1.0
    m = SimpleJumper(jump)
    for p in rng.uniform(size=300) ** 2:
        for e in c:
            c[e] = (1 - jump) * c[e] + jump / 3 * total
        for e in c:
            c[e] *= 1 + e * (p - 0.5)
        total = sum(c.values())
        assert m.update(float(p)) == pytest.approx(math.log(total), abs=1e-9)


def test_null_streams_keep_the_false_alarm_rate_below_delta() -> None:
    """200 exchangeable streams (calibration 300, stream 1000, deterministic seeds): alarms at
    delta = 0.1 number at most the 1e-4 upper quantile of Binomial(200, 0.1) (Ville: P(alarm) <= delta)."""
    delta, runs = 0.1, 200
    alarms = 0
    for seed in range(runs):
        rng = np.random.default_rng(1000 + seed)
        m = DriftMonitor(tuple(rng.uniform(size=300)), delta=delta, seed=seed)
        for a in rng.uniform(size=1000):
            m.observe(float(a))
        alarms += m.alarm
    assert alarms <= stats.binom.ppf(1 - 1e-4, runs, delta)


@pytest.mark.parametrize("seed", range(10))
def test_a_shift_is_detected_and_the_alarm_stays(seed: int) -> None:
    """500 in-domain scores, then scores from Beta(2, 1) (stranger than the calibration's U(0, 1) on
    average): the alarm at delta 0.01 rises after the shift, within 400 observations, and stays."""
    rng = np.random.default_rng(seed)
    m = DriftMonitor(tuple(rng.uniform(size=300)), delta=0.01, seed=seed)
    for a in rng.uniform(size=500):
        m.observe(float(a))
    pre = m.alarm
    for a in rng.beta(2, 1, 400):
        m.observe(float(a))
    assert not pre and m.alarm and 500 < m.alarm_at <= 900
    assert m.max_log_value >= math.log(100)


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="delta"):
        DriftMonitor((0.1,), delta=1.0)
    with pytest.raises(ValueError, match="finite"):
        DriftMonitor((0.1,)).observe(math.nan)
