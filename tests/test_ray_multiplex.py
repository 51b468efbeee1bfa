"""Many adapters on Ray Serve (deploy/ray/multiplex_app.py): a real local Ray, on CPU, the tiny model.

One module-scoped cluster: two adapter replicas (at most 2 adapters loaded on demand each) behind
the router, a registry of 6 adapters (5 with sigma fixed, 1 whose sigma is searched). Checks: the
registry refuses what it does not list (404 naming it; a client's path is only a name); answers
equal the adapter served alone by the single-process app; least-recently-used adapters are evicted
and freed (the model's own count of adapters); one sigma search per adapter for both replicas, the
other replica answering 503 with Retry-After meanwhile, then loading it from the cache.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from conftest import LABELS, require
from helpers.ray_cluster import local_serve

require("ray.serve", "ray[serve] is not installed (extra 'ray')")

RAY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "ray"
SIGMA = 0.05
FIXED = ["a1", "a2", "a3", "a4", "a5"]
SEARCHED = "s1"
ANCHOR = [{"prompt": p, "label": lab} for p, lab in [
    ("a wonderful film", "positive"), ("a terrible film", "negative"), ("great acting", "positive"),
    ("boring and slow", "negative"), ("a delight", "positive"), ("a mess", "negative")]]
SEARCH = dict(search_criterion="flip", search_iters=2, search_samples=2)
TEXTS = ["a great film", "a dull mess"]


def _import_ray_modules():
    sys.path.insert(0, str(RAY_DIR))
    try:
        import multiplex_app
        import serve_app
    finally:
        sys.path.remove(str(RAY_DIR))
    return serve_app, multiplex_app




@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    """The registry's adapters (distinct copies of the tiny adapter) and its file."""
    from helpers.models import perturb_lora

    root = tmp_path_factory.mktemp("registry")
    anchor = root / "anchor.jsonl"
    anchor.write_text("".join(json.dumps(r) + "\n" for r in ANCHOR))
    paths = {name: str(perturb_lora(Path(tiny["adapter"]), root / name, seed=i + 1, scale=0.3))
             for i, name in enumerate([*FIXED, SEARCHED])}
    entries = [{"name": n, "adapter": paths[n], "sigma": SIGMA} for n in FIXED]
    entries.append({"name": SEARCHED, "adapter": paths[SEARCHED], "anchor": str(anchor)})
    registry = root / "registry.json"
    registry.write_text(json.dumps(entries))
    return {"paths": paths, "registry": registry, "anchor": str(anchor), "cache": str(root / "cache")}


def common(tiny, adapters) -> dict:
    return {"model": tiny["model"], "labels": LABELS, "cache_dir": adapters["cache"], "n_samples": 4,
            "warmup": False, **SEARCH}


def base_settings(tiny, adapters) -> dict:
    """Every replica's: the tiny adapter from start-up (sigma fixed); no server-wide sigma, so that a
    registry entry without one searches its own."""
    return {**common(tiny, adapters), "adapters": [{"name": "base", "adapter": tiny["adapter"], "sigma": SIGMA}]}


@pytest.fixture(scope="module")
def cluster(tiny, adapters):
    serve_app, multiplex_app = _import_ray_modules()
    settings = {**base_settings(tiny, adapters), "registry": str(adapters["registry"]), "num_gpus": 0,
                "num_cpus": 0.5, "num_replicas": 2, "max_adapters_per_replica": 2, "max_ongoing_requests": 2,
                "metrics_interval_s": 1.0, "ready_timeout_s": 300, "lease_ttl_s": 20}
    with local_serve([serve_app, multiplex_app], lambda: multiplex_app.build_app(settings), "tfb-multi") as running:
        yield {**running, "module": multiplex_app}


def alone(tiny, adapters, name: str) -> dict:
    """The single-process app serving adapter ``name`` alone: its answers to TEXTS (seed 3)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    # a cache of its own: the cluster's searches are its own, not this process's
    entry = {"adapter": adapters["paths"][name], "adapter_name": name, "cache_dir": adapters["cache"] + "-alone"}
    entry.update({"sigma": SIGMA} if name in FIXED else {"sigma": None, "anchor": adapters["anchor"]})
    with TestClient(create_app(Settings(**{**common(tiny, adapters), **entry}))) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        return {t: client.post("/predict", json={"inputs": [t], "seed": 3}).json() for t in TEXTS}


def predict(base: str, name: str, text: str) -> httpx.Response:
    return httpx.post(f"{base}/predict", json={"inputs": [text], "adapter": name, "seed": 3}, timeout=120)


def same_answer(got: dict, want: dict) -> None:
    assert got["sigma"] == pytest.approx(want["sigma"], rel=1e-9)
    g, w = got["predictions"][0], want["predictions"][0]
    assert g["label"] == w["label"]
    assert g["probs"] == pytest.approx(w["probs"], abs=1e-5)
    assert g["mutual_information"] == pytest.approx(w["mutual_information"], abs=1e-5)


def scrape(cluster) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{cluster['metrics_port']}/metrics", timeout=10).read().decode()


def series(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for labels, value in re.findall(rf"^ray_{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        out.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return out


def test_a_name_outside_the_registry_is_refused_naming_it(cluster):
    base = cluster["base"]
    r = httpx.post(f"{base}/predict", json={"inputs": ["a great film"], "adapter": "nope"}, timeout=60)
    assert r.status_code == 404 and "adapter registry (registry.json)" in r.json()["detail"], r.text
    # a client's path is a name like any other: not in the registry, never read
    r = httpx.post(f"{base}/v1/completions", json={"model": str(RAY_DIR), "prompt": "hi"}, timeout=60)
    assert r.status_code == 404 and "adapter registry (registry.json)" in r.json()["error"]["message"], r.text
    # the start-up adapter needs no registry: any replica answers it
    r = httpx.post(f"{base}/predict", json={"inputs": ["a great film"]}, timeout=60)
    assert r.status_code == 200, r.text


def test_adapters_load_on_demand_answer_as_alone_and_the_lru_one_is_freed(cluster, tiny, adapters):
    base = cluster["base"]
    want = {name: alone(tiny, adapters, name) for name in FIXED}
    answered: dict[str, set[str]] = {}
    for _ in range(2):  # 5 adapters, 2 replicas of at most 2 each: loads must evict
        for name in FIXED:
            for text in TEXTS:
                r = predict(base, name, text)
                assert r.status_code == 200, r.text
                same_answer(r.json(), want[name][text])
                answered.setdefault(name, set()).add(r.headers["x-tfb-replica"])
    deadline = time.monotonic() + 90
    while True:
        text = scrape(cluster)
        held = {s["replica"]: v for s, v in series(text, "tfb_multiplex_adapters_held")}
        slots = {s["replica"]: v for s, v in series(text, "tfb_multiplex_model_adapters")}
        loads = sum(v for _, v in series(text, "tfb_multiplex_loads_total"))
        evictions = {s["replica"]: v for s, v in series(text, "tfb_multiplex_evictions_total")}
        if len(held) == 2 and loads >= len(FIXED) and sum(held.values()) + sum(evictions.values()) == loads:
            break
        assert time.monotonic() < deadline, f"Ray exported held={held} loads={loads} evictions={evictions}"
        time.sleep(1)
    assert all(v <= 2 for v in held.values()), held
    assert sum(evictions.values()) >= 1, "5 adapters in 2 x 2 places: something had to be evicted"
    # the model's own count: the start-up adapter plus those held; every evicted one was freed
    assert slots == {rep: 1 + v for rep, v in held.items()}, (slots, held)


def test_one_sigma_search_for_both_replicas(cluster, tiny, adapters):
    import ray

    base = cluster["base"]
    want = alone(tiny, adapters, SEARCHED)  # searched in this process, cached apart
    outcomes: list[tuple[int, str, dict]] = []

    def ask(i: int) -> tuple[int, str, dict]:
        text = TEXTS[i % 2]
        deadline = time.monotonic() + 240
        while True:
            r = predict(base, SEARCHED, text)
            outcomes.append((r.status_code, r.headers.get("x-tfb-replica", ""), dict(r.headers)))
            if r.status_code != 503:
                return r.status_code, r.headers["x-tfb-replica"], {"text": text, **r.json()}
            assert "retry-after" in r.headers, r.text
            assert time.monotonic() < deadline, "the searched adapter never answered"
            time.sleep(0.2)

    replicas: set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(12):  # concurrent rounds until both replicas have answered it
            for status, replica, body in pool.map(ask, range(16)):
                assert status == 200, body
                same_answer(body, want[body["text"]])
                replicas.add(replica)
            if len(replicas) == 2:
                break
    assert len(replicas) == 2, f"only {replicas} answered {SEARCHED}: nothing shows the other replica's load"
    assert any(status == 503 for status, _, _ in outcomes), "no request waited for the search"
    grants = ray.get(ray.get_actor(cluster["module"].LEASE_ACTOR, namespace=cluster["module"].LEASE_NAMESPACE).grants.remote())
    assert list(grants.values()) == [1], grants
    deadline = time.monotonic() + 90
    while True:
        text = scrape(cluster)
        searches = [(s, v) for s, v in series(text, "tfb_multiplex_sigma_searches_total") if s["adapter"] == SEARCHED]
        if searches:
            break
        assert time.monotonic() < deadline
        time.sleep(1)
    assert sum(v for _, v in searches) == 1, searches


def test_a_bad_registry_fails_the_build_naming_the_entry(tiny, adapters, tmp_path):
    _, multiplex_app = _import_ray_modules()
    bad = tmp_path / "registry.json"
    bad.write_text(json.dumps([{"name": "x", "adapter": str(tmp_path / "missing")}]))
    with pytest.raises(ValueError, match=r"registry.json: entry 1 \('x'\): adapter folder .* does not exist"):
        multiplex_app.build_app({**base_settings(tiny, adapters), "registry": str(bad), "num_gpus": 0})


def test_the_lease_is_one_replicas_until_released_or_expired(monkeypatch):
    """The sigma-search lease (the actor's class, no cluster): one holder; renewed, it stays; a holder
    that stops renewing (died mid-search) loses it at expiry; only the holder renews or releases."""
    _, multiplex_app = _import_ray_modules()
    now = [100.0]
    monkeypatch.setattr(multiplex_app.time, "monotonic", lambda: now[0])
    lease = multiplex_app.SigmaLeaseActor()
    assert lease.acquire("k", "r1", 30)["granted"]
    got = lease.acquire("k", "r2", 30)
    assert not got["granted"] and got["holder"] == "r1" and got["expires_in_s"] == 30
    assert lease.acquire("other", "r2", 30)["granted"]  # another adapter's search: its own lease
    now[0] += 20
    assert lease.renew("k", "r1", 30)
    now[0] += 20
    assert not lease.acquire("k", "r2", 30)["granted"]  # renewed 20 s ago: still r1's
    now[0] += 11
    assert lease.acquire("k", "r2", 30)["granted"]  # r1 stopped renewing: expired, r2 takes it
    assert not lease.renew("k", "r1", 30) and not lease.release("k", "r1")
    assert lease.release("k", "r2") and lease.acquire("k", "r1", 30)["granted"]
    assert lease.grants() == {"k": 3, "other": 1}


@pytest.mark.parametrize("body, name", [
    (b'{"adapter": "a", "model": "b"}', "a"), (b'{"model": "b", "prompt": "x"}', "b"), (b' {"model": "b"}', "b"),
    (b'{"model": ""}', None), (b'{"model": 3}', None), (b'[{"model": "b"}]', None), (b"{not json", None), (b"", None),
])
def test_the_router_reads_the_adapter_a_body_names(body, name):
    _, multiplex_app = _import_ray_modules()
    assert multiplex_app.adapter_of(body) == name


def test_the_multiplex_serve_config_validates_and_builds(tiny, adapters):
    """deploy/ray/serve_multiplex.yaml is a valid Serve config whose args build_app takes (the
    model and registry swapped for the tiny ones)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    cfg = yaml.safe_load((RAY_DIR / "serve_multiplex.yaml").read_text())
    ServeDeploySchema.model_validate(cfg)
    args = cfg["applications"][0]["args"]
    assert cfg["applications"][0]["import_path"] == "multiplex_app:build_app"
    _, multiplex_app = _import_ray_modules()
    local = {**args, **base_settings(tiny, adapters), "registry": str(adapters["registry"]), "device": "cpu",
             "dtype": "float32", "published": None}
    app = multiplex_app.build_app(local)
    assert app is not None
