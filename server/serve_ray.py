"""Scale-out on Ray Serve: the same FastAPI app as N replicas, each with its own model and prefix cache.

    serve run deploy/ray/serve.yaml          # see that file and docs/deployment.md

Each replica calls `create_app()` with no settings, so it reads its LOGPROBS_* environment (set per
replica with `ray_actor_options.runtime_env.env_vars`: LOGPROBS_N_THREADS, LOGPROBS_MODEL,
LOGPROBS_API_KEY_FILE, ...), and its lifespan loads the model once, when the replica starts.
Serve's proxy forwards the client's Host header, so give the replicas an API key (then any Host is
accepted) or LOGPROBS_ALLOWED_HOSTS.

Routing is Serve's default (the shorter queue of two random replicas): no prefix affinity. Serve's
proxy routes before it reads the request body, so an HTTP router never sees the prompt; see
docs/deployment.md for what that costs the prefix caches. Start the nodes with
RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0, or each proxy keeps requests on its own node.

Every response carries `X-Serve-Replica: <replica id>`, so a client can tell which replica answered;
GET /metrics through the proxy reaches one replica at a time, and this header says which.
"""

from __future__ import annotations

from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = b"x-serve-replica"


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


def replica_app():
    """Called once in each replica (Serve's ingress builder): the app of server.app.create_app,
    configured from this replica's environment."""
    from server.app import create_app

    app = create_app()
    app.add_middleware(ReplicaTag, replica=serve.get_replica_context().replica_id.unique_id)
    return app


# Defaults for a config file to override (deploy/ray/serve.yaml): one replica per machine, a few
# requests queued at each (lm-eval's num_concurrent; with one sequence, the engine runs prompts one
# at a time anyway).
LogprobsServer = serve.deployment(
    serve.ingress(replica_app)(),
    name="LogprobsServer",
    max_ongoing_requests=4,
    max_replicas_per_node=1,
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)


def build(args: dict | None = None):
    """Application builder (`import_path: server.serve_ray:build`); deployment options come from the
    config file's `deployments:` section."""
    return LogprobsServer.bind()


app = build()
