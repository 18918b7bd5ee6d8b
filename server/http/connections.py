"""The HTTP connection itself, below the ASGI app: uvicorn's httptools protocol (llhttp, which refuses
ambiguous framing such as Transfer-Encoding with Content-Length, as RFC 9112 section 6.1 asks) with
two additions that no ASGI layer can make, since they happen before there is a request:

- a bound on the time a client takes to deliver a whole request, from the moment its connection
  opens or its request begins (--request-read-timeout): a connection that never sends a byte,
  headers sent a byte at a time, a body shorter than its Content-Length are answered 408 and
  closed, instead of holding a descriptor for ever (uvicorn bounds only the idle time between
  requests);
- the parser's own refusals answered in OpenAI's JSON error format, not uvicorn's text/plain.

`logprobs-server` serves with it; `uvicorn server.app:app --http server.http.connections:HttpProtocol`
does too, with the default bound.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.config import Settings
from server.http.errors import error_body

DEFAULT_READ_TIMEOUT: float = Settings.model_fields["request_read_timeout"].default


def _raw_response(status: int, reason: bytes, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 response, OpenAI's error as its body, closing the connection."""
    body = json.dumps(error_body(message, code=code)).encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class HttpProtocol(HttpToolsProtocol):
    read_timeout: float = DEFAULT_READ_TIMEOUT

    _read_deadline: asyncio.TimerHandle | None = None
    _reading = False  # a request has begun and is not yet whole

    # uvicorn's HttpToolsProtocol takes an asyncio.Transport here, narrower than asyncio's BaseTransport,
    # and ignores the same override error; this signature is uvicorn's.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _answering(self) -> bool:
        """A response is in progress (uvicorn stops reading a pipelined request meanwhile)."""
        return self.cycle is not None and not self.cycle.response_complete

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = True
        if self._read_deadline is None and not self._answering():  # a kept-alive connection's next request
            self._arm()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading = False
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._reading and self._read_deadline is None and not self.transport.is_closing():
            self._arm()  # a pipelined request was begun while the previous one was answered

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if self.read_timeout > 0:
            self._read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        self.logger.info(
            "Closed a connection from %s that did not deliver a whole request within %g s (--request-read-timeout)",
            self.client[0] if self.client else "?",
            self.read_timeout,
        )
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.transport.write(
                _raw_response(
                    408,
                    b"Request Timeout",
                    f"The request did not arrive whole within {self.read_timeout:g} s "
                    "(the server's --request-read-timeout); send it at once.",
                    "request_timeout",
                )
            )
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this when the parser refuses the bytes (framing, a malformed request line or
        header, Transfer-Encoding beside Content-Length)."""
        self._disarm()
        self.transport.write(
            _raw_response(
                400,
                b"Bad Request",
                "The request is not valid HTTP/1.1 (malformed "
                "request line, headers or framing); it was refused and the connection "
                "closed.",
                "invalid_http",
            )
        )
        self.transport.close()


def protocol_with(read_timeout: float) -> type[HttpProtocol]:
    """The protocol class for uvicorn, with this bound (uvicorn builds one instance per connection
    and has no setting to carry it)."""
    return type("HttpProtocol", (HttpProtocol,), {"read_timeout": read_timeout})
