"""tfb-serve on Ray Serve: the same FastAPI app, one replica per GPU, autoscaled.

    serve run serve_app:build_app model=... adapter=...         # ad hoc, settings as args
    serve deploy deploy/ray/serve_config.yaml                     # declarative (or KubeRay, rayservice.yaml)

Each replica is one :func:`app.main.create_app` with its own model, batching worker and metrics
registry. Ray Serve's proxy routes and queues requests across replicas; inside a replica the app's
own batcher coalesces them into N-sample forwards, as in the single-process server.

* Start-up: a replica takes traffic only once its model is loaded and warmed up (the app loads on
  a worker thread; the replica's ASGI start-up waits for it). A load failure fails the replica's
  start, with the cause in its log, and Ray retries it.
* Health: ``check_health`` is the app's readiness (failed or draining = unhealthy; the worker
  thread must be alive).
* Metrics: Prometheus cannot scrape each replica's /metrics through the proxy (each scrape would
  hit a random replica), so every replica mirrors its registry into ``ray.util.metrics`` and Ray's
  per-node metrics agent exports them, prefixed ``ray_``. Counters and histogram series are
  exported as gauges holding the cumulative values (exact buckets and sums; ``rate``,
  ``increase`` and ``histogram_quantile`` work on them as on the originals; zero-valued series
  exist from the start, which ``increase`` needs). Strip the prefix at scrape time
  (``metric_relabel_configs``, see prometheus-ray.yml) and deploy/prometheus/rules.yml and the
  Grafana dashboard work unchanged.
* Feedback: a prediction (id, probabilities, and its prediction set and abstain flag with the
  alpha and max_risk they were made at) is remembered by the replica that made it and by one
  shared actor, so POST /feedback works, and counts realised coverage and selective risk,
  whichever replica the proxy picks.
* Online prediction sets (``TFB_CONFORMAL_ONLINE``): their state lives in a second shared actor
  (:class:`OnlineStateActor`), which applies every label whichever replica it reaches; each
  replica serves from a mirror of it refreshed every second (app/online.py says what the bound
  counts then). Drift tests stay per replica: each tests its own share of the traffic, so with R
  replicas the chance that any of them ever raises a false alarm is at most R x TFB_DRIFT_DELTA.
* Each response carries ``X-TFB-Replica`` (the Serve replica id) and ``X-TFB-PID``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from ray import serve
from ray.serve import Application

log = logging.getLogger("tfb.ray")

DEFAULT_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    # requests in flight per replica that autoscaling aims for: enough to fill the app's batches
    "target_ongoing_requests": 16,
    "upscale_delay_s": 30,
    # a replica costs a model load (minutes for an 8B model): give traffic time to come back
    "downscale_delay_s": 600,
}


class RayMetricsMirror:
    """Copies a prometheus_client registry into ``ray.util.metrics`` gauges every ``interval_s``.

    Every sample becomes a gauge of the same name (``_total``, ``_bucket``, ``_sum``, ``_count``
    included) holding the sample's value, with the sample's labels as tags; ``_created``
    timestamps are skipped. ``before`` runs before each copy (e.g. the app's refresh of its
    recent-window gauges, which it otherwise does at scrape time).
    """

    def __init__(self, registry: Any, interval_s: float = 5.0, before: Callable[[], None] | None = None) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.before = before
        self._gauges: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self) -> int:
        """One copy; returns the number of samples copied."""
        from ray.util.metrics import Gauge

        if self.before is not None:
            self.before()
        copied = 0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                keys = tuple(sorted(sample.labels))
                entry = self._gauges.get(sample.name)
                if entry is None:
                    entry = (Gauge(sample.name, description=family.documentation or sample.name, tag_keys=keys), keys)
                    self._gauges[sample.name] = entry
                gauge, known = entry
                if keys != known:  # a label set the gauge was not declared with: not exportable
                    continue
                gauge.set(float(sample.value), tags=dict(sample.labels) if keys else None)
                copied += 1
        return copied

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tfb-ray-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:  # a metrics hiccup must never take the replica down
                log.exception("mirroring metrics to Ray failed")
            self._stop.wait(self.interval_s)


FEEDBACK_ACTOR = "tfb-feedback-store"


class FeedbackStoreActor:
    """Predictions of every replica by id, so /feedback works whichever replica it reaches.

    One named, detached actor per Serve application namespace; bounded like the app's own store.
    An actor runs one method at a time: :meth:`claim` is atomic across replicas. A prediction is
    kept whole, as the fields of the app's ``FeedbackRecord`` (labels, probabilities, index, and the
    prediction set, alpha, abstain and max_risk it was made with): /feedback on another replica
    counts realised coverage and selective risk as the predicting replica would. Plain dicts, so
    the actor needs none of the app's code.
    """

    def __init__(self, capacity: int) -> None:
        from collections import OrderedDict

        self.capacity = capacity
        self.items: OrderedDict[str, dict[str, Any]] = OrderedDict()  # id -> the FeedbackRecord's fields

    def add(self, pred_id: str, record: dict[str, Any]) -> None:
        known = self.items.get(pred_id)
        labelled = bool(known and known["labelled"])  # claimed by its own replica before this add arrived
        self.items[pred_id] = {**record, "labelled": labelled}
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def lookup(self, pred_id: str) -> dict[str, Any] | None:
        """The FeedbackRecord's fields of a prediction, or None if unknown. Marks nothing."""
        item = self.items.get(pred_id)
        return None if item is None or "labels" not in item else dict(item)

    def claim(self, pred_id: str) -> bool | None:
        """Mark a prediction labelled: True if this call did, False if it was already, None if the
        id is unknown (then remembered as labelled, for an :meth:`add` still on its way)."""
        item = self.items.get(pred_id)
        if item is None:
            self.items[pred_id] = {"labelled": True}
            return None
        if item["labelled"]:
            return False
        item["labelled"] = True
        return True


class SharedFeedbackStore:
    """The app's FeedbackStore, backed by :class:`FeedbackStoreActor` for other replicas' ids.

    Writes go to both (the actor call is fire-and-forget, off the /predict path). /feedback
    awaits the actor (never blocking the event loop): it finds the prediction (locally, else in
    the actor, retrying briefly for an add still on its way), validates the label, and only then
    claims it in the actor, so a mistyped label (422) never blocks the right one, and a second
    label is refused (409) whichever replica each copy reaches.
    """

    def __init__(self, local: Any, actor: Any, retries: int = 3, timeout_s: float = 10.0) -> None:
        self.local = local
        self.actor = actor
        self.capacity = local.capacity
        self.retries = retries
        self.timeout_s = timeout_s

    def __len__(self) -> int:
        return len(self.local)

    def add(self, pred_id: str, record: Any) -> None:
        from dataclasses import asdict

        self.local.add(pred_id, record)
        self.actor.add.remote(pred_id, asdict(record))

    async def _call(self, method: Any, *args: Any) -> Any:
        return await asyncio.wait_for(method.remote(*args), self.timeout_s)  # an ObjectRef is awaitable

    async def label(self, pred_id: str, target: Callable[[Any], int]) -> tuple[Any, int]:
        from app.errors import DuplicateFeedbackError, UnknownPredictionError
        from app.predictor import FeedbackRecord

        try:
            record = self.local.get(pred_id)
        except UnknownPredictionError:
            record = None
        if record is None:
            shared = await self._call(self.actor.lookup, pred_id)
            for _ in range(self.retries if shared is None else 0):
                await asyncio.sleep(0.05)  # the predicting replica's fire-and-forget add may be on its way
                shared = await self._call(self.actor.lookup, pred_id)
                if shared is not None:
                    break
            if shared is None:
                self.local.get(pred_id)  # raises the app's 404, with its message
            ps = shared.get("prediction_set")
            record = FeedbackRecord(**{**shared, "labels": tuple(shared["labels"]), "probs": list(shared["probs"]),
                               "prediction_set": None if ps is None else tuple(ps)})
        if record.labelled:
            raise DuplicateFeedbackError(f"prediction {pred_id!r} already has a label")
        index = target(record)  # a bad label: 422 here, nothing claimed
        if await self._call(self.actor.claim, pred_id) is False:
            record.labelled = True
            raise DuplicateFeedbackError(f"prediction {pred_id!r} already has a label (through another replica)")
        record.labelled = True
        return record, index


ONLINE_ACTOR = "tfb-online-conformal"


class OnlineStateActor:
    """The online prediction sets' state of every adapter, shared by the replicas (one method at a
    time: labels are applied one after another, in the order they reach it). Keyed by the text of
    the state's key (adapter, calibration content, score, Mondrian, eta); per key its ``state_id``
    (the first replica's) and, per alpha, :class:`tfb_core.decide.online.OnlineSets`'s fields."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}

    def attach(self, key: str, state_id: str, alphas: dict[str, Any]) -> dict[str, Any]:
        """The state of ``key``: the one held, else the caller's (restored or new) becomes it."""
        return self.states.setdefault(key, {"state_id": state_id, "alphas": dict(alphas)})

    def snapshot(self, key: str) -> dict[str, Any] | None:
        return self.states.get(key)

    def update(self, key: str, served: dict[str, Any], target: int, score: float,
               start: dict[str, Any]) -> dict[str, Any] | None:
        """Apply one label (the prediction's served thresholds, its true class and score); None if
        the prediction is not of this state. ``start``: the alpha's state before any label."""
        from tfb_core.decide.online import OnlineSets, Served

        state = self.states.get(key)
        if state is None or served["state_id"] != state["state_id"]:
            return None
        alpha = repr(float(served["alpha"]))
        sets = OnlineSets.from_dict(state["alphas"].get(alpha, start))
        covered = sets.update(int(target), float(score), Served.from_dict(served))
        state["alphas"][alpha] = sets.to_dict()
        return {"state": state["alphas"][alpha], "covered": covered}


class SharedOnline:
    """A replica's handle on :class:`OnlineStateActor` (what app/online.py calls; awaited, never
    blocking the event loop)."""

    def __init__(self, actor: Any, timeout_s: float = 10.0) -> None:
        self.actor = actor
        self.timeout_s = timeout_s

    async def _call(self, method: Any, *args: Any) -> Any:
        return await asyncio.wait_for(method.remote(*args), self.timeout_s)

    async def attach(self, key: str, state_id: str, alphas: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.actor.attach, key, state_id, alphas)

    async def snapshot(self, key: str) -> dict[str, Any] | None:
        return await self._call(self.actor.snapshot, key)

    async def update(self, key: str, served: dict[str, Any], target: int, score: float,
                     start: dict[str, Any]) -> dict[str, Any] | None:
        return await self._call(self.actor.update, key, served, target, score, start)


def _online_actor() -> Any:
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=-1)(OnlineStateActor)
    return cls.options(name=ONLINE_ACTOR, lifetime="detached", get_if_exists=True).remote()


def _feedback_actor(capacity: int) -> Any:
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=-1)(FeedbackStoreActor)
    return cls.options(name=FEEDBACK_ACTOR, lifetime="detached", get_if_exists=True).remote(capacity)


class ReplicaHeaders:
    """ASGI middleware: name the replica that answered (X-TFB-Replica, X-TFB-PID)."""

    def __init__(self, app: Any, replica: str, pid: int) -> None:
        self.app = app
        self.headers = [(b"x-tfb-replica", replica.encode()), (b"x-tfb-pid", str(pid).encode())]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + self.headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _wait_ready(state: Any, timeout_s: float) -> None:
    """Block until the app's worker has loaded the model; raise with the cause if it failed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while state.status == "loading":
        if loop.time() > deadline:
            raise TimeoutError(f"the model did not load within {timeout_s:.0f}s (ready_timeout_s)")
        await asyncio.sleep(0.2)
    if state.status != "ready":
        raise RuntimeError(state.error or f"replica not ready: {state.status}")


def check_replica_settings(settings: Any) -> None:
    """Refuse what one replica cannot do for all: runtime LoRA loading changes the replica that the
    proxy routes the load to, not the others (vLLM's per-instance API). ``ValueError`` naming it."""
    if settings.allow_runtime_lora_updating:
        raise ValueError("TFB_ALLOW_RUNTIME_LORA_UPDATING is per process: under Ray Serve a load would reach one "
                         "replica of many; list the adapters in TFB_ADAPTERS (every replica loads them)")


#: A replica's Ray Serve options, for this deployment and multiplex_app's adapter replicas.
REPLICA_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_gpus": 1, "num_cpus": 2},
    # In flight inside one replica: queued in the app's batcher, which fills forwards of up to
    # TFB_MAX_BATCH_ROWS rows. Keep it below the app's TFB_MAX_QUEUE so that overload queues in
    # Ray's router (across replicas) rather than bouncing with the app's 429.
    "max_ongoing_requests": 32,
    # Past this, Ray's proxy answers 503 at once instead of letting latency grow without bound.
    "max_queued_requests": 512,
    "health_check_period_s": 10,
    "health_check_timeout_s": 30,
    "graceful_shutdown_wait_loop_s": 2,
    "graceful_shutdown_timeout_s": 60,
}


@serve.deployment(name="tfb", autoscaling_config=DEFAULT_AUTOSCALING, **REPLICA_OPTIONS)
@serve.ingress()
class TFBDeployment:
    """One replica: one app, one model, on the GPU(s) Ray gave this actor."""

    async def __init__(self, settings: dict[str, Any] | None = None, metrics_interval_s: float = 5.0,
                       ready_timeout_s: float = 3600.0, shared_feedback: bool = True) -> None:
        from app.main import create_app
        from app.predictor import FeedbackStore
        from app.settings import Settings

        overrides = dict(settings or {})
        # A failed load must fail the replica's start (Ray reports it and retries), not exit the process.
        overrides.setdefault("exit_on_startup_failure", False)
        self.settings = Settings(**overrides)  # TFB_* from the environment, overridden by args
        check_replica_settings(self.settings)
        capacity = self.settings.feedback_store_size
        store = SharedFeedbackStore(FeedbackStore(capacity), _feedback_actor(capacity)) if shared_feedback else None
        online = SharedOnline(_online_actor()) if shared_feedback else None
        self.fastapi = create_app(self.settings, feedback_store=store, shared_online=online)
        self.state = self.fastapi.state.tfb
        self.replica_id = _replica_id()
        self._install_replica_headers()
        self._wait_for_model_on_startup(ready_timeout_s)
        self.mirror = RayMetricsMirror(self.state.registry, metrics_interval_s, self.state.metrics.refresh_recent)
        self.mirror.start()
        log.info("replica %s (pid %d): app created, model loading", self.replica_id, os.getpid())

    def __serve_build_asgi_app__(self) -> Any:
        return self.fastapi

    def _install_replica_headers(self) -> None:
        self.fastapi.add_middleware(ReplicaHeaders, replica=self.replica_id, pid=os.getpid())

    def _wait_for_model_on_startup(self, timeout_s: float) -> None:
        # Ray Serve runs the app's lifespan as part of starting the replica; extending that
        # start-up until the model is ready keeps traffic away from a replica that would 503.
        inner = self.fastapi.router.lifespan_context
        state = self.state

        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[Any]:
            async with inner(app) as value:
                await _wait_ready(state, timeout_s)
                yield value

        self.fastapi.router.lifespan_context = lifespan

    async def check_health(self) -> None:
        """Unhealthy (Ray replaces the replica) when the app failed, drains, or lost its worker."""
        status = self.state.status
        if status in ("failed", "draining"):
            raise RuntimeError(f"replica {self.replica_id}: {self.state.error or status}")
        thread = getattr(self.state.worker, "_thread", None)
        if status == "ready" and thread is not None and not thread.is_alive():
            raise RuntimeError(f"replica {self.replica_id}: the model worker thread has died")

    def __del__(self) -> None:
        mirror = getattr(self, "mirror", None)
        if mirror is not None:
            mirror.stop()


def _replica_id() -> str:
    try:
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return str(getattr(rid, "unique_id", None) or rid or getattr(ctx, "replica_tag", "unknown"))
    except Exception:  # outside a replica (tests constructing the class directly)
        return f"local-{os.getpid()}"


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Application builder for ``serve run serve_app:build_app`` and serve_config.yaml's ``args``.

    ``args``: TFB settings by field name (``model``, ``adapter``, ``task``, ``sigma``... as in
    ``TFB_<FIELD>``; the environment is read too), plus ``num_gpus``/``num_cpus`` per replica,
    ``num_replicas`` (fixed count instead of autoscaling), ``metrics_interval_s``,
    ``ready_timeout_s`` and ``shared_feedback`` (default true: /feedback finds predictions made by
    any replica, through one small named actor).
    """
    args = dict(args or {})
    options: dict[str, Any] = {}
    actor = {"num_gpus": float(args.pop("num_gpus", 1)), "num_cpus": float(args.pop("num_cpus", 2))}
    options["ray_actor_options"] = actor
    if "num_replicas" in args:
        options["num_replicas"] = int(args.pop("num_replicas"))
        options["autoscaling_config"] = None
    deploy_kwargs = {k: args.pop(k) for k in ("metrics_interval_s", "ready_timeout_s", "shared_feedback") if k in args}
    return TFBDeployment.options(**options).bind(settings=args, **deploy_kwargs)


#: ``serve run serve_app:app`` with every setting from TFB_* environment variables.
app = TFBDeployment.bind()
