"""Prediction sets and abstention on the demo (SST-2, the embedded SmolLM2 MLE adapter).

Mean probabilities of the anchor and test inputs once under TFB (the demo's sigma as served, N = 10) and
the MLE adapter (sigma = 0); then 20 seeded random half/half calibration/test splits: coverage and
mean set size at alpha = 0.1 (LAC, APS, Mondrian LAC), and abstention at max_risk = 0.05 (delta 0.1):
whether a threshold is certified, the share answered and the selective error on the test half.

    python benchmarks/conformal_sst2.py --probs probs.json --out benchmarks/results/conformal-sst2.json

(``--probs``: the probabilities abstention_sst2.py computes, read from or written to that file.)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from abstention_sst2 import demo_probs

from tfb_core.data.datasets import load_records
from tfb_core.decide.conformal import Calibration

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--max-risk", type=float, default=0.05)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--probs", default=None, help="read/write the probabilities here (abstention_sst2.py's file)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    records = load_records("sst2", "anchor") + load_records("sst2", "test")
    target = torch.tensor([int(r["label"]) for r in records])
    probs, sigma = demo_probs(records, Path(args.probs) if args.probs else None)
    n = len(records)
    rows: list[dict] = []
    for s in range(args.splits):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(s))
        cal_i, test_i = perm[: n // 2], perm[n // 2:]
        row: dict = {"split": s}
        for method, p in probs.items():
            cal = Calibration.fit(p[cal_i], target[cal_i])
            for name, score, mondrian in (("lac", "lac", False), ("aps", "aps", False), ("lac_mondrian", "lac", True)):
                sets = cal.prediction_sets(p[test_i], args.alpha, score, mondrian).sets
                hits = sum(int(y) in st for st, y in zip(sets, target[test_i], strict=True))
                row[f"{method}_{name}_coverage"] = hits / len(sets)
                row[f"{method}_{name}_set_size"] = sum(len(st) for st in sets) / len(sets)
            conf, pred = p[test_i].max(1)
            th = cal.threshold(args.max_risk, args.delta)
            answered = conf >= th.threshold
            row[f"{method}_certified"] = th.supported
            row[f"{method}_answered"] = float(answered.double().mean())
            wrong = (pred != target[test_i])[answered]
            row[f"{method}_selective_error"] = float(wrong.double().mean()) if answered.any() else None
            row[f"{method}_accuracy"] = float((pred == target[test_i]).double().mean())
        rows.append(row)
    summary = {}
    for key in rows[0]:
        if key == "split":
            continue
        vals = [r[key] for r in rows if r[key] is not None]
        summary[key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)} if vals else None
    for method in probs:
        errs = [r[f"{method}_selective_error"] for r in rows]
        summary[f"{method}_splits_risk_met"] = sum(e is None or e <= args.max_risk for e in errs) / len(rows)
    out = {"n": n, "n_calibration": n // 2, "sigma": sigma, "alpha": args.alpha, "max_risk": args.max_risk,
           "delta": args.delta, "splits": args.splits, "summary": summary, "rows": rows}
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
