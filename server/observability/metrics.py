"""Prometheus metrics (served by GET /metrics, server/api.py) and the middleware that counts requests
and gives each one its request id (its place among the layers: server/app.py).

Each server state holds its own CollectorRegistry (not prometheus-client's global one), so several
apps can live in one process. What the engine does is heard through its hooks, on the model thread
(prometheus-client's metrics are thread-safe, and an increment is cheap); queue and prefix-cache
figures are read from the engine when /metrics is scraped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.engine import Engine, EngineHooks
from server.http.request_id import HEADER, choose_request_id, reset_request_id, set_request_id

if TYPE_CHECKING:
    from server.observability.fingerprint import Fingerprint

OTHER_ROUTE = "other"  # the route label of paths no route serves: clients cannot add label values
# Requests run from milliseconds (a tokenization) to minutes (an lm-eval batch of long prompts).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class MetricsHooks(EngineHooks):
    """The engine's events, counted (called on the model thread)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def job_admitted(self, waited: float) -> None:
        self.metrics.queue_wait.observe(waited)

    def job_ended(self, prompt_tokens_run: int, prompt_tokens_reused: int, generated: int) -> None:
        m = self.metrics
        m.prompt_tokens_run.inc(prompt_tokens_run)
        m.prompt_tokens_reused.inc(prompt_tokens_reused)
        m.generated_tokens.inc(generated)


class EngineCollector:
    """The queue and the prefix cache, read at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        yield GaugeMetricFamily(
            "logprobs_queue_jobs", "Jobs (one per prompt and sample) waiting for the model.", value=engine.queued_jobs
        )
        yield GaugeMetricFamily(
            "logprobs_queue_tokens",
            "Tokens (prompt + max_tokens) of the jobs waiting for the "
            "model; requests beyond --max-queued-tokens get 429.",
            value=engine.queued_tokens,
        )
        cache = engine.cache  # None when off (an empty PrefixCache is falsy: it has a length)
        yield CounterMetricFamily(
            "logprobs_prefix_cache_lookups",
            "Scored prompts looked up in the prefix cache.",
            value=cache.lookups if cache is not None else 0,
        )
        yield CounterMetricFamily(
            "logprobs_prefix_cache_hits",
            "Prefix cache lookups that found a prefix to reuse.",
            value=cache.hits if cache is not None else 0,
        )
        yield CounterMetricFamily(
            "logprobs_prefix_cache_reused_tokens",
            "Prompt positions restored from the prefix cache instead of run.",
            value=cache.reused_tokens if cache is not None else 0,
        )
        yield GaugeMetricFamily(
            "logprobs_prefix_cache_bytes",
            "Memory held by the prefix cache's entries.",
            value=cache.used if cache is not None else 0,
        )
        yield GaugeMetricFamily(
            "logprobs_prefix_cache_capacity_bytes",
            "The prefix cache's bound (--prefix-cache-mb; 0: off).",
            value=cache.max_bytes if cache is not None else 0,
        )
        yield GaugeMetricFamily(
            "logprobs_prefix_cache_entries",
            "Prompts held by the prefix cache.",
            value=len(cache) if cache is not None else 0,
        )


class Metrics:
    """One server's metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "logprobs_requests_total",
            "HTTP requests, by route template and the status sent.",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "logprobs_request_duration_seconds",
            "Time from a request's arrival to the last byte of its response (a stream's whole length), by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens_run = Counter(
            "logprobs_prompt_tokens_run_total",
            "Prompt tokens run through the model (scored or not; prefix-cache reuse not counted).",
            registry=r,
        )
        self.prompt_tokens_reused = Counter(
            "logprobs_prompt_tokens_reused_total",
            "Prompt tokens whose KV state and scores came from the prefix cache instead of the model.",
            registry=r,
        )
        self.generated_tokens = Counter("logprobs_generated_tokens_total", "Tokens generated.", registry=r)
        self.queue_wait = Histogram(
            "logprobs_queue_wait_seconds",
            "Time a job (one prompt and sample) waited in the queue before the model took it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.load_seconds = Gauge(
            "logprobs_model_load_seconds", "Seconds the backend took to load the model.", registry=r
        )
        self.model_info = Info(
            "logprobs_model",
            "The served model id, its system_fingerprint, and the parts that fingerprint hashes.",
            registry=r,
        )
        self.hooks = MetricsHooks(self)

    def describe_server(self, engine: Engine, model_name: str, fingerprint: Fingerprint, load_seconds: float) -> None:
        """What is known once the model is loaded: the engine to read at scrape time, and the info."""
        self.registry.register(EngineCollector(engine))
        self.load_seconds.set(load_seconds)
        self.model_info.info({"model": model_name, "system_fingerprint": fingerprint.short, **fingerprint.parts})

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _leaf_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        included = getattr(route, "original_router", None)  # newer FastAPI keeps an included router whole
        yield from (_leaf_routes(included.routes) if included is not None else (route,))


class ObservabilityMiddleware:
    """Pure ASGI (it neither buffers a streamed body nor reads the request's `receive` channel
    itself; it watches what the app reads): gives each HTTP request its id (the client's
    x-request-id if sane, else a new one) in the logging context and on the response, and counts
    it by route and the status actually sent, or 499 (nginx's and vLLM's "client closed request")
    when the client left before the whole answer: a client hanging up halfway through its body
    otherwise counts as the 400 that Starlette makes of the broken body, which nobody receives, and
    an abandoned stream as the 200 its first line said."""

    def __init__(self, app: ASGIApp):
        self.app = app

    def _route(self, scope: Scope, owner: Starlette) -> str:
        """The route template that served the request: the route FastAPI's routing chose (in the
        scope once routing ran), else the route of `owner` the path matches (a response sent before
        routing, such as an auth middleware's 401), else "other"."""
        route = scope.get("route")
        if route is None:
            routes = _leaf_routes(owner.router.routes)
            route = next((r for r in routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or OTHER_ROUTE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The application, as Starlette put it in the scope on the way in (read now: a mounted
        # sub-application would replace it in the shared scope on its way through).
        owner: Starlette = scope["app"]
        started = time.perf_counter()
        sent_id = next((value for name, value in scope["headers"] if name == HEADER.encode()), None)
        request_id = choose_request_id(sent_id)
        header = (HEADER.encode(), request_id.encode())
        status: int | None = None
        answered = False  # the response's last byte was sent
        left = False  # the client disconnected before that

        async def watch_receive() -> Message:
            nonlocal left
            message = await receive()
            if message["type"] == "http.disconnect" and not answered:
                left = True
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered, left
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            try:
                await send(message)
            except OSError:  # a stream's client gone (ASGI 2.4 servers say so here, not in receive)
                left = True
                raise
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True

        token = set_request_id(request_id)
        try:
            await self.app(scope, watch_receive, send_with_id)
        finally:
            reset_request_id(token)
            state = getattr(owner.state, "server", None)
            if state is not None:
                # Nothing sent: the app failed after it had begun (before that, its InternalErrors
                # layer answers a 500 itself) or the connection went first.
                route = self._route(scope, owner)
                state.metrics.requests.labels(route, "499" if left else str(status or 500)).inc()
                state.metrics.latency.labels(route).observe(time.perf_counter() - started)
