"""Read timeouts for request headers and bodies: uvicorn's h11 protocol that cuts off slow clients.

uvicorn times out idle keep-alive connections only: a client that sends a request line and then a
header every few seconds (slowloris), or a body a byte at a time, holds a connection, a file
descriptor and a task for as long as it likes. :func:`timed_protocol` makes an ``H11Protocol``
that, like Apache's mod_reqtimeout,

* gives the request line and headers ``header_timeout_s`` in all, counted from the connection's
  start or the end of the previous response;
* gives the body ``body_timeout_s`` without a byte, and in all ``body_timeout_s`` plus one second
  per ``body_min_rate`` bytes received (a 200 MB upload at 1 MB/s is fine, a trickle is not);

and answers 408 (problem+json, ``Connection: close``) where no response has started, then closes
the connection. A connection that sent nothing is closed without an answer. Time during which
uvicorn itself stopped reading (the application is slow to consume the body) does not count.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("merc.api")
HEADERS, BODY, APP = "headers", "body", "app"


class _TimedH11Protocol(H11Protocol):
    """H11Protocol with the read timeouts of the class attributes below (set by :func:`timed_protocol`)."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    body_min_rate = 1024.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        now = self.loop.time()
        self._phase, self._since, self._last_data, self._checked, self._received = HEADERS, now, now, now, 0
        self._timer = self.loop.call_later(self._tick(), self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._follow(self.loop.time())
        self._received += len(data)
        self._last_data = self.loop.time()
        super().data_received(data)
        self._follow(self.loop.time())

    def _tick(self) -> float:
        return max(0.05, min(1.0, self.header_timeout_s / 4, self.body_timeout_s / 4))

    def _current_phase(self) -> str:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return HEADERS
        return BODY if cycle.more_body and not cycle.response_started else APP

    def _follow(self, now: float) -> None:
        """Start a new clock when the request moves on (headers -> body -> application -> headers)."""
        phase = self._current_phase()
        if phase != self._phase:
            self._phase, self._since, self._last_data, self._received = phase, now, now, 0

    def _check(self) -> None:
        if self.transport.is_closing():
            return
        now = self.loop.time()
        self._follow(now)
        waiting = self.cycle is not None and getattr(self.cycle, "waiting_for_100_continue", False)
        if self.flow.read_paused or waiting:  # uvicorn is not reading (or owes a 100 Continue): the clock stops
            shift = now - self._checked
            self._since, self._last_data = self._since + shift, self._last_data + shift
        self._checked = now
        reason = self._overdue(now)
        if reason is None:
            self._timer = self.loop.call_later(self._tick(), self._check)
        else:
            self._cut(reason)

    def _overdue(self, now: float) -> str | None:
        """Why the request in progress is too slow, or None."""
        if self._phase == HEADERS and now - self._since > self.header_timeout_s:
            return f"the request line and headers did not arrive within {self.header_timeout_s:g} s"
        if self._phase != BODY:
            return None
        if now - self._last_data > self.body_timeout_s:
            return f"the request body sent nothing for {self.body_timeout_s:g} s"
        if now - self._since > self.body_timeout_s + self._received / self.body_min_rate:
            return f"the request body arrived slower than {self.body_min_rate:g} bytes/s"
        return None

    def _cut(self, reason: str) -> None:
        """408 when the client sent part of a request (no response has started in these phases); then close."""
        if self._received or self._phase == BODY:
            body = {"type": "urn:merc:problem:request-timeout", "title": "Request Timeout", "status": 408}
            raw = json.dumps({**body, "detail": reason}).encode()
            head = "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n"
            head += f"content-length: {len(raw)}\r\nconnection: close\r\n\r\n"
            self.transport.write(head.encode() + raw)
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.warning("cut off %s: %s", client, reason)
        self.transport.close()


def timed_protocol(header_timeout_s: float, body_timeout_s: float, body_min_rate: float) -> type[H11Protocol]:
    """The protocol class to pass as ``uvicorn.run(..., http=...)``."""
    limits = {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s, "body_min_rate": body_min_rate}
    return type("TimedH11Protocol", (_TimedH11Protocol,), limits)
