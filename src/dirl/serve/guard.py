"""What keeps one client from stalling ``dirl serve`` for the others.

* :class:`GuardedH11Protocol` -- uvicorn's h11 protocol with a cap on open connections and
  deadlines on the request head and body: a slow-loris client that sends its headers a byte at a
  time (or never finishes a body) is disconnected, and connections over the cap are closed at
  once, so 3,000 of them hold neither sockets nor memory. uvicorn alone has neither (its
  keep-alive timer is cancelled by the first byte of the next request).
* :class:`DeclaredSizeGuard` -- a body whose Content-Length is over its route's cap is refused
  before a byte of it is read.
* :func:`check_stop_strings` -- caps on the number and length of a request's stop strings
  (matching them runs on a worker thread, never on the event loop).
* :class:`UpdateLog` -- the outcome of the last ``/update_weights``, reported by ``/health``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from uvicorn.protocols.http.h11_impl import H11Protocol

from dirl.serve.schemas import error_body

__all__ = ["SMALL_BODY_BYTES", "DeclaredSizeGuard", "GuardedH11Protocol", "UpdateLog", "check_stop_strings",
           "guarded_protocol"]

SMALL_BODY_BYTES = 64 * 1024   # body cap of every route without its own (GET routes need none)


def guarded_protocol(max_connections: int, header_timeout_s: float, body_timeout_s: float) -> type:
    """A :class:`GuardedH11Protocol` subclass carrying these limits (uvicorn builds one protocol
    object per connection from the class it is given)."""
    return type("GuardedH11", (GuardedH11Protocol,), {
        "max_connections": max_connections, "header_timeout_s": header_timeout_s,
        "body_timeout_s": body_timeout_s})


class GuardedH11Protocol(H11Protocol):
    """h11 with a connection cap and head/body deadlines (see the module docstring)."""

    max_connections = 512
    header_timeout_s = 10.0
    body_timeout_s = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._guard_timer: asyncio.TimerHandle | None = None
        self._guarded_cycle = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.abort()  # over the cap: no response, no buffers
            return
        self._arm(self.header_timeout_s)

    def _arm(self, seconds: float | None) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
        self._guard_timer = None if seconds is None else self.loop.call_later(seconds, self._too_slow)

    def _too_slow(self) -> None:
        self._guard_timer = None
        if not self.transport.is_closing():
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # still waiting for a request's head
            return
        if cycle is not self._guarded_cycle:  # a new request's head is complete
            self._guarded_cycle = cycle
            self._arm(self.body_timeout_s if cycle.more_body else None)
        elif not cycle.more_body and self._guard_timer is not None:  # its body is complete: the
            self._arm(None)                                          # work itself is not timed here

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(self.header_timeout_s)  # the next request's head, on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_guard_timer", None) is not None:
            self._guard_timer.cancel()
            self._guard_timer = None
        super().connection_lost(exc)


def check_stop_strings(stops: list[str], max_count: int, max_chars: int) -> str:
    """'' when ``stops`` is within the caps, else the problem (for a 400)."""
    if len(stops) > max_count:
        return f"at most {max_count} stop strings per request, got {len(stops)}"
    longest = max((len(s) for s in stops), default=0)
    if longest > max_chars:
        return f"a stop string may hold at most {max_chars} characters, got {longest}"
    return ""


@dataclass
class UpdateLog:
    """The last weight update: ``status`` is none | applied | rejected | rolled_back."""

    status: str = "none"
    message: str = ""
    weight_version: int = 0
    at: float = 0.0

    def record(self, status: str, message: str, weight_version: int) -> None:
        self.status, self.message, self.weight_version, self.at = status, message[:300], weight_version, time.time()

    def as_dict(self) -> dict:
        return asdict(self)


class DeclaredSizeGuard:
    """Refuse a body whose Content-Length is over its route's cap with the JSON 413, before a byte
    of it is read (Starlette's limiter would answer in plain text). Bodies without a length are
    counted by the routes' ``max_body_size`` while they stream in."""

    def __init__(self, app, limits: dict[str, int]):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            declared = Headers(scope=scope).get("content-length", "0")
            limit = self.limits.get(scope["path"], SMALL_BODY_BYTES)
            if not declared.isdigit() or int(declared) > limit:
                body = error_body(f"request body of {declared} bytes exceeds this route's limit of {limit} bytes",
                                  "request_too_large")
                return await JSONResponse(body, status_code=413)(scope, receive, send)
        await self.app(scope, receive, send)
