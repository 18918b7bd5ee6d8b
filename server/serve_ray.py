"""Scale-out on Ray Serve: N model replicas, each with its own model and prefix cache, behind a thin
ingress that routes every prompt to the replica holding its prefix.

    serve run deploy/ray/serve.yaml          # see that file and docs/deployment.md

Serve's HTTP proxy picks a replica before it reads a request's body, so it cannot route by prompt.
Here the proxy reaches `LogprobsIngress` (light: it parses, splits and joins), which calls the model
replicas through a deployment handle; the handle's request router (server/scale/router.py) sees each
call's prompt and sends it where its prefix is cached, within a load bound (server/scale/affinity.py
says why that rule). A non-streamed completion of several token-id prompts (lm-eval's batches) is
split into one call per prompt and joined in order (server/scale/fanout.py); anything else goes whole.

Each model replica runs the app of server.app.create_app, configured from its LOGPROBS_* environment
(set for the whole application, `runtime_env.env_vars` in deploy/ray/serve.yaml: the ingress checks
the same body limit, keys and whole-request limits before it splits), on exactly the request the
client sent (method, path, headers, body): keys, the Host check, limits, errors and streaming are the
replica's own. Its responses carry `X-Serve-Replica: <replica id>` (a joined response: each part's,
comma-separated), so GET /metrics tells which replica answered. When the client leaves, the calls
are cancelled and the replicas stop the work (their app sees the client disconnect).
"""

# No `from __future__ import annotations` here: FastAPI reads the route's annotations (Request) on a
# class that Serve's ingress wraps, where string annotations were taken for query parameters.
import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import context as serve_context
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import Settings
from server.http.body_limit import BodyLimit
from server.http.errors import error_body
from server.http.request_id import HEADER as REQUEST_ID_HEADER
from server.http.request_id import choose_request_id
from server.http.security import Guard
from server.scale import asgi_call, fanout
from server.scale.asgi_call import Call

if TYPE_CHECKING:
    from ray.serve import Application

REPLICA_HEADER = b"x-serve-replica"
log = logging.getLogger(__name__)


class ReplicaTag:
    """Adds `X-Serve-Replica` to every HTTP response; pure ASGI, so streams stay unbuffered."""

    def __init__(self, app: ASGIApp, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.replica)]}
            await send(message)

        await self.app(scope, receive, tagged)


# max_ongoing_requests: Serve's own bound on the calls a replica holds. The router places prompts by
# prefix and by how many each replica was sent (affinity.py); a replica's engine queues them fairly and
# answers 429 past --max-queued-tokens. A small bound here made Serve back off and retry (up to
# 12.8 s for 8 requests of 4 prompts that compute in 2 s, measured) and sent prompts off their prefix.
@serve.deployment(
    name="LogprobsModel",
    max_ongoing_requests=64,
    max_replicas_per_node=1,
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
    request_router_config=RequestRouterConfig(request_router_class="server.scale.router:PrefixAffinityRouter"),
)
class LogprobsModel:
    """One model replica: this server's app, loaded once when the replica starts."""

    # Serve awaits an async __init__ (the replica is ready once it returns); mypy holds to Python's
    # rule that __init__ returns None, which a coroutine function does not.
    async def __init__(self) -> None:  # type: ignore[misc]
        from server.app import create_app

        self.app = create_app()
        self.app.add_middleware(ReplicaTag, replica=serve.get_replica_context().replica_id.unique_id)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # loads the model (the replica is ready after this)

    async def forward(self, call: Call) -> AsyncIterator[Message]:
        """The response to one forwarded request, message by message (a generator: streams stay streams)."""
        async for message in asgi_call.run(self.app, call):
            yield message

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)


async def _collect(model: DeploymentHandle, call: Call) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One part of a split request (run as its own task), its whole response."""
    # Serve 2.60 gives a handle call its parent request's internal id, and its router indexes the
    # calls waiting for a replica by that id: concurrent calls of one request then overwrite each
    # other there and wait forever (measured: the first part answered, the rest hung until the
    # client's timeout). Each part gets an id of its own, in this task's copy of the context.
    context = serve_context._get_serve_request_context()
    serve_context._serve_request_context.set(replace(context, _internal_request_id=uuid.uuid4().hex))
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    stream = model.options(stream=True).forward.remote(call)
    try:
        async for message in stream:
            if message["type"] == "http.response.start":
                status, headers = message["status"], message.get("headers", [])
            else:
                chunks.append(message.get("body", b""))
    except asyncio.CancelledError:
        stream.cancel()  # the client left: the replica stops this part's work
        raise
    return status, headers, b"".join(chunks)


def ingress_app() -> FastAPI:
    """The ingress's HTTP app: the same body limit, keys and Host check as a replica (so nothing is
    split or forwarded for a client the replicas would refuse), then forwarding."""
    settings = Settings.load()
    layers = [*Guard.load(settings).middleware(), Middleware(BodyLimit, max_bytes=settings.max_body_bytes)]
    app = FastAPI(
        title="logprobs-server (Ray Serve ingress)", openapi_url=None, docs_url=None, redoc_url=None, middleware=layers
    )
    app.state.settings = settings
    return app


app = ingress_app()


@serve.deployment(name="LogprobsIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class LogprobsIngress:
    def __init__(self, model: DeploymentHandle):
        self.model, self.settings = model, app.state.settings

    @app.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"], include_in_schema=False
    )
    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        # One request id for every part, so the replicas' log lines of one request share it.
        request_id = choose_request_id(request.headers.get(REQUEST_ID_HEADER, "").encode() or None)
        headers = [(k, v) for k, v in request.headers.items() if k != REQUEST_ID_HEADER]
        call: Call = {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "body": body,
            "headers": [*headers, (REQUEST_ID_HEADER, request_id)],
            "client": list(request.client) if request.client else None,
        }
        parsed = fanout.parse(body) if request.method == "POST" and body else None
        parts = fanout.split(request.url.path, parsed, self.settings, len(body)) if parsed is not None else None
        try:
            if parts is not None and parsed is not None:  # (parts come from a parsed body)
                joined = await self._split(call, parts, parsed.get("n") or 1)  # split() took n >= 1 or null
                if joined is not None:
                    return joined
            return await self._whole(call | {"route_key": fanout.route_key(parsed)})
        except asyncio.CancelledError:
            raise  # the client left: Serve cancels the calls made for it
        except Exception:
            log.exception("forwarding %s %s failed", request.method, request.url.path)
            return JSONResponse(
                error_body("No model replica could answer; retry shortly.", type="server_error"),
                status_code=503,
                headers={"Retry-After": "1"},
            )

    async def _split(self, call: Call, parts: list[fanout.JSONObject], n: int) -> Response | None:
        """The parts, each to the replica holding its prefix, joined; None: send the whole request
        (a part was refused or failed, or the parts came from different builds)."""
        headers = [(k, v) for k, v in call["headers"] if k != "content-length"]
        bodies = [json.dumps(part, separators=(",", ":")).encode() for part in parts]
        results = await asyncio.gather(
            *[
                _collect(
                    self.model,
                    call
                    | {
                        "body": body,
                        "route_key": fanout.route_key(part),
                        "headers": [*headers, ("content-length", str(len(body)))],
                    },
                )
                for part, body in zip(parts, bodies)
            ],
            return_exceptions=True,
        )  # every part ends before we go on
        collected = [result for result in results if not isinstance(result, BaseException)]
        for status, part_headers, body in collected:
            if status in (429, 503):
                # Busy: say so (with its Retry-After) rather than sending the whole request to a busy server.
                return Response(
                    body,
                    status_code=status,
                    headers={
                        k.decode("latin-1"): v.decode("latin-1")
                        for k, v in part_headers
                        if k.lower() != b"content-length"
                    },
                )
        if len(collected) < len(results) or any(status != 200 for status, _, _ in collected):
            return None  # the whole request again: the client gets a single server's error, prompt index and all
        answers = [json.loads(body) for _, _, body in collected]
        if not fanout.consistent(answers):
            log.warning("the parts of a split request came from different builds (a redeploy?): sent whole")
            return None
        joined = fanout.join(answers, n)
        replicas = sorted(
            {v.decode() for _, part_headers, _ in collected for k, v in part_headers if k == REPLICA_HEADER}
        )
        return Response(
            json.dumps(joined, ensure_ascii=False, separators=(",", ":")).encode(),
            media_type="application/json",
            headers={
                "x-serve-replica": ",".join(replicas),
                REQUEST_ID_HEADER: dict(call["headers"])[REQUEST_ID_HEADER],
                "x-system-fingerprint": joined.get("system_fingerprint", ""),
            },
        )

    async def _whole(self, call: Call) -> Response:
        stream = self.model.options(stream=True).forward.remote(call)
        start = await stream.__anext__()

        async def body() -> AsyncIterator[bytes]:
            try:
                async for message in stream:
                    yield message.get("body", b"")
            finally:
                stream.cancel()  # the client left mid-stream (a no-op once the stream is done)

        response = StreamingResponse(body(), status_code=start["status"])
        response.raw_headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        return response


def build(args: dict[str, Any] | None = None) -> "Application":
    """Application builder (`import_path: server.serve_ray:build`); deployment options come from the
    config file's `deployments:` section."""
    # serve.deployment turns each class into a Deployment, which has bind(); Ray is untyped here, so
    # mypy sees the classes as written.
    return LogprobsIngress.bind(LogprobsModel.bind())  # type: ignore[attr-defined]
