"""Risk-controlled generation and answer confidence on the demo's held-out arithmetic questions.

Reuses the per-question rows of ``benchmarks/results/generation-eval.json`` (benchmarks/generation_eval.py:
the generative demo adapter arith-mle on the embedded SmolLM2-135M-Instruct, sigma 0.015 as the server
searches it, N = 10, posterior seed 0, greedy, chat; 300 in-domain test questions, 200 shifted ones
with three-digit operands): answers, exact match and every score per question; nothing is decoded here.

1. max_risk: over ``--splits`` random halves of the 300 in-domain questions (150 calibrate, 150 test),
   per score (:data:`tfb_core.decide.generation_risk.RISK_SCORES`; ``nll`` = TFB's sequence NLL,
   ``mle_nll`` = the sigma = 0 answer's NLL, ``semantic_entropy`` = per-sample mode's majority
   answer, ``max_mi``) and max_risk in {0.1, 0.2} at delta 0.1: the Learn-then-Test threshold on the
   calibration half (the server's procedure), and on the test half the share answered and the error
   among the answered. Reported: the share of splits whose test error is <= max_risk (the guarantee
   is over the calibration draw: >= 1 - delta expected, up to the test half's own noise), the mean
   answered share, the share of splits where anything was certified.
2. confidence: p̄(answer) = exp(-nll) of TFB's answers and of the MLE's (sigma = 0), and each with
   temperature scaling (sigmoid(logit(c) / T)) fitted on calibration questions: ECE, Brier, NLL.
   In domain: mean over the same splits (T fitted on the calibration half), and on one split
   (the first 150 questions calibrate, the last 150 test) paired bootstrap intervals; shifted:
   T fitted on all 300 in-domain questions, measured on the 200 shifted ones, paired bootstrap.

    python benchmarks/generation_risk.py --out benchmarks/results/generation-risk.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfb_core.decide.generation_risk import (  # noqa: E402
    RISK_SCORES,
    answer_confidence,
    certainty,
    certified,
    confidence_metrics,
    confidence_report,
    fit_confidence_temperature,
    scale_confidence,
)

#: score -> (the eval row's score, the correctness of the answer it serves)
COLUMNS = {"nll": ("tfb_nll", "tfb_correct"), "mle_nll": ("mle_nll", "mle_correct"),
           "semantic_entropy": ("tfb_semantic_entropy", "tfb_majority_correct"),
           "max_mi": ("tfb_max_mi", "tfb_correct")}
MAX_RISKS = (0.1, 0.2)


def columns(rows: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per score: (u (n,), correct (n,) bool) of the rows."""
    return {s: (torch.tensor([float(r["scores"][u]) for r in rows], dtype=torch.float64),
                torch.tensor([bool(r[ok]) for r in rows])) for s, (u, ok) in COLUMNS.items()}


def risk_splits(cols: dict, splits: int, delta: float, seed: int) -> dict:
    n = next(iter(cols.values()))[0].shape[0]
    half = n // 2
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=gen) for _ in range(splits)]
    out: dict = {}
    for score, (u, ok) in cols.items():
        rows = {}
        for r in MAX_RISKS:
            held = answered = certified_n = 0
            errs = []
            for p in perms:
                cal, test = p[:half], p[half:]
                th = certified(u[cal], ~ok[cal], r, delta)
                ans = certainty(u[test]) >= th.threshold
                k = int(ans.sum())
                certified_n += th.supported
                answered += k / test.shape[0]
                err = float((~ok[test][ans]).double().mean()) if k else 0.0
                if k:
                    errs.append(err)
                held += err <= r
            rows[str(r)] = {"held_share": held / splits, "mean_answered_share": answered / splits,
                            "certified_share": certified_n / splits,
                            "mean_error_when_answering": sum(errs) / len(errs) if errs else None}
        out[score] = {"accuracy": float(ok.double().mean()), "max_risk": rows}
    return out


def confidences(rows: list[dict], cal_rows: list[dict]) -> tuple[dict, dict, dict]:
    """Confidence and correctness per method on ``rows`` (T fitted on ``cal_rows``), and the Ts."""
    def conf(rs, m):
        return (answer_confidence(torch.tensor([float(r["scores"][f"{m}_nll"]) for r in rs], dtype=torch.float64)),
                torch.tensor([bool(r[f"{m}_correct"]) for r in rs]))

    c, y, ts = {}, {}, {}
    for m in ("tfb", "mle"):
        cc, cy = conf(cal_rows, m)
        ts[m] = fit_confidence_temperature(cc, cy)
        c[m], y[m] = conf(rows, m)
        c[f"{m}+temperature"], y[f"{m}+temperature"] = scale_confidence(c[m], ts[m]), y[m]
    return c, y, ts


def confidence_splits(rows: list[dict], splits: int, seed: int) -> dict:
    n, half = len(rows), len(rows) // 2
    gen = torch.Generator().manual_seed(seed)
    sums: dict = {}
    wins: dict = {}
    for _ in range(splits):
        p = torch.randperm(n, generator=gen).tolist()
        c, y, _ = confidences([rows[i] for i in p[half:]], [rows[i] for i in p[:half]])
        m = {k: confidence_metrics(c[k], y[k]) for k in c}
        for k, v in m.items():
            for metric, x in v.items():
                sums.setdefault(k, {}).setdefault(metric, 0.0)
                sums[k][metric] += x / splits
        for b in ("mle", "mle+temperature", "tfb+temperature"):
            for metric in ("ece", "brier", "nll"):
                key = f"tfb-{b}"
                wins.setdefault(key, {}).setdefault(metric, 0.0)
                wins[key][metric] += (m["tfb"][metric] < m[b][metric]) / splits
    return {"mean": sums, "tfb_lower_share": wins}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=Path, default=Path("benchmarks/results/generation-eval.json"))
    ap.add_argument("--splits", type=int, default=1000)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/generation-risk.json"))
    args = ap.parse_args(argv)
    ev = json.loads(args.rows.read_text())
    ind, shifted = ev["sets"]["in_domain_test"]["rows"], ev["sets"]["shifted"]["rows"]
    out: dict = {"source": str(args.rows), "adapter": ev["adapter"], "sigma": ev["search"]["sigma"],
                 "options": ev["sets"]["in_domain_test"]["options"], "n_in_domain": len(ind), "n_shifted": len(shifted),
                 "splits": args.splits, "delta": args.delta, "seed": args.seed,
                 "scores": {k: v.description for k, v in RISK_SCORES.items()},
                 "command": "python benchmarks/generation_risk.py --out " + str(args.out)}
    out["risk"] = risk_splits(columns(ind), args.splits, args.delta, args.seed)
    best = {str(r): max(out["risk"], key=lambda s: out["risk"][s]["max_risk"][str(r)]["mean_answered_share"])
            for r in MAX_RISKS}
    out["most_answered"] = best
    out["confidence_in_domain_splits"] = confidence_splits(ind, args.splits, args.seed)
    c, y, ts = confidences(ind[len(ind) // 2:], ind[:len(ind) // 2])
    out["confidence_in_domain_fixed_split"] = {"temperature": ts, **confidence_report(
        c, y, ["mle", "mle+temperature"], args.n_boot, args.seed)}
    c, y, ts = confidences(shifted, ind)
    out["confidence_shifted"] = {"temperature": ts, **confidence_report(c, y, ["mle", "mle+temperature"], args.n_boot,
                                                                        args.seed)}
    print(table(out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


def table(out: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"max_risk on {out['n_in_domain']} in-domain questions, {out['splits']} splits 150/150, delta "
             f"{out['delta']}: held share / answered share / certified share"]
    for s, v in out["risk"].items():
        lines.append(f"  {s:<18} acc {v['accuracy']:.3f}  " + "  ".join(
            f"max_risk {r}: {x['held_share']:.3f} / {x['mean_answered_share']:.3f} / {x['certified_share']:.3f}"
            for r, x in v["max_risk"].items()))
    for name in ("confidence_in_domain_fixed_split", "confidence_shifted"):
        rep = out[name]
        lines.append(f"{name} (T: " + ", ".join(f"{k} {t:.3f}" for k, t in rep["temperature"].items()) + ")")
        for k, m in rep["metrics"].items():
            lines.append(f"  {k:<16} ECE {m['ece']:.4f} Brier {m['brier']:.4f} NLL {m['nll']:.4f} "
                         f"conf {m['mean_confidence']:.3f} acc {m['accuracy']:.3f}")
        for k, d in rep["differences"].items():
            lines.append(f"  {k:<28} " + "  ".join(
                f"{m} {x['diff']:+.4f} [{f(x['lo'])}, {f(x['hi'])}]{'*' if x['excludes_zero'] else ''}"
                for m, x in d.items()))
    mean = out["confidence_in_domain_splits"]
    lines.append("in domain, mean over splits: " + "; ".join(
        f"{k} ECE {m['ece']:.4f} Brier {m['brier']:.4f} NLL {m['nll']:.4f}" for k, m in mean["mean"].items()))
    lines.append("share of splits where TFB's raw confidence is lower: " + "; ".join(
        f"{k}: " + ", ".join(f"{m} {v:.2f}" for m, v in d.items()) for k, d in mean["tfb_lower_share"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
