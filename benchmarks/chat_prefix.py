"""The chat template's head kept per posterior sample, against every chat prompt computed whole:
chat questions sent one at a time to the generative demo adapter (as a client sends them), the same
draw, timed in interleaved rounds; prints one JSON line with both times and the answers (equal).

    python benchmarks/chat_prefix.py            # SmolLM2-135M-Instruct + tfb_core/adapters/arith-mle
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [f"Calculate {a} + {b} =" for a, b in [(12, 30), (47, 38), (5, 91), (66, 7), (23, 45), (81, 19),
                                                     (34, 52), (9, 88)]]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default=str(ROOT / "tfb_core" / "adapters" / "arith-mle"))
    ap.add_argument("--sigma", type=float, default=0.015)
    ap.add_argument("-N", "--n-samples", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tfb_core.config import ModelConfig
    from tfb_core.data.generation import encode_prompt
    from tfb_core.data.loading import load_adapter, load_base_model
    from tfb_core.forward.completion import GenerationRequest
    from tfb_core.forward.generator import BayesianGenerator
    from tfb_core.serving.generation import chat_head

    tok, model = load_base_model(ModelConfig())
    gen = BayesianGenerator.from_peft(load_adapter(model, ModelConfig(adapter=args.adapter)), tok)
    prompts = [encode_prompt(tok, q, chat=True) for q in QUESTIONS]
    draw = gen.posteriors[0].draw(0, args.n_samples)
    head = chat_head(tok)

    def run() -> list[str]:
        return [gen.generate([GenerationRequest(p, n_samples=args.n_samples, sigma=args.sigma, max_tokens=8,
                                                noise=draw)])[0].completion.text for p in prompts]

    out: dict = {"head_tokens": len(head or []), "prompt_tokens": [len(p) for p in prompts], "whole_s": [],
                 "kept_s": []}
    for _ in range(args.rounds):
        for name, h in (("whole", None), ("kept", head)):
            gen.set_prefix(h)
            if h:
                run()  # a running server has the rows after its first chat request
            t = time.perf_counter()
            out[f"{name}_answers"] = run()
            out[f"{name}_s"].append(round(time.perf_counter() - t, 3))
    out["speedup"] = [round(w / k, 2) for w, k in zip(out["whole_s"], out["kept_s"], strict=True)]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
