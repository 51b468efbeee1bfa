"""Bayesian generation through the server: K concurrent /v1/completions requests (they join one
running decode, continuous batching) against the same K requests one after another, in generated
tokens per second, measured in one run on the in-process app (no network).

    python benchmarks/serve_generate.py                      # a tiny random Llama built in a temp dir
    python benchmarks/serve_generate.py --model M --adapter A --device cuda --dtype bfloat16

Every answer runs to ``--tokens`` tokens (no stop token). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again", "superb"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model"), ap.add_argument("--adapter")
    ap.add_argument("--device", default="cpu"), ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n-samples", type=int, default=10), ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--sigma", type=float, default=0.01), ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_app_support import make_settings, ready_client

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            tiny = {"model": args.model, "adapter": args.adapter, "root": Path(tmp)}
        else:
            from benchmarks.generate_core import _tiny

            model, adapter = _tiny(Path(tmp))
            tiny = {"model": model, "adapter": adapter, "root": Path(tmp)}
        kind = {"labels": None, "task": "generation"} if args.model else {}  # a real adapter: served as generative
        settings = make_settings(tiny, sigma=args.sigma, device=args.device, dtype=args.dtype, **kind,
                                 max_samples=max(args.n_samples, 16), max_batch_rows=max(64, args.n_samples),
                                 max_tokens=args.tokens, request_timeout_s=3600.0)
        body = {"max_tokens": args.tokens, "temperature": 0, "n_samples": args.n_samples, "stop_token_ids": []}
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
        with ready_client(settings) as client:
            def one(prompt: str) -> int:
                r = client.post("/v1/completions", json={**body, "prompt": prompt})
                assert r.status_code == 200, r.text
                return r.json()["usage"]["completion_tokens"]

            one(prompts[0])  # warm-up
            t0 = time.perf_counter()
            seq_tokens = sum(one(p) for p in prompts)
            t_seq = time.perf_counter() - t0
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
                con_tokens = sum(pool.map(one, prompts))
            t_con = time.perf_counter() - t0
    out = {"device": args.device, "dtype": args.dtype, "model": args.model or "tiny random Llama",
           "requests": len(prompts), "n_samples": args.n_samples, "sigma": args.sigma,
           "tokens_per_answer": args.tokens, "sequential_s": round(t_seq, 3), "concurrent_s": round(t_con, 3),
           "sequential_tok_per_s": round(seq_tokens / t_seq, 1), "concurrent_tok_per_s": round(con_tokens / t_con, 1),
           "speedup": round(t_seq / t_con, 2)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
