"""One HTTP request run through an ASGI app in this process, its response as it comes: how a model
replica serves what the ingress forwards (the replica's own app, with its keys, limits, errors and
streaming, and nothing in between). Leaving early (the client went away) tells the app so, as a
server does: its receive() answers http.disconnect and its task is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from starlette.types import ASGIApp, Message, Scope
from typing_extensions import NotRequired, TypedDict


class Call(TypedDict):
    """A request as the ingress forwards it to a model replica (server/serve_ray.py): what the client
    sent, in values Ray can pass between processes."""

    method: str
    path: str
    headers: list[tuple[str, str]]  # (name, value), as the client sent them
    query: NotRequired[str]
    body: NotRequired[bytes]
    client: NotRequired[list[str | int] | None]  # [host, port]
    route_key: NotRequired[list[int] | str | None]  # what the router matches prefixes by (fanout.route_key)


def scope_of(call: Call) -> Scope:
    """The ASGI scope of a forwarded request: method, path, query, headers as the client sent them."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "http",
        "method": call["method"],
        "path": call["path"],
        "raw_path": call["path"].encode(),
        "query_string": call.get("query", "").encode(),
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in call["headers"]],
        "client": tuple(call.get("client") or ("127.0.0.1", 0)),
        "server": ("127.0.0.1", 80),
    }


async def run(app: ASGIApp, call: Call) -> AsyncIterator[Message]:
    """The app's http.response.start and http.response.body messages for `call`."""
    messages: asyncio.Queue[Message] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call.get("body", b""), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.ensure_future(app(scope_of(call), receive, messages.put))  # an ASGI app returns an awaitable
    try:
        while True:
            getter = asyncio.ensure_future(messages.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                if messages.empty():
                    await task  # the app ended without finishing its response: raise what it raised
                    return
                message = messages.get_nowait()
            else:
                message = getter.result()
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                return
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
