"""A bound on request bodies (--max-body-bytes), enforced while they arrive, before any parsing; and
no body of ambiguous length: a request with both Transfer-Encoding and Content-Length is refused and
its connection closed (RFC 9112 section 6.1: behind a proxy that reads the other header, the rest
of the bytes would be a smuggled request). llhttp, the parser logprobs-server uses, refuses those
itself; this catches them under uvicorn's h11 parser, which does not.

Pure ASGI, so streamed responses are not buffered and the disconnect watch in server.api still
reads the real `receive` channel.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.errors import error_body


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _refusal(
        self, status: int = 413, message: str | None = None, code: str = "body_too_large"
    ) -> tuple[Message, Message]:
        message = (
            message
            or f"The request body is larger than this server's limit of {self.max_bytes} bytes (--max-body-bytes)."
        )
        body = json.dumps(error_body(message, param=None, code=code)).encode()
        start: Message = {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
        return start, {"type": "http.response.body", "body": body}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and b"transfer-encoding" in headers:
            for message in self._refusal(
                400,
                "The request has both Transfer-Encoding and Content-Length, so its "
                "length is ambiguous; send one of them.",
                "invalid_http",
            ):
                await send(message)
            return
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            for message in self._refusal():  # refused before a byte of the body is read
                await send(message)
            return
        received = 0
        too_large = False

        async def counted_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    # What the app gets ends here; its answer is replaced by the 413 below.
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message: Message) -> None:
            if too_large:
                if message["type"] == "http.response.start":
                    start, body = self._refusal()
                    await send(start)
                    await send(body)
                return  # the app's own response (a parse error of the cut body) is dropped
            await send(message)

        await self.app(scope, counted_receive, guarded_send)
