"""Many adapters on Ray Serve's model multiplexing (deploy/ray/multiplex_app.py), on a local CPU Ray.

    python benchmarks/ray_multiplex.py --shape demo --adapters 32 --searched 4 --duration 240
    python benchmarks/ray_multiplex.py --shape tiny ...    # the test suite's tiny random Llama

Two adapter replicas (at most ``--max-per-replica`` adapters loaded on demand each) behind the
router; a registry of ``--adapters`` distinct adapters (the bundled SST-2 adapter, or the tiny one,
with its A and B perturbed by a seeded 10% noise each), sigma fixed for all but ``--searched`` of
them, whose sigma is searched (on 8 anchor sentences, a short search) by whichever replica loads
them first. The copies carry no calibration file (the demo's 272 sentences, computed at each first
load, would be most of what 2 shared cores do in a few minutes). ``--clients`` closed-loop clients
send one-sentence /predict requests for ``--duration`` seconds, the adapter drawn from a Zipf law
(exponent ``--zipf``) over the registry in a seeded shuffled order. A 503 (the adapter's sigma is
being searched) is counted and the client goes on with its next request (as a client told to retry
later would); a searched adapter's cold load is the time from its first request to its first answer.

Reported: hit rate (answers from an adapter the replica held: ``X-TFB-Adapter-Load: warm``),
p50/p95 latency of warm answers and of cold loads (sigma fixed, from the cache), sigma
searches per searched adapter (the lease actor's grants and the replicas' search counters), peak
resident memory per replica, the bytes each adapter holds, and whether every answer equals the
single-process server's for the same adapter, sentence and seed (one app with every adapter of the
registry listed at start-up, sigma from the same cache).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "ray"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.models: the test support's perturb_lora


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


def build(root: Path, shape: str, count: int, searched: int, sigma: float) -> dict[str, Any]:
    """The base settings, the registry file and its adapters."""
    from helpers.models import perturb_lora

    if shape == "demo":
        from loadgen import DEMO_SIGMA, demo_sentences

        from tfb_core.serving.config import DEMO_ADAPTER

        src, model, sigma = DEMO_ADAPTER, None, DEMO_SIGMA
        sentences = demo_sentences()
        anchor_records = [json.loads(line) for line in (src / "anchor.jsonl").read_text().splitlines()
                          if line.strip()][:8]
    else:
        from loadgen import SENTENCES, build_tiny_server_model

        model_dir, src = build_tiny_server_model(root / "tiny")
        model, sentences = str(model_dir), SENTENCES
        anchor_records = [{"prompt": s, "label": "positive" if i % 2 == 0 else "negative"}
                          for i, s in enumerate(SENTENCES * 2)]
    anchor = root / "anchor.jsonl"
    anchor.write_text("".join(json.dumps(r) + "\n" for r in anchor_records))
    names = [f"sst2-{i:02d}" for i in range(count)]
    entries = []
    for i, name in enumerate(names):
        path = perturb_lora(Path(src), root / "adapters" / name, seed=1000 + i, scale=0.1)
        # the copies calibrate on nothing: a calibration of the demo's 272 sentences at every first load
        # would be most of what 2 shared cores do in a few minutes (it is cached once done, as sigma is)
        (path / "calibration.jsonl").unlink(missing_ok=True)
        entries.append({"name": name, "adapter": str(path), **({"task": "sst2"} if shape == "demo" else {}),
                        **({"anchor": str(anchor)} if i < searched else {"sigma": sigma})})
    registry = root / "registry.json"
    registry.write_text(json.dumps(entries, indent=1))
    settings: dict[str, Any] = {"cache_dir": str(root / "cache"), "warmup": False,
                                "search_criterion": "flip", "search_iters": 2, "search_samples": 2,
                                "adapters": [{"name": "base", "adapter": str(src), "sigma": sigma}]}
    if model is not None:
        settings.update(model=model, labels=["negative", "positive"])
    return {"settings": settings, "registry": registry, "names": names, "searched": names[:searched],
            "sentences": sentences[:8], "sigma": sigma}


def traffic(base: str, names: list[str], sentences: list[str], clients: int, duration_s: float, zipf: float,
            seed: int) -> list[dict[str, Any]]:
    import httpx

    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)  # popularity rank -> adapter: the searched ones fall anywhere
    weights = [1.0 / (k + 1) ** zipf for k in range(len(order))]
    out: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = time.monotonic() + duration_s

    def client(i: int) -> None:
        r_ = random.Random(seed * 100 + i)
        with httpx.Client(timeout=600) as http:
            while time.monotonic() < stop:
                name = r_.choices(order, weights)[0]
                k = r_.randrange(len(sentences))
                t0 = time.monotonic()
                r = http.post(f"{base}/predict", json={"inputs": [sentences[k]], "adapter": name, "seed": 3})
                row = {"adapter": name, "sentence": k, "status": r.status_code, "seconds": time.monotonic() - t0,
                       "load": r.headers.get("x-tfb-adapter-load"), "replica": r.headers.get("x-tfb-replica"),
                       "sent_s": t0, "done_s": time.monotonic()}
                if r.status_code == 200:
                    body = r.json()
                    row.update(probs=body["predictions"][0]["probs"], sigma=body["sigma"])
                else:
                    row["error"] = r.text[:300]
                with lock:
                    out.append(row)
                if r.status_code == 503:  # its sigma is being searched: the client goes on with other requests
                    time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def replica_stats(app_name: str, want: int = 2, tries: int = 40) -> dict[str, dict[str, Any]]:
    from ray import serve

    handle = serve.get_deployment_handle("tfb-adapters", app_name=app_name)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(tries):
        s = handle.stats.remote().result()
        seen[s["replica"]] = s
        if len(seen) >= want:
            break
    return seen


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def metric(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(v))
            for labels, v in re.findall(rf"^ray_{name}\{{([^}}]*)\}} (\S+)$", text, re.M)]


def reference(setup: dict[str, Any], rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[float]]:
    """The single-process server's answers (every adapter that answered listed at start-up, sigma from
    the cache), one request per sentence as the clients sent them, on one torch thread as the replicas
    ran (Ray sets OMP_NUM_THREADS=1 for a replica of fractional CPUs; on 2 threads the demo's float32
    forward differs by up to 2e-2 in a probability, on 1 thread it is bit for bit the replicas')."""
    import torch
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    entries = json.loads(Path(setup["registry"]).read_text())
    settings = {**setup["settings"], "adapters": entries, "max_loras": len(entries),
                "exit_on_startup_failure": False, "request_timeout_s": 1800}
    needed = sorted({(r["adapter"], r["sentence"]) for r in rows if r["status"] == 200})
    answered = {name for name, _ in needed}  # a searched adapter that never answered would search again here
    entries = [e for e in entries if e["name"] in answered]
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with TestClient(create_app(Settings(**settings))) as client:
        deadline = time.monotonic() + 1800
        while client.get("/readyz").status_code != 200 or any(
                a.get("state") != "ready" for a in client.get("/info").json().get("adapters", [])):
            assert time.monotonic() < deadline, "the reference server did not become ready"
            time.sleep(0.5)
        for name, k in needed:
            r = client.post("/predict", json={"inputs": [setup["sentences"][k]], "adapter": name, "seed": 3})
            assert r.status_code == 200, r.text
            out[(name, k)] = r.json()["predictions"][0]["probs"]
    torch.set_num_threads(threads)
    return out


def check_again(rows_file: str, root: str, result_file: str) -> int:
    """The reference step again, over the rows a run saved (``--check-rows``): updates its result."""
    from loadgen import demo_sentences

    saved = json.loads(Path(rows_file).read_text())
    rows = [r for r in saved["rows"] if r["status"] == 200]
    entries = json.loads((Path(root) / "registry.json").read_text())
    result = json.loads(Path(result_file).read_text())
    setup = {"registry": Path(root) / "registry.json", "sentences": demo_sentences()[:8],
             "settings": {"cache_dir": str(Path(root) / "cache"), "warmup": False, "search_criterion": "flip",
                          "search_iters": 2, "search_samples": 2, "n_samples": result["n_samples"],
                          "adapters": entries[:1]}}
    ref = reference(setup, rows)
    diffs = [max(abs(a - b) for a, b in zip(r["probs"], ref[(r["adapter"], r["sentence"])], strict=True)) for r in rows]
    result.update(answers_equal_single_process=max(diffs) <= 1e-5, mismatches=sum(d > 1e-5 for d in diffs),
                  max_abs_prob_difference=max(diffs), reference="one request per sentence, on one torch thread")
    Path(result_file).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("answers_equal_single_process", "mismatches", "max_abs_prob_difference")}))
    return 0 if result["answers_equal_single_process"] else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["demo", "tiny"], default="demo")
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--searched", type=int, default=4)
    p.add_argument("--max-per-replica", type=int, default=8)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=240)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    p.add_argument("--check-rows", nargs=3, metavar=("ROWS_JSON", "ROOT", "RESULT_JSON"), default=None,
                   help="only the reference step again, over the rows a run saved in ROWS_JSON (its temporary "
                        "folder ROOT, its result RESULT_JSON updated)")
    args = p.parse_args()
    if args.check_rows:
        return check_again(*args.check_rows)

    import multiplex_app
    import ray
    import serve_app
    from helpers.ray_cluster import local_serve

    root = Path(tempfile.mkdtemp(prefix="tfb-ray-multiplex-"))
    setup = build(root, args.shape, args.adapters, args.searched, 0.05)
    setup["settings"]["n_samples"] = args.n_samples
    settings = {**setup["settings"], "registry": str(setup["registry"]), "num_gpus": 0, "num_cpus": 0.5,
                "num_replicas": args.replicas, "metrics_interval_s": 2.0,
                "max_adapters_per_replica": args.max_per_replica, "ready_timeout_s": 1800}
    load_avg_start = os.getloadavg()
    t0 = time.monotonic()  # from the cluster's start: Ray, Serve's proxy, the replicas, ready
    with local_serve([serve_app, multiplex_app], lambda: multiplex_app.build_app(settings), "tfb-multi",
                     ready_timeout_s=1800) as running:
        base, metrics_port = running["base"], running["metrics_port"]
        ready_s = time.monotonic() - t0
        import httpx

        probe = httpx.post(f"{base}/predict", json={"inputs": [setup["sentences"][0]], "adapter": setup["names"][-1]},
                           timeout=600)
        if probe.status_code != 200:  # a set-up error: say it now, not after minutes of the same error
            print(f"the first request failed: {probe.status_code} {probe.text}", file=sys.stderr)
            return 1
        print(f"ready in {ready_s:.1f}s; traffic for {args.duration:.0f}s", flush=True)
        rows = traffic(base, setup["names"], setup["sentences"], args.clients, args.duration, args.zipf, args.seed)
        stats = replica_stats("tfb-multi", args.replicas)
        grants = ray.get(ray.get_actor(multiplex_app.LEASE_ACTOR, namespace=multiplex_app.LEASE_NAMESPACE).grants.remote())
        time.sleep(6)  # the mirror's and Ray's export intervals
        text = scrape(metrics_port)
    ok = [r for r in rows if r["status"] == 200]
    warm = [r["seconds"] for r in ok if r["load"] == "warm"]
    cold = {src: [r["seconds"] for r in ok if r["load"] == f"cold-{src}"] for src in ("fixed", "cache", "search")}
    # a searched adapter, as its clients saw it: from its first request (answered 503 while the search
    # ran) to its first answer
    search_wait = {}
    for name in setup["searched"]:
        mine = [r for r in rows if r["adapter"] == name]
        first_ok = min((r["done_s"] for r in mine if r["status"] == 200), default=None)
        if mine and first_ok is not None:
            search_wait[name] = round(first_ok - min(r["sent_s"] for r in mine), 1)
    searches: dict[str, float] = {}
    for labels, v in metric(text, "tfb_multiplex_sigma_searches_total"):
        searches[labels["adapter"]] = searches.get(labels["adapter"], 0) + v
    print(f"{len(rows)} requests; reference answers ...", flush=True)
    Path(tempfile.gettempdir(), "ray-multiplex-rows.json").write_text(json.dumps(
        {"rows": rows, "text": text, "stats": stats, "grants": grants, "ready_s": ready_s}))
    ref = reference(setup, rows)
    mismatches = [r for r in ok if max(abs(a - b) for a, b in zip(r["probs"], ref[(r["adapter"], r["sentence"])],
                                                                   strict=True)) > 1e-5]
    per_adapter_bytes = sorted({m["weights_bytes"] for s in stats.values() for n, m in s["memory"].items()
                                if n != "base"})
    noise_bytes = sorted({m["noise_bytes"] for s in stats.values() for n, m in s["memory"].items() if n != "base"})
    result = {
        "shape": args.shape, "model": setup["settings"].get("model", "embedded default (SmolLM2-135M-Instruct)"),
        "adapters": args.adapters, "searched": args.searched, "replicas": args.replicas,
        "max_per_replica": args.max_per_replica, "clients": args.clients, "duration_s": args.duration,
        "zipf": args.zipf, "n_samples": args.n_samples, "cpu_count": os.cpu_count(),
        "load_avg_start": load_avg_start, "load_avg_end": os.getloadavg(),
        "note": "one 2-core machine shared with other jobs: absolute latencies are contaminated, ratios less so",
        "ready_s": round(ready_s, 1),
        "requests": len(rows), "answered": len(ok),
        "errors": [r for r in rows if r["status"] not in (200, 503)][:5],
        "hit_rate": round(len(warm) / len(ok), 4) if ok else None,
        "warm": {"n": len(warm), "p50_ms": _pct(warm, 0.5), "p95_ms": _pct(warm, 0.95)},
        "cold": {src: {"n": len(v), "p50_ms": _pct(v, 0.5), "p95_ms": _pct(v, 0.95)} for src, v in cold.items()},
        "answered_503": sum(r["status"] == 503 for r in rows),
        "searched_adapter_first_request_to_first_answer_s": search_wait,
        "searches_per_searched_adapter": {n: searches.get(n, 0) for n in setup["searched"]},
        "lease_grants": sorted(grants.values()),
        "adapters_requested": len({r["adapter"] for r in rows}),
        "replicas_holding_at_end": {k: s["held"] for k, s in stats.items()},
        "peak_rss_mb": {k: round(s["peak_rss_bytes"] / 2**20, 1) for k, s in stats.items()},
        "adapter_weights_bytes": per_adapter_bytes, "adapter_noise_bytes": noise_bytes,
        "loads": sum(v for _, v in metric(text, "tfb_multiplex_loads_total")),
        "evictions": sum(v for _, v in metric(text, "tfb_multiplex_evictions_total")),
        "answers_equal_single_process": not mismatches, "mismatches": len(mismatches),
        "mean_latency_ms": round(statistics.mean(r["seconds"] for r in ok) * 1000, 1) if ok else None,
    }
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok and not mismatches and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
