"""Pure ASGI middleware: body limits, content types, clients that leave, the drain's deadline, the
per-route request metrics and Server-Timing.

The body is read (up to the limit, within TFB_BODY_TIMEOUT_S) before the app sees it, so an
oversized or lying body is a 413, a body that does not arrive in time a 408, and neither reaches
the JSON parser; a body that is not JSON (content type) or is compressed (content encoding) is a
415. While the app works on a request, the connection is watched: a client that disconnects gets
its request cancelled (the model worker then skips its forward; status 499 in the metrics, as
nginx logs it), and when the drain's deadline passes at shutdown, a request still running is
answered 503 with Retry-After. The metrics use the route's path, or "other" for paths the app
does not serve (bounded label values). Every response carries ``Server-Timing: app;dur=``
(milliseconds from the request reaching the app to its response), so that a client can tell the
server's share of a latency from the network's and its own; /predict adds its queue and batch times.
On the vLLM-compatible paths (``openai_paths``) these errors come in vLLM's body (app/errors.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response, openai_error_response
from app.metrics import Metrics


def server_timing(seconds: dict[str, float]) -> str:
    """A Server-Timing header value (W3C): ``name;dur=<ms>`` per entry."""
    return ", ".join(f"{name};dur={1e3 * value:.3f}" for name, value in seconds.items())


class Expiry:
    """Set once, when the drain's deadline has passed; requests can wait on it (one future per loop).
    ``draining``: the drain has begun (every response from then on closes its connection)."""

    def __init__(self) -> None:
        self.is_set = False
        self.draining = False
        self._future: asyncio.Future[None] | None = None

    def future(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        if self._future is None or self._future.get_loop() is not loop:  # an app served again on another loop
            self._future = loop.create_future()
            if self.is_set:
                self._future.set_result(None)
        return self._future

    def set(self) -> None:
        self.is_set = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)


#: status counted for a request whose client disconnected before its answer (nginx's convention)
CLIENT_CLOSED = 499
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def unsupported_media(scope: Scope) -> str | None:
    """Why a request body cannot be read as JSON (a 415), or None: it is JSON, or untyped."""
    encoding = _header(scope, b"content-encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        return f"content-encoding {encoding.strip()!r} is not supported: send an uncompressed JSON body"
    ctype = _header(scope, b"content-type")
    if ctype is None:
        return None  # parsed as JSON, as FastAPI does
    media = ctype.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return None
    return f"unsupported content type {media or ctype!r}: send application/json"


def _gone(watch: asyncio.Future[Message]) -> bool:
    """Whether the message received after the body says the client disconnected."""
    return (watch.done() and not watch.cancelled() and watch.exception() is None
            and watch.result().get("type") == "http.disconnect")


class ServingMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int, routes: set[str | None],
                 body_timeout_s: float = 30.0, expiry: Expiry | None = None,
                 max_header_bytes: int | None = None, openai_paths: set[str] | frozenset[str] = frozenset()) -> None:
        self.app = app
        self.openai_paths = frozenset(openai_paths)
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.routes = {r for r in routes if r}
        self.body_timeout_s = body_timeout_s
        self.expiry = expiry or Expiry()
        self.max_header_bytes = max_header_bytes

    def _error(self, scope: Scope, status: int, message: str, headers: dict[str, str]) -> ASGIApp:
        """The error response, in vLLM's body on its paths, else ours."""
        if scope["path"] in self.openai_paths:
            return openai_error_response(status, message, headers)
        return error_response(status, message, headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        start = time.perf_counter()
        status = 500
        started = False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                timing = server_timing({"app": time.perf_counter() - start}).encode()
                headers = [*message.get("headers", []), (b"server-timing", timing)]
                if self.expiry.draining and not any(k.lower() == b"connection" for k, _ in headers):
                    # shutting down: a keep-alive client must not send its next request here
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        # This request's task is cancelled (by callbacks, no extra tasks) when its body is late, when
        # its client disconnects, or when the drain's deadline passes, each only before its response
        # starts; the reason tells those cancellations from the server's own.
        task = asyncio.current_task()
        reason: list[str] = []
        live = True

        def stop(why: str) -> None:
            if live and not started and not reason and task is not None:
                reason.append(why)
                task.cancel()

        def on_expiry(_: asyncio.Future[None]) -> None:
            stop("expired")

        expired = self.expiry.future()
        expired.add_done_callback(on_expiry)
        watch: list[asyncio.Future[Message]] = []
        try:
            try:
                await self._handle(scope, receive, send_status, route, stop, watch)
            except asyncio.CancelledError:
                if not reason:
                    raise  # the server's cancellation, not ours
                live = False
                uncancel = getattr(task, "uncancel", None)  # Python >= 3.11: this cancellation is handled
                if uncancel is not None:
                    uncancel()
                if reason[0] == "gone":
                    status = CLIENT_CLOSED
                elif reason[0] == "body":
                    await self._error(scope, 408, f"the request body did not arrive within {self.body_timeout_s:g}s "
                                      "(TFB_BODY_TIMEOUT_S)", {"Connection": "close"})(scope, receive, send_status)
                else:
                    await self._error(scope, 503, "the server is shutting down: not answered within the drain "
                                      "timeout (TFB_DRAIN_TIMEOUT_S)",
                                      {"Retry-After": "5", "Connection": "close"})(scope, receive, send_status)
        finally:
            live = False
            expired.remove_done_callback(on_expiry)
            for w in watch:
                w.cancel()
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - start)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, route: str, stop: Callable[[str], None],
                      watch: list[asyncio.Future[Message]]) -> None:
        """Refuse what cannot be read, read the body (``stop("body")`` when late), run the app while
        watching for the client's disconnect (``stop("gone")``; the watch is appended to ``watch``)."""
        if self.max_header_bytes is not None:
            # h11 bounds the headers it buffers (TFB_MAX_HEADER_BYTES), but headers that arrive in one
            # read of the socket are parsed whole: refuse those here, as nginx does
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
                len(k) + len(v) + 4 for k, v in scope.get("headers", []))
            if size > self.max_header_bytes:
                await self._error(scope, 431, f"request headers of {size} bytes are over the limit of "
                                  f"{self.max_header_bytes} (TFB_MAX_HEADER_BYTES)",
                                  {"Connection": "close"})(scope, receive, send)
                return
        if scope["method"] in _BODY_METHODS and route != "other":
            why = unsupported_media(scope)
            if why is not None:
                await self._error(scope, 415, why, {"Connection": "close"})(scope, receive, send)
                return
        timer = asyncio.get_running_loop().call_later(self.body_timeout_s, stop, "body")
        try:
            body = await self._read_body(scope, receive)
        finally:
            timer.cancel()
        if body is None:
            limit = f"request body over the limit of {self.max_body} bytes (TFB_MAX_BODY_BYTES)"
            await self._error(scope, 413, limit, {"Connection": "close"})(scope, receive, send)
            return
        if body["type"] != "http.request":  # gone while sending its body
            stop("gone")
            await asyncio.sleep(0)  # take the cancellation here
            return
        # after the body, the next message is the client's disconnect (or the response's end): watch
        # for it while the app works, and share it with the app if it asks
        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(lambda f: stop("gone") if _gone(f) else None)
        watch.append(watcher)
        pending = [body]

        async def replay() -> Message:
            if pending:
                return pending.pop()
            return await asyncio.shield(watcher)

        await self.app(scope, replay, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> Message | None:
        """The whole body as one message (or the disconnect that cut it), or None over the limit."""
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body:
                    return None
            except ValueError:
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # a disconnect
                return message
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
