"""Soak: minutes of mixed valid, invalid and abandoned traffic against `tfb serve` (loopback only, bounded).

The server is `tfb serve` (app/server.py: h11 with bounded headers, header and body timeouts,
keep-alive, connection cap) on the test suite's tiny model (random Llama, local tokenizer, random
LoRA, fixed sigma), in a subprocess on 127.0.0.1. Simulated clients, each on its own connection,
come and go so that 16 to 64 are active (levels 16, 32, 64, 32, each ``phase_s`` seconds) and send,
back to back:

- valid: /predict with 1-4 inputs, N in {1, 4, 10}, sometimes a seed or their own labels; /feedback
  on an earlier prediction; /info and /metrics;
- invalid: a blank prompt, N over the limit, too many inputs, malformed JSON, deep nesting, invalid
  UTF-8, a gzip body, a text body, an unknown field, a body over the limit, headers over the limit;
- abandoned: a /predict whose client closes right after sending it; headers sent half and then
  silence (the server's header timeout must close it); a connection that sends nothing.

Reported: the count of each (kind, status), the p50/p99 latency of the valid requests, the server's
resident memory (VmRSS) every few seconds, and whether every 5xx was a 503 with Retry-After.

    python benchmarks/soak.py --seconds 300 --output benchmarks/results/soak-tiny-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from loadgen import SENTENCES, _free_port, _percentile, build_tiny_server_model  # noqa: E402

LEVELS = (16, 32, 64, 32)
MAX_CLIENTS = max(LEVELS)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _invalid(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    """(name, body, headers) of one invalid /predict."""
    ok = b'{"inputs": ["a"]}'
    cases = [
        ("blank prompt", b'{"inputs": ["a film", "   "]}', {}),
        ("N over the limit", b'{"inputs": ["a"], "n_samples": 999}', {}),
        ("too many inputs", json.dumps({"inputs": ["a"] * 100}).encode(), {}),
        ("malformed JSON", b'{"inputs": [', {}),
        ("deep nesting", b'{"inputs": ' + b"[" * 3000 + b"]" * 3000 + b"}", {}),
        ("invalid UTF-8", b'{"inputs": ["\xff\xfe"]}', {}),
        ("gzip body", gzip.compress(ok), {"content-encoding": "gzip"}),
        ("text body", ok, {"content-type": "text/plain"}),
        ("unknown field", b'{"inputs": ["a"], "temperature": 1}', {}),
        ("body over the limit", json.dumps({"inputs": ["a" * 70_000]}).encode(), {}),
        ("headers over the limit", ok, {"x-big": "a" * 20_000}),
    ]
    return cases[rng.randrange(len(cases))]


async def _abandon(port: int, rng: random.Random, stats: Counter) -> None:
    """One abandoned connection: a request whose client leaves, half the headers, or nothing at all."""
    kind = rng.choice(("predict then gone", "half headers", "silent"))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        stats[("abandoned", kind, "connect failed")] += 1
        return
    try:
        if kind == "predict then gone":
            body = json.dumps({"inputs": rng.sample(SENTENCES, 3), "n_samples": 10}).encode()
            writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            await asyncio.sleep(rng.uniform(0.0, 0.02))
            stats[("abandoned", kind, "left")] += 1
            return
        if kind == "half headers":
            writer.write(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
            await writer.drain()
        # wait for the server to close it (its header timeout), bounded
        try:
            data = await asyncio.wait_for(reader.read(), 30.0)
            stats[("abandoned", kind, data[:12].decode("latin-1") or "closed")] += 1
        except asyncio.TimeoutError:
            stats[("abandoned", kind, "still open after 30 s")] += 1
    except OSError as exc:
        stats[("abandoned", kind, type(exc).__name__)] += 1
    finally:
        writer.close()


async def _client(c: int, port: int, level: list[int], stop_at: float, stats: Counter, lat: list[float],
                  bad_5xx: list[str], seed: int) -> None:
    import httpx

    rng = random.Random(seed * 1000 + c)
    ids: list[str] = []
    base = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=base, timeout=60.0, limits=limits) as client:
        while time.monotonic() < stop_at:
            if c >= level[0]:  # inactive at this level: the connection goes idle (and is closed by keep-alive)
                await asyncio.sleep(0.5)
                continue
            roll = rng.random()
            try:
                if roll < 0.10:
                    await _abandon(port, rng, stats)
                    continue
                if roll < 0.30:
                    name, body, headers = _invalid(rng)
                    r = await client.post("/predict", content=body,
                                          headers={"content-type": "application/json", **headers})
                    kind = f"invalid: {name}"
                elif roll < 0.36 and ids:
                    r = await client.post("/feedback", json={"id": ids.pop(), "label": rng.randrange(2)})
                    kind = "feedback"
                elif roll < 0.40:
                    r = await client.get(rng.choice(("/info", "/metrics", "/readyz")))
                    kind = "get"
                else:
                    body: dict[str, Any] = {"inputs": rng.sample(SENTENCES, rng.randint(1, 4)),
                                            "n_samples": rng.choice((1, 4, 10))}
                    if rng.random() < 0.2:
                        body["seed"] = rng.randrange(3)
                    if rng.random() < 0.1:
                        body["labels"] = ["yes", "no"]
                    t0 = time.perf_counter()
                    r = await client.post("/predict", json=body)
                    kind = "predict"
                    if r.status_code == 200:
                        lat.append(time.perf_counter() - t0)
                        if body.get("labels") is None:
                            ids.extend(p["id"] for p in r.json()["predictions"][:1])
                            del ids[:-20]
            except httpx.HTTPError as exc:
                stats[("error", type(exc).__name__, "")] += 1
                continue
            stats[(kind, str(r.status_code), "")] += 1
            if r.status_code >= 500 and not (r.status_code == 503 and r.headers.get("retry-after")):
                bad_5xx.append(f"{kind}: {r.status_code} {r.text[:200]}")


async def _soak(port: int, pid: int, seconds: float, phase_s: float, sample_s: float, seed: int) -> dict[str, Any]:
    stats: Counter = Counter()
    lat: list[float] = []
    bad_5xx: list[str] = []
    rss: list[tuple[float, float]] = []
    level = [LEVELS[0]]
    t0 = time.monotonic()
    stop_at = t0 + seconds
    clients = [asyncio.create_task(_client(c, port, level, stop_at, stats, lat, bad_5xx, seed))
               for c in range(MAX_CLIENTS)]
    levels: list[tuple[float, int]] = []
    while time.monotonic() < stop_at:
        now = time.monotonic() - t0
        level[0] = LEVELS[int(now // phase_s) % len(LEVELS)]
        if not levels or levels[-1][1] != level[0]:
            levels.append((round(now, 1), level[0]))
        rss.append((round(now, 1), round(_rss_mb(pid), 1)))
        await asyncio.sleep(sample_s)
    await asyncio.gather(*clients)
    rss.append((round(time.monotonic() - t0, 1), round(_rss_mb(pid), 1)))
    return {"stats": stats, "latencies": lat, "bad_5xx": bad_5xx, "rss": rss, "levels": levels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS counts as steady")
    ap.add_argument("--phase", type=float, default=20.0, help="seconds per level of active clients")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="tfb-soak-") as tmp:
        root = Path(tmp)
        model_dir, adapter_dir = build_tiny_server_model(root)
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TFB_")}
        settings = {"TFB_MAX_QUEUE": "256", "TFB_MAX_INPUTS": "8", "TFB_MAX_SAMPLES": "16", "TFB_N_SAMPLES": "4",
                    "TFB_MAX_BODY_BYTES": "65536", "TFB_MAX_HEADER_BYTES": "8192", "TFB_HEADER_TIMEOUT_S": "2",
                    "TFB_BODY_TIMEOUT_S": "5", "TFB_KEEP_ALIVE_S": "5", "TFB_LOG_LEVEL": "warning",
                    "TFB_CACHE_DIR": str(root / "cache")}
        env.update({**settings, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        cmd = [sys.executable, "-m", "app.cli", "serve", "--model", str(model_dir), "--adapter", str(adapter_dir),
               "--labels", "negative", "positive", "--sigma", "0.05", "--host", "127.0.0.1", "--port", str(port)]
        log_path = root / "server.log"
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=logf, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        if s.recv(64).startswith(b"HTTP/1.1 200"):
                            break
                except OSError:
                    pass
                assert proc.poll() is None, log_path.read_text()[-2000:]
                time.sleep(0.2)
            rss_ready = _rss_mb(proc.pid)
            out = asyncio.run(_soak(port, proc.pid, args.seconds, args.phase, args.sample, args.seed))
            import httpx

            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        finally:
            proc.terminate()
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        log_tail = log_path.read_text()[-3000:]

    aborted = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("tfb_requests_aborted_total{")}
    steady = [mb for t, mb in out["rss"] if t >= args.warmup]
    lat = out["latencies"]
    counts: dict[str, dict[str, int]] = {}
    for (kind, status, detail), n in sorted(out["stats"].items()):
        counts.setdefault(kind, {})[f"{status} {detail}".strip()] = n
    result = {
        "server": "tfb serve, tiny model (tests' shape), sigma 0.05, OMP_NUM_THREADS=1, loopback",
        "settings": settings, "seconds": args.seconds, "warmup_s": args.warmup, "levels": out["levels"],
        "counts": counts,
        "valid_predict": {"n": len(lat), "p50_ms": round(1e3 * _percentile(lat, 0.5), 1) if lat else None,
                          "p99_ms": round(1e3 * _percentile(lat, 0.99), 1) if lat else None},
        "server_aborted": aborted,
        "five_xx_without_retry_after": out["bad_5xx"][:20], "five_xx_without_retry_after_count": len(out["bad_5xx"]),
        "rss_mb": {"ready": round(rss_ready, 1), "samples": out["rss"],
                   "steady_min": min(steady) if steady else None, "steady_max": max(steady) if steady else None,
                   "steady_spread": round((max(steady) - min(steady)) / min(steady), 4) if steady else None},
        "exit_code_after_sigterm": code,
        "server_log_tail": log_tail,
    }
    text = json.dumps(result, indent=1)
    if args.output:
        args.output.write_text(text + "\n")
    summary = {k: result[k] for k in ("valid_predict", "five_xx_without_retry_after_count", "server_aborted")}
    summary["rss_mb"] = {k: v for k, v in result["rss_mb"].items() if k != "samples"}
    print(json.dumps({"counts": counts, **summary}, indent=1))


if __name__ == "__main__":
    main()
