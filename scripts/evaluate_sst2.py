"""The real-data results: MLE vs TFB vs temperature scaling on held-out SST-2, OOD, tolerance sweep.

    .venv/bin/python scripts/evaluate_sst2.py                     # CPU (slow: tens of minutes)
    .venv/bin/python scripts/evaluate_sst2.py --device cuda       # a GPU: about a minute

Writes benchmarks/results/sst2_tfb.json (main evaluation + sweep) and docs/sst2_reliability.png.
The adapter is the committed demo adapter; the anchor is its committed anchor.jsonl (100
sentences, disjoint from train and test); test = the 272-sentence held-out SST-2 split; OOD =
BoolQ validation questions fed through the same SST-2 prompt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfb_core.config import ModelConfig, SearchConfig  # noqa: E402
from tfb_core.data.datasets import load_records  # noqa: E402
from tfb_core.data.jsonl import read_jsonl  # noqa: E402
from tfb_core.data.tasks import get_task  # noqa: E402
from tfb_core.decide.uncertainty import classification_metrics, nll, summarize  # noqa: E402
from tfb_core.evaluation.classification import EvalOptions, evaluate  # noqa: E402
from tfb_core.evaluation.report import format_table  # noqa: E402
from tfb_core.search.classifier import search_sigma  # noqa: E402
from tfb_core.serving.config import DEMO_ADAPTER, DEMO_ANCHOR  # noqa: E402
from tfb_core.serving.startup import load_classifier  # noqa: E402

log = logging.getLogger("evaluate_sst2")
SWEEP = [("nll", 0.01), ("nll", 0.05), ("nll", 0.3), ("nll", 1.0), ("nll", 1.5), ("nll", 3.0),
         ("flip", 0.01), ("flip", 0.03), ("flip", 0.05)]


def sweep(clf, task, anchor, test, base: SearchConfig, n_samples: int, seed: int, max_rows: int,
          spec: list[tuple[str, float]] = SWEEP) -> list[dict]:
    """Per (criterion, tolerance): the searched sigma, its anchor change, and the test metrics at it."""
    a_prompts = [task.format(r) for r in anchor]
    t_prompts = [task.format(r) for r in test]
    y_test = torch.tensor([task.target(r) for r in test])
    y_anchor = torch.tensor([task.target(r) for r in anchor])
    ref = clf.sample_probs(a_prompts, 1, sigma=0.0, max_rows=max_rows)[:, 0]  # (A, C)
    pseudo = ref.argmax(1)
    rows = []
    for criterion, tol in spec:
        cfg = SearchConfig(**{**asdict(base), "criterion": criterion, "tolerance": tol})
        res = search_sigma(clf, a_prompts, cfg, targets=y_anchor, progress=False, max_rows=max_rows)
        row = {"criterion": criterion, "tolerance": tol, "sigma": res.sigma, "search_value": res.value,
               "satisfied": res.satisfied, "note": res.note, "evaluations": res.n_evaluations}
        if res.sigma > 0:
            a = summarize(clf.sample_probs(a_prompts, n_samples, seed=seed, sigma=res.sigma, max_rows=max_rows)).probs
            row["anchor_nll_rel_change"] = abs(nll(a, pseudo) - nll(ref, pseudo)) / nll(ref, pseudo)
            row["anchor_flip"] = float((a.argmax(1) != pseudo).double().mean())
            u = summarize(clf.sample_probs(t_prompts, n_samples, seed=seed, sigma=res.sigma, max_rows=max_rows))
            row["test"] = {**classification_metrics(u.probs, y_test), "mean_mi": float(u.mutual_information.mean())}
        log.info("sweep %s", row)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=str(DEMO_ADAPTER))
    ap.add_argument("--anchor", default=str(DEMO_ANCHOR))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--criterion", default="nll")
    ap.add_argument("--tolerance", type=float, default=1.5)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="first N test (and OOD) sentences only (smoke runs)")
    ap.add_argument("--ood-task", default="boolq")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--sweep", default=",".join(f"{c}:{t:g}" for c, t in SWEEP),
                    help="criterion:tolerance,... of the tolerance sweep ('' for none)")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "sst2_tfb.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "sst2_reliability.png"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    task = get_task("sst2")
    clf = load_classifier(ModelConfig(adapter=args.adapter, device=args.device), task.labels)
    test = load_records("sst2", "test", limit=args.limit)
    anchor = read_jsonl(args.anchor)
    ood = load_records(args.ood_task, "validation", limit=len(test)) if args.ood_task else None
    search = SearchConfig(criterion=args.criterion, tolerance=args.tolerance, n_samples=args.samples, seed=args.seed)
    opts = EvalOptions(n_boot=args.bootstrap, max_rows=args.max_rows, plot=args.plot, ood_task=args.ood_task)
    result = evaluate(clf, task, test, anchor, search, opts, n_samples=args.samples, seed=args.seed, ood=ood,
                      progress=False)
    print(format_table(result), file=sys.stderr)
    spec = [(c, float(t)) for c, t in (item.split(":") for item in args.sweep.split(",") if item)]
    result["sweep"] = sweep(clf, task, anchor, test, search, args.samples, args.seed, args.max_rows, spec)
    result["environment"] = {"device": args.device, "torch": torch.__version__,
                             "cuda": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                             "seconds_total": time.time() - t0, "command": " ".join(sys.argv)}
    result["model"] = {"model": ModelConfig().model, "adapter": "tfb_core/adapters/sst2-mle",
                       "anchor": "tfb_core/adapters/sst2-mle/anchor.jsonl", "test": "sst2:test",
                       "ood": f"{args.ood_task}:validation (questions through the SST-2 prompt)"}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["sweep"]:
        t = row.get("test", {})
        print(f"{row['criterion']:>5} <= {row['tolerance']:<5g} sigma={row['sigma']:.5f} "
              f"anchor nll-change={row.get('anchor_nll_rel_change', 0):.3f} flip={row.get('anchor_flip', 0):.3f} "
              f"test acc={t.get('accuracy', float('nan')):.4f} ece={t.get('ece', float('nan')):.4f} "
              f"nll={t.get('nll', float('nan')):.4f}", file=sys.stderr)
    log.info("wrote %s and %s in %.0fs", out, args.plot, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
