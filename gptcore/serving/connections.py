"""Connections that cannot starve the server: a bound on the time to send a request's head,
and accept errors logged once.

A socket that sends half a request head and then nothing held its file descriptor forever
(uvicorn bounds idle keep-alive connections, not a head in progress): under a 256-file limit,
300 of them made a normal request time out, and asyncio logged a traceback for every refused
accept, 415,673 of them (161 MB) in 25 s.
"""

from __future__ import annotations

import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def bounded_protocol(head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head
    within ``head_timeout_s`` of connecting or of its last response."""

    class BoundedH11(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_overdue)

        def _head_overdue(self) -> None:
            # Still waiting for a request head (h11's IDLE): a request being served is not cut.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return BoundedH11


def once_per_kind(loop, context: dict) -> None:
    """An event-loop exception handler that prints each kind of error (its message) once,
    in one line: a refused accept repeats as long as the machine is out of file descriptors."""
    message = context.get("message", "unknown error")
    seen = loop.__dict__.setdefault("_gptcore_seen", set()) if hasattr(loop, "__dict__") else set()
    if message in seen:
        return
    seen.add(message)
    exc = context.get("exception")
    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    print(f"gptcore serve: {message}{detail}; logged once, not on every repeat", file=sys.stderr, flush=True)
