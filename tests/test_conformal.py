"""Conformal sets and Learn-then-Test abstention against independent oracles (MAPIE, scipy,
hand computation) and a coverage property on synthetic exchangeable data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import IN_CI

from tfb_core.decide.conformal import Calibration, binom_cdf, finite_sample_quantile, nonconformity

try:  # the oracles (dev extra); under CI a missing one fails
    import mapie.classification as mapie_classification
    import scipy.stats as stats
except ImportError as exc:
    if IN_CI:
        raise
    pytest.skip(f"oracle not installed (dev extra): {exc}", allow_module_level=True)


def synthetic(n: int, c: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchangeable (probs, labels): labels drawn from the (miscalibrated) probabilities' sharper version."""
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2.0
    probs = torch.softmax(logits, 1)
    labels = torch.multinomial(torch.softmax(logits * 1.5, 1), 1, generator=gen).squeeze(1)
    return probs, labels


class _Identity:
    """A prefit sklearn-style classifier whose features are its probabilities."""

    def __init__(self, c: int) -> None:
        self.classes_ = np.arange(c)
        self.n_features_in_ = c

    def fit(self, x, y):  # pragma: no cover - prefit
        return self

    def predict_proba(self, x):
        return np.asarray(x)

    def predict(self, x):
        return np.asarray(x).argmax(1)

    def __sklearn_is_fitted__(self) -> bool:
        return True


def test_finite_sample_quantile_by_hand() -> None:
    scores = tuple(float(x) for x in range(1, 10))  # n = 9
    assert finite_sample_quantile(scores, 0.1) == (9.0, True)  # ceil(10 * 0.9) = 9
    assert finite_sample_quantile(scores, 0.2) == (8.0, True)  # ceil(10 * 0.8) = 8
    assert finite_sample_quantile(scores, 0.35) == (7.0, True)  # ceil(6.5) = 7
    assert finite_sample_quantile(scores, 0.05) == (math.inf, False)  # alpha < 1/(n+1): unsupported
    with pytest.raises(ValueError, match="alpha"):
        finite_sample_quantile(scores, 1.0)


def test_lac_sets_match_mapie() -> None:
    gen = torch.Generator().manual_seed(1)
    cal_p, cal_y = synthetic(300, 4, gen)
    test_p, _ = synthetic(200, 4, gen)
    cal = Calibration.fit(cal_p, cal_y)
    for alpha in (0.05, 0.1, 0.2):
        mapie = mapie_classification.SplitConformalClassifier(_Identity(4), confidence_level=1 - alpha,
                                                              conformity_score="lac", prefit=True)
        mapie.conformalize(cal_p.numpy(), cal_y.numpy())
        _, sets = mapie.predict_set(test_p.numpy())  # (B, C, 1)
        ours = cal.prediction_sets(test_p, alpha, "lac")
        assert ours.supported
        expected = [np.flatnonzero(row).tolist() for row in sets[:, :, 0]]
        assert ours.sets == expected


def test_aps_sets_match_hand_computation() -> None:
    gen = torch.Generator().manual_seed(2)
    cal_p, cal_y = synthetic(150, 5, gen)
    test_p, _ = synthetic(50, 5, gen)
    alpha = 0.1

    def aps(p: list[float], y: int) -> float:  # sum of the probabilities ranked at or above y
        return sum(q for q in p if q >= p[y])

    cal_scores = sorted(aps(p, int(y)) for p, y in zip(cal_p.tolist(), cal_y, strict=True))
    q = cal_scores[math.ceil((150 + 1) * (1 - alpha)) - 1]
    expected = [[y for y in range(5) if aps(p, y) <= q] for p in test_p.tolist()]
    assert Calibration.fit(cal_p, cal_y).prediction_sets(test_p, alpha, "aps").sets == expected


def test_mondrian_uses_per_class_quantiles() -> None:
    gen = torch.Generator().manual_seed(3)
    cal_p, cal_y = synthetic(400, 3, gen)
    test_p, _ = synthetic(40, 3, gen)
    cal = Calibration.fit(cal_p, cal_y)
    s_cal, s_test = nonconformity(cal_p, "lac"), nonconformity(test_p, "lac")
    alpha = 0.1
    q = []
    for y in range(3):
        own = sorted(s_cal[cal_y == y, y].tolist())
        q.append(own[math.ceil((len(own) + 1) * (1 - alpha)) - 1])
    expected = [[y for y in range(3) if s_test[b, y] <= q[y]] for b in range(40)]
    assert cal.prediction_sets(test_p, alpha, "lac", mondrian=True).sets == expected


def test_unsupported_alpha_gives_full_sets_and_a_flag() -> None:
    gen = torch.Generator().manual_seed(4)
    cal_p, cal_y = synthetic(9, 3, gen)
    out = Calibration.fit(cal_p, cal_y).prediction_sets(cal_p, 0.05, "aps")
    assert not out.supported and all(s == [0, 1, 2] for s in out.sets)


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("mondrian", [False, True])
def test_coverage_over_random_splits(score: str, mondrian: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    probs, labels = synthetic(4000, 4, gen)
    alpha, covered, total, class_cov = 0.1, 0, 0, torch.zeros(4)
    class_n = torch.zeros(4)
    for _ in range(100):
        perm = torch.randperm(4000, generator=gen)
        cal_i, test_i = perm[:200], perm[200:400]
        cal = Calibration.fit(probs[cal_i], labels[cal_i])
        sets = cal.prediction_sets(probs[test_i], alpha, score, mondrian).sets
        for s, y in zip(sets, labels[test_i].tolist(), strict=True):
            covered += y in s
            total += 1
            class_cov[y] += y in s
            class_n[y] += 1
    # E[coverage] >= 1 - alpha exactly; 20 000 draws: 3 standard errors are ~0.006
    assert covered / total >= 1 - alpha - 0.01
    assert covered / total <= 1 - alpha + 1 / 201 + 0.01  # not trivially full sets
    if mondrian:
        assert (class_cov / class_n).min() >= 1 - alpha - 0.03


def test_binom_cdf_matches_scipy() -> None:
    for n, k, p in [(10, 0, 0.05), (100, 3, 0.05), (1000, 40, 0.05), (57, 57, 0.3), (500, 10, 0.01)]:
        assert binom_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-300)


def scipy_fallback(conf: torch.Tensor, wrong: torch.Tensor, grid: tuple[float, ...], max_risk: float,
                   delta: float, points=(0.999, 0.99, 0.95, 0.8)) -> float | None:
    """The lowest threshold the fallback procedure certifies, written from its definition with scipy:
    delta / 4 at the grid point nearest each of ``points``; a rejected null passes its level to the
    next grid point down; a null not rejected passes nothing."""
    own = {min(range(len(grid)), key=lambda j: abs(grid[j] - c)) for c in points}
    assert len(own) == len(points)
    lowest, carried = None, 0.0
    for j, lam in enumerate(grid):
        level = (delta / len(points) if j in own else 0.0) + carried
        ans = conf >= lam
        n_a, k = int(ans.sum()), int((wrong & ans).sum())
        if level > 0 and n_a > 0 and stats.binom.cdf(k, n_a, max_risk) <= level:
            lowest, carried = lam, level
        else:
            carried = 0.0
    return lowest


def test_ltt_threshold_matches_scipy_fallback() -> None:
    gen = torch.Generator().manual_seed(6)
    for n_classes, n in [(2, 2000), (2, 300), (4, 600)]:
        probs, labels = synthetic(n, n_classes, gen)
        cal = Calibration.fit(probs, labels)
        conf, pred = probs.max(1)
        wrong = pred != labels
        for max_risk, delta in [(0.05, 0.1), (0.1, 0.1), (0.02, 0.2), (0.2, 0.05)]:
            expected = scipy_fallback(conf, wrong, cal.grid, max_risk, delta)
            th = cal.threshold(max_risk, delta)
            assert th.supported == (expected is not None)
            if expected is not None:
                assert th.threshold == expected
                abstain, _ = cal.abstain(conf, max_risk, delta)
                assert abstain == (conf < expected).tolist()


def test_ltt_a_null_not_rejected_passes_nothing_on() -> None:
    """By hand: 20 inputs at confidence 0.97 (10 wrong), 600 right at 0.945, 300 at 0.835 (150 wrong),
    max_risk 0.1, delta 0.1. The fallback points 0.999, 0.99 and 0.95 (grid 0.94988) answer the 20
    (50 % wrong): not rejected, so their delta / 4 each is not passed on; the grid points between
    0.95 and 0.8 have no level of their own, though 10 errors in 620 would reject there; at 0.8
    (920 answered, 160 wrong: 17 %) delta / 4 does not reject. Nothing is certified. A procedure that
    passed a level on after a null it did not reject would certify 0.84."""
    conf = torch.tensor([0.97] * 20 + [0.945] * 600 + [0.835] * 300, dtype=torch.float64)
    wrong = torch.tensor([True] * 10 + [False] * 10 + [False] * 600 + [True] * 150 + [False] * 150)
    probs = torch.stack([conf, 1 - conf], 1)
    labels = wrong.long()  # class 0 predicted everywhere: wrong exactly where the label is 1
    cal = Calibration.fit(probs, labels)
    assert stats.binom.cdf(10, 620, 0.1) < 1e-10  # the level-less points would reject at any level
    th = cal.threshold(0.1, 0.1)
    assert not th.supported and th.threshold == math.inf
    # the same with 40 right inputs at 0.97: 0.999 and 0.99 answer none; at 0.95, 40 answered and 0
    # wrong: 0.9^40 = 0.0148 <= delta / 4 = 0.025, rejected, and the run goes on down at 0.025 to 0.84
    # (640 answered, 0 wrong); 0.83 answers the 300 too (150 of 940 wrong): not rejected
    conf2 = torch.cat([torch.full((40,), 0.97, dtype=torch.float64), conf[20:]])
    labels2 = torch.cat([torch.zeros(40, dtype=torch.long), labels[20:]])
    th2 = Calibration.fit(torch.stack([conf2, 1 - conf2], 1), labels2).threshold(0.1, 0.1)
    assert th2.supported and th2.threshold == pytest.approx(0.84)
    # and 1000 more at 0.805, 20 of them wrong: at 0.8 (1940 answered, 170 wrong) the p-value lies
    # between delta / 4 and delta / 2, so 0.8 is rejected only if the level of the run that ended at
    # 0.83 were still carried: it is not, and 0.84 stays the lowest certified threshold
    conf3 = torch.cat([conf2, torch.full((1000,), 0.805, dtype=torch.float64)])
    labels3 = torch.cat([labels2, torch.ones(20, dtype=torch.long), torch.zeros(980, dtype=torch.long)])
    assert 0.025 < stats.binom.cdf(170, 1940, 0.1) <= 0.05
    th3 = Calibration.fit(torch.stack([conf3, 1 - conf3], 1), labels3).threshold(0.1, 0.1)
    assert th3.supported and th3.threshold == pytest.approx(0.84)


def test_ltt_controls_selective_risk_over_splits() -> None:
    gen = torch.Generator().manual_seed(7)
    probs, labels = synthetic(20000, 2, gen)
    conf, pred = probs.max(1)
    wrong = pred != labels
    max_risk, delta, fails, splits = 0.1, 0.1, 0, 40
    for _ in range(splits):
        perm = torch.randperm(20000, generator=gen)
        cal_i, test_i = perm[:1000], perm[1000:]
        th = Calibration.fit(probs[cal_i], labels[cal_i]).threshold(max_risk, delta)
        assert th.supported
        ans = conf[test_i] >= th.threshold
        fails += float(wrong[test_i][ans].double().mean()) > max_risk
    assert fails <= delta * splits  # expected <= 4; the bound is loose so usually 0


def test_ltt_family_wise_error_is_at_most_delta_where_every_null_is_true() -> None:
    """Errors independent of confidence at rate 0.105: the selective risk is 0.105 > max_risk 0.1 at
    every threshold, so certifying any threshold is an error. Over 400 calibration draws of 1000 the
    share that certifies one must be <= delta (0.1) up to sampling noise: 3 standard errors of a
    proportion at 0.1 over 400 draws is 0.045. Spending delta at each fallback point instead of
    delta / 4, or passing a level on after a null that was not rejected, certifies far more often."""
    gen = torch.Generator().manual_seed(11)
    certified, draws = 0, 400
    for _ in range(draws):
        conf = 0.5 + 0.5 * torch.rand(1000, generator=gen, dtype=torch.float64)
        wrong = torch.rand(1000, generator=gen) < 0.105
        probs = torch.stack([conf, 1 - conf], 1)
        certified += Calibration.fit(probs, wrong.long()).threshold(0.1, 0.1).supported
    assert certified / draws <= 0.1 + 0.045


def test_unreachable_risk_abstains_on_everything() -> None:
    probs = torch.tensor([[0.6, 0.4]] * 50, dtype=torch.float64)
    labels = torch.tensor([0, 1] * 25)  # 50 % wrong at every confidence
    abstain, th = Calibration.fit(probs, labels).abstain(probs[:, 0], 0.05)
    assert not th.supported and th.threshold == math.inf and all(abstain)


def test_calibration_round_trips_through_json() -> None:
    gen = torch.Generator().manual_seed(8)
    probs, labels = synthetic(60, 3, gen)
    cal = Calibration.fit(probs, labels, source="anchor split")
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    with_mi = Calibration.fit(probs, labels, mutual_information=torch.full((60,), 0.25))
    assert Calibration.from_dict(json.loads(json.dumps(with_mi.to_dict()))) == with_mi
    old = cal.to_dict()
    del old["mean_predictive_entropy"], old["mean_mutual_information"]
    with pytest.raises(KeyError):  # a cache from before the drift reference: the engine recomputes it
        Calibration.from_dict(old)
    at = Calibration.fit(probs, labels, n_samples=10, seed=3)
    assert (at.n_samples, at.seed) == (10, 3) and Calibration.from_dict(json.loads(json.dumps(at.to_dict()))) == at
    unsaid = at.to_dict()
    del unsaid["n_samples"], unsaid["seed"]
    with pytest.raises(KeyError):  # a cache that does not say which N and seed it holds: recomputed
        Calibration.from_dict(unsaid)


def test_mondrian_is_unsupported_when_any_class_is() -> None:
    """30 calibration inputs of class 0 and 3 of class 1: at alpha 0.1 class 0's quantile is its
    ceil(31 * 0.9) = 28th smallest score, class 1 would need the ceil(4 * 0.9) = 4th of 3 (none): the
    sets are unsupported, class 1 is in every set, class 0 only within its quantile. At alpha 0.3
    both are supported (ceil(4 * 0.7) = 3 <= 3)."""
    gen = torch.Generator().manual_seed(5)
    p0 = torch.rand(33, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    probs = torch.stack([p0, 1 - p0], 1)  # (33, 2)
    labels = torch.tensor([0] * 30 + [1] * 3)
    cal = Calibration.fit(probs, labels)
    q0 = sorted((1 - p0[:30]).tolist())[27]  # LAC: 1 - p_y, from scratch
    qs, ok = cal.quantiles(0.1, "lac", mondrian=True)
    assert not ok and qs[0] == pytest.approx(q0) and qs[1] == math.inf
    test = torch.tensor([[0.99, 0.01], [0.5, 0.5], [0.05, 0.95]], dtype=torch.float64)
    out = cal.prediction_sets(test, 0.1, "lac", mondrian=True)
    assert not out.supported
    assert out.sets == [[c for c in (0, 1) if c == 1 or 1 - float(row[0]) <= q0] for row in test]
    assert cal.quantiles(0.3, "lac", mondrian=True)[1]
    assert cal.quantiles(0.1, "lac")[1]  # pooled, 33 inputs support alpha 0.1


def test_sets_calibrated_at_n_samples_under_cover_at_fewer() -> None:
    """Why a request at another N may not claim the calibration's guarantee (engine.check_conformal).

    Simulated model, no network: an input has a latent logit mu (C = 2); each posterior sample's
    probabilities are softmax(mu + 2 eps), eps standard normal; the true label is drawn from
    softmax(mu). LAC sets are calibrated on the means of N = 10 samples, the score function the
    server calibrates, and tested on fresh inputs scored at N = 10 and at N = 1, each of R = 400
    independent draws of (200 calibration, 500 test) inputs; the quantile is computed here from
    scratch (the ceil((n + 1)(1 - alpha))-th smallest calibration score).

    Bounds: at N = 10 the data are exchangeable with continuous scores, so a split's coverage has
    mean k/(n + 1) = 181/201 (k = ceil(201 * 0.9)) and variance <= Var Beta(181, 21) + 1/(4 * 500)
    < 1e-3. The mean of R = 400 splits (each in [0, 1]) then strays by t = 0.03 with probability
    <= exp(-R t^2 / (2 * 1e-3 + 2t / 3)) < 1e-7 (Bernstein), each side. At N = 1 the scores are
    noisier than the calibration's and coverage falls (about 0.75 here); the bound 1 - alpha - 0.03
    fails only if the mean strays up by > 0.1, with probability <= exp(-400 * 0.01 / (2/4 + 0.2 / 3))
    < 1e-3 even for the largest variance a [0, 1] variable has (1/4)."""
    gen = torch.Generator().manual_seed(20)
    reps, n_cal, n_test, n, alpha = 400, 200, 500, 10, 0.1
    mu = torch.randn(reps, n_cal + n_test, 1, 2, generator=gen, dtype=torch.float64) * 2.0
    probs = torch.softmax(mu + 2.0 * torch.randn(reps, n_cal + n_test, n, 2, generator=gen, dtype=torch.float64),
                          -1)  # (R, M, N, C) per-sample probabilities
    label = torch.multinomial(torch.softmax(mu[:, :, 0], -1).reshape(-1, 2), 1, generator=gen).reshape(reps, -1)
    true_score = 1.0 - probs.mean(2)[:, :n_cal].gather(2, label[:, :n_cal, None])[..., 0]  # (R, n_cal)
    k = math.ceil((n_cal + 1) * (1 - alpha))
    q = true_score.sort(1).values[:, k - 1]  # (R,)

    def coverage(test_probs: torch.Tensor) -> float:  # (R, n_test, C) -> mean over splits and inputs
        s = 1.0 - test_probs.gather(2, label[:, n_cal:, None])[..., 0]  # (R, n_test)
        return float((s <= q[:, None]).double().mean())

    at_n = coverage(probs[:, n_cal:].mean(2))
    at_one = coverage(probs[:, n_cal:, 0])
    assert k / (n_cal + 1) - 0.03 <= at_n <= k / (n_cal + 1) + 0.03
    assert at_one <= 1 - alpha - 0.03, (at_n, at_one)


def test_uncertainty_reference_by_hand() -> None:
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]], dtype=torch.float64)
    cal = Calibration.fit(probs, torch.tensor([0, 0, 1]), mutual_information=torch.tensor([0.3, 0.0, 0.03]))
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert cal.mean_predictive_entropy == pytest.approx((math.log(2) + 0.0 + h) / 3)
    assert cal.mean_mutual_information == pytest.approx(0.11)
    assert Calibration.fit(probs, torch.tensor([0, 0, 1])).mean_mutual_information is None
