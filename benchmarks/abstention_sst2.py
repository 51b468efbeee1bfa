"""Abstention on the demo (SST-2, the embedded SmolLM2 MLE adapter): what max_risk answers, measured.

The demo's held-out SST-2 sentences are the 272 of the test part (the demo's calibration file) and
the 100 of the anchor (whose inputs, not labels, the sigma search saw). Their mean probabilities
are computed once under TFB (the demo's sigma as served: from the cache or its search; N = 10,
seed 0) and under the MLE adapter (sigma = 0). Then:

* splits: the pool of 372 is split at random into n calibration and 372 - n test sentences
  (n = 100, 200, 272; ``--splits`` seeded draws); Learn-then-Test is fitted on the calibration
  part by the server's procedure (the fallback, :mod:`tfb_core.decide.conformal`) and by the one it
  replaced (fixed-sequence runs from 8 evenly spaced grid points, delta / 8 each, restated here),
  and measured on the test part: the share answered and the error among the answered (mean and
  10th percentile over splits), the share of splits that certify a threshold, and the share whose
  test error exceeds max_risk (sampling noise of a small test part included);
* served: the demo's own calibration (the 272 test-part sentences) measured on the 100 anchor
  sentences, the held-out set left.

    python benchmarks/abstention_sst2.py --out benchmarks/results/abstention-sst2.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from tfb_core.data.datasets import load_records
from tfb_core.decide.conformal import Calibration, Threshold, binom_cdf
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.response import predict
from tfb_core.serving.startup import load_engine

SIZES = (100, 200, 272)
MAX_RISKS = (0.1, 0.05)


def mean_probs(cfg: EngineConfig, records: list[dict]) -> tuple[torch.Tensor, float]:
    engine = load_engine(cfg, progress=False)
    out = predict(engine, records)
    return torch.tensor([p["probs"] for p in out["predictions"]], dtype=torch.float64), engine.sigma  # (n, C)


def demo_probs(records: list[dict], cache: Path | None) -> tuple[dict[str, torch.Tensor], float]:
    """Mean probabilities of ``records`` under TFB (the demo's sigma as served: from the cache or its
    search) and the MLE adapter, and that sigma; read from / written to ``cache`` if given."""
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in saved["probs"].items()}, saved["sigma"]
    tfb, sigma = mean_probs(EngineConfig(calibration=""), records)  # no calibration forward: not needed here
    mle, _ = mean_probs(EngineConfig(sigma=0.0, calibration=""), records)
    probs = {"tfb": tfb, "mle": mle}
    if cache is not None:
        cache.write_text(json.dumps({"sigma": sigma, "probs": {k: v.tolist() for k, v in probs.items()}}))
    return probs, sigma


def eight_starts(cal: Calibration, max_risk: float, delta: float) -> Threshold:
    """The procedure before the fallback: fixed-sequence runs from 8 evenly spaced grid points, delta / 8 each."""
    g = len(cal.grid)
    starts = sorted({round(i * g / 8) for i in range(8)})
    best = None
    for s in starts:
        for j in range(s, g):
            if binom_cdf(cal.errors[j], cal.answered[j], max_risk) > delta / len(starts):
                break
            best = j if best is None else max(best, j)
    return Threshold(math.inf, False, 0.0) if best is None else Threshold(cal.grid[best], True, 0.0)


def measure(th: Threshold, probs: torch.Tensor, target: torch.Tensor) -> tuple[float, float | None]:
    """(share answered, error among the answered) of ``probs`` at the threshold."""
    conf, pred = probs.max(1)
    answered = conf >= th.threshold
    k = int(answered.sum())
    return k / len(target), (float((pred != target)[answered].double().mean()) if k else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--probs", default=None, help="read/write the probabilities here (skip the forwards)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    anchor, test = load_records("sst2", "anchor"), load_records("sst2", "test")
    target = torch.tensor([int(r["label"]) for r in anchor + test])
    probs, sigma = demo_probs(anchor + test, Path(args.probs) if args.probs else None)
    n_pool = len(target)
    procedures = {"fallback": lambda cal, r: cal.threshold(r, args.delta),
                  "eight_starts": lambda cal, r: eight_starts(cal, r, args.delta)}
    splits: dict[str, dict] = {}
    for method, p in probs.items():
        for n in SIZES:
            gen = torch.Generator().manual_seed(n)
            rows = []
            for _ in range(args.splits):
                perm = torch.randperm(n_pool, generator=gen)
                cal_i, test_i = perm[:n], perm[n:]
                cal = Calibration.fit(p[cal_i], target[cal_i])
                for r in MAX_RISKS:
                    for name, fit in procedures.items():
                        th = fit(cal, r)
                        share, err = measure(th, p[test_i], target[test_i])
                        rows.append((r, name, th.supported, share, err))
            for r in MAX_RISKS:
                for name in procedures:
                    sel = [row for row in rows if row[0] == r and row[1] == name]
                    shares = sorted(row[3] for row in sel)
                    errs = [row[4] for row in sel if row[4] is not None]
                    splits[f"{method}/n={n}/max_risk={r}/{name}"] = {
                        "answered_mean": statistics.fmean(shares), "answered_p10": shares[len(shares) // 10],
                        "certified": sum(row[2] for row in sel) / len(sel),
                        "selective_error_mean": statistics.fmean(errs) if errs else None,
                        "test_error_over_max_risk": sum(e > r for e in errs) / len(sel)}
    served = {}
    n_anchor = len(anchor)
    for method, p in probs.items():
        cal = Calibration.fit(p[n_anchor:], target[n_anchor:])  # the demo's calibration file: the test part
        for r in MAX_RISKS:
            th = cal.threshold(r, args.delta)
            share, err = measure(th, p[:n_anchor], target[:n_anchor])
            served[f"{method}/max_risk={r}"] = {"certified": th.supported, "threshold": th.threshold if th.supported
                                                else None, "calibration_answered": th.answered_fraction,
                                                "answered": share, "selective_error": err}
    out = {"sigma": sigma, "n_pool": n_pool, "delta": args.delta, "splits": args.splits,
           "accuracy": {m: float((p.argmax(1) == target).double().mean()) for m, p in probs.items()},
           "split_results": splits, "served_on_anchor": served}
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
