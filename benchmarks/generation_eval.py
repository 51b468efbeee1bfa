"""``tfb eval`` for generation on the demo: the generative demo adapter on the embedded SmolLM2-135M-Instruct.

1. sigma: the generative search (:mod:`tfb_core.search.generation`, the criterion on the sigma = 0
   model's own greedy answers to the adapter's anchor prompts; ``--criterion``, ``--tolerance``, the
   rest :class:`~tfb_core.config.SearchConfig`'s defaults), timed; or ``--sigma`` given;
2. :func:`tfb_core.evaluation.generation.evaluate_generation` at that sigma on the first ``--n-test``
   questions of the in-domain test split and the first ``--n-shifted`` of the shifted set
   (:mod:`tfb_core.data.generation`: arithmetic with operands of more digits than trained on),
   N posterior samples, K temperature-1 samples for the semantic-entropy baseline, timed;
3. with ``--n-calibration`` (the adapter's calibration questions): each answer's confidence
   exp(-nll) on the other sets against the MLE's with temperature scaling fitted on them
   (:func:`tfb_core.evaluation.generation.confidence_calibration`); ``--merge`` of a run with that set
   adds it to an earlier result.

Writes the JSON (search, per set: accuracy, per score AUROC / AURC with bootstrap intervals and
cost, per-question rows) and prints the tables::

    python benchmarks/generation_eval.py --adapter tfb_core/adapters/arith-mle \\
        --out benchmarks/results/generation-eval.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfb_core.config import ModelConfig, SearchConfig  # noqa: E402
from tfb_core.data.generation import load_generation  # noqa: E402
from tfb_core.data.loading import load_adapter, load_base_model  # noqa: E402
from tfb_core.evaluation.generation import (  # noqa: E402
    GenEvalOptions,
    confidence_calibration,
    evaluate_generation,
    format_confidence,
    format_generation_table,
    shift_auroc,
)
from tfb_core.forward.generator import BayesianGenerator  # noqa: E402
from tfb_core.search.generation import read_anchor, search_generation_sigma  # noqa: E402
from tfb_core.search.strategy import GENERATION_SEARCH  # noqa: E402
from tfb_core.serving.config import EngineConfig  # noqa: E402

log = logging.getLogger("generation_eval")


def find_demo_adapter(root: Path) -> Path | None:
    """The first ``*-mle`` adapter under ``root`` whose train_config says ``"kind": "generation"``."""
    for d in sorted(root.glob("*-mle")):
        cfg = d / "train_config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("kind") == "generation":
            return d
    return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, default=None, help="default: tfb_core/adapters/*-mle of kind generation")
    ap.add_argument("--anchor", type=Path, default=None, help="default: the adapter's anchor.jsonl")
    ap.add_argument("--task", default=None, help="default: the adapter's train_config task")
    ap.add_argument("--sigma", type=float, default=None, help="skip the search")
    ap.add_argument("--search-result", type=Path, default=None,
                    help="skip the search: a JSON file of a SearchResult (its 'search' key, or the whole file)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="only merge the 'sets' of these result files (runs of one adapter and sigma) into --out")
    ap.add_argument("--criterion", default="nll")
    ap.add_argument("--tolerance", type=float, default=None, help="default: the server's for a generative adapter")
    ap.add_argument("--low", type=float, default=None, help="the search's bracket (default: SearchConfig's)")
    ap.add_argument("--high", type=float, default=None)
    ap.add_argument("--n-test", type=int, default=150)
    ap.add_argument("--n-shifted", type=int, default=100)
    ap.add_argument("--n-calibration", type=int, default=0,
                    help="also the first N questions of the calibration split (the adapter's calibration.jsonl: "
                         "what the server's max_risk is calibrated on; benchmarks/generation_risk.py reads them)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("-N", "--n-samples", type=int, default=10)
    ap.add_argument("-K", "--k-samples", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/generation-eval.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.merge:
        return merge(args.merge, args.out, args.n_boot)
    torch.set_num_threads(args.threads)

    adapter = args.adapter or find_demo_adapter(Path(__file__).resolve().parents[1] / "tfb_core" / "adapters")
    if adapter is None:
        raise SystemExit("no generative demo adapter (tfb_core/adapters/*-mle of kind generation): pass --adapter")
    train_cfg = json.loads((adapter / "train_config.json").read_text()) if (adapter / "train_config.json").is_file() else {}
    task = args.task or train_cfg.get("task", "arithmetic")
    anchor = args.anchor or adapter / "anchor.jsonl"
    weights = adapter / "adapter_model.safetensors"
    out: dict = {"adapter": str(adapter), "adapter_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                 "base_model": ModelConfig().model, "task": task, "anchor": str(anchor),
                 "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                             "note": "2 CPU cores shared with other jobs: times are indicative"}}

    t0 = time.perf_counter()
    tok, model = load_base_model(ModelConfig())
    gen = BayesianGenerator.from_peft(load_adapter(model, ModelConfig(adapter=str(adapter))), tok)
    out["load_seconds"] = time.perf_counter() - t0

    if args.search_result is not None:
        saved = json.loads(args.search_result.read_text())
        out["search"] = saved.get("search", saved)
        sigma = float(out["search"]["sigma"])
    elif args.sigma is None:
        given = {k: getattr(args, k) for k in ("tolerance", "low", "high") if getattr(args, k) is not None}
        # the server's default search for a generative adapter, unless told otherwise
        search_cfg = SearchConfig(**{**asdict(GENERATION_SEARCH), "criterion": args.criterion,
                                     "n_samples": args.n_samples, **given})
        # as the server searches it (tfb_core.serving.startup): its anchor answers of up to anchor_max_tokens
        res = search_generation_sigma(gen, read_anchor(anchor), search_cfg, chat=True,
                                      max_tokens=EngineConfig().anchor_max_tokens)
        out["search"] = {"config": asdict(search_cfg), **res.to_dict()}
        sigma = res.sigma
        log.info("sigma %.5g (%s %.4g <= %g) in %.1fs", sigma, res.criterion, res.value, res.tolerance, res.seconds)
        if not res.satisfied:
            raise SystemExit(f"the search found no sigma: {res.note}")
    else:
        sigma = args.sigma
        out["search"] = {"sigma": sigma, "given": True}

    opts = GenEvalOptions(n_samples=args.n_samples, k_samples=args.k_samples, max_tokens=args.max_tokens,
                          batch=args.batch, n_boot=args.n_boot, chat=True)
    out["sets"] = {}
    tables = []
    for name, split, n in (("in_domain_test", "test", args.n_test), ("shifted", "shifted", args.n_shifted),
                           ("calibration", "calibration", args.n_calibration)):
        if n <= 0:
            continue
        records = load_generation(task, split, limit=n)
        t = time.perf_counter()
        partial = args.out.with_suffix(f".{name}.partial.json")

        def checkpoint(rows, costs, partial=partial, t=t):
            partial.write_text(json.dumps({"sigma": sigma, "seconds": time.perf_counter() - t, "rows": rows,
                                           "costs": costs, "options": asdict(opts)}) + "\n")

        result = evaluate_generation(gen, records, sigma, opts, checkpoint=checkpoint,
                                     progress=lambda done, total, name=name: log.info("%s %d/%d", name, done, total))
        partial.unlink(missing_ok=True)
        result["seconds"] = time.perf_counter() - t
        result["split"] = split
        out["sets"][name] = result
        tables.append(format_generation_table(f"{name} ({task} {split}, first {len(records)})", result)
                      + f"\n  ({result['seconds']:.0f} s)")
        print(tables[-1], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")  # after each set: a partial run keeps its work
    if {"in_domain_test", "shifted"} <= set(out["sets"]):
        _shift_detection(out)
        tables.append(out["shift_table"])
        print(out["shift_table"], flush=True)
    if _confidence(out, args.n_boot):
        tables.append(out["confidence_table"])
        print(out["confidence_table"], flush=True)
    out["tables"] = tables
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


def _shift_detection(out: dict) -> None:
    """Per score, the AUROC of telling the shifted questions from the in-domain ones (the shifted set
    is nearly all wrong: the wrong-answer AUROC ranks few right answers there)."""
    shift = shift_auroc(out["sets"]["in_domain_test"]["rows"], out["sets"]["shifted"]["rows"])
    out["shift_detection"] = shift
    out["shift_table"] = "shift detection (AUROC, shifted vs in-domain): " + ", ".join(
        f"{k} {v:.3f}" for k, v in shift.items() if v is not None)


def _confidence(out: dict, n_boot: int) -> bool:
    """With a calibration set: each other set's answer confidence against the MLE's with temperature
    scaling fitted on the calibration questions (:func:`~tfb_core.evaluation.generation.confidence_calibration`)."""
    if "calibration" not in out["sets"]:
        return False
    cal = out["sets"]["calibration"]["rows"]
    lines = []
    for name, s in out["sets"].items():
        if name != "calibration":
            s["confidence"] = confidence_calibration(s["rows"], cal, n_boot, s["options"]["boot_seed"])
            lines += [f"{name}:", *format_confidence(s["confidence"])]
    out["confidence_table"] = "\n".join(lines)
    return True


def merge(paths: list[Path], out_path: Path, n_boot: int = 1000) -> dict:
    """One result of several runs' sets (the same adapter and sigma), tables in order."""
    runs = [json.loads(p.read_text()) for p in paths]
    out = runs[0]
    for run in runs[1:]:
        if run["adapter_sha256"] != out["adapter_sha256"] or run["search"]["sigma"] != out["search"]["sigma"]:
            raise SystemExit(f"cannot merge runs of different adapters or sigmas: {paths}")
        out["sets"].update(run["sets"])
        out["tables"] = out.get("tables", []) + run.get("tables", [])
        out["load_seconds"] = max(out["load_seconds"], run["load_seconds"])
    out["merged_from"] = [str(p) for p in paths]
    if {"in_domain_test", "shifted"} <= set(out["sets"]):
        _shift_detection(out)
    if _confidence(out, n_boot):
        out["tables"] = [t for t in out.get("tables", []) if not t.startswith("in_domain_test:")] + [out["confidence_table"]]
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    print("\n\n".join(out.get("tables", [])))
    return out


if __name__ == "__main__":
    main()
