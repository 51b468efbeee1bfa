"""Risk-controlled generation and answer confidence on the demo's held-out arithmetic questions.

Reuses the per-question rows of ``benchmarks/results/generation-eval.json`` (benchmarks/generation_eval.py:
the generative demo adapter arith-mle on the embedded SmolLM2-135M-Instruct, sigma 0.015 as the server
searches it, N = 10, posterior seed 0, greedy, chat; 300 in-domain test questions, 200 shifted ones
with three-digit operands): answers, exact match and every score per question; nothing is decoded here.

1. max_risk: the held-out in-domain questions (the 300 test questions, pooled with the rows of the
   adapter's calibration questions where ``--calibration-rows`` has them: ``generation_eval.py
   --n-calibration 300``, or a partial run's checkpoint) split ``--splits`` times at random into
   halves, one calibrating and one testing; per score (:data:`tfb_core.decide.generation_risk.RISK_SCORES`:
   ``nll`` = TFB's sequence NLL, ``mle_nll`` = the sigma = 0 answer's NLL, ``semantic_entropy`` =
   per-sample mode's majority answer, ``max_mi``) and max_risk in {0.1, 0.2} at delta 0.1: the
   Learn-then-Test threshold on the calibration half (the server's code), and on the test half the
   share answered and the error among the answered. Reported: the share of splits whose test error
   is <= max_risk (the guarantee is over the calibration draw: >= 1 - delta expected, up to the test
   half's own noise), the mean answered share, the share of splits where anything was certified,
   and TFB's nll against the MLE's per split. With calibration rows, also as served: calibrated on
   them, measured on the test and the shifted questions.
2. confidence: exp(-nll) of TFB's answers and of the MLE's (sigma = 0), and each with temperature
   scaling fitted on calibration questions (:func:`tfb_core.evaluation.generation.confidence_calibration`):
   ECE, Brier, NLL with paired bootstrap intervals, in domain (the calibration questions' rows
   calibrate where given, else the first half of the test questions) and shifted (the 200
   questions with longer operands); and the mean over the splits above.

    python benchmarks/generation_risk.py --out benchmarks/results/generation-risk.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfb_core.decide.generation_risk import RISK_SCORES, certainty, certified  # noqa: E402
from tfb_core.evaluation.generation import confidence_calibration, format_confidence  # noqa: E402

#: score -> (the eval row's score, the correctness of the answer it serves)
COLUMNS = {"nll": ("tfb_nll", "tfb_correct"), "mle_nll": ("mle_nll", "mle_correct"),
           "semantic_entropy": ("tfb_semantic_entropy", "tfb_majority_correct"),
           "max_mi": ("tfb_max_mi", "tfb_correct")}
MAX_RISKS = (0.1, 0.2)


def columns(rows: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per score: (u (n,), correct (n,) bool) of the rows."""
    return {s: (torch.tensor([float(r["scores"][u]) for r in rows], dtype=torch.float64),
                torch.tensor([bool(r[ok]) for r in rows])) for s, (u, ok) in COLUMNS.items()}


def risk_at(cal: dict, test: dict, max_risk: float, delta: float) -> tuple[bool, float, float | None]:
    """(certified, answered share, error among answered or None) of the threshold fitted on ``cal``."""
    th = certified(cal[0], ~cal[1], max_risk, delta)
    ans = certainty(test[0]) >= th.threshold
    k = int(ans.sum())
    return th.supported, k / test[0].shape[0], float((~test[1][ans]).double().mean()) if k else None


def risk_splits(rows: list[dict], cal_pool: list[dict] | None, splits: int, delta: float, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    draws = [split(rows, cal_pool, gen) for _ in range(splits)]
    cols = [(columns(test), columns(cal)) for test, cal in draws]
    out: dict = {"n_calibration": len(draws[0][1]), "n_test": len(draws[0][0])}
    answered: dict = {}
    for score in COLUMNS:
        res = {}
        for r in MAX_RISKS:
            runs = [risk_at(c[score], t[score], r, delta) for t, c in cols]
            answered[(score, r)] = torch.tensor([a for _, a, _ in runs], dtype=torch.float64)
            errs = [e for _, _, e in runs if e is not None]
            res[str(r)] = {"held_share": sum(e is None or e <= r for _, _, e in runs) / splits,
                           "mean_answered_share": sum(a for _, a, _ in runs) / splits,
                           "certified_share": sum(c for c, _, _ in runs) / splits,
                           "mean_error_when_answering": sum(errs) / len(errs) if errs else None}
        out[score] = {"max_risk": res}
    # TFB's score against the MLE's on the same splits: the answered share's difference
    out["nll-mle_nll"] = {}
    for r in MAX_RISKS:
        d = answered[("nll", r)] - answered[("mle_nll", r)]
        lo, hi = torch.quantile(d, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
        out["nll-mle_nll"][str(r)] = {"mean_answered_difference": float(d.mean()), "p05": lo, "p95": hi,
                                      "share_nll_answers_more": float((d > 0).double().mean()),
                                      "share_equal": float((d == 0).double().mean())}
    return out


def served(cal_rows: list[dict], test_rows: list[dict], delta: float) -> dict:
    """The server's calibration (the adapter's calibration questions) measured on other questions."""
    cal, test = columns(cal_rows), columns(test_rows)
    out = {}
    for score in COLUMNS:
        out[score] = {"calibration_accuracy": float(cal[score][1].double().mean()),
                      "test_accuracy": float(test[score][1].double().mean())}
        for r in MAX_RISKS:
            c, a, e = risk_at(cal[score], test[score], r, delta)
            out[score][str(r)] = {"certified": c, "answered_share": a, "selective_error": e}
    return out


def confidence_splits(rows: list[dict], cal_pool: list[dict] | None, splits: int, seed: int) -> dict:
    """Mean metrics over random splits (the temperature fitted on each split's calibration part) and
    the share of splits where TFB's raw confidence scores lower (better) than each other method."""
    gen = torch.Generator().manual_seed(seed)
    sums: dict = {}
    wins: dict = {}
    for _ in range(splits):
        test, cal = split(rows, cal_pool, gen)
        m = confidence_calibration(test, cal, n_boot=0)["metrics"]
        for k, v in m.items():
            for metric, x in v.items():
                sums.setdefault(k, {}).setdefault(metric, 0.0)
                sums[k][metric] += x / splits
        for b in ("mle", "mle+temperature", "tfb+temperature"):
            for metric in ("ece", "brier", "nll"):
                wins.setdefault(f"tfb-{b}", {}).setdefault(metric, 0.0)
                wins[f"tfb-{b}"][metric] += (m["tfb"][metric] < m[b][metric]) / splits
    return {"mean": sums, "tfb_lower_share": wins}


def split(rows: list[dict], cal_pool: list[dict] | None, gen: torch.Generator) -> tuple[list[dict], list[dict]]:
    """(test, calibration): the rows and the calibration questions' rows (all held-out in-domain
    questions of one distribution), pooled, shuffled and halved."""
    pool = rows + (cal_pool or [])
    p = torch.randperm(len(pool), generator=gen).tolist()
    k = len(pool) // 2
    return [pool[i] for i in p[:k]], [pool[i] for i in p[k:]]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=Path, default=Path("benchmarks/results/generation-eval.json"))
    ap.add_argument("--calibration-rows", type=Path, default=Path("benchmarks/results/generation-eval-calibration.json"),
                    help="rows of the adapter's 300 calibration questions (generation_eval.py --n-calibration 300)")
    ap.add_argument("--splits", type=int, default=1000)
    ap.add_argument("--confidence-splits", type=int, default=200, help="splits of the confidence means (each fits T)")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/generation-risk.json"))
    args = ap.parse_args(argv)
    ev = json.loads(args.rows.read_text())
    ind, shifted = ev["sets"]["in_domain_test"]["rows"], ev["sets"]["shifted"]["rows"]
    cal_rows = None
    if args.calibration_rows is not None and args.calibration_rows.is_file():
        cal_ev = json.loads(args.calibration_rows.read_text())
        if "sets" in cal_ev:  # a finished run
            if cal_ev["adapter_sha256"] != ev["adapter_sha256"] or cal_ev["search"]["sigma"] != ev["search"]["sigma"]:
                raise SystemExit("the calibration rows are of another adapter or sigma")
            cal_rows = cal_ev["sets"]["calibration"]["rows"]
        else:  # a partial run's checkpoint (generation_eval.py's .partial.json): the questions done so far
            if cal_ev["sigma"] != ev["search"]["sigma"] or cal_ev["options"] != ev["sets"]["in_domain_test"]["options"]:
                raise SystemExit("the partial calibration rows are of another sigma or decode")
            cal_rows = cal_ev["rows"]
    out: dict = {"source": str(args.rows), "calibration_source": str(args.calibration_rows) if cal_rows else None,
                 "adapter": ev["adapter"], "sigma": ev["search"]["sigma"],
                 "options": ev["sets"]["in_domain_test"]["options"], "n_in_domain": len(ind), "n_shifted": len(shifted),
                 "n_calibration_questions": len(cal_rows or ()), "splits": args.splits, "delta": args.delta,
                 "seed": args.seed, "scores": {k: v.description for k, v in RISK_SCORES.items()},
                 "machine": "2 CPU cores shared with other jobs (no timings here)",
                 "command": "python benchmarks/generation_risk.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out["risk"] = risk_splits(ind, cal_rows, args.splits, args.delta, args.seed)
    out["most_answered"] = {str(r): max(COLUMNS, key=lambda s: out["risk"][s]["max_risk"][str(r)]["mean_answered_share"])
                            for r in MAX_RISKS}
    out["most_answered"]["both"] = max(COLUMNS, key=lambda s: sum(
        out["risk"][s]["max_risk"][str(r)]["mean_answered_share"] for r in MAX_RISKS))
    out["confidence_in_domain_splits"] = confidence_splits(ind, cal_rows, args.confidence_splits, args.seed)
    if cal_rows:  # as served: calibrated on the adapter's calibration questions (those decoded)
        out["served"] = {"in_domain": served(cal_rows, ind, args.delta), "shifted": served(cal_rows, shifted, args.delta)}
        out["confidence_in_domain"] = confidence_calibration(ind, cal_rows, args.n_boot, args.seed)
        out["confidence_shifted"] = confidence_calibration(shifted, cal_rows, args.n_boot, args.seed)
    else:  # the first half of the in-domain questions calibrates
        half = len(ind) // 2
        out["confidence_in_domain"] = confidence_calibration(ind[half:], ind[:half], args.n_boot, args.seed)
        out["confidence_shifted"] = confidence_calibration(shifted, ind, args.n_boot, args.seed)
    print(table(out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


def table(out: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    r = out["risk"]
    lines = [f"max_risk, {out['splits']} splits ({r['n_calibration']} calibrate, {r['n_test']} test), delta "
             f"{out['delta']}: held share / answered share / certified share / mean error when answering"]
    for s in COLUMNS:
        lines.append(f"  {s:<18}" + "  ".join(
            f"max_risk {k}: {x['held_share']:.3f} / {x['mean_answered_share']:.3f} / {x['certified_share']:.3f} / "
            f"{f(x['mean_error_when_answering'])}" for k, x in r[s]["max_risk"].items()))
    lines.append("nll - mle_nll, answered share per split: " + "  ".join(
        f"max_risk {k}: mean {x['mean_answered_difference']:+.3f} [5-95%: {x['p05']:+.3f}, {x['p95']:+.3f}], nll more in "
        f"{x['share_nll_answers_more']:.2f}, equal in {x['share_equal']:.2f}" for k, x in r["nll-mle_nll"].items()))
    lines.append(f"most answered: {out['most_answered']}")
    for where, res in out.get("served", {}).items():
        lines.append(f"as served (calibrated on the {out['n_calibration_questions']} calibration questions), {where}:")
        for s, v in res.items():
            lines.append(f"  {s:<18} acc {v['test_accuracy']:.3f}  " + "  ".join(
                f"max_risk {k}: answered {x['answered_share']:.3f} error {f(x['selective_error'])}"
                for k, x in v.items() if k in {str(m) for m in MAX_RISKS}))
    for name in ("confidence_in_domain", "confidence_shifted"):
        lines += [f"{name}:", *format_confidence(out[name])]
    mean = out["confidence_in_domain_splits"]
    lines.append("in domain, mean over splits: " + "; ".join(
        f"{k} ECE {m['ece']:.4f} Brier {m['brier']:.4f} NLL {m['nll']:.4f}" for k, m in mean["mean"].items()))
    lines.append("share of splits where TFB's raw confidence is lower: " + "; ".join(
        f"{k}: " + ", ".join(f"{m} {v:.2f}" for m, v in d.items()) for k, d in mean["tfb_lower_share"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
