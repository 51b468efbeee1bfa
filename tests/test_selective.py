"""Risk-coverage, AURC, error AUROC, and offline conformal/abstention reports: by hand and against
scikit-learn's roc_auc_score (an independent oracle; dev extra, through mapie)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require

from tfb_core.decide.conformal import Calibration, confidence_grid
from tfb_core.decide.selective import (
    abstention_report,
    aurc_optimal,
    auroc,
    certainties,
    certified_threshold,
    confidence_equivalent,
    conformal_report,
    plot_risk_coverage,
    risk_coverage,
)

metrics = require("sklearn.metrics", "scikit-learn is not installed (dev extra, via mapie)")


def test_risk_coverage_and_aurc_by_hand():
    cert = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, False, True, True])
    rc = risk_coverage(cert, correct)
    assert rc["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert rc["risk"] == pytest.approx([0.0, 1 / 2, 1 / 3, 1 / 4])
    assert rc["threshold"] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert rc["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 4) / 4)  # 13/48
    assert aurc_optimal(correct) == pytest.approx((0 + 0 + 0 + 1 / 4) / 4)  # the wrong one answered last
    # order does not matter, only the scores
    perm = torch.tensor([2, 0, 3, 1])
    assert risk_coverage(cert[perm], correct[perm])["aurc"] == pytest.approx(13 / 48)


def test_risk_coverage_answers_ties_together():
    rc = risk_coverage(torch.tensor([0.9, 0.9, 0.5]), torch.tensor([True, True, False]))
    assert rc["coverage"] == pytest.approx([2 / 3, 1.0]) and rc["risk"] == pytest.approx([0.0, 1 / 3])
    assert rc["aurc"] == pytest.approx((0 * 2 + 1 / 3) / 3)
    # all tied: one point, the overall error, whatever the order
    rc = risk_coverage(torch.full((4,), 0.7), torch.tensor([True, False, True, False]))
    assert rc["coverage"] == [1.0] and rc["risk"] == [0.5] and rc["aurc"] == 0.5
    with pytest.raises(ValueError, match="as many"):
        risk_coverage(torch.tensor([0.5]), torch.tensor([True, False]))


def test_error_auroc_is_sklearns_with_ties():
    gen = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (200,), generator=gen).double() / 4  # many ties
    wrong = torch.rand(200, generator=gen) < 0.3 + 0.4 * score  # errors where the score is high
    want = metrics.roc_auc_score(wrong.numpy(), score.numpy())
    assert auroc(score, wrong) == pytest.approx(want, abs=1e-6)  # torchmetrics answers in float32
    assert auroc(score, torch.zeros(200, dtype=torch.bool)) is None  # no errors: undefined
    assert auroc(score, torch.ones(200, dtype=torch.bool)) is None


def _h(c: float, k: int) -> float:
    """Entropy of (c, (1-c)/k, ..., (1-c)/k), k + 1 classes."""
    rest = (1 - c) / k
    return -(c * math.log(c) if c else 0.0) - (k * rest * math.log(rest) if rest else 0.0)


def test_certainties_put_entropy_and_mi_on_the_confidence_scale():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.0, 1.0]], dtype=torch.float64)
    mi = torch.tensor([0.3, 0.01, 0.0], dtype=torch.float64)
    c = certainties(p, mi)
    assert c["confidence"].tolist() == pytest.approx([0.5, 0.9, 1.0])
    # two classes: the entropy of p maps back to max p
    assert c["entropy"].tolist() == pytest.approx([0.5, 0.9, 1.0], abs=1e-12)
    # MI: the binary confidence whose entropy it is (decreasing: more MI, less certain)
    for value, got in zip([0.3, 0.01, 0.0], c["mutual_information"].tolist(), strict=True):
        assert 0.5 <= got <= 1.0 and _h(got, 1) == pytest.approx(value, abs=1e-12)
    assert c["mutual_information"][0] < c["mutual_information"][1] < c["mutual_information"][2]
    assert "mutual_information" not in certainties(p)
    # three classes: a max-entropy completion maps to its own top probability; the ends are 1/C and 1
    q = torch.tensor([[0.7, 0.15, 0.15], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]], dtype=torch.float64)
    # (near 1/C the entropy is flat in c: there c is found to about sqrt(machine epsilon))
    assert certainties(q)["entropy"].tolist() == pytest.approx([0.7, 1 / 3, 1.0], abs=1e-7)
    assert confidence_equivalent(torch.tensor([_h(0.42, 3)], dtype=torch.float64), 4).item() == pytest.approx(0.42, abs=1e-12)


def test_conformal_report_by_hand():
    p0 = torch.tensor([0.1 * k for k in range(1, 10)], dtype=torch.float64)  # LAC scores 0.9 .. 0.1, n = 9
    cal = torch.stack([p0, 1 - p0], 1)
    test = torch.tensor([[0.5, 0.5], [0.15, 0.85], [0.9, 0.1]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    rep = conformal_report(cal, torch.zeros(9, dtype=torch.long), test, y, alphas=(0.2, 0.05))
    # alpha 0.2: q = the ceil(10 * 0.8) = 8th smallest score = 0.8, the set is {y: p_y >= 0.2}:
    # {0, 1} (covers 0), {1} (misses 0), {0} (misses 1)
    assert rep["0.2"]["coverage"] == pytest.approx(1 / 3) and rep["0.2"]["mean_set_size"] == pytest.approx(4 / 3)
    assert rep["0.2"]["supported"] and rep["0.2"]["target"] == pytest.approx(0.8)
    # alpha 0.05 < 1/(n+1): every label, flagged
    assert rep["0.05"] == {"target": 0.95, "coverage": 1.0, "mean_set_size": 2.0, "supported": False}


def _two_groups(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n confident right answers (0.95) and n unsure ones (0.605), half of those wrong."""
    conf = torch.tensor([0.95] * n + [0.605] * n, dtype=torch.float64)
    wrong = torch.tensor([False] * n + [i % 2 == 0 for i in range(n)])
    return torch.stack([conf, 1 - conf], 1), wrong


def test_abstention_report_by_hand_and_confidence_is_the_servers_rule():
    probs, wrong = _two_groups(50)
    cal_scores = certainties(probs)
    rep = abstention_report(cal_scores, wrong, cal_scores, wrong, n_classes=2, max_risks=(0.1,), delta=0.1)
    # every threshold in (0.605, 0.95] answers the 50 right ones: 0.9^50 = 0.005 <= 0.1 / 8 certifies
    # them; at 0.6 the 25 errors in 100 do not; the lowest certified grid point is 0.61
    conf = rep["confidence"]["0.1"]
    assert conf["certified"] and conf["threshold"] == pytest.approx(0.61)
    assert conf["coverage"] == 0.5 and conf["selective_risk"] == 0.0
    # binary: entropy is confidence on the same grid, so the same threshold and inputs
    assert rep["entropy"] == rep["confidence"]
    # the confidence threshold is Calibration.threshold's (what the server uses per request)
    y = torch.where(wrong, 1, 0)
    th = Calibration.fit(probs, y).threshold(0.1, 0.1)
    assert certified_threshold(cal_scores["confidence"], wrong, 0.1, 0.1, confidence_grid(2)) == th
    # too strict for 100 inputs: nothing certified, nothing answered
    strict = abstention_report(cal_scores, wrong, cal_scores, wrong, n_classes=2, max_risks=(0.02,))
    assert strict["confidence"]["0.02"] == {"certified": False, "threshold": None, "coverage": 0.0,
                                            "selective_risk": None}


def test_abstention_report_measures_the_test_data_not_the_calibrations():
    """Fitted on one set, measured on another with its own errors: coverage and selective risk are
    counted by hand on the test data at the reported threshold (measuring the calibration data, 0.5
    and 0.0 here, or flipped error flags, 0.75, would differ)."""
    probs, wrong = _two_groups(50)
    test_conf = torch.tensor([0.97, 0.96, 0.7, 0.62, 0.6, 0.55], dtype=torch.float64)
    test_wrong = torch.tensor([False, True, False, False, True, False])
    test = certainties(torch.stack([test_conf, 1 - test_conf], 1))
    rep = abstention_report(certainties(probs), wrong, test, test_wrong, n_classes=2, max_risks=(0.1,))
    row = rep["confidence"]["0.1"]
    th = row["threshold"]
    # certified between the two calibration groups: the 50 right answers, none of the unsure ones
    assert row["certified"] and 0.605 < th <= 0.95
    answered = [i for i, c in enumerate(test_conf.tolist()) if c >= th]
    assert answered == [0, 1, 2, 3]  # 0.6 and 0.55 abstain
    assert row["coverage"] == pytest.approx(4 / 6)
    assert row["selective_risk"] == pytest.approx(1 / 4)  # 0.96 is the one wrong answer among them


def test_plot_risk_coverage_writes_a_png(tmp_path):
    probs, wrong = _two_groups(5)
    curves = {"mle": {s: risk_coverage(c, ~wrong) for s, c in certainties(probs).items()}}
    path = plot_risk_coverage(curves, tmp_path / "rc.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
