"""`tfb serve`'s HTTP server: uvicorn with h11, bounded headers, read timeouts, a connection cap and a
drain that ends on time.

What each limit does (settings, TFB_*):
- MAX_HEADER_BYTES: h11's ``max_incomplete_event_size``: a request line and headers larger than
  this get 400 and the connection closes (httptools has no such limit: h11 is chosen explicitly).
- HEADER_TIMEOUT_S: a connection must deliver a request's line and headers within this from its
  first byte (or from its opening, or from the previous response), else 408 and close: a client
  that sends headers a byte at a time, or connects and sends nothing, cannot hold a connection.
- BODY_TIMEOUT_S: the middleware reads the body within this, else 408 (app/middleware.py).
- KEEP_ALIVE_S: uvicorn's ``timeout_keep_alive``: an idle connection between requests is closed.
- MAX_CONNECTIONS: uvicorn's ``limit_concurrency``: past this many connections (or requests in
  progress) uvicorn answers its own 503 at once (plain text, no Retry-After: uvicorn's, not ours).
- DRAIN_TIMEOUT_S: on SIGTERM/SIGINT new connections are refused, the worker takes no new work,
  and this long after the signal whatever is still running is answered 503 with Retry-After
  (app/middleware.py); uvicorn's own grace ends a moment later, so the process exits within the
  timeout plus about a second. An open keep-alive connection is not cut at the signal: a request
  on it is answered 503 with Retry-After and ``Connection: close`` (every response of the drain
  closes its connection), and an idle one closes at its keep-alive timeout (KEEP_ALIVE_S), so
  the exit may wait for that too (never past the drain's bound).

Under plain ``uvicorn --factory app.main:create_app`` these are uvicorn's flags (``--http h11
--h11-max-incomplete-event-size``, ``--timeout-keep-alive``, ``--limit-concurrency``,
``--timeout-graceful-shutdown``), and no header timeout: put a proxy in front (deploy/README.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.main import create_app
from app.settings import Settings

#: uvicorn's graceful shutdown ends this long after the drain's deadline: time to send the 503s
DRAIN_GRACE_S = 1.0


def _response_408() -> bytes:
    body = b"the request headers did not arrive in time"
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on each request's line and headers."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still waiting for a whole request line and headers
                if self._header_timer is None:
                    self._arm()
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # the keep-alive timer covers an idle connection from here
            self._disarm()
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self._arm()  # a pipelined request already started

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def shutdown(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                # Idle between requests: uvicorn would close it now, and a request already on its way
                # (a client's pooled connection) would find it closed. Left open, that request is
                # answered 503 with Retry-After and Connection: close (the app is draining); the
                # keep-alive timer (or the header timer, before a first request) closes it otherwise.
                return
            super().shutdown()  # a response in progress: the connection closes after it

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection whose request headers did not arrive within %gs", timeout_s)
                self.transport.write(_response_408())
                self.transport.close()

    return HeaderTimeoutProtocol


class TFBServer(uvicorn.Server):
    """uvicorn's server that starts the app's drain clock at the signal, not after its own wait."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Any) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: Any = None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets)


def build_server(settings: Settings, **config: Any) -> TFBServer:
    """The app and its uvicorn server with the HTTP limits of ``settings`` (``config``: more uvicorn options)."""
    app = create_app(settings)
    cfg = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        http=header_timeout_protocol(settings.header_timeout_s),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_s, limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=settings.drain_timeout_s + DRAIN_GRACE_S,  # type: ignore[arg-type]
        **config)
    return TFBServer(cfg, app.state.tfb.begin_drain)


def run_server(settings: Settings) -> None:
    """Serve until a signal (what ``tfb serve`` runs)."""
    build_server(settings).run()
