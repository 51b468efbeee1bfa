"""A throwaway loopback Ray cluster running one Serve application, for the Ray tests."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import httpx

#: Ray Serve's proxy readiness and health check timeouts, in seconds, for a loaded CI machine.
PATIENT_PROXY = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_serve(modules: Sequence[ModuleType], build: Callable[[], Any], name: str,
                ready_timeout_s: float = 300) -> Iterator[dict[str, Any]]:
    """Start Ray (2 CPUs, no dashboard, no auth token written to ~/.ray) and Serve on loopback ports,
    run ``build()``'s application as ``name`` and wait until its ``/readyz`` answers 200 through the
    proxy; yield ``{"base", "metrics_port"}``; shut everything down and restore the environment.
    ``modules`` are shipped to the workers by value (they need not import them from a path)."""
    import ray
    from ray import cloudpickle, serve

    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    # The controller kills a proxy that is not ready within 5 s (Ray's default): on 2 loaded cores a
    # worker process can take longer to start, and serve.start then fails with ProxyActor died.
    # Environment of the processes ray.init starts, restored after.
    saved = {k: os.environ.get(k) for k in (*PATIENT_PROXY, "RAY_AUTH_MODE")}
    os.environ.update(PATIENT_PROXY)
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway loopback cluster: no token written to ~/.ray
    metrics_port, http_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build(), name=name, route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + ready_timeout_s
        while True:  # serve.run returns once the replicas are running; the proxy may lag a little
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Ray Serve application did not become ready"
            time.sleep(0.5)
        yield {"base": base, "metrics_port": metrics_port}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            for module in modules:
                cloudpickle.unregister_pickle_by_value(module)
