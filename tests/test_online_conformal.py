"""Online prediction sets (tfb_core.decide.online) against independent oracles: simulated streams
with a known shift, where split conformal provably under-covers; the quantile-tracking recursion
written out here; delayed, out-of-order and partial labels with the delay counted here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tfb_core.decide.conformal import finite_sample_quantile
from tfb_core.decide.online import OnlineSets, Served, coverage_bound, effective_alpha

ALPHA, ETA = 0.1, 0.05


def shifted_scores(rng: np.random.Generator, before: int, after: int) -> np.ndarray:
    """True-label scores: U(0, 0.5) before the shift, U(0.3, 1) after."""
    return np.concatenate([rng.uniform(0.0, 0.5, before), rng.uniform(0.3, 1.0, after)])


def oracle_bound(alpha: float, eta: float, t: int, delay: int = 0) -> float:
    """|mean err - alpha| <= (B + (D + 1) eta max(alpha, 1 - alpha)) / (eta T), B = 1 (written out here)."""
    return (1.0 + (delay + 1) * eta * max(alpha, 1 - alpha)) / (eta * t)


def serve(state: OnlineSets, n_classes: int = 1) -> Served:
    return Served(state.alpha, state.thresholds(n_classes), [t.labelled for t in state.trackers], "s")


def test_static_split_conformal_under_covers_and_online_keeps_its_bound() -> None:
    """Calibration from the pre-shift law: split conformal's q is about the 0.9 quantile of U(0, 0.5)
    (0.45), which covers (0.45 - 0.3) / 0.7 = 0.21 of the post-shift scores. Quantile tracking, from
    the same start, covers 1 - alpha over the whole stream and over the post-shift window within
    the deterministic bounds (errors counted here from the served thresholds)."""
    rng = np.random.default_rng(0)
    cal = tuple(sorted(rng.uniform(0.0, 0.5, 500)))
    q_static, ok = finite_sample_quantile(cal, ALPHA)
    assert ok
    before, after = 3000, 3000
    scores = shifted_scores(rng, before, after)
    static_cov = float(np.mean(scores[before:] <= q_static))
    assert static_cov == pytest.approx((q_static - 0.3) / 0.7, abs=0.03) and static_cov < 0.3
    state = OnlineSets.start(ALPHA, ETA, [q_static], mondrian=False)
    errs = []
    for s in scores:
        served = serve(state)
        errs.append(s > served.thresholds[0])
        state.update(0, float(s), served)
    errs = np.array(errs)
    t = len(errs)
    assert abs(errs.mean() - ALPHA) <= oracle_bound(ALPHA, ETA, t)
    # any window: the q range is 1 + eta wide
    assert abs(errs[before:].mean() - ALPHA) <= (1.0 + ETA) / (ETA * after)
    assert abs(1 - errs[before:].mean() - (1 - ALPHA)) < 0.02  # the figure the issue asks for
    assert state.trackers[0].errors == int(errs.sum()) and state.trackers[0].labelled == t
    assert state.summary()["trackers"][0]["bound"] == pytest.approx(oracle_bound(ALPHA, ETA, t))


def test_updates_are_the_quantile_tracking_recursion() -> None:
    """q_{t+1} = q_t + eta (1{s_t > q_t} - alpha), written out here, on an adversarial stream
    (each score just above, or just below, the current threshold)."""
    state = OnlineSets.start(0.2, 0.1, [0.4], mondrian=False)
    q = 0.4
    for t in range(200):
        s = q + (0.01 if t % 3 else -0.01)
        q = q + 0.1 * ((1.0 if s > q else 0.0) - 0.2)
        state.update(0, s, serve(state))
        assert state.trackers[0].q == pytest.approx(q, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_delayed_out_of_order_and_partial_labels_keep_the_delay_bound(seed: int) -> None:
    """Predictions are served in batches of up to 40 (each with the threshold in force), labels
    arrive in a random order, some never: the errors are those of the served sets, the delay D is
    counted here, and the long-run coverage of the labelled ones obeys the bound with D."""
    rng = np.random.default_rng(seed)
    state = OnlineSets.start(ALPHA, ETA, [0.45], mondrian=False)
    scores = shifted_scores(rng, 1500, 1500)
    errs, delay, applied = [], 0, 0
    i = 0
    while i < len(scores):
        k = int(rng.integers(1, 41))
        batch = [(float(s), serve(state), applied) for s in scores[i:i + k]]
        i += k
        for j in rng.permutation(len(batch)):
            if rng.random() < 0.3:  # never labelled
                continue
            s, served, applied_then = batch[j]
            delay = max(delay, applied - applied_then)
            errs.append(s > served.thresholds[0])
            state.update(0, s, served)
            applied += 1
    t = len(errs)
    # the misses are those of the sets served (not of the threshold when the label came), and the
    # threshold is its start plus eta (misses - alpha T)
    assert state.trackers[0].errors == sum(errs)
    assert state.trackers[0].q == pytest.approx(0.45 + ETA * (sum(errs) - ALPHA * t), abs=1e-9)
    assert state.trackers[0].max_delay == delay and delay > 0
    assert abs(np.mean(errs) - ALPHA) <= oracle_bound(ALPHA, ETA, t, delay)
    assert state.summary()["trackers"][0]["bound"] == pytest.approx(oracle_bound(ALPHA, ETA, t, delay))


def test_mondrian_trackers_move_only_with_their_own_class() -> None:
    """A label of class 0 moves q_0 and leaves q_1; per class the bound holds among its labels."""
    state = OnlineSets.start(ALPHA, ETA, [0.3, 0.6], mondrian=True)
    q1 = state.trackers[1].q
    for _ in range(10):  # each a miss: 0.3 + 10 * 0.045 < 0.9
        state.update(0, 0.9, serve(state, 2))
    assert state.trackers[1].q == q1 and state.trackers[1].labelled == 0
    assert state.trackers[0].q == pytest.approx(0.3 + 10 * ETA * (1 - ALPHA))
    rng = np.random.default_rng(3)
    errs: dict[int, list[bool]] = {0: [], 1: []}
    for _ in range(4000):
        y = int(rng.integers(2))
        s = float(rng.uniform(0.5, 1.0) if y else rng.uniform(0.0, 0.4))
        served = serve(state, 2)
        errs[y].append(s > served.thresholds[y])
        state.update(y, s, served)
    for y in (0, 1):
        assert abs(np.mean(errs[y]) - ALPHA) <= oracle_bound(ALPHA, ETA, len(errs[y]))


def test_start_clips_into_the_score_range_and_the_state_round_trips() -> None:
    state = OnlineSets.start(ALPHA, ETA, [math.inf, -0.2], mondrian=True)
    assert [t.q for t in state.trackers] == [1.0, 0.0]  # unsupported: every label; below 0: none
    for s in (0.9, 0.1, 0.5):
        state.update(0, s, serve(state, 2))
    again = OnlineSets.from_dict(state.to_dict())
    assert again == state
    broken = state.to_dict()
    broken["trackers"][0]["q"] = 5.0  # outside the range any run of updates can reach
    with pytest.raises(ValueError, match="outside"):
        OnlineSets.from_dict(broken)
    with pytest.raises(ValueError, match="eta"):
        OnlineSets.start(ALPHA, 0.0, [0.5], mondrian=False)


def test_bound_and_effective_alpha_by_hand() -> None:
    assert coverage_bound(0.1, 0.05, 0) == math.inf
    assert coverage_bound(0.1, 0.05, 1000) == pytest.approx((1 + 0.05 * 0.9) / 50)
    assert coverage_bound(0.1, 0.05, 1000, max_delay=3) == pytest.approx((1 + 4 * 0.05 * 0.9) / 50)
    scores = (0.1, 0.2, 0.3, 0.4)
    assert effective_alpha(scores, 0.25) == 0.5 and effective_alpha(scores, 0.4) == 0.0
