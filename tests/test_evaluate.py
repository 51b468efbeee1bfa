"""Evaluation on the tiny model: every metric, the bootstrap, OOD AUROC and the plot file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tfb_core.config import SearchConfig
from tfb_core.data.tasks import get_task
from tfb_core.decide.uncertainty import apply_temperature, fit_temperature, reliability_bins, summarize
from tfb_core.evaluation.classification import EvalOptions, evaluate
from tfb_core.evaluation.report import METHODS, METRICS, bootstrap_differences, format_table, ood_auroc

SENTENCES = ["a great film with a wonderful cast", "a dull and tedious mess of a movie",
             "the plot is thin but the acting is superb", "I would not watch it again", "a great film",
             "a dull movie", "the acting is superb", "tedious"]


def records(n: int, offset: int = 0) -> list[dict]:
    return [{"sentence": SENTENCES[(i + offset) % len(SENTENCES)], "label": (i + offset) % 2} for i in range(n)]


def test_bootstrap_is_paired_and_deterministic():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, 2, generator=gen), 1)
    y = torch.randint(0, 2, (50,), generator=gen)
    same = bootstrap_differences({"mle": p, "copy": p.clone()}, y, n_boot=50, seed=1)
    for m in METRICS:
        assert same["copy-mle"][m]["diff"] == 0.0 and same["copy-mle"][m]["lo"] == same["copy-mle"][m]["hi"] == 0.0
    a = bootstrap_differences({"mle": p, "t": p.pow(0.5) / p.pow(0.5).sum(1, keepdim=True)}, y, n_boot=50, seed=1)
    b = bootstrap_differences({"mle": p, "t": p.pow(0.5) / p.pow(0.5).sum(1, keepdim=True)}, y, n_boot=50, seed=1)
    assert a == b
    assert all(r["lo"] <= r["hi"] for r in a["t-mle"].values())


def test_ood_auroc():
    assert ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.8, 0.9])) == 1.0
    assert ood_auroc(torch.tensor([0.8, 0.9]), torch.tensor([0.1, 0.2])) == 0.0
    assert ood_auroc(torch.tensor([0.1, 0.5]), torch.tensor([0.3, 0.9])) == 0.75  # 3 of 4 pairs ordered


def test_reliability_bins_by_hand_and_their_ece_is_torchmetrics():
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.04, 0.96], [0.3, 0.7], [0.82, 0.18]])
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    bins = reliability_bins(p, y, n_bins=15)
    # confidences 0.9 (bin 13, right), 0.8 (12, wrong), 0.55 (8, wrong), 0.96 (14, right), 0.7 (10, right),
    # 0.82 (12, right)
    want = {13: (1, 0.9, 1.0), 12: (2, 0.81, 0.5), 8: (1, 0.55, 0.0), 14: (1, 0.96, 1.0), 10: (1, 0.7, 1.0)}
    for b in range(15):
        count, conf, acc = want.get(b, (0, math.nan, math.nan))
        assert bins["count"][b] == count
        if count:
            assert bins["confidence"][b] == pytest.approx(conf) and bins["accuracy"][b] == pytest.approx(acc)
        else:
            assert math.isnan(bins["confidence"][b]) and math.isnan(bins["accuracy"][b])
    from torchmetrics.functional.classification import multiclass_calibration_error

    ece = sum(c / len(y) * abs(a - f) for c, f, a in zip(bins["count"], bins["confidence"], bins["accuracy"],
                                                          strict=True) if c)
    oracle = float(multiclass_calibration_error(p, y, num_classes=2, n_bins=15, norm="l1"))
    assert ece == pytest.approx(oracle, abs=1e-6)


def test_summarize_splits_entropy_by_hand():
    # two confident samples that disagree: the mean is a coin flip, each sample is nearly certain
    eps = 1e-6
    two = torch.tensor([[[1 - eps, eps], [eps, 1 - eps]]], dtype=torch.float64)  # (B=1, N=2, C=2)
    u = summarize(two)
    assert float(u.predictive_entropy[0]) == pytest.approx(math.log(2), abs=1e-5)
    assert float(u.expected_entropy[0]) == pytest.approx(0.0, abs=1e-4)
    assert float(u.mutual_information[0]) == pytest.approx(math.log(2), abs=1e-4)
    # samples that agree: no epistemic part, all of it aleatoric
    same = torch.tensor([[[0.7, 0.2, 0.1]] * 3])
    u = summarize(same)
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert float(u.predictive_entropy[0]) == pytest.approx(h, abs=1e-6)
    assert float(u.expected_entropy[0]) == pytest.approx(h, abs=1e-6)
    assert float(u.mutual_information[0]) == pytest.approx(0.0, abs=1e-6)
    assert int(u.index[0]) == 0 and float(u.confidence[0]) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="B, N, C"):
        summarize(torch.ones(2, 3))


@pytest.mark.parametrize("n", [2, 3, 5, 7, 10])
def test_summarize_of_one_model_is_the_row_exactly(n):
    """N bitwise-identical rows (sigma = 0) are one model: probs are the row and MI is 0 exactly, by
    construction (a mean of N copies of an entropy is not always the entropy, e.g. 0.1 * 3 / 3, and
    which inputs round depends on the CPU's summation order); rows that differ are averaged."""
    row = torch.softmax(torch.randn(64, 3, generator=torch.Generator().manual_seed(n)), -1)  # (B, C)
    same = row[:, None].expand(64, n, 3).contiguous()  # (B, N, C)
    u = summarize(same)
    assert torch.equal(u.probs, row) and torch.equal(u.mutual_information, torch.zeros(64))
    assert torch.equal(u.predictive_entropy, u.expected_entropy)
    mixed = same.clone()
    mixed[0, -1] = torch.tensor([1.0, 0.0, 0.0])  # one input whose samples disagree
    u = summarize(mixed)
    assert float(u.mutual_information[0]) > 0 and torch.equal(u.probs[1:], row[1:])
    assert torch.allclose(u.probs[0].double(), mixed[0].double().mean(0), atol=1e-7)


def test_fit_temperature_recovers_a_known_temperature():
    """Labels drawn from softmax(logits / T): the fitted temperature on softmax(logits) is T."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 3, generator=gen, dtype=torch.float64) * 3
    true_t = 2.5
    y = torch.multinomial(torch.softmax(logits / true_t, 1), 1, generator=gen).squeeze(1)
    fitted = fit_temperature(torch.softmax(logits, 1), y)
    assert fitted == pytest.approx(true_t, rel=0.05)
    calibrated = apply_temperature(torch.softmax(logits, 1), fitted)
    torch.testing.assert_close(calibrated, torch.softmax(logits / fitted, 1))


def test_evaluate_tiny_model_all_metrics_and_plot(classifier, tmp_path):
    task = get_task("sst2")
    plot = tmp_path / "reliability.png"
    opts = EvalOptions(n_boot=20, plot=str(plot), max_rows=32)
    search = SearchConfig(criterion="nll", tolerance=0.3, iters=2, n_samples=3, max_expansions=1)
    ood = [{"question": "is the sky blue", "passage": "x", "answer": True},
           {"question": "does water boil at 100 degrees", "passage": "x", "answer": False}]
    out = evaluate(classifier, task, records(12), records(6, offset=3), search, opts, n_samples=3, seed=0, ood=ood)
    assert set(out["methods"]) == set(METHODS)
    for m in out["methods"].values():
        for k in (*METRICS, "mean_mi", "mean_confidence"):
            assert math.isfinite(m[k])
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["ece"] <= 1.0
    assert out["methods"]["mle"]["mean_mi"] == 0.0
    assert out["sigma"] >= 0.0 and out["search"]["criterion"] == "nll"
    assert set(out["differences"]) == {"tfb-mle", "temperature-mle", "tfb+temperature-mle"}
    assert {"auroc_mi_tfb", "auroc_entropy_tfb", "auroc_entropy_mle"} <= set(out["ood"])
    assert plot.is_file() and plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(out)  # JSON-able
    assert "tfb+temperature" in format_table(out)


def test_evaluate_fixed_sigma_is_deterministic(classifier):
    task = get_task("sst2")
    opts = EvalOptions(n_boot=0)
    a = evaluate(classifier, task, records(8), records(4), SearchConfig(), opts, sigma=0.05, n_samples=2, seed=3)
    b = evaluate(classifier, task, records(8), records(4), SearchConfig(), opts, sigma=0.05, n_samples=2, seed=3)
    assert a["methods"] == b["methods"] and a["search"] is None
    assert a["methods"]["tfb"]["mean_mi"] > 0.0


def test_eval_options_reject_bad_values():
    with pytest.raises(ValueError, match="n_boot"):
        EvalOptions(n_boot=-1)
    with pytest.raises(ValueError, match="limit"):
        EvalOptions(limit=0)


def test_tfb_eval_command_on_the_tiny_model(tiny, tmp_path, monkeypatch, capsys):
    """``tfb eval`` end to end: flags -> run_eval -> JSON on stdout, table on stderr, files written."""
    from tfb_core.cli import build_parser
    from tfb_core.evaluation import classification as ev

    monkeypatch.setattr(ev, "_load_split", lambda task, split, limit, cache: records(limit or 6))
    anchor = tmp_path / "anchor.jsonl"
    anchor.write_text("".join(json.dumps(r) + "\n" for r in records(4, offset=1)))
    args = build_parser().parse_args([
        "eval", "--model", tiny["model"], "--adapter", tiny["adapter"], "--task", "sst2", "--anchor", str(anchor),
        "--sigma", "0.05", "--samples", "2", "--limit", "6", "--ood-task", "boolq", "--bootstrap", "5",
        "--output", str(tmp_path / "out.json"), "--plot", str(tmp_path / "plot.png")])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sigma"] == 0.05 and out["n_test"] == 6 and "ood" in out
    assert json.loads((tmp_path / "out.json").read_text())["methods"] == out["methods"]
    assert (tmp_path / "plot.png").is_file()


def test_evaluate_acting_on_uncertainty_section(classifier, tmp_path):
    """The selective section: error AUROC is sklearn's on the same probabilities, AURC is the
    risk-coverage area, sets and thresholds are fitted on one seeded half and measured on the other."""
    from conftest import require

    metrics = require("sklearn.metrics", "scikit-learn is not installed (dev extra, via mapie)")
    from tfb_core.decide.selective import risk_coverage

    task = get_task("sst2")
    test = records(16)
    plot = tmp_path / "rel.png"
    out = evaluate(classifier, task, test, records(4), SearchConfig(), EvalOptions(n_boot=0, plot=str(plot)),
                   sigma=0.05, n_samples=3, seed=0)
    sel = out["selective"]
    assert sel["n_calibration"] == 8 and sel["n_measured"] == 8 and "seeded half" in sel["calibration"]
    assert set(sel["methods"]) == set(METHODS)
    assert set(sel["methods"]["tfb"]["aurc"]) == {"confidence", "entropy", "mutual_information"}
    assert set(sel["methods"]["mle"]["aurc"]) == {"confidence", "entropy"}
    # the MLE probabilities, independently: one sigma = 0 forward
    prompts = [task.format(r) for r in test]
    y = torch.tensor([r["label"] for r in test])
    p = classifier.sample_probs(prompts, 1, sigma=0.0).mean(1)  # (B, C)
    conf, wrong = p.max(1).values, p.argmax(1) != y
    m = sel["methods"]["mle"]
    assert 0 < int(wrong.sum()) < len(test)  # both classes: the AUROC is defined
    assert m["error_auroc"]["confidence"] == pytest.approx(metrics.roc_auc_score(wrong.numpy(), (-conf).numpy()),
                                                           abs=1e-5)
    assert m["aurc"]["confidence"] == pytest.approx(risk_coverage(conf, ~wrong)["aurc"], abs=1e-6)
    assert m["aurc_optimal"] <= m["aurc"]["confidence"] + 1e-12
    for alpha, r in m["conformal"].items():
        assert r["target"] == pytest.approx(1 - float(alpha)) and 1.0 <= r["mean_set_size"] <= 2.0
    assert m["conformal"]["0.05"]["supported"] is False  # 8 calibration records cannot support 1/(n+1) > 0.05
    assert set(sel["methods"]["tfb"]["abstention"]) == {"confidence", "entropy", "mutual_information"}
    rc = tmp_path / "rel_risk_coverage.png"
    assert out["plot_risk_coverage"] == str(rc) and rc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "acting on uncertainty" in format_table(out)
    json.dumps(out)


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_ood_aurocs_rank_ood_inputs_as_more_uncertain(classifier):
    """The OOD AUROCs of ``evaluate`` against scikit-learn on the MLE's entropies recomputed here (at
    sigma = 0 the model is deterministic), with OOD = positive and higher entropy = more OOD; and,
    with two classes, confidence orders inputs exactly as entropy does (reversed), so its AUROC
    (of minus the confidence) equals entropy's: a dropped sign on either gives 1 - AUROC."""
    from sklearn.metrics import roc_auc_score

    from tfb_core.evaluation.classification import ood_input

    task = get_task("sst2")
    opts = EvalOptions(n_boot=0, max_rows=32)
    search = SearchConfig(criterion="nll", tolerance=0.3, iters=2, n_samples=3, max_expansions=1)
    test = records(6, offset=3)
    ood = [{"question": q, "passage": "x", "answer": True} for q in
           ("is the sky blue", "does water boil at 100 degrees", "what is the capital of france")]
    out = evaluate(classifier, task, records(12), test, search, opts, n_samples=3, seed=0, ood=ood)["ood"]
    prompts = [task.format(r) for r in test] + [task.format(ood_input(task, r, "question")) for r in ood]
    h = summarize(classifier.sample_probs(prompts, 1, sigma=0.0)).predictive_entropy.double()  # (9,)
    expected = roc_auc_score([0] * len(test) + [1] * len(ood), h.numpy())
    assert 0.0 < expected < 1.0 and expected != 0.5  # the sign shows
    assert out["auroc_entropy_mle"] == pytest.approx(expected, abs=1e-6)  # a float32 ratio of pair counts
    assert out["auroc_confidence_mle"] == pytest.approx(expected, abs=1e-6)
    assert out["auroc_confidence_tfb"] == pytest.approx(out["auroc_entropy_tfb"], abs=1e-6)


def test_tfb_eval_test_file_generic_task_with_calibration_and_ood_files(tiny, tmp_path, capsys, monkeypatch):
    """``tfb eval --test-file`` on the generic task (prompt and label), sets fitted on --calibration,
    OOD AUROCs from --ood-file; without --calibration, a seeded half of the test file."""
    from tfb_core.cli import main

    labelled = [{"prompt": s, "label": ["negative", "positive"][i % 2]} for i, s in enumerate(SENTENCES)]
    test = _write(tmp_path / "test.jsonl", labelled + [""] + labelled[:4])  # a blank line is skipped
    cal = _write(tmp_path / "cal.jsonl", labelled[2:] + labelled[:2])
    ood = _write(tmp_path / "ood.jsonl", [{"prompt": "is the sky blue"}, {"prompt": "does water boil"}])
    base = ["eval", "--model", tiny["model"], "--adapter", tiny["adapter"], "--labels", "negative", "positive",
            "--anchor", cal, "--sigma", "0.05", "--samples", "2", "--bootstrap", "0", "--test-file", test]
    assert main(base + ["--calibration", cal, "--ood-file", ood]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "generic" and out["n_test"] == 12 and out["model"]["test"] == test
    sel = out["selective"]
    assert sel["calibration"] == f"calibration file {cal} (8 records)" and sel["n_measured"] == 12
    assert out["ood"]["n_ood"] == 2 and "auroc_confidence_tfb" in out["ood"]
    assert main(base + ["--split-seed", "1"]) == 0
    captured = capsys.readouterr()
    sel = json.loads(captured.out)["selective"]
    assert sel["n_calibration"] == 6 and sel["n_measured"] == 6 and "seed 1" in sel["calibration"]
    assert "fitted on a seeded half of the test records (seed 1)" in captured.err
    monkeypatch.setenv("TFB_CALIBRATION", cal)  # the server's setting works as --calibration
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["selective"]["calibration"] == f"calibration file {cal} (8 records)"


@pytest.mark.parametrize(("line", "message"), [
    ({"prompt": "a film"}, "no 'label'"),
    ({"prompt": "a film", "label": "meh"}, "unknown label 'meh'"),
    ({"label": "positive"}, "missing field 'prompt'"),
    ("not json", "not valid JSON"),
])
def test_tfb_eval_test_file_must_be_labelled(tiny, tmp_path, capsys, line, message):
    """A bad or unlabelled record: exit 2 with one line naming the file and line, before the model loads."""
    from tfb_core.cli import main

    test = _write(tmp_path / "test.jsonl", [{"prompt": "a great film", "label": "positive"}, "", line])
    rc = main(["eval", "--model", tiny["model"], "--adapter", tiny["adapter"], "--labels", "negative", "positive",
               "--anchor", test, "--sigma", "0.05", "--test-file", test])
    err = capsys.readouterr().err
    assert rc == 2 and f"{test}:3" in err and message in err, err


def test_tfb_eval_generic_task_needs_a_test_file(tiny, capsys):
    from tfb_core.cli import main

    rc = main(["eval", "--model", tiny["model"], "--adapter", tiny["adapter"], "--labels", "negative", "positive",
               "--sigma", "0.05"])
    assert rc == 2 and "--test-file" in capsys.readouterr().err
