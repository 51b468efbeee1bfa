"""tfb-serve benchmarks: the batched N-sample forward against the obvious alternatives, and more.

    python benchmarks/bench.py --model tiny --out benchmarks/results/tiny-cpu.json
    python benchmarks/bench.py --model smollm2 --grid cpu --out benchmarks/results/smollm2-cpu.json
    PYTHONPATH=. python3 benchmarks/bench.py --model llama8b-shape --dtype bfloat16 --device cuda --out ...

Sections (``--sections``, default all that apply):
  equiv    all methods give the same per-sample probabilities (same posterior samples)
  peak     measured matmul peak of this device and dtype (one large square matmul)
  forward  per (B prompts, L tokens, N samples), interleaved rounds, median seconds of
             ref_full  (a) N sequential peft forwards, lora_A perturbed in place, full logits
             ref_last  (b) the same with logits_to_keep=1
             mixed     (c) peft mixed batch: N noisy adapters, one forward, adapter_names per row
             ours      tfb-serve: one forward of N*B rows (run_jobs; only last position, class rows)
           and the achieved FLOP/s of ours as a fraction of the matmul peak
  overhead N = 1 against the plain peft LoRA forward (logits_to_keep=1, and full logits)
  memory   peak memory of ours at N against the plain peft forward on N*B rows (CPU: RSS of a
           subprocess per configuration; CUDA: max_memory_allocated)
  profile  torch.profiler top ops of ours
  search   sigma search, bisection against the grid variant, on a 100-example anchor set
  server   the HTTP app under concurrent load, coalescing on and off (needs the app's deps)

FLOPs of one forward of R rows x T tokens (multiply-add = 2 FLOPs; norms, rotary, softmax ignored):
    2 * R * T * (P_dec + P_lora)              P_dec: every nn.Linear in the decoder layers,
                                              P_lora: r * (in + out) per LoRA module off lm_head
  + 4 * R * T^2 * H * L                       attention scores and values, full square (as an
                                              explicit-mask SDPA computes it; causal would be half)
  + 2 * R * K * (V_h * H + r * (H + V_h))     lm_head at K kept positions over V_h vocabulary rows:
                                              ours K = 1, V_h = C (class tokens); ref_last, mixed,
                                              plain K = 1, V_h = V; ref_full K = T, V_h = V
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from bench_models import DTYPES, Harness  # noqa: E402

from tfb_core.forward.planning import MIN_SHARED_PREFIX  # noqa: E402

GRIDS: dict[str, list[tuple[int, int, tuple[int, ...]]]] = {  # (B prompts, L tokens, Ns)
    "full": [(b, L, (1, 4, 10, 32)) for b in (1, 8) for L in (64, 256)],
    # CPU, a 135M model, 2 shared cores: what fits in ~10-15 minutes (see RESULTS.md)
    "cpu": [(1, 64, (1, 4, 10, 32)), (8, 64, (1, 10)), (1, 256, (1, 10))],
    "quick": [(1, 16, (1, 4)), (2, 16, (1, 4))],
    # with --shared-prefix: the batches of several prompts (with one prompt nothing is shared)
    "cpu-prefix": [(8, 64, (1, 10))],
    "b8": [(8, L, (1, 4, 10, 32)) for L in (64, 256)],  # the batches of 8 prompts of the full grid
}
METHODS = ("ref_full", "ref_last", "mixed", "ours")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- FLOPs ------------------------------------------------------------------------------------
def forward_flops(c: dict[str, int], rows: int, T: int, method: str, n_classes: int = 2) -> float:
    """FLOPs of one forward (see the module docstring); ``rows`` = R, all rows T tokens."""
    H, L, V, r = c["hidden"], c["layers"], c["vocab"], c["rank"]
    body = 2.0 * rows * T * (c["decoder_linear"] + c["lora_body"]) + 4.0 * rows * T * T * H * L
    vh = n_classes if method == "ours" else V
    k = T if method == "ref_full" else 1
    head = 2.0 * rows * k * (vh * H + c["head_lora"] * r * (H + vh))
    return body + head


# --- sections ---------------------------------------------------------------------------------
def matmul_peak(device: str, dtype: torch.dtype, seconds: float = 3.0) -> dict[str, Any]:
    """Best FLOP/s of a large square matmul in ``dtype`` on ``device``."""
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    reps = 10 if device.startswith("cuda") else 1
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, reps * 2.0 * n ** 3 / (time.perf_counter() - t0))
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "flops": best, "tflops": best / 1e12}


SHARED_PREFIX = 0  # --shared-prefix: leading tokens common to every prompt of a batch (a task's instruction)


def make_ids(h: Harness, B: int, T: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000 * B + T)
    ids = torch.randint(10, h.config.vocab_size, (B, T), generator=gen)  # (B, T)
    p = min(SHARED_PREFIX, T - 1)
    if p > 0:
        ids[:, :p] = ids[0, :p].clone()
    return ids.to(h.device)


def equivalence(h: Harness) -> dict[str, Any]:
    """Max |difference| of per-sample probabilities between ours and each baseline (same samples)."""
    B, T, N = 2, 16, 3
    ids = make_ids(h, B, T, seed=7)
    draw = h.draw(N, seed=0)  # seed 0: the samples the mixed adapters hold (the first N of any draw of seed 0)
    if h.n_mixed < N:
        h.add_mixed_adapters(draw)
    ours = h.run_ours(ids.tolist(), N, draw)  # (B, N, C)

    def bn(x: torch.Tensor) -> torch.Tensor:  # (N*B, C) sample-major -> (B, N, C)
        return x.view(N, B, -1).transpose(0, 1)

    out = {"ref_full": bn(h.run_ref(ids, N, keep_last=False, draw=draw)),
           "ref_last": bn(h.run_ref(ids, N, keep_last=True, draw=draw))}
    out["mixed"] = bn(h.run_mixed(ids, N))
    plain = h.run_plain(ids)
    mean = h.run_ours(ids.tolist(), 1, None, sigma=0.0)[:, 0]
    res = {k: float((ours - v).abs().max()) for k, v in out.items()}
    res["plain_vs_ours_sigma0"] = float((plain - mean).abs().max())
    res["noise_effect"] = float((ours - mean[:, None]).abs().max())  # > 0: the samples differ
    return res


def timed_rounds(fns: dict[str, Callable[[], Any]], rounds: int, device: str) -> dict[str, list[float]]:
    """Run every fn once per round, interleaved, so load changes hit all methods alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def summarize_times(ts: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "rounds": len(ts)}


def forward_section(h: Harness, grid: list[tuple[int, int, tuple[int, ...]]], rounds: int, peak: float | None,
                    deadline: float, skip: set[str], results: dict[str, Any]) -> None:
    counts = h.counts()
    n_max = max(n for _, _, ns in grid for n in ns)
    draw = h.draw(n_max, seed=0)  # cached per seed, as the engine does
    if "mixed" not in skip:
        t0 = time.perf_counter()
        h.add_mixed_adapters(draw)
        results["meta"]["mixed_adapters_load_s"] = time.perf_counter() - t0
    warm_ids = make_ids(h, 1, 8)
    timed_rounds(_fns(h, warm_ids, 2, draw, skip), 1, h.device)  # warm-up of every code path
    for B, T, ns in grid:
        ids = make_ids(h, B, T)
        for N in ns:
            cfg = {"B": B, "L": T, "N": N, "rows": N * B}
            if time.perf_counter() > deadline:
                results["forward"].append({**cfg, "skipped": "time budget"})
                log(f"forward B={B} L={T} N={N}: skipped (time budget)")
                continue
            try:
                times = timed_rounds(_fns(h, ids, N, draw, skip), rounds, h.device)
            except Exception as exc:  # one failing configuration must not end the run
                _record_error(results, f"forward B={B} L={T} N={N}", exc, h.device)
                results["forward"].append({**cfg, "error": repr(exc)[:300]})
                continue
            row: dict[str, Any] = {**cfg, **{k: summarize_times(v) for k, v in times.items()}}
            ours = row["ours"]["median_s"]
            if "ours_planned" in times:
                row["planned_forwards"] = len(_plan(h, ids.tolist(), N))
                for k in METHODS[:3]:  # per round, median over rounds, as below
                    if k in times:
                        row[f"ours_planned_speedup_vs_{k}_paired"] = statistics.median(
                            a / b for a, b in zip(times[k], times["ours_planned"], strict=True))
            for k in (*METHODS[:3], "ours_rowwise"):
                if k in row:
                    row[f"speedup_vs_{k}"] = row[k]["median_s"] / ours
                    # ratio per round (same load), median over rounds
                    row[f"speedup_vs_{k}_paired"] = statistics.median(
                        a / b for a, b in zip(times[k], times["ours"], strict=True))
            fl = forward_flops(counts, N * B, T, "ours")
            p = min(SHARED_PREFIX, T - 1)
            if p >= MIN_SHARED_PREFIX and B > 1:  # ours runs the prefix on N rows, the rest on N*B rows
                c = counts
                fl -= 2.0 * (N * B - N) * p * (c["decoder_linear"] + c["lora_body"])
                fl -= 4.0 * (N * B - N) * p * p * c["hidden"] * c["layers"]
            row["ours_flops"] = fl
            row["ours_flops_per_s"] = fl / ours
            if peak:
                row["ours_frac_of_peak"] = fl / ours / peak
            results["forward"].append(row)
            timings = "  ".join(f"{k}={row[k]['median_s'] * 1e3:.1f}ms" for k in (*METHODS, "ours_rowwise", "ours_planned")
                                if k in row)
            log(f"forward B={B} L={T} N={N}: {timings}")


def _plan(h: Harness, tokens: list[list[int]], N: int) -> list[list[int]]:
    """What the engine and the server run: the same rows in forwards planned by length and token cap."""
    return h.clf.plan(tokens, [N] * len(tokens), max_rows=N * len(tokens))


def _fns(h: Harness, ids: torch.Tensor, N: int, draw: Any, skip: set[str]) -> dict[str, Callable[[], Any]]:
    tokens = ids.tolist()
    fns = {"ref_full": lambda: h.run_ref(ids, N, keep_last=False),
           "ref_last": lambda: h.run_ref(ids, N, keep_last=True),
           "mixed": lambda: h.run_mixed(ids, N),
           "ours": lambda: h.run_ours(tokens, N, draw)}
    if len(tokens) > 1 and N > 1:  # with B = 1 (or N = 1) both noise layouts are the same
        fns["ours_rowwise"] = lambda: h.run_ours_rowwise(tokens, N, draw)
    plan = _plan(h, tokens, N)
    if len(plan) > 1:
        fns["ours_planned"] = lambda: [h.run_ours([tokens[i] for i in c], N, draw) for c in plan]
    return {k: v for k, v in fns.items() if k not in skip}


def overhead_section(h: Harness, grid: list[tuple[int, int, tuple[int, ...]]], rounds: int, deadline: float,
                     results: dict[str, Any]) -> None:
    draw = h.draw(1, seed=0)
    for B, T in sorted({(b, t) for b, t, _ in grid}):
        if time.perf_counter() > deadline:
            results["overhead"].append({"B": B, "L": T, "skipped": "time budget"})
            continue
        ids = make_ids(h, B, T)
        tokens = ids.tolist()
        fns = {"plain_last": lambda ids=ids: h.run_plain(ids, keep_last=True),
               "ours_n1": lambda tokens=tokens: h.run_ours(tokens, 1, draw),
               "ours_sigma0": lambda tokens=tokens: h.run_ours(tokens, 1, None, sigma=0.0),
               "plain_full": lambda ids=ids: h.run_plain(ids, keep_last=False)}
        try:
            timed_rounds(fns, 1, h.device)
            times = timed_rounds(fns, rounds, h.device)
        except Exception as exc:
            _record_error(results, f"overhead B={B} L={T}", exc, h.device)
            continue
        row: dict[str, Any] = {"B": B, "L": T, **{k: summarize_times(v) for k, v in times.items()}}
        for k in ("ours_n1", "ours_sigma0"):
            row[f"{k}_over_plain_last"] = row[k]["median_s"] / row["plain_last"]["median_s"]
            row[f"{k}_over_plain_last_paired"] = statistics.median(
                a / b for a, b in zip(times[k], times["plain_last"], strict=True))
        results["overhead"].append(row)
        log(f"overhead B={B} L={T}: ours N=1 / plain = {row['ours_n1_over_plain_last_paired']:.3f} "
            f"(sigma=0: {row['ours_sigma0_over_plain_last_paired']:.3f})")


# --- memory -------------------------------------------------------------------------------------
def memory_configs(grid: list[tuple[int, int, tuple[int, ...]]], quick: bool,
                   device: str) -> list[tuple[int, int, int, tuple[str, ...]]]:
    """(B, L, N, kinds): 'plain' on N*B rows, 'ours', and at N = 32 the pre-change row-wise noise."""
    if quick:
        B, T = 2, 16
    else:
        B, T = (2, 64) if device == "cpu" else (8, 256)
    ns = sorted({n for _, _, nn in grid for n in nn} | {32})
    if device == "cpu" and not quick:
        ns = [n for n in ns if n in (1, 10, 32)]
    return [(B, T, n, ("plain", "ours", "ours_rowwise") if n == 32 else ("plain", "ours")) for n in ns]


def memory_one(h: Harness, kind: str, B: int, T: int, N: int) -> dict[str, Any]:
    """Run one configuration (kind 'ours' / 'ours_rowwise': N samples of B prompts; 'plain': N*B rows, no noise)."""
    if kind in ("ours", "ours_rowwise"):
        draw = h.draw(N, seed=0)
        ids = make_ids(h, B, T)
        run = h.run_ours if kind == "ours" else h.run_ours_rowwise
        return {"fn": lambda: run(ids.tolist(), N, draw), "noise_bytes": draw.nbytes()}
    ids = make_ids(h, B, T).repeat(N, 1)  # the same N*B rows, plain peft, logits_to_keep=1
    return {"fn": lambda: h.run_plain(ids, keep_last=True), "noise_bytes": 0}


def memory_cuda(h: Harness, configs: list[tuple[int, int, int]], deadline: float, results: dict[str, Any]) -> None:
    for B, T, N, kinds in configs:
        for kind in kinds:
            if time.perf_counter() > deadline:
                results["memory"].append({"kind": kind, "B": B, "L": T, "N": N, "skipped": "time budget"})
                continue
            try:
                spec = memory_one(h, kind, B, T, N)
                spec["fn"]()  # warm (workspaces, caches)
                gc.collect()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                spec["fn"]()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
                results["memory"].append({"kind": kind, "B": B, "L": T, "N": N, "rows": N * B, "base_bytes": base,
                                          "peak_bytes": peak, "extra_bytes": peak - base,
                                          "noise_bytes": spec["noise_bytes"], "measure": "cuda max_memory_allocated"})
            except Exception as exc:
                _record_error(results, f"memory {kind} B={B} L={T} N={N}", exc, h.device)
    _memory_ratios(results)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args: argparse.Namespace) -> None:
    """Subprocess: build the model, run one configuration, print peak RSS above the loaded model."""
    import ctypes
    import threading

    spec_in = json.loads(args.mem_child)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    h = Harness(args.model, args.dtype, args.device, rank=args.rank, sigma=args.sigma, weights=args.weights)
    spec = memory_one(h, spec_in["kind"], spec_in["B"], spec_in["L"], spec_in["N"])
    small = memory_one(h, spec_in["kind"], 1, 8, 1)
    small["fn"]()  # initialise the libraries' lazy state
    with torch.no_grad():  # page in every weight (safetensors maps them lazily; ours reads 2 rows of lm_head)
        for t in [*h.peft_model.parameters(), *h.peft_model.buffers()]:
            t.sum()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    spec["fn"]()
    stop.set()
    t.join()
    peak[0] = max(peak[0], _rss())
    print("MEMJSON " + json.dumps({**spec_in, "rows": spec_in["N"] * spec_in["B"], "base_bytes": base,
                                   "peak_bytes": peak[0], "extra_bytes": peak[0] - base,
                                   "noise_bytes": spec["noise_bytes"], "measure": "RSS of a subprocess"}), flush=True)


def memory_cpu(args: argparse.Namespace, configs: list[tuple[int, int, int]], deadline: float,
               results: dict[str, Any]) -> None:
    for B, T, N, kinds in configs:
        for kind in kinds:
            spec = {"kind": kind, "B": B, "L": T, "N": N}
            if time.perf_counter() > deadline:
                results["memory"].append({**spec, "skipped": "time budget"})
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--dtype", args.dtype,
                   "--device", args.device, "--rank", str(args.rank), "--sigma", str(args.sigma),
                   "--weights", args.weights, "--mem-child", json.dumps(spec)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            # a fixed mmap threshold: glibc then maps every tensor above 128 KiB on its own and unmaps it
            # when freed, so RSS follows live memory instead of the heap's high-water mark
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                      timeout=min(1800.0, max(30.0, deadline - time.perf_counter())))
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMJSON ")]
                if proc.returncode != 0 or not line:
                    raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-500:]}")
                row = json.loads(line[-1][len("MEMJSON "):])
                results["memory"].append(row)
                log(f"memory {kind} B={B} L={T} N={N}: peak {row['peak_bytes'] / 2**20:.0f} MiB, "
                    f"+{row['extra_bytes'] / 2**20:.0f} MiB over the loaded model")
            except Exception as exc:
                _record_error(results, f"memory {kind} B={B} L={T} N={N}", exc, args.device)
    _memory_ratios(results)


def _memory_ratios(results: dict[str, Any]) -> None:
    rows = [r for r in results["memory"] if "peak_bytes" in r]
    for r in rows:
        if r["kind"] == "plain":
            continue
        plain = [p for p in rows if p["kind"] == "plain" and (p["B"], p["L"], p["N"]) == (r["B"], r["L"], r["N"])]
        if plain:
            r["peak_over_plain"] = r["peak_bytes"] / plain[0]["peak_bytes"]
            r["extra_over_plain_extra"] = r["extra_bytes"] / max(plain[0]["extra_bytes"], 1)


# --- profile ------------------------------------------------------------------------------------
def profile_section(h: Harness, B: int, T: int, N: int, results: dict[str, Any], top: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    draw = h.draw(N, seed=0)
    tokens = make_ids(h, B, T).tolist()
    h.run_ours(tokens, N, draw)
    cuda = h.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        h.run_ours(tokens, N, draw)
        sync(h.device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    results["profile"] = {
        "B": B, "L": T, "N": N, "by": key,
        "total_ms": total / 1e3,
        "top": [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
                for e in events[:top]],
    }
    log("profile top ops: " + ", ".join(f"{t['op']} {100 * t['share']:.0f}%" for t in results["profile"]["top"][:6]))


# --- sigma search -------------------------------------------------------------------------------
SYNTH_WORDS = ("a", "the", "film", "movie", "plot", "cast", "great", "dull", "wonderful", "tedious", "superb",
               "thin", "gripping", "mess", "acting", "story", "slow", "funny", "moving", "flat", "clever", "bland")


def anchor_sentences(n: int = 100) -> tuple[list[str], str]:
    path = ROOT / "tfb_core" / "adapters" / "sst2-mle" / "anchor.jsonl"
    from tfb_core.data.tasks import get_task

    task = get_task("sst2")
    if path.is_file():
        recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()][:n]
        return [task.format(r) for r in recs], str(path.relative_to(ROOT))
    gen = torch.Generator().manual_seed(42)
    out = []
    for _ in range(n):
        k = int(torch.randint(6, 18, (1,), generator=gen))
        words = [SYNTH_WORDS[int(i)] for i in torch.randint(0, len(SYNTH_WORDS), (k,), generator=gen)]
        out.append(task.format({"sentence": " ".join(words)}))
    return out, "synthetic SST-2-style sentences (seed 42)"


def search_section(h: Harness, max_rows: int, quick: bool, results: dict[str, Any]) -> None:
    from tfb_core.config import SearchConfig
    from tfb_core.search.classifier import search_sigma

    prompts, source = anchor_sentences(20 if quick else 100)
    h.use_tfb()
    calls = {"forwards": 0, "rows": 0}
    orig = h.clf.run_jobs

    def counting(jobs: Any, *a: Any, **kw: Any) -> Any:
        calls["forwards"] += 1
        calls["rows"] += sum(j.n_samples for j in jobs)
        return orig(jobs, *a, **kw)

    h.clf.run_jobs = counting  # type: ignore[method-assign]
    out: dict[str, Any] = {"anchor": source, "n_anchor": len(prompts), "max_rows": max_rows, "runs": []}
    try:
        for method in ("bisect", "grid"):
            cfg = SearchConfig(method=method, criterion="nll", tolerance=0.3, n_samples=10, seed=0,
                               iters=3 if quick else 7)
            calls.update(forwards=0, rows=0)
            t0 = time.perf_counter()
            res = search_sigma(h.clf, prompts, cfg, progress=False, max_rows=max_rows)
            sec = time.perf_counter() - t0
            out["runs"].append({"method": method, "seconds": sec, "search_seconds": res.seconds,
                                "sigma": res.sigma, "value": res.value, "evaluations": res.n_evaluations,
                                "forwards": calls["forwards"], "rows": calls["rows"], "satisfied": res.satisfied})
            log(f"search {method}: sigma={res.sigma:.5g} in {sec:.2f}s, {res.n_evaluations} evaluations, "
                f"{calls['forwards']} forwards")
    finally:
        del h.clf.run_jobs
    results["search"] = out


# --- driver -------------------------------------------------------------------------------------
def _record_error(results: dict[str, Any], where: str, exc: BaseException, device: str) -> None:
    log(f"ERROR in {where}: {exc!r}")
    results["errors"].append({"where": where, "error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]})
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()


def save(results: dict[str, Any], out: Path | None) -> None:
    """Write the results so far (atomically): a run killed later still leaves what it measured."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    deadline = start + args.budget_s
    if args.threads is None and args.device == "cpu":
        # on cores shared with other jobs, intra-op threads spin at every barrier: measured 10x slower
        # with 2 threads than with 1 on this project's 2-core machine (see RESULTS.md)
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    global SHARED_PREFIX
    SHARED_PREFIX = args.shared_prefix
    grid_name = args.grid or ("quick" if args.quick else ("full" if args.model == "tiny" or args.device != "cpu"
                                                          else "cpu"))
    grid = GRIDS[grid_name]
    rounds = args.rounds or (1 if args.quick else 5 if args.model == "tiny" else 3 if args.device != "cpu" else 2)
    sections = set(args.sections.split(",")) if args.sections else {
        "equiv", "peak", "forward", "overhead", "memory", "profile", "search", "server"}
    skip = set(args.skip_methods.split(",")) if args.skip_methods else set()
    results: dict[str, Any] = {"meta": {}, "equivalence": {}, "matmul_peak": None, "forward": [], "overhead": [],
                               "memory": [], "profile": None, "search": None, "server": None, "errors": []}
    meta = results["meta"]
    meta.update({"model": args.model, "dtype": args.dtype, "device": args.device, "grid": grid_name,
                 "grid_points": [list(g[:2]) + [list(g[2])] for g in grid], "rounds": rounds,
                 "sigma": args.sigma, "rank": args.rank, "shared_prefix": args.shared_prefix,
                 "torch": torch.__version__, "python": platform.python_version(),
                 "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg_start": load_avg(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]})
    try:
        import peft
        import transformers

        meta.update(transformers=transformers.__version__, peft=peft.__version__)
    except Exception:  # noqa: BLE001
        pass
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    log(f"model {args.model} ({args.dtype} on {args.device}), grid {grid_name}, {rounds} rounds, sections "
        f"{sorted(sections)}")
    h = None
    try:
        t0 = time.perf_counter()
        h = Harness(args.model, args.dtype, args.device, rank=args.rank, sigma=args.sigma, weights=args.weights)
        meta.update(build_s=time.perf_counter() - t0, weights=h.weights, counts=h.counts(),
                    lora_modules=len(h.clf.posterior.modules), attn_implementation=h.config._attn_implementation)
        log(f"built in {meta['build_s']:.1f}s ({h.weights}), {len(h.clf.posterior.modules)} LoRA modules")
    except Exception as exc:
        _record_error(results, "build", exc, args.device)
    peak = None

    def measure_peak() -> float | None:
        """Best of this and earlier measures: on shared cores the peak moves with the load."""
        try:
            m = matmul_peak(args.device, DTYPES[args.dtype])
        except Exception as exc:
            _record_error(results, "peak", exc, args.device)
            return None
        prev = results["matmul_peak"]
        samples = (prev["samples_tflops"] if prev else []) + [m["tflops"]]
        if prev is None or m["flops"] > prev["flops"]:
            results["matmul_peak"] = m
        results["matmul_peak"]["samples_tflops"] = samples
        log(f"matmul peak {m['tflops'] * 1e3:.1f} GFLOP/s ({args.dtype}); best so far "
            f"{results['matmul_peak']['tflops'] * 1e3:.1f}")
        return results["matmul_peak"]["flops"]

    if "peak" in sections:
        peak = measure_peak()
    if h is not None:
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("forward", lambda: forward_section(h, grid, rounds, peak, deadline, skip, results)),
            ("equiv", lambda: results["equivalence"].update(equivalence(h))),
            ("overhead", lambda: overhead_section(h, grid, 2 * rounds, deadline, results)),
            ("profile", lambda: profile_section(h, *args.profile_at, results)),
            ("search", lambda: search_section(h, args.search_rows or (256 if args.device != "cpu" else 64),
                                              args.quick, results)),
        ]
        if args.profile_at is None:
            b, t, ns = grid[-1] if args.device != "cpu" else grid[0]
            args.profile_at = (b, t, 10 if 10 in ns else ns[-1])
        for name, fn in steps:
            if name in sections:
                try:
                    log(f"section {name}")
                    fn()
                except Exception as exc:
                    _record_error(results, name, exc, args.device)
                if name == "forward" and "peak" in sections:  # again, under the load the forwards saw
                    peak = measure_peak()
                    for row in results["forward"]:
                        if peak and "ours_flops_per_s" in row:
                            row["ours_frac_of_peak"] = row["ours_flops_per_s"] / peak
                save(results, args.out)
        if "memory" in sections:
            try:
                log("section memory")
                configs = memory_configs(grid, args.quick, args.device)
                if args.device.startswith("cuda"):
                    memory_cuda(h, configs, deadline, results)
            except Exception as exc:
                _record_error(results, "memory", exc, args.device)
    if h is not None and args.device == "cpu" and "memory" in sections:
        del h
        gc.collect()
        try:
            memory_cpu(args, memory_configs(grid, args.quick, args.device), deadline, results)
        except Exception as exc:
            _record_error(results, "memory", exc, args.device)
    if "server" in sections:
        try:
            log("section server")
            from loadgen import server_section

            settings = tuple(x.strip() for x in args.server_settings.split(";")) if args.server_settings else None
            results["server"] = server_section(quick=args.quick, clients=args.clients, log=log,
                                               shape=args.server_model, device=args.device, dtype=args.dtype,
                                               seconds=args.server_seconds, **({"settings": settings} if settings else {}))
        except ModuleNotFoundError as exc:  # the GPU machine lacks the app's dependencies
            results["server"] = {"skipped": f"missing module: {exc.name}"}
            log(f"server skipped: {exc}")
        except Exception as exc:
            _record_error(results, "server", exc, args.device)
    meta["loadavg_end"] = load_avg()
    meta["total_s"] = time.perf_counter() - start
    return results


# --- report -------------------------------------------------------------------------------------
def _ms(x: dict[str, Any] | None) -> str:
    return f"{x['median_s'] * 1e3:.1f}" if x else "-"


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    out = [f"### {m['model']} ({m.get('weights', '?')}), {m['dtype']} on {m['device']}"
           f"{' (' + m['gpu'] + ')' if m.get('gpu') else ''}, torch {m['torch']}, {m.get('threads')} threads, "
           f"load {m.get('loadavg_start')} -> {m.get('loadavg_end')}"
           f"{', first ' + str(m['shared_prefix']) + ' tokens shared by the prompts' if m.get('shared_prefix') else ''}",
           ""]
    if res.get("equivalence"):
        out += ["Equivalence (max |Δp| against ours, same posterior samples): " +
                ", ".join(f"{k} {v:.1e}" for k, v in res["equivalence"].items()), ""]
    pk = res.get("matmul_peak")
    if pk:
        out += [f"Matmul peak ({pk['n']}² {pk['dtype']}, best of {len(pk.get('samples_tflops', [1]))} measures): "
                f"{pk['tflops'] * 1e3:.1f} GFLOP/s", ""]
    fw = [r for r in res.get("forward", []) if "ours" in r]
    if fw:
        out += ["| B | L | N | (a) ref full ms | (b) ref last ms | (c) peft mixed ms | ours ms | ×(a) | ×(b) | ×(c) "
                "| ours GFLOP/s | of peak | ours, row-wise noise ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in fw:
            def sp(k: str, r: dict[str, Any] = r) -> str:
                v = r.get(f"speedup_vs_{k}_paired")
                return f"{v:.2f}" if v else "-"
            frac = r.get("ours_frac_of_peak")
            out.append(f"| {r['B']} | {r['L']} | {r['N']} | {_ms(r.get('ref_full'))} | {_ms(r.get('ref_last'))} | "
                       f"{_ms(r.get('mixed'))} | {_ms(r['ours'])} | {sp('ref_full')} | {sp('ref_last')} | "
                       f"{sp('mixed')} | {r['ours_flops_per_s'] / 1e9:.1f} | "
                       f"{'-' if frac is None else f'{100 * frac:.1f}%'} | {_ms(r.get('ours_rowwise'))} |")
        planned = [r for r in fw if "ours_planned" in r]
        if planned:
            out.append("\nOurs in planned forwards (as the engine and server run it): " + "; ".join(
                f"B={r['B']} L={r['L']} N={r['N']}: {_ms(r['ours_planned'])} ms in {r['planned_forwards']} forwards, "
                + ", ".join(f"×{m} {r[f'ours_planned_speedup_vs_{k}_paired']:.2f}"
                            for k, m in (("ref_full", "(a)"), ("ref_last", "(b)"), ("mixed", "(c)"))
                            if f"ours_planned_speedup_vs_{k}_paired" in r) for r in planned))
        skipped = [r for r in res["forward"] if "ours" not in r]
        if skipped:
            out.append("Not run: " + ", ".join(f"B={r['B']} L={r['L']} N={r['N']} ({r.get('skipped') or 'error'})"
                                               for r in skipped))
        out.append("")
    if res.get("overhead"):
        out += ["| B | L | plain peft (last) ms | ours N=1 ms | ours σ=0 ms | plain peft (full logits) ms "
                "| N=1 / plain | σ=0 / plain |", "|---|---|---|---|---|---|---|---|"]
        for r in res["overhead"]:
            if "plain_last" not in r:
                continue
            out.append(f"| {r['B']} | {r['L']} | {_ms(r['plain_last'])} | {_ms(r['ours_n1'])} | "
                       f"{_ms(r['ours_sigma0'])} | {_ms(r['plain_full'])} | {r['ours_n1_over_plain_last_paired']:.3f} | "
                       f"{r['ours_sigma0_over_plain_last_paired']:.3f} |")
        out.append("")
    mem = [r for r in res.get("memory", []) if "peak_bytes" in r]
    if mem:
        out += [f"Peak memory ({mem[0]['measure']}; plain = peft LoRA forward, logits_to_keep=1, on N×B rows):", "",
                "| B | L | N | run | plain peak MiB | peak MiB | / plain | plain extra MiB | extra MiB "
                "| noise draw MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in mem:
            if r["kind"] == "plain":
                continue
            p = [q for q in mem if q["kind"] == "plain" and (q["B"], q["L"], q["N"]) == (r["B"], r["L"], r["N"])]
            pp = p[0] if p else None
            mib = 2 ** 20
            out.append(f"| {r['B']} | {r['L']} | {r['N']} | {r['kind']} | "
                       f"{pp['peak_bytes'] / mib if pp else float('nan'):.0f} | "
                       f"{r['peak_bytes'] / mib:.0f} | {r.get('peak_over_plain', float('nan')):.3f} | "
                       f"{pp['extra_bytes'] / mib if pp else float('nan'):.1f} | {r['extra_bytes'] / mib:.1f} | "
                       f"{r['noise_bytes'] / mib:.2f} |")
        out.append("")
    pr = res.get("profile")
    if pr:
        out += [f"Profile of ours (B={pr['B']}, L={pr['L']}, N={pr['N']}, {pr['by']}, total {pr['total_ms']:.1f} ms):",
                "", "| op | self ms | share | calls |", "|---|---|---|---|"]
        out += [f"| {t['op']} | {t['self_ms']:.1f} | {100 * t['share']:.1f}% | {t['calls']} |" for t in pr["top"]]
        out.append("")
    se = res.get("search")
    if se:
        out += [f"σ search ({se['anchor']}, {se['n_anchor']} anchors, N=10, {se['max_rows']} rows per forward):", "",
                "| method | seconds | evaluations | forwards | rows | σ |", "|---|---|---|---|---|---|"]
        out += [f"| {r['method']} | {r['seconds']:.2f} | {r['evaluations']} | {r['forwards']} | {r['rows']} | "
                f"{r['sigma']:.5g} |" for r in se["runs"]]
        out.append("")
    sv = res.get("server")
    if sv and "runs" in sv:
        out += [f"Server under load ({sv['model']}, {sv['clients']} clients, {sv['inputs_per_request']} input(s) and "
                f"N={sv['n_samples']} per request):", "",
                "| batching | requests | errors | seconds | req/s | p50 ms | p99 ms | max ms | in the app p50 / p99 ms "
                "| forwards | inputs / forward | forward share of wall | mean queue wait ms |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['name']} | {r['requests']} | {r['errors']} | {r['seconds']:.1f} | {r['rps']:.1f} | "
                f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
                f"{r.get('app_p50_ms', float('nan')):.1f} / {r.get('app_p99_ms', float('nan')):.1f} | "
                f"{r.get('forwards', '-')} | "
                f"{r.get('inputs_per_forward', float('nan')):.1f} | {100 * r.get('forward_share', float('nan')):.0f}% | "
                f"{r.get('mean_queue_wait_ms', float('nan')):.1f} |" for r in sv["runs"]]
        slow = [f"{r['name']}: " + ", ".join(f"{x['ms']:.0f} ms (sent at {x['sent_s']:.1f} s)" for x in r["slowest"][:3])
                for r in sv["runs"] if r.get("slowest")]
        if slow:
            out.append("\nSlowest requests: " + "; ".join(slow) + ".")
        if "coalescing_speedup" in sv:
            also = (f", {sv['coalescing_speedup_20ms']:.2f}× (20 ms)" if "coalescing_speedup_20ms" in sv else "")
            out.append(f"\nCoalescing: {sv['coalescing_speedup']:.2f}× (max wait 5 ms){also} the throughput of one "
                       "request per forward.")
        out.append("")
    elif sv:
        out += [f"Server: {sv}", ""]
    if res.get("errors"):
        out += ["Errors: " + "; ".join(f"{e['where']}: {e['error'][:120]}" for e in res["errors"]), ""]
    out.append(f"Total {m.get('total_s', 0):.0f} s.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2", "llama8b-shape"])
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", default="auto", choices=["auto", "real", "random"],
                    help="smollm2 only: the cached real SmolLM2 weights if present (auto), or random")
    ap.add_argument("--out", type=Path, help="write the results here (JSON)")
    ap.add_argument("--grid", choices=list(GRIDS), help="default: full (tiny, GPU), cpu (CPU), quick (--quick)")
    ap.add_argument("--rounds", type=int, help="timed rounds per configuration")
    ap.add_argument("--sections", help="comma list of: equiv,peak,forward,overhead,memory,profile,search,server")
    ap.add_argument("--skip-methods", help="comma list of baselines not to run (ref_full,ref_last,mixed)")
    ap.add_argument("--quick", action="store_true", help="a dry run: tiny grid, one round")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip configurations started after this long")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--shared-prefix", type=int, default=0, metavar="P",
                    help="the first P tokens of every prompt are the same (a task instruction; the demo's SST-2 "
                         "instruction is 23 SmolLM2 tokens); default 0: random tokens throughout")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--server-model", default="tiny", choices=["tiny", "small", "smollm2", "demo"],
                    help="the model the app serves in the server section (demo: the embedded default, real "
                         "SmolLM2 weights and the bundled adapter, on SST-2 sentences)")
    ap.add_argument("--server-seconds", type=float, help="load per batching setting (default 40)")
    ap.add_argument("--server-settings", help="';'-separated list of: coalescing on;coalescing on, 20 ms;"
                                              "coalescing off (default all three)")
    ap.add_argument("--search-rows", type=int, help="max rows per forward in the sigma search")
    ap.add_argument("--profile-at", type=int, nargs=3, metavar=("B", "L", "N"))
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    ap.add_argument("--markdown-from", type=Path, help="print the tables of an earlier JSON result and exit")
    args = ap.parse_args(argv)
    if args.markdown_from:
        print(markdown(json.loads(args.markdown_from.read_text())))
        return 0
    if args.mem_child:
        memory_child(args)
        return 0
    res = run(args)
    if args.out:
        save(res, args.out)
        log(f"wrote {args.out}")
    print(markdown(res), flush=True)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
