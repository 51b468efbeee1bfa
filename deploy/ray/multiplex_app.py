"""Many adapters on a few replicas: tfb-serve on Ray Serve's model multiplexing.

    serve run multiplex_app:build_app registry=/adapters/registry.json max_adapters_per_replica=8 model=...

Two deployments (serve_app.py's single deployment serves the adapters listed at start-up on every
replica; this one loads them on demand):

* ``tfb-router``, the HTTP ingress: reads the adapter a request names (the JSON body's ``adapter``,
  else ``model``: an unmodified OpenAI or vLLM client works) and sends the request to the adapter
  replicas through a handle with that ``multiplexed_model_id``, so Ray routes it to a replica that
  holds the adapter already. A name the registry does not list: 404 naming the registry (nothing
  is loaded); no name, or a start-up adapter's (or the base model's): any replica.
* ``tfb-adapters``, the replicas: each one :func:`app.main.create_app` (base model and start-up
  adapters, batching worker, metrics, feedback), plus adapters loaded on demand, at most
  ``max_adapters_per_replica``: Ray's ``@serve.multiplexed`` keeps them in LRU order and evicts the
  least recently used (:class:`HeldAdapter`'s ``__del__``: the server's unload, everything freed,
  once the requests that hold it are answered; an adapter evicted while its sigma search runs is
  freed when the search is over, so that no search is lost to an eviction). A load is the server's runtime load
  (:meth:`app.lora_updates.RuntimeLoras.load_config`) of the registry's entry (:mod:`app.registry`).

Each answer of an adapter loaded on demand says how it was loaded (``X-TFB-Adapter-Load``: ``warm``,
or ``cold-fixed``, ``cold-cache``, ``cold-search``: the request waited for the load).

One sigma search per adapter for the whole cluster: sigma and the calibration are cached in
``TFB_CACHE_DIR`` (a volume every replica mounts; files written atomically, keyed by what they
depend on). A replica whose load needs a search first takes the adapter's lease from one named
actor (:class:`SigmaLeaseActor`), renewed while its search runs and released when it ends; a
replica that dies mid-search stops renewing and the lease expires after ``lease_ttl_s``. A replica
that finds the lease taken answers 503 with ``Retry-After`` (naming the replica that searches);
once the search is cached, every replica loads the adapter from the cache. ``tfb search --registry``
fills the cache before traffic.

Requests and their answers go through the handle whole (streamed: server-sent events arrive chunk
by chunk); the replica answers them with its own app, in process (:func:`asgi_stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve import Application
from serve_app import (
    REPLICA_OPTIONS,
    RayMetricsMirror,
    ReplicaHeaders,
    SharedFeedbackStore,
    _feedback_actor,
    _replica_id,
    _wait_ready,
    check_replica_settings,
)

log = logging.getLogger("tfb.ray")

LEASE_ACTOR = "tfb-sigma-leases"
#: the lease actor's namespace (named explicitly: the replicas and the tools that look at it agree)
LEASE_NAMESPACE = "tfb"
#: a request's fields that name its adapter, in order (/predict's, then the OpenAI routes')
NAME_FIELDS = ("adapter", "model")
#: response headers the router does not copy (the proxy frames the body itself)
HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


# --- the sigma-search lease ------------------------------------------------------------------------
class SigmaLeaseActor:
    """Who searches which adapter's sigma now, for the whole cluster: one named, detached actor
    (one method at a time, so :meth:`acquire` is atomic across replicas). A lease is held for
    ``ttl_s`` and renewed by its holder while it searches; an expired lease (its holder died or
    stalled) may be taken by another. ``grants``: how many times each key was granted anew."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}
        self.granted: dict[str, int] = {}

    def acquire(self, key: str, owner: str, ttl_s: float) -> dict[str, Any]:
        now = time.monotonic()
        held = self.leases.get(key)
        if held is not None and held[0] != owner and held[1] > now:
            return {"granted": False, "holder": held[0], "expires_in_s": held[1] - now}
        if held is None or held[0] != owner:
            self.granted[key] = self.granted.get(key, 0) + 1
        self.leases[key] = (owner, now + ttl_s)
        return {"granted": True, "holder": owner, "expires_in_s": ttl_s}

    def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        held = self.leases.get(key)
        if held is None or held[0] != owner:
            return False
        self.leases[key] = (owner, time.monotonic() + ttl_s)
        return True

    def release(self, key: str, owner: str) -> bool:
        held = self.leases.get(key)
        if held is None or held[0] != owner:
            return False
        del self.leases[key]
        return True

    def grants(self) -> dict[str, int]:
        return dict(self.granted)


def lease_actor() -> Any:
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=-1)(SigmaLeaseActor)
    return cls.options(name=LEASE_ACTOR, namespace=LEASE_NAMESPACE, lifetime="detached",
                       get_if_exists=True).remote()


class SearchElsewhereError(Exception):
    """Another replica searches this adapter's sigma: 503, retry after its search."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --- metrics ---------------------------------------------------------------------------------------
class MultiplexMetrics:
    """Per replica: adapters held, loads (by where sigma came from), evictions, cold-load latency,
    sigma searches and loads refused while another replica searches; per adapter, which replicas
    hold it (``tfb_multiplex_adapter_held{adapter, replica}``: 1 while held, 0 after). On the app's
    registry: the replica's /metrics and the Ray mirror export them."""

    def __init__(self, registry: Any, replica: str, slots: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.replica = replica
        r = {"replica": replica}
        self.held = Gauge("tfb_multiplex_adapters_held", "adapters loaded on demand that this replica holds",
                          ["replica"], registry=registry).labels(**r)
        self.slots = Gauge("tfb_multiplex_model_adapters", "adapters in the model's forwards (start-up ones "
                           "included): what an eviction freed is gone from it", ["replica"], registry=registry)
        self.slots.labels(**r).set_function(slots)
        self._loads = Counter("tfb_multiplex_loads", "adapters loaded on demand, by where sigma came from",
                              ["replica", "sigma_source"], registry=registry)
        self.evictions = Counter("tfb_multiplex_evictions", "adapters evicted (least recently used) and unloaded",
                                 ["replica"], registry=registry).labels(**r)
        self._cold = Histogram("tfb_multiplex_cold_load_seconds", "a load on demand until the adapter answers "
                               "(a searched sigma: until its search is over)", ["replica", "sigma_source"],
                               registry=registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                                                           600, 1800))
        self._searches = Counter("tfb_multiplex_sigma_searches", "sigma searches this replica ran, by adapter",
                                 ["replica", "adapter"], registry=registry)
        self.waits = Counter("tfb_multiplex_search_waits", "loads answered 503: another replica searched the "
                             "adapter's sigma", ["replica"], registry=registry).labels(**r)
        self._adapter = Gauge("tfb_multiplex_adapter_held", "1 while this replica holds the adapter",
                              ["replica", "adapter"], registry=registry)
        for source in ("fixed", "cache", "search"):
            self._loads.labels(sigma_source=source, **r)
            self._cold.labels(sigma_source=source, **r)

    def loaded(self, name: str, source: str, seconds: float | None) -> None:
        self._loads.labels(replica=self.replica, sigma_source=source).inc()
        if seconds is not None:
            self.cold(source, seconds)
        self._adapter.labels(replica=self.replica, adapter=name).set(1)

    def cold(self, source: str, seconds: float) -> None:
        self._cold.labels(replica=self.replica, sigma_source=source).observe(seconds)

    def searched(self, name: str) -> None:
        self._searches.labels(replica=self.replica, adapter=name).inc()

    def evicted(self, name: str) -> None:
        self.evictions.inc()
        self._adapter.labels(replica=self.replica, adapter=name).set(0)


# --- in-process HTTP -------------------------------------------------------------------------------
async def asgi_stream(app: Any, method: str, path: str, query: str, headers: list[tuple[str, str]],
                      body: bytes) -> AsyncIterator[Any]:
    """Answer one request with the ASGI ``app`` in this process: yields ``{"status", "headers"}``,
    then the body's chunks as the app sends them (a stream stays a stream)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    disconnected = asyncio.Event()
    sent = False
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("tfb-replica", 80)}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await queue.put(None)

    task = asyncio.create_task(run())
    started = False
    try:
        while (message := await queue.get()) is not None:
            if message["type"] == "http.response.start":
                started = True
                yield {"status": message["status"],
                       "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body"):
                    break
        if not started:  # the app ended without answering (it cannot: its error handlers answer)
            yield {"status": 500, "headers": [("content-type", "application/json")]}
            yield json.dumps({"detail": "internal error (see the server log)"}).encode()
    finally:
        disconnected.set()  # the client went away (or the answer is whole): the app's stream ends
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task


def error_chunks(path: str, status: int, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None) -> list[Any]:
    """An error answer as :func:`asgi_stream` yields one: the app's body for its route (OpenAI-style
    on /v1/ routes, ``{"detail"}`` elsewhere)."""
    from app.errors import openai_error_body

    body = openai_error_body(status, message, param=param) if path.startswith("/v1/") else {"detail": message}
    out = [("content-type", "application/json"), *((headers or {}).items())]
    return [{"status": status, "headers": out}, json.dumps(body).encode()]


# --- the adapter replicas --------------------------------------------------------------------------
class HeldAdapter:
    """An adapter this replica loaded on demand: what Ray's multiplexer keeps in its LRU. Ray calls
    :meth:`__del__` when it evicts it (in a thread): the server's unload, which waits for the
    requests that hold it, then frees everything (its slots, posterior, noise draws, prefixes,
    metric series)."""

    def __init__(self, replica: TFBAdapters, name: str, loop: asyncio.AbstractEventLoop, record: Any = None) -> None:
        self.replica, self.name, self.loop = replica, name, loop
        #: its lifecycle record while its sigma search runs (None: loaded with sigma fixed or cached)
        self.record = record
        #: requests that got the adapter from the multiplexer and are not answered yet
        self.inflight = 0
        self.evicted = False

    def __del__(self) -> None:
        if getattr(self, "evicted", True):
            return
        self.evicted = True
        try:
            self.replica._evict(self)
        except Exception:  # an eviction that broke must not break the next load (logged)
            log.exception("evicting adapter %s failed", getattr(self, "name", "?"))


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


@serve.deployment(name="tfb-adapters", **REPLICA_OPTIONS)
class TFBAdapters:
    """One replica: the base model with its start-up adapters, and up to ``max_adapters_per_replica``
    adapters of the registry loaded on demand (Ray's multiplexer, LRU)."""

    async def __init__(self, settings: dict[str, Any] | None = None, registry: str | None = None,
                       max_adapters_per_replica: int = 8, lease_ttl_s: float = 30.0, metrics_interval_s: float = 5.0,
                       ready_timeout_s: float = 3600.0, shared_feedback: bool = True) -> None:
        from app.main import create_app
        from app.predictor import FeedbackStore
        from app.registry import Registry
        from app.settings import Settings

        overrides = dict(settings or {})
        overrides.setdefault("exit_on_startup_failure", False)
        self.settings = Settings(**overrides)
        check_replica_settings(self.settings)
        if not registry:
            raise ValueError("registry: the file or folder of the adapters this deployment may load")
        self.registry = Registry(registry, self.settings, {n for n, _ in self.settings.engine_configs()})
        self.lease_ttl_s = float(lease_ttl_s)
        capacity = self.settings.feedback_store_size
        store = SharedFeedbackStore(FeedbackStore(capacity), _feedback_actor(capacity)) if shared_feedback else None
        self.fastapi = create_app(self.settings, feedback_store=store)
        self.state = self.fastapi.state.tfb
        self.replica_id = _replica_id()
        self.fastapi.add_middleware(ReplicaHeaders, replica=self.replica_id, pid=os.getpid())
        self.loop = asyncio.get_running_loop()
        self._lifespan = self.fastapi.router.lifespan_context(self.fastapi)
        await self._lifespan.__aenter__()  # the model loads on the app's worker thread
        await _wait_ready(self.state, ready_timeout_s)
        self.leases = lease_actor()
        self.metrics = MultiplexMetrics(self.state.registry, self.replica_id, self._model_adapters)
        self.held: dict[str, HeldAdapter] = {}
        #: adapters evicted while their sigma search ran: unloaded once it is over (its result cached)
        self.detached: dict[str, Any] = {}
        #: where each adapter's sigma came from at its last load (fixed, cache, search)
        self.sources: dict[str, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

        async def load(name: str) -> HeldAdapter:  # wired at run time: the maximum is a setting
            return await self._load(name)

        self._get_adapter = serve.multiplexed(max_num_models_per_replica=int(max_adapters_per_replica))(load)
        self.mirror = RayMetricsMirror(self.state.registry, metrics_interval_s, self.state.metrics.refresh_recent)
        self.mirror.start()
        log.info("replica %s (pid %d): ready, at most %d adapters of %d in the registry", self.replica_id,
                 os.getpid(), max_adapters_per_replica, len(self.registry.entries))

    def _model_adapters(self) -> int:
        """Adapters in the model's forwards (a freed slot is None): the model's own count."""
        pool = self.state.predictor.adapters if self.state.predictor is not None else None
        return 0 if pool is None else sum(p is not None for p in pool.default.classifier.posteriors)

    # --- a load on demand -----------------------------------------------------------------------------
    async def _load(self, name: str) -> HeldAdapter:
        """The multiplexer's loader: the registry's entry, loaded as the server loads one at run time."""
        started = time.monotonic()
        kept = self.detached.pop(name, None)
        if kept is not None and kept.state in ("searching", "calibrating", "ready"):
            return self._hold(name, kept)  # evicted while it searched, not unloaded yet: held again
        spec = self.registry.get(name)  # NotInRegistryError: the router's registry was older
        cfg = self.settings.adapter_config(spec)
        lifecycle = self.state.require_predictor().adapters.lifecycle
        while name in lifecycle.records and lifecycle.records[name].state == "unloading":
            await asyncio.sleep(0.05)  # a detached adapter's unload (after its search) is ending: then load
        seen: dict[str, Any] = {}

        async def before_install(record: Any, prepared: Any) -> None:
            seen["record"], seen["source"] = record, prepared.plan.source
            if prepared.plan.source == "search":
                seen["lease"] = await self._lease(name, prepared)
                seen["source"] = prepared.plan.source  # "cache" if another replica's search ended meanwhile

        loras = self.state.runtime_loras
        await loras.load_config(name, cfg, None, before_install)
        source = self.sources[name] = seen["source"]
        if source == "search":  # its search runs in the background: latency once it answers
            self.metrics.loaded(name, source, None)
            self._spawn(self._watch_search(name, seen["record"], seen.get("lease"), started))
            return self._hold(name, seen["record"])
        self.metrics.loaded(name, source, time.monotonic() - started)
        return self._hold(name, None)

    def _hold(self, name: str, record: Any) -> HeldAdapter:
        held = self.held[name] = HeldAdapter(self, name, self.loop, record)
        self.metrics.held.set(len(self.held))
        return held

    async def _lease(self, name: str, prepared: Any) -> str:
        """Take the cluster's lease on ``name``'s sigma search (its cache key), or
        :class:`SearchElsewhereError`; with it, read the cache once more (a search that ended since
        the adapter's files were read is used, not run again)."""
        from tfb_core.data.loading import default_cache_dir
        from tfb_core.search import cache
        from tfb_core.serving.startup import cached_sigma

        plan = prepared.plan
        key = cache.cache_path(default_cache_dir(plan.cfg.model.cache_dir), plan.key).stem
        got = await self.leases.acquire.remote(key, self.replica_id, self.lease_ttl_s)
        if not got["granted"]:
            self.metrics.waits.inc()
            raise SearchElsewhereError(f"adapter {name!r}: its sigma is being searched by replica {got['holder']} "
                                       "(one search per adapter for the cluster): retry later",
                                       max(1.0, min(float(got["expires_in_s"]), 10.0)))
        result = cached_sigma(plan.cfg, plan.key)
        if result is not None:
            plan.result = result
            await self.leases.release.remote(key, self.replica_id)
            return key
        self.metrics.searched(name)
        return key

    async def _watch_search(self, name: str, record: Any, key: str | None, started: float) -> None:
        """Renew the lease while ``name``'s search runs; release it when the search is over."""
        try:
            while record.state == "searching":
                if key is not None and not await self.leases.renew.remote(key, self.replica_id, self.lease_ttl_s):
                    log.warning("adapter %s: the sigma-search lease expired while searching", name)
                await asyncio.sleep(min(1.0, self.lease_ttl_s / 3))
            if record.state in ("ready", "calibrating"):
                self.metrics.cold("search", time.monotonic() - started)
        finally:
            if key is not None:
                with contextlib.suppress(Exception):
                    await self.leases.release.remote(key, self.replica_id)
            if self.detached.get(name) is record:  # evicted while it searched: its result is cached, free it
                del self.detached[name]
                await self._unload(name)

    async def _unload(self, name: str) -> None:
        """The server's unload of ``name`` (its requests answered first, then everything freed)."""
        from app.lora_updates import UnloadLoraRequest

        try:
            await self.state.runtime_loras.unload(UnloadLoraRequest(lora_name=name))
        except Exception as exc:  # noqa: BLE001 -- e.g. its search failed: freed then already
            log.info("adapter %s: nothing to unload (%s)", name, exc)
            return
        log.info("adapter %s evicted (least recently used) and unloaded", name)

    async def _release(self, held: HeldAdapter) -> None:
        """On the loop (never between the search watch's check and its unload): an adapter whose sigma
        search runs is detached (unloaded once the search is over: the search is not wasted, and
        the lease stays with this replica); any other is unloaded now."""
        record = held.record
        if record is not None and record.state == "searching":
            self.detached[held.name] = record
            log.info("adapter %s evicted while its sigma search runs: unloaded once the search is over", held.name)
            return
        await self._unload(held.name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- an eviction ------------------------------------------------------------------------------
    def _evict(self, held: HeldAdapter) -> None:
        """Ray's eviction (on a thread, while the loop runs): wait for the requests that got the adapter,
        then the server's unload, until it is freed. From the loop itself (the object collected
        without an eviction): the unload begins, and frees once its requests are answered."""
        if self.held.get(held.name) is held:
            del self.held[held.name]
        self.metrics.held.set(len(self.held))
        self.metrics.evicted(held.name)
        if _on_loop(held.loop):
            with contextlib.suppress(Exception):
                self.state.require_predictor().adapters.lifecycle.unload(held.name)
            return
        while held.inflight:
            time.sleep(0.005)
        asyncio.run_coroutine_threadsafe(self._release(held), held.loop).result(timeout=600)

    # --- requests ---------------------------------------------------------------------------------
    async def forward(self, method: str, path: str, query: str, headers: list[tuple[str, str]],
                      body: bytes) -> AsyncIterator[Any]:
        """One request, answered by this replica's app (streamed); its adapter (the multiplexed model
        id) loaded first if this replica does not hold it."""
        from app.errors import status_of

        name = serve.get_multiplexed_model_id()
        held = load = None
        if name:
            cold = name not in self.held
            try:
                held = await self._get_adapter(name)
            except SearchElsewhereError as exc:
                for chunk in error_chunks(path, 503, str(exc), {"Retry-After": str(round(exc.retry_after_s))},
                                          "model"):
                    yield chunk
                return
            except Exception as exc:  # noqa: BLE001 -- answered with the server's status for it
                status, message, headers_out = status_of(exc)
                if status == 500 and not isinstance(exc, KeyError):
                    log.exception("loading adapter %s failed", name)
                else:
                    message = str(exc)
                    status = 404 if isinstance(exc, KeyError) else status
                for chunk in error_chunks(path, status, message, headers_out, "model"):
                    yield chunk
                return
            held.inflight += 1  # no await since the multiplexer returned it: an eviction waits for this
            load = f"cold-{self.sources.get(name, 'unknown')}" if cold else "warm"
        try:
            async for chunk in asgi_stream(self.fastapi, method, path, query, headers, body):
                if load is not None and isinstance(chunk, dict):  # the answer's head: say how it was loaded
                    chunk = {**chunk, "headers": [*chunk["headers"], ("x-tfb-adapter-load", load)]}
                yield chunk
        finally:
            if held is not None:
                held.inflight -= 1

    def stats(self) -> dict[str, Any]:
        """What this replica holds: adapters, the bytes of each (its A', B', d and kept noise draws),
        the process's resident and peak resident memory (benchmarks, operators)."""
        engines = self.state.predictor.adapters.engines if self.state.predictor is not None else {}
        status = {}
        with contextlib.suppress(OSError):
            for line in open("/proc/self/status").read().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    status[key] = int(value.split()[0]) * 1024
        return {"replica": self.replica_id, "pid": os.getpid(), "held": sorted(self.held),
                "model_adapters": self._model_adapters(),
                "memory": {name: engine.memory() for name, engine in engines.items()},
                "rss_bytes": status.get("VmRSS"), "peak_rss_bytes": status.get("VmHWM")}

    async def check_health(self) -> None:
        status = self.state.status
        if status in ("failed", "draining"):
            raise RuntimeError(f"replica {self.replica_id}: {self.state.error or status}")

    async def __del__(self) -> None:
        mirror = getattr(self, "mirror", None)
        if mirror is not None:
            mirror.stop()
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            with contextlib.suppress(Exception):
                await lifespan.__aexit__(None, None, None)


# --- the ingress -----------------------------------------------------------------------------------
def adapter_of(body: bytes) -> str | None:
    """The adapter a request body names (``adapter``, else ``model``), or None (no JSON object, no name)."""
    if not body or body.lstrip()[:1] != b"{":
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None  # the replica's app answers the bad body
    for field in NAME_FIELDS:
        value = data.get(field) if isinstance(data, dict) else None
        if isinstance(value, str) and value:
            return value
    return None


@serve.deployment(name="tfb-router", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=1024)
class TFBRouter:
    """The HTTP ingress: each request to the replicas that hold its adapter (Ray's multiplexed routing)."""

    def __init__(self, adapters: Any, registry: str, settings: dict[str, Any] | None = None) -> None:
        from app.registry import Registry
        from app.settings import Settings

        s = Settings(**dict(settings or {}))
        #: names every replica serves from start-up (and the base model's, an alias of the default)
        self.served = {n for n, _ in s.engine_configs()} | {s.model}
        self.registry = Registry(registry, s, self.served)
        self.adapters = adapters

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, StreamingResponse

        body = await request.body()
        path = request.url.path
        name = adapter_of(body) if request.method == "POST" else None
        handle = self.adapters.options(stream=True)
        if name is not None and name not in self.served:
            if name not in self.registry:
                status, out = error_chunks(path, 404, f"adapter {name!r} is not in {self.registry.label}: this "
                                           "deployment loads only the adapters its operator lists there",
                                           param="model")
                return JSONResponse(json.loads(out), status_code=status["status"])
            handle = self.adapters.options(stream=True, multiplexed_model_id=name)
        stream = handle.forward.remote(request.method, path, request.url.query, list(request.headers.items()), body)
        head = await stream.__anext__()
        headers = {k: v for k, v in head["headers"] if k.lower() not in HOP_HEADERS}
        return StreamingResponse(stream, status_code=head["status"], headers=headers)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder (``serve run multiplex_app:build_app``, a serve config's ``args``).

    ``args``: TFB settings by field name (the base model and its start-up adapters, as serve_app's),
    plus ``registry`` (required: the adapters that may be loaded), ``max_adapters_per_replica``
    (default 8), ``lease_ttl_s`` (default 30), ``num_gpus``/``num_cpus`` per replica,
    ``num_replicas`` (default 1), ``metrics_interval_s``, ``ready_timeout_s``, ``shared_feedback``.
    The registry is read here first: a bad one fails the build, naming the file and the entry."""
    from app.registry import Registry
    from app.settings import Settings

    args = dict(args or {})
    registry = args.pop("registry", None) or os.environ.get("TFB_REGISTRY")
    if not registry:
        raise ValueError("registry: give the file or folder of the adapters this deployment may load "
                         "(args registry=... or TFB_REGISTRY)")
    actor = {"num_gpus": float(args.pop("num_gpus", 1)), "num_cpus": float(args.pop("num_cpus", 2))}
    options: dict[str, Any] = {"ray_actor_options": actor, "num_replicas": int(args.pop("num_replicas", 1))}
    if "max_ongoing_requests" in args:
        options["max_ongoing_requests"] = int(args.pop("max_ongoing_requests"))
    kwargs = {k: args.pop(k) for k in ("max_adapters_per_replica", "lease_ttl_s", "metrics_interval_s",
                                         "ready_timeout_s", "shared_feedback") if k in args}
    settings = Settings(**args)
    Registry(registry, settings, {n for n, _ in settings.engine_configs()} | {settings.model})  # fails the build
    adapters = TFBAdapters.options(**options).bind(settings=args, registry=str(registry), **kwargs)
    return TFBRouter.bind(adapters, str(registry), args)
