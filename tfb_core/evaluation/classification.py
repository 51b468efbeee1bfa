"""Evaluation: what TFB does to calibration, against the MLE adapter and temperature scaling.

On the same test examples, with the same adapter::

    mle              sigma = 0 (the adapter as trained)
    tfb              sigma from the anchor search, N samples, mean of per-sample softmax
    temperature      mle probabilities, one temperature fitted (NLL) on the labelled anchor set
    tfb+temperature  tfb mean probabilities, one temperature fitted on the same anchor set

Per method: accuracy, ECE (15 bins), NLL, Brier (fractions, not x100) and mean mutual information;
paired bootstrap intervals for the differences to ``mle``; with an OOD set, the AUROC of
confidence, predictive entropy and mutual information separating in- (label 0) from
out-of-distribution (label 1) inputs. Acting on uncertainty (:mod:`tfb_core.decide.selective`): coverage
and mean set size of split-conformal sets at each alpha, the risk-coverage curve and its area,
the share answered at each max_risk under Learn-then-Test (by confidence, entropy and mutual
information) and the AUROC of each score for detecting errors; the sets and thresholds are fitted
on a calibration file or, without one, on a seeded half of the test records and measured on the
other half. ``tfb eval`` (:mod:`tfb_core.cli`) runs :func:`run_eval` on a data set's split or on
the user's labelled JSON Lines (``--test-file``). This module runs the model and reads the data;
the bootstrap, the AUROCs, the plot and the table are :mod:`tfb_core.evaluation.report`'s.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tfb_core.config import SearchConfig
from tfb_core.data.tasks import Record, Task, TaskError
from tfb_core.decide import selective
from tfb_core.decide.conformal import SCORES
from tfb_core.decide.uncertainty import (
    Uncertainty,
    apply_temperature,
    classification_metrics,
    fit_temperature,
    summarize,
)
from tfb_core.evaluation.report import bootstrap_differences, format_table, ood_auroc, plot_reliability
from tfb_core.forward.layout import rows_of

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate beyond the model: data, Monte Carlo and bootstrap settings, outputs."""

    test_split: str = "test"
    limit: int | None = None
    anchor_split: str = "anchor"  # used when no anchor file is given
    anchor_limit: int | None = None  # that many of the split, shuffled with seed 42 (the reference's anchor)
    ood_task: str | None = None
    ood_split: str = "validation"
    ood_field: str = "question"  # the OOD record field fed to the task as its input text
    ood_limit: int | None = None
    n_boot: int = 1000
    boot_seed: int = 0
    max_rows: int = 64
    plot: str | None = None
    output: str | None = None
    test_file: str | None = None  # labelled JSON Lines instead of test_split
    ood_file: str | None = None  # JSON Lines of OOD inputs instead of ood_task
    split_seed: int = 0  # the seeded half of the test records that calibrates when no calibration file is given
    conformal_score: str = "lac"
    conformal_mondrian: bool = False
    risk_delta: float = 0.1

    def __post_init__(self) -> None:
        if self.conformal_score not in SCORES:
            raise ValueError(f"conformal_score must be one of {SCORES}, got {self.conformal_score!r}")
        if not 0.0 < self.risk_delta < 1.0:
            raise ValueError(f"risk_delta must be in (0, 1), got {self.risk_delta}")
        if self.n_boot < 0:
            raise ValueError(f"n_boot must be >= 0, got {self.n_boot}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")


def _prompts(task: Task, records: Sequence[Record], what: str = "test") -> tuple[list[str], torch.Tensor]:
    prompts = [task.format(r) for r in records]
    targets = [task.target(r) for r in records]
    missing = [i for i, t in enumerate(targets, 1) if t is None]
    if missing:
        raise ValueError(f"{what}: record {missing[0]} has no label (every evaluation record needs one)")
    return prompts, torch.tensor(targets)


def read_labelled(path: str | Path, task: Task, what: str = "test file") -> list[Record]:
    """Records of a JSON Lines file, each with the task's fields and a label; an error names the file and line."""
    from tfb_core.data.jsonl import read_jsonl
    from tfb_core.data.loading import LoadError

    records = read_jsonl(path, what)
    lines = [i for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    for rec, line in zip(records, lines, strict=True):
        try:
            task.format(rec)
            target = task.target(rec)
        except TaskError as exc:
            raise LoadError(f"{what} {path}:{line}: {exc}") from exc
        if target is None:
            raise LoadError(f"{what} {path}:{line}: no 'label': every record needs one of "
                            f"{list(task.labels)} (or its index)")
    return records


def ood_input(task: Task, record: Record, field: str) -> Record:
    """An OOD record as an input of ``task``: its ``field`` as the task's one input field (e.g. a
    BoolQ question as an SST-2 sentence); a record of the task's own fields is used as it is."""
    if len(task.fields) == 1 and field in record:
        return {task.fields[0]: record[field]}
    return record


def _sample(clf: Any, prompts: Sequence[str], n: int, sigma: float, seed: int, max_rows: int,
            progress: bool, desc: str) -> torch.Tensor:
    from tqdm.auto import tqdm

    with tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False, unit="prompt") as bar:
        return clf.sample_probs(prompts, rows_of(n, sigma), seed=seed, sigma=sigma, max_rows=max_rows,
                                progress=bar)  # (B, N, C)


def evaluate(clf: Any, task: Task, test: Sequence[Record], anchor: Sequence[Record], search: SearchConfig,
             opts: EvalOptions, sigma: float | None = None, n_samples: int = 10, seed: int = 0,
             ood: Sequence[Record] | None = None, progress: bool = False,
             calibration: Sequence[Record] | None = None, calibration_source: str = "calibration") -> dict[str, Any]:
    """All four methods on ``test``; sigma from ``search`` on ``anchor`` unless given. JSON-able.

    Prediction sets and abstention thresholds are fitted on ``calibration`` (labelled records) if
    given, else on a seeded half of ``test`` (``opts.split_seed``) and measured on the other half."""
    from tfb_core.search.classifier import search_sigma

    start = time.perf_counter()
    test_prompts, y = _prompts(task, test, "test")
    anchor_prompts, y_anchor = _prompts(task, anchor, "anchor (temperature scaling needs labels)")
    search_info: dict[str, Any] | None = None
    if sigma is None:
        result = search_sigma(clf, anchor_prompts, search, targets=y_anchor, progress=progress, max_rows=opts.max_rows)
        sigma = result.sigma
        search_info = {k: v for k, v in result.to_dict().items() if k != "history"}
        search_info["history"] = [asdict(p) for p in result.history]
    run = lambda prompts, s, desc: _sample(clf, prompts, n_samples, s, seed, opts.max_rows, progress, desc)  # noqa: E731
    mle_anchor = run(anchor_prompts, 0.0, "anchor mle").mean(1)  # (A, C)
    tfb_anchor = summarize(run(anchor_prompts, sigma, "anchor tfb")).probs if sigma > 0 else mle_anchor
    t_mle, t_tfb = fit_temperature(mle_anchor, y_anchor), fit_temperature(tfb_anchor, y_anchor)
    mle_test = run(test_prompts, 0.0, "test mle")  # (B, 1, C)
    tfb_test = run(test_prompts, sigma, "test tfb") if sigma > 0 else mle_test  # (B, N, C)
    u_tfb = summarize(tfb_test)
    probs = {"mle": mle_test.mean(1), "tfb": u_tfb.probs, "temperature": apply_temperature(mle_test.mean(1), t_mle),
             "tfb+temperature": apply_temperature(u_tfb.probs, t_tfb)}
    methods: dict[str, dict[str, float]] = {}
    for name, p in probs.items():
        methods[name] = classification_metrics(p, y)
        methods[name]["mean_confidence"] = float(p.max(1).values.mean())
        methods[name]["mean_mi"] = float(u_tfb.mutual_information.mean()) if name.startswith("tfb") else 0.0
    out: dict[str, Any] = {
        "task": task.name, "labels": list(task.labels), "n_test": len(test), "n_anchor": len(anchor),
        "sigma": sigma, "n_samples": n_samples, "seed": seed, "search": search_info,
        "search_config": asdict(search), "temperature": {"mle": t_mle, "tfb": t_tfb},
        "anchor_metrics": {"mle": classification_metrics(mle_anchor, y_anchor),
                           "tfb": classification_metrics(tfb_anchor, y_anchor)},
        "methods": methods, "n_boot": opts.n_boot,
        "differences": bootstrap_differences(probs, y, n_boot=opts.n_boot, seed=opts.boot_seed),
    }
    if calibration is not None:
        cal_prompts, y_cal = _prompts(task, calibration, calibration_source)
        mle_cal = run(cal_prompts, 0.0, "calibration mle").mean(1)  # (n, C)
        u_cal = summarize(run(cal_prompts, sigma, "calibration tfb")) if sigma > 0 else summarize(mle_cal[:, None])
        cal = {"mle": mle_cal, "tfb": u_cal.probs, "temperature": apply_temperature(mle_cal, t_mle),
               "tfb+temperature": apply_temperature(u_cal.probs, t_tfb)}
        out["selective"] = selective_metrics(probs, y, u_tfb, opts, (cal, y_cal, u_cal),
                                             f"{calibration_source} ({len(calibration)} records)")
    else:
        out["selective"] = selective_metrics(probs, y, u_tfb, opts)
    if ood:
        ood_prompts = [task.format(ood_input(task, r, opts.ood_field)) for r in ood]
        u_in_mle = summarize(mle_test)
        u_out_mle = summarize(run(ood_prompts, 0.0, "ood mle"))
        u_out = summarize(run(ood_prompts, sigma, "ood tfb")) if sigma > 0 else u_out_mle
        out["ood"] = {
            "n_ood": len(ood),
            "auroc_confidence_mle": ood_auroc(-u_in_mle.confidence, -u_out_mle.confidence),
            "auroc_confidence_tfb": ood_auroc(-u_tfb.confidence, -u_out.confidence),
            "auroc_entropy_mle": ood_auroc(u_in_mle.predictive_entropy, u_out_mle.predictive_entropy),
            "auroc_entropy_tfb": ood_auroc(u_tfb.predictive_entropy, u_out.predictive_entropy),
            "auroc_mi_tfb": ood_auroc(u_tfb.mutual_information, u_out.mutual_information),
            "mean_mi_in": float(u_tfb.mutual_information.mean()), "mean_mi_ood": float(u_out.mutual_information.mean()),
            "mean_entropy_in_tfb": float(u_tfb.predictive_entropy.mean()),
            "mean_entropy_ood_tfb": float(u_out.predictive_entropy.mean()),
        }
    if opts.plot:
        title = f"{task.name}: {len(test)} test examples, sigma={sigma:.4g}, N={n_samples}"
        out["plot"] = str(plot_reliability(probs, y, opts.plot, title=title))
        curves = {name: {score: selective.risk_coverage(c, correct) for score, c in scores.items()}
                  for name, scores, correct in _scored(probs, y, u_tfb)}
        out["plot_risk_coverage"] = str(selective.plot_risk_coverage(curves, risk_coverage_path(opts.plot), title))
    out["seconds"] = time.perf_counter() - start
    return out


def risk_coverage_path(plot: str | Path) -> Path:
    """Where the risk-coverage PNG goes: beside the reliability diagram, ``<name>_risk_coverage.png``."""
    p = Path(plot)
    return p.with_name(f"{p.stem}_risk_coverage.png")


def _scored(probs: dict[str, torch.Tensor], y: torch.Tensor, u_tfb: Uncertainty):
    """(method, its certainty scores on the test records, correct (B,)): mutual information for ``tfb`` only."""
    for name, p in probs.items():
        yield name, selective.certainties(p, u_tfb.mutual_information if name == "tfb" else None), p.argmax(1) == y


def selective_metrics(probs: dict[str, torch.Tensor], y: torch.Tensor, u_tfb: Uncertainty, opts: EvalOptions,
                      cal: tuple[dict[str, torch.Tensor], torch.Tensor, Uncertainty] | None = None,
                      cal_source: str = "") -> dict[str, Any]:
    """Acting on uncertainty, per method: AURC and error-detection AUROC of each certainty score on
    all test records; conformal coverage and set size per alpha and Learn-then-Test coverage per
    max_risk, fitted on ``cal`` ((probs per method, targets, TFB uncertainty)) or else on a seeded
    half of the test records, and measured on the test records not used to fit them."""
    n = y.shape[0]
    if cal is None:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(opts.split_seed))
        fit_i, eval_i = perm[: n // 2].sort().values, perm[n // 2:].sort().values
        cal = ({k: p[fit_i] for k, p in probs.items()}, y[fit_i],
               Uncertainty(*(getattr(u_tfb, f)[fit_i] for f in Uncertainty.__dataclass_fields__)))
        cal_source = f"a seeded half of the test records (seed {opts.split_seed})"
        probs_eval, y_eval = {k: p[eval_i] for k, p in probs.items()}, y[eval_i]
        mi_eval = u_tfb.mutual_information[eval_i]
    else:
        probs_eval, y_eval, mi_eval = probs, y, u_tfb.mutual_information
    cal_probs, y_cal, u_cal = cal
    out: dict[str, Any] = {"calibration": cal_source, "n_calibration": int(y_cal.shape[0]),
                           "n_measured": int(y_eval.shape[0]), "conformal_score": opts.conformal_score,
                           "mondrian": opts.conformal_mondrian, "risk_delta": opts.risk_delta, "methods": {}}
    for name, scores, correct in _scored(probs, y, u_tfb):
        m: dict[str, Any] = {
            "aurc": {s: selective.risk_coverage(c, correct)["aurc"] for s, c in scores.items()},
            "aurc_optimal": selective.aurc_optimal(correct),
            "error_auroc": {s: selective.auroc(-c, ~correct) for s, c in scores.items()},
        }
        if y_cal.shape[0] and y_eval.shape[0]:
            m["conformal"] = selective.conformal_report(cal_probs[name], y_cal, probs_eval[name], y_eval,
                                                        score=opts.conformal_score, mondrian=opts.conformal_mondrian)
            with_mi = name == "tfb"
            m["abstention"] = selective.abstention_report(
                selective.certainties(cal_probs[name], u_cal.mutual_information if with_mi else None),
                cal_probs[name].argmax(1) != y_cal,
                selective.certainties(probs_eval[name], mi_eval if with_mi else None),
                probs_eval[name].argmax(1) != y_eval, n_classes=probs[name].shape[1], delta=opts.risk_delta)
        out["methods"][name] = m
    return out


def _load_split(task: str, split: str, limit: int | None, cache_dir: str | None) -> list[Record]:
    from tfb_core.data.datasets import load_records

    return load_records(task, split, limit=limit, cache_dir=cache_dir)


def run_eval(cfg: Any, opts: EvalOptions, progress: bool = True) -> dict[str, Any]:
    """Load the model of ``cfg`` (an :class:`tfb_core.serving.config.EngineConfig`), evaluate, write outputs.

    Test records come from ``opts.test_file`` (labelled JSON Lines: the task's fields, or
    ``prompt`` and ``label`` for the generic task) or else the data set's ``opts.test_split``
    (:mod:`tfb_core.data.datasets`); OOD records from ``opts.ood_file`` or ``opts.ood_task``; the anchor from
    ``cfg.anchor`` (a JSONL file) or else the data set's ``opts.anchor_split``. Prediction sets and
    abstention are fitted on ``cfg.calibration`` if it was given (not the demo's default file), else
    on a seeded half of the test records. Prints the table to stderr.
    """
    from tfb_core.data.jsonl import read_jsonl
    from tfb_core.data.tasks import get_task
    from tfb_core.serving.startup import load_classifier

    calibration_file = cfg.calibration  # before the demo's defaults fill it in: only a file the user named
    cfg = cfg.with_defaults()
    if cfg.task is None and cfg.labels is None:
        raise ValueError("evaluation needs a named task (--task) or the generic task's --labels")
    task = get_task(cfg.task, cfg.labels)
    builtin = task.name != "generic"
    if not opts.test_file and not builtin:
        raise ValueError("the generic task has no built-in data: give --test-file F.jsonl (prompt and label per line)")
    if not cfg.anchor and not builtin:
        raise ValueError("the generic task has no built-in anchor: give --anchor F.jsonl (labelled: temperature "
                         "scaling is fitted on it)")
    if opts.test_file:
        test = read_labelled(opts.test_file, task, "test file")[:opts.limit]
    else:
        test = _load_split(task.name, opts.test_split, opts.limit, cfg.model.cache_dir)
    calibration = read_labelled(calibration_file, task, "calibration file") if calibration_file else None
    clf = load_classifier(cfg.model, task.labels)
    clf.truncate = task.truncate
    if cfg.anchor:
        anchor = read_jsonl(cfg.anchor)
    else:
        anchor = _load_split(task.name, opts.anchor_split, None, cfg.model.cache_dir)
        if opts.anchor_limit:
            random.Random(42).shuffle(anchor)
            anchor = anchor[:opts.anchor_limit]
    if opts.ood_file:
        ood: list[Record] | None = read_jsonl(opts.ood_file, "OOD file")
    elif opts.ood_task:
        ood = _load_split(opts.ood_task, opts.ood_split, opts.ood_limit or len(test), cfg.model.cache_dir)
    else:
        ood = None
    result = evaluate(clf, task, test, anchor, cfg.search, opts, sigma=cfg.sigma, n_samples=cfg.n_samples,
                      seed=cfg.seed, ood=ood, progress=progress, calibration=calibration,
                      calibration_source=f"calibration file {calibration_file}")
    result["model"] = {"model": cfg.model.model, "adapter": cfg.model.adapter, "device": cfg.model.device,
                       "anchor": cfg.anchor or f"{task.name}:{opts.anchor_split}",
                       "test": opts.test_file or f"{task.name}:{opts.test_split}",
                       "ood": opts.ood_file or (f"{opts.ood_task}:{opts.ood_split}" if opts.ood_task else None)}
    print(format_table(result), file=sys.stderr)
    if opts.output:
        path = Path(opts.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result
