"""Pure ASGI middleware: the body-size limit, the per-route request metrics and Server-Timing.

The body is read (up to the limit) before the app sees it, so an oversized or lying body is a
413 and never reaches the JSON parser; the metrics use the route's path, or "other" for paths
the app does not serve (bounded label values). Every response carries ``Server-Timing: app;dur=``
(milliseconds from the request reaching the app to its response), so that a client can tell the
server's share of a latency from the network's and its own; /predict adds its queue and batch times.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response
from app.metrics import Metrics


def server_timing(seconds: dict[str, float]) -> str:
    """A Server-Timing header value (W3C): ``name;dur=<ms>`` per entry."""
    return ", ".join(f"{name};dur={1e3 * value:.3f}" for name, value in seconds.items())


class ServingMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int, routes: set[str | None]) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.routes = {r for r in routes if r}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                timing = server_timing({"app": time.perf_counter() - start}).encode()
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", timing)]}
            await send(message)

        try:
            body_receive = await self._read_body(scope, receive)
            if body_receive is None:
                limit = f"request body over the limit of {self.max_body} bytes (TFB_MAX_BODY_BYTES)"
                await error_response(413, limit, {"Connection": "close"})(scope, receive, send_status)
            else:
                await self.app(scope, body_receive, send_status)
        finally:
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - start)

    async def _read_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """A receive that replays the whole body, or None when it is over the limit."""
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.max_body:
                        return None
                except ValueError:
                    return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # a disconnect: let the app see it
                first: Message | None = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        pending = [first]

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await receive()

        return replay
