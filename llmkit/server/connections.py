"""Bounds on HTTP connections that uvicorn's own options leave open: uvicorn's h11 protocol, plus three limits.

uvicorn (0.54, h11) times a connection out only after a response (`timeout_keep_alive`): a
fresh connection that sends nothing, or a request line, headers or body sent halfway, holds
its socket forever. Its `limit_concurrency` answers 503 per request but still accepts and
keeps every connection, so idle sockets pile up until the process runs out of file
descriptors. This subclass adds:

- idle timeout: a connection with no request in progress (fresh, or between keep-alive
  requests) is closed after `idle_timeout_s`;
- read timeout: a request must arrive whole (head and body) within `read_timeout_s` of its
  first byte, or the connection is closed (a slow sender cannot hold it byte by byte);
- connection cap: beyond `max_connections` open connections a new one is answered 503 with
  `Connection: close` and closed at once, before anything is read from it.
"""

from __future__ import annotations

import asyncio
import json
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REFUSAL_LOG_EVERY_S = 10.0  # a flood of refused connections logs one warning per period, not one each
RETRY_AFTER_S = 1
_REFUSAL_BODY = json.dumps(
    {
        "error": {
            "message": "the server has too many open connections; retry shortly",
            "type": "too_many_connections",
            "param": None,
            "code": "too_many_connections",
        }
    }
).encode()
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nretry-after: %d\r\nconnection: close\r\n\r\n%s"
    % (len(_REFUSAL_BODY), RETRY_AFTER_S, _REFUSAL_BODY)
)


class BoundedH11Protocol(H11Protocol):
    """H11Protocol with an idle timeout from the first moment, a whole-request read timeout and a connection cap.

    Set the three class attributes in a subclass (see `bounded_protocol`): uvicorn builds one instance per
    connection and passes only its own Config.
    """

    idle_timeout_s: float
    read_timeout_s: float
    max_connections: int
    _last_refusal_log = 0.0  # shared by all connections

    def connection_made(self, transport) -> None:
        self._read_timer: asyncio.TimerHandle | None = None
        self._refused = len(self.connections) >= self.max_connections
        if self._refused:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.idle_timeout_s, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._watch_request_read()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_request_read()  # the next request may already be partly buffered

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    # --- read timeout -------------------------------------------------------------------------------

    def _reading_request(self) -> bool:
        """A request has begun to arrive and is not complete: a partial head buffered, or its body under way."""
        state = self.conn.their_state
        return state is h11.SEND_BODY or (state is h11.IDLE and bool(self.conn.trailing_data[0]))

    def _watch_request_read(self) -> None:
        if self.transport.is_closing():
            return
        if not self._reading_request():
            self._stop_read_timer()
        elif self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        """The request did not arrive whole in time: close the connection (a handler waiting for the body sees
        a disconnect)."""
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    # --- connection cap -----------------------------------------------------------------------------

    def _refuse(self, transport) -> None:
        self.transport = transport  # connection_lost still runs for this connection
        transport.write(REFUSAL)
        transport.close()
        now = time.monotonic()
        if now - BoundedH11Protocol._last_refusal_log >= REFUSAL_LOG_EVERY_S:
            BoundedH11Protocol._last_refusal_log = now
            self.logger.warning(
                "refusing new connections: %d open, the --max-connections limit",
                len(self.connections),
                extra={"event": "connections_refused"},
            )


def bounded_protocol(*, idle_timeout_s: float, read_timeout_s: float, max_connections: int) -> type:
    """The protocol class to pass as `uvicorn.Config(http=...)`, with these limits."""
    return type(
        "LlmkitH11Protocol",
        (BoundedH11Protocol,),
        {"idle_timeout_s": idle_timeout_s, "read_timeout_s": read_timeout_s, "max_connections": max_connections},
    )
