"""The HTTP connection guard: uvicorn's httptools protocol with the bounds it lacks.

uvicorn 0.49 bounds neither how long a client may take to send a request
nor how large its head may be, and counts half-sent connections toward
``limit_concurrency`` (so that limit turns an attack into 503s for valid
clients). Measured on this server before the guard: 20,000 half-sent
unauthenticated requests exhausted the file descriptors, and a 120 MB
header took 32 s to parse while every route stalled. :class:`GuardedHttpProtocol`
adds, per connection:

- **head size**: a request head (request line and headers) over
  ``max_header_bytes`` is answered 431 and the connection closed, before
  httptools has buffered more than that plus one read (256 KiB);
- **head time**: a new connection must deliver its first request head, and
  any request its head, within ``header_timeout`` seconds of its first byte
  (408, then close); idle keep-alive connections close after
  ``keep_alive_timeout`` as uvicorn does;
- **body time**: a body must arrive within ``body_timeout`` seconds of the
  end of its head; otherwise the connection is closed and the request is
  counted as 408;
- **connection cap**: at ``max_connections`` open connections, a new one
  evicts the oldest connection that is waiting for a request head (the
  slow or idle ones), so clients that send whole requests keep being
  served; if every connection is busy with a request, the new one gets 503.
- **drain**: at shutdown an idle connection stays open ``drain_linger``
  seconds so that a request already in its socket buffer is read and
  answered rather than reset; every response sent while draining carries
  ``Connection: close`` (see :class:`serving.metrics.MetricsMiddleware`).

Timers are armed only while a request is partly received, so a request that
arrives in one read costs no timer at all.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("fedmeta.serving")


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 32 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 2048
    drain_linger: float = 0.25


def _raw_response(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the bounds in the module docstring; ``config.fedmeta_limits`` holds them."""

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ConnectionLimits = getattr(config, "fedmeta_limits", ConnectionLimits())
        self._in_head = True  # between requests or inside a request head
        self._in_body = False
        self._head_bytes = 0
        self._head_start = 0.0
        self._body_start = 0.0
        self._timer = None
        self._timer_phase = ""
        self._draining = False

    # --- connection lifecycle -------------------------------------------------------
    @property
    def _waiting(self) -> dict:
        """The server's connections that wait for a request head, oldest first (a dict keeps insertion order)."""
        waiting = getattr(self.server_state, "fedmeta_waiting", None)
        if waiting is None:
            waiting = self.server_state.fedmeta_waiting = {}
        return waiting

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_start = self.loop.time()
        self._arm("head", self.limits.header_timeout)
        self._waiting[self] = None
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._waiting.pop(self, None)
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return self._in_head and (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    def _make_room(self) -> None:
        """Over the cap: close the oldest connection waiting for a request head, or else this new one."""
        for oldest in self._waiting:
            if oldest is not self:
                oldest._close("evicted", "too many open connections; this one sent no complete request", "408 Request Timeout")
                return
        self._close("refused", "too many connections busy with requests; retry shortly", "503 Service Unavailable")

    # --- reading --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._in_head:
            if self._head_bytes == 0:
                self._head_start = self.loop.time()
            self._head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._in_head and self._head_bytes > self.limits.max_header_bytes:
            self._close("header_too_large", f"request head exceeds {self.limits.max_header_bytes} bytes", "431 Request Header Fields Too Large")
        elif self._in_head and self._head_bytes:
            self._arm("head", self._head_start + self.limits.header_timeout - self.loop.time())
        elif self._in_body:
            self._arm("body", self._body_start + self.limits.body_timeout - self.loop.time())
        else:
            self._disarm()

    def on_headers_complete(self) -> None:
        self._waiting.pop(self, None)
        self._in_head, self._in_body, self._head_bytes = False, True, 0
        self._body_start = self.loop.time()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._in_body = True, False
        super().on_message_complete()

    # --- timers ---------------------------------------------------------------------
    def _arm(self, phase: str, seconds: float) -> None:
        """A timer for the current phase (head or body); one already running for the same phase stays."""
        if self._timer is not None:
            if self._timer_phase == phase:
                return
            self._timer.cancel()
        self._timer, self._timer_phase = self.loop.call_later(max(seconds, 0.0), self._on_timeout), phase

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._in_body:
            if self.cycle is not None and not self.cycle.response_started:
                self.cycle.scope["fedmeta.timed_out"] = True  # the app sees a disconnect; metrics count a 408
            self._close("body_timeout", f"request body not received within {self.limits.body_timeout:g} s", None)
        elif self._waiting_for_head() or self._head_bytes:
            self._close("header_timeout", f"request head not received within {self.limits.header_timeout:g} s", "408 Request Timeout")

    def _close(self, event: str, message: str, status: str | None) -> None:
        self._disarm()
        self._waiting.pop(self, None)
        if status is not None and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(_raw_response(status, message))
        if event != "drained":
            self._report(event)
        self.transport.close()

    def _report(self, event: str) -> None:
        """Count a closed connection; one summary line per second at most, so an attack cannot flood the log."""
        counts = getattr(self.server_state, "fedmeta_closed", None)
        if counts is None:
            counts = self.server_state.fedmeta_closed = {"since": self.loop.time()}
        counts[event] = counts.get(event, 0) + 1
        now = self.loop.time()
        if now - counts["since"] >= 1.0 or sum(v for k, v in counts.items() if k != "since") == 1:
            since = counts.pop("since")
            log.info(json.dumps({"event": "connections_closed", **counts, "seconds": round(now - since, 3), "open_connections": len(self.connections)}))
            counts.clear()
            counts["since"] = now

    # --- shutdown -------------------------------------------------------------------
    def shutdown(self) -> None:
        """Graceful shutdown: answer what was received; close idle connections after a short linger."""
        self._draining = True
        if self._waiting_for_head() and not self._head_bytes:
            self.loop.call_later(self.limits.drain_linger, self._close_if_idle)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_head():
            self._waiting[self] = None  # the newest waiter again
            if self._draining:
                self.loop.call_later(self.limits.drain_linger, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if not self.transport.is_closing() and self._waiting_for_head() and not self._head_bytes:
            self._close("drained", "", None)
