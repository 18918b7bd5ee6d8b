"""The ASGI application: `uvicorn server.app:app` reads LOGPROBS_* environment variables; the CLI
passes the Settings it built from the environment and its flags; tests and embedders may pass a
backend they built (then nothing is loaded from disk, and the app is ready without its lifespan)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware import Middleware

from server.api import router
from server.backends.base import Backend
from server.config import ConfigError, Settings
from server.http.body_limit import BodyLimit
from server.http.errors import EXCEPTION_HANDLERS, InternalErrors, without_422
from server.http.request_id import install_request_id_logging
from server.http.security import Guard
from server.models import ResolvedModel
from server.observability.metrics import ObservabilityMiddleware
from server.state import ServerState


def configure_logging(level: str) -> None:
    # [request id]: "-" on lines logged outside any request (see server/http/request_id.py).
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    logging.getLogger("server").setLevel(level.upper())
    install_request_id_logging()


def middleware(settings: Settings, guard: Guard) -> list[Middleware]:
    """The layers around the routes, outermost first (Starlette runs its own error layer outside
    them and its exception handlers, EXCEPTION_HANDLERS, inside):

    1. request ids and counts, around everything else, so that every answer below is counted and
       carries its id (the 401s, the 413s, the 500s);
    2. the Host check, then the API key (http/security.py; either may be off);
    3. the body limit (413), for requests that got past both: it answers 413 in place of whatever
       the app said about a body it cut short, a 500 included;
    4. an exception the routes did not handle becomes OpenAI's 500 here, and a shutdown's
       cancellation a 503, without dropping the connection;
    then the routes, whose bodies are parsed off the event loop (http/body.py)."""
    return [
        Middleware(ObservabilityMiddleware),
        *guard.middleware(),
        Middleware(BodyLimit, max_bytes=settings.max_body_bytes),
        Middleware(InternalErrors),
    ]


class LogprobsAPI(FastAPI):
    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema, without the 422s it documents on its own (errors are 400s here)."""
        if self.openapi_schema is None:
            self.openapi_schema = without_422(super().openapi())
        return self.openapi_schema


def create_app(
    settings: Settings | None = None, backend: Backend | None = None, model: ResolvedModel | None = None
) -> FastAPI:
    """The app, around the model the settings name (loaded at start-up, in the lifespan; `model`:
    already found by the caller, as the CLI does) or around `backend` (the state is built now, so
    in-process clients such as httpx's ASGITransport, which run no lifespan, can call it at once;
    close it with app.state.server.close())."""
    problem: ConfigError | None = None
    if settings is None:  # `uvicorn server.app:app`: the environment's settings
        try:
            settings = Settings.load()
            guard = Guard.load(settings)  # API keys (and the key file) are read here, once
        except ConfigError as exc:
            problem = exc  # reported at start-up, not at import
    else:
        guard = Guard.load(settings)  # a ConfigError is the caller's (the CLI's) to report

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            if problem is not None:
                raise problem
            assert settings is not None  # loaded: no problem was met
            configure_logging(settings.log_level)
            if getattr(app.state, "server", None) is None:
                app.state.server = ServerState.build(settings, model=model)
        except ConfigError as exc:
            # Starlette reports any startup failure with a traceback; a setting the user must fix
            # deserves one clear line instead, so exit here.
            print(f"logprobs-server: error: {exc}", file=sys.stderr, flush=True)
            os._exit(2)
        logging.getLogger(__name__).info("Serving '%s'", app.state.server.model_name)
        yield
        app.state.server.close()

    # A setting the user must fix: the lifespan reports it at start-up; until then, no layers.
    layers: list[Middleware] = []
    if problem is None:
        assert settings is not None  # loaded: no problem was met
        layers = middleware(settings, guard)
    app = LogprobsAPI(
        title="logprobs-server",
        summary="OpenAI-compatible completions with echo and exact per-token logprobs for local models.",
        lifespan=lifespan,
        # No redirects from this API: `/v1/completions/` is a 404 in OpenAI's format, not a 307 whose
        # Location Starlette builds from the client's Host header.
        redirect_slashes=False,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=layers,
    )
    app.include_router(router)
    if backend is not None:
        if problem is not None:  # no lifespan will report it: the caller hears it now
            raise problem
        assert settings is not None  # loaded: no problem was met
        app.state.server = ServerState.build(settings, backend)
    return app


app = create_app()
