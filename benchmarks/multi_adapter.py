"""Many adapters on one base model: throughput with requests spread over 1, 2 and 6 adapters, and
peak memory of one server with 6 adapters against 6 single-adapter servers.

    python benchmarks/multi_adapter.py --shape tiny          # the test suite's random tiny Llama
    python benchmarks/multi_adapter.py --shape smollm2       # SmolLM2-135M's shape, random weights
    python benchmarks/multi_adapter.py --shape demo          # the real SmolLM2-135M-Instruct + the
                                                             # bundled SST-2 adapter and 5 perturbed copies

One server (``uvicorn --factory app.main:create_app``, loopback) per configuration, ``TFB_ADAPTERS``
listing k adapters with a fixed sigma; ``clients`` simulated users send one-input requests naming
the adapters in turn (benchmarks/loadgen.py). The ratios compare runs of this one invocation.
Memory: the peak resident set (VmHWM) of the 6-adapter server after its load, against the sum of
6 single-adapter servers' (each started, loaded and sent the same requests, one after another).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import (  # noqa: E402
    DEMO_SIGMA,
    ROOT,
    SENTENCES,
    _free_port,
    _load,
    _serve,
    _server_metrics,
    _wait_ready,
    build_tiny_server_model,
    demo_sentences,
)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_adapters(root: Path, shape: str, count: int) -> tuple[str | None, list[Path]]:
    """(base model folder or None for the embedded default, ``count`` adapter folders)."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    if shape == "demo":
        from tfb_core.serving.config import DEMO_ADAPTER

        out = []
        for k in range(count):  # the bundled adapter, then copies with their own perturbation
            folder = root / f"adapter{k}"
            shutil.copytree(DEMO_ADAPTER, folder)
            if k:
                from safetensors.torch import load_file, save_file

                f = folder / "adapter_model.safetensors"
                sd = load_file(f)
                gen = torch.Generator().manual_seed(k)
                save_file({n: v + 0.1 * v.std() * torch.randn(v.shape, generator=gen).to(v.dtype)
                           for n, v in sd.items()}, f)
            out.append(folder)
        return None, out
    from bench_models import lora_config, randomize_lora

    model_dir, first = build_tiny_server_model(root, shape=shape)
    out = [first]
    for k in range(1, count):
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        peft_model = get_peft_model(base, lora_config(4))
        randomize_lora(peft_model, 100 + k)
        peft_model.save_pretrained(root / f"adapter{k}")
        out.append(root / f"adapter{k}")
    del PeftModel
    return str(model_dir), out


def _env(model: str | None, adapters: list[Path], sigma: float, n_samples: int, clients: int, root: Path,
         threads: str, timeout: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFB_")}
    spec = [{"name": f"a{k}", "adapter": str(a)} for k, a in enumerate(adapters)]
    env.update({"TFB_ADAPTERS": json.dumps(spec), "TFB_SIGMA": str(sigma), "TFB_N_SAMPLES": str(n_samples),
                "TFB_MAX_SAMPLES": str(n_samples), "TFB_MAX_BATCH_ROWS": str(clients * n_samples),
                "TFB_MAX_QUEUE": str(4 * clients), "TFB_REQUEST_TIMEOUT_S": str(timeout), "TFB_LOG_LEVEL": "warning",
                "OMP_NUM_THREADS": threads,
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    if model is not None:
        env.update(TFB_MODEL=model, TFB_LABELS="negative,positive", TFB_CACHE_DIR=str(root / "cache"))
    else:  # the embedded default: its converted model in the user's cache (sigma is fixed: nothing searched)
        env.update(TFB_TASK="sst2")
    return env


def run_server(env: dict[str, str], root: Path, clients: int, total: int, seconds: float, n_samples: int,
               sentences: list[str], names: list[str], timeout: float) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(env, port, root / "server.log")
    try:
        t0 = time.perf_counter()
        _wait_ready(url, proc, timeout=900.0)
        ready_s = time.perf_counter() - t0
        row = asyncio.run(_load(url, clients, total, seconds, n_samples, sentences, timeout,
                                snapshot=lambda: _server_metrics(url), adapters=names))
        before = row.pop("before")
        after = _server_metrics(url)
        forwards = after.get("tfb_forward_duration_seconds_count", 0.0) - before.get("tfb_forward_duration_seconds_count", 0.0)
        inputs = after.get("tfb_batch_inputs_sum", 0.0) - before.get("tfb_batch_inputs_sum", 0.0)
        row.update(ready_s=ready_s, forwards=int(forwards), inputs_per_forward=inputs / max(forwards, 1.0),
                   peak_rss_mb=_peak_rss_mb(proc.pid))
        return row
    except Exception:
        print((root / "server.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["tiny", "smollm2", "demo"], default="tiny")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--counts", default="1,2,6,1", help="adapters per run, in order (the last 1 repeats the "
                                                           "baseline: drift of a shared machine)")
    p.add_argument("--no-memory", action="store_true", help="skip the 6 single-adapter servers")
    p.add_argument("--threads", default="1", help="the server's OMP_NUM_THREADS")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    sigma = DEMO_SIGMA if args.shape == "demo" else 0.05
    sentences = demo_sentences() if args.shape == "demo" else SENTENCES
    timeout = max(60.0, 4 * args.seconds)
    out: dict[str, Any] = {"shape": args.shape, "clients": args.clients, "n_samples": args.samples, "sigma": sigma,
                           "server_threads": int(args.threads), "cpu_count": os.cpu_count(),
                           "load_avg_start": list(os.getloadavg()), "runs": []}
    with tempfile.TemporaryDirectory(prefix="tfb-bench-multi-") as tmp:
        root = Path(tmp)
        model, adapters = build_adapters(root, args.shape, max(max(counts), 6))
        for k in counts:
            names = [f"a{i}" for i in range(k)]
            env = _env(model, adapters[:k], sigma, args.samples, args.clients, root, args.threads, timeout)
            row = run_server(env, root, args.clients, args.requests, args.seconds, args.samples, sentences, names, timeout)
            row = {"adapters": k, **row}
            out["runs"].append(row)
            print(f"{k} adapter(s): {row['rps']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
                  f"{row['forwards']} forwards of {row['inputs_per_forward']:.1f} inputs, peak RSS {row['peak_rss_mb']:.0f} MB, "
                  f"{row['errors']} errors", flush=True)
        base = [r["rps"] for r in out["runs"] if r["adapters"] == 1]
        ref = sum(base) / len(base)
        out["throughput_ratio"] = {str(r["adapters"]): r["rps"] / ref for r in out["runs"] if r["adapters"] > 1}
        if not args.no_memory:
            six = next((r for r in out["runs"] if r["adapters"] == 6), None)
            singles = []
            for k in range(6):  # six single-adapter servers, as an operator runs them today
                env = _env(model, [adapters[k]], sigma, args.samples, args.clients, root, args.threads, timeout)
                row = run_server(env, root, args.clients, 4 * args.clients, 10.0, args.samples, sentences, ["a0"], timeout)
                singles.append(row["peak_rss_mb"])
                print(f"single-adapter server {k}: peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
            out["memory"] = {"six_adapters_one_server_mb": six["peak_rss_mb"] if six else None,
                             "six_single_servers_mb": sum(singles), "single_server_mb": singles}
            if six:
                out["memory"]["ratio"] = six["peak_rss_mb"] / sum(singles)
                out["memory"]["per_extra_adapter_mb"] = (six["peak_rss_mb"] - min(singles)) / 5
    out["load_avg_end"] = list(os.getloadavg())
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
