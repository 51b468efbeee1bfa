"""Bayesian decoding speed, library only: N posterior samples as rows of one decode against the
reference way (one generation per sample, N after one another) and against plain peft greedy
decoding (N = 1), in generated tokens per second, all measured in one run.

    python benchmarks/generate_core.py                       # a tiny random Llama built in a temp dir
    python benchmarks/generate_core.py --model M --adapter A --device cuda --dtype bfloat16
    python benchmarks/generate_core.py --shape llama8b-shape --device cuda --dtype bfloat16  # random weights

``--shape`` (benchmarks/bench_models.py's shapes: smollm2, llama8b-shape) builds random weights on
the device with a random rank-8 LoRA on q, v and lm_head and random prompt token ids: one copy of
the model (plain peft is measured first, then the same model is Bayesianized in place), so the 8B
shape needs about 17 GB in bf16. Peak GPU memory of each way is reported.

Every answer runs to ``--tokens`` tokens (no stop token), so the three ways generate the same
number of tokens. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again", "superb"]


def _tiny(root: Path) -> tuple[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_lora, build_tiny_model
    from helpers.models import build_tokenizer

    tok = build_tokenizer(root / "model")
    build_tiny_model(root / "model", vocab_size=len(tok))
    build_lora(root / "model", root / "adapter")
    return str(root / "model"), str(root / "adapter")


def _timed(fn, repeats: int) -> tuple[float, float | None]:
    """(the best of ``repeats`` runs in seconds, peak GPU memory in GiB over them; None on a CPU)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), (round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)


def _random(args: argparse.Namespace) -> tuple[object, object, str, list[list[int]]]:
    """(peft model of random weights of ``args.shape`` with a random LoRA, a stub tokenizer, its name,
    random prompts of ``args.prompt_tokens`` ids)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_models import DTYPES, StubTokenizer, build_base, lora_config, randomize_lora
    from peft import get_peft_model

    base, _ = build_base(args.shape, DTYPES[args.dtype], args.device, weights="random")
    peft_model = get_peft_model(base, lora_config(8)).eval()
    randomize_lora(peft_model, 1)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (args.prompt_tokens,), generator=gen).tolist() for _ in range(args.prompts)]
    return peft_model, StubTokenizer(vocab), f"{args.shape} (random weights)", prompts


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model"), ap.add_argument("--adapter")
    ap.add_argument("--device", default="cpu"), ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n-samples", type=int, default=10), ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--sigma", type=float, default=0.01), ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), choices=range(1, len(PROMPTS) + 1))
    ap.add_argument("--shape", default=None, help="random weights of this shape (bench_models.SHAPES), not --model")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="with --shape: random prompt length")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tfb_core.forward.completion import GenerationRequest
    from tfb_core.forward.generator import BayesianGenerator

    if args.shape:
        peft_model, tok, model, prompts = _random(args)
    else:
        from tfb_core.config import ModelConfig
        from tfb_core.data.loading import load_adapter, load_base_model

        with tempfile.TemporaryDirectory() as tmp:
            model, adapter = (args.model, args.adapter) if args.model else _tiny(Path(tmp))
            cfg = ModelConfig(model=model, adapter=adapter, device=args.device, dtype=args.dtype)
            tok, base = load_base_model(cfg)
            peft_model = load_adapter(base, cfg)
        prompts = [tok(p)["input_ids"] for p in PROMPTS[:args.prompts]]
    n, L = args.n_samples, args.tokens
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def plain():  # peft greedy, N = 1, one prompt at a time
        with torch.no_grad():
            for t in prompts:
                ids = torch.tensor([t], device=args.device)
                peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=L, min_new_tokens=L, pad_token_id=pad)

    plain()  # warm-up
    t_plain, peak_plain = _timed(plain, args.repeats)
    gen = BayesianGenerator.from_peft(peft_model, tok)  # in place: the same weights, now Bayesian
    draws = [gen.posteriors[0].draw(i, n) for i in range(len(prompts))]

    def batched():  # every prompt's N samples: rows of one decode
        gen.generate([GenerationRequest(t, n_samples=n, sigma=args.sigma, max_tokens=L, stop_token_ids=(),
                                        noise=d) for t, d in zip(prompts, draws, strict=True)])

    def sequential():  # the reference: one generation per prompt and sample, one row each
        from tfb_core.bayes.posterior import NoiseDraw

        for t, d in zip(prompts, draws, strict=True):
            for s in range(n):
                one = NoiseDraw(seed=d.seed, z=[z[s:s + 1] for z in d.z])
                gen.generate([GenerationRequest(t, n_samples=1, sigma=args.sigma, max_tokens=L, stop_token_ids=(),
                                                noise=one)])

    batched(), sequential()  # warm-up
    (t_batched, peak_batched), (t_seq, peak_seq) = (_timed(f, args.repeats) for f in (batched, sequential))
    tokens = len(prompts) * L  # answers' tokens (each from N samples)
    out = {"device": args.device, "dtype": args.dtype, "model": model,
           "prompts": len(prompts), "prompt_tokens": [len(t) for t in prompts], "n_samples": n, "tokens_per_answer": L,
           "batched_s": round(t_batched, 4), "sequential_s": round(t_seq, 4), "plain_peft_s": round(t_plain, 4),
           "batched_answer_tok_per_s": round(tokens / t_batched, 1),
           "sequential_answer_tok_per_s": round(tokens / t_seq, 1),
           "plain_tok_per_s": round(tokens / t_plain, 1),
           "speedup_vs_sequential": round(t_seq / t_batched, 2), "overhead_vs_plain": round(t_batched / t_plain, 2),
           "peak_gib": {"plain": peak_plain, "batched": peak_batched, "sequential": peak_seq}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
