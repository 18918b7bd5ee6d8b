"""The app around a backend (by default the byte-level fake), called in-process through httpx's
ASGITransport: the HTTP layer (routes, validation, errors, keys, limits, streaming) tested without
a subprocess or a model file. An exception that escapes the app (one raised after a response has
started; the app answers the others with a 500 itself) is raised here: a test failure, as on a
real server it drops the client's kept-alive connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import httpx

from server.app import create_app
from server.backends.base import Backend
from server.config import Settings
from testing.fake_backend import ByteBackend


class InProcess:
    def __init__(self, backend: Backend | None = None, **settings):
        self.backend = backend or ByteBackend()
        self.settings = Settings.load(**settings)
        self.app = create_app(self.settings, self.backend)
        self.state = self.app.state.server

    def close(self) -> None:
        self.state.close()

    def client(self, *, host: str = "127.0.0.1:8000", peer: str = "127.0.0.1", **headers) -> httpx.AsyncClient:
        """An async client (use inside run()); `host` is the Host header, `peer` the caller's address."""
        transport = httpx.ASGITransport(app=self.app, client=(peer, 50000))
        return httpx.AsyncClient(transport=transport, base_url=f"http://{host}", headers=headers, timeout=60)

    def run(self, work: Callable[[httpx.AsyncClient], Awaitable]):
        """Run `work(client)` on a fresh event loop; returns what it returns."""

        async def go():
            async with self.client() as client:
                return await work(client)

        return asyncio.run(go())

    def request(
        self, method: str, path: str, *, host: str = "127.0.0.1:8000", headers: dict | None = None, **kwargs
    ) -> httpx.Response:
        async def go():
            async with self.client(host=host, **(headers or {})) as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(go())

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, payload=None, **kwargs) -> httpx.Response:
        return self.request("POST", path, json=payload, **kwargs)

    def events(self, path: str, payload: dict, **kwargs) -> list:
        """The `data:` payloads of a streamed request, checking the Server-Sent Events framing: every
        event one `data: ` line and a blank line, ending with [DONE] (left out of the list)."""
        response = self.post(path, payload | {"stream": True}, **kwargs)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        blocks = response.text.split("\n\n")
        assert blocks[-1] == "", "the stream must end with a blank line"
        events = []
        for block in blocks[:-1]:
            assert block.startswith("data: ") and "\n" not in block, block
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
        assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
        return events[:-1]
