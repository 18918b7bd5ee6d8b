"""Every error leaves the server in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content=error_body(message, type=type, param=param, code=code), headers=headers
    )


INTERNAL_ERROR = "Internal server error; the server log has the details."
SHUTTING_DOWN = (
    "The server is shutting down and stopped this request before it finished (past its "
    "--shutdown-grace); retry it once the server is back."
)
SHUTDOWN_RETRY_AFTER = "5"  # seconds: about what a restart of a small model takes


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence for the first problem, and the field it concerns."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    if kind == "invalid_unicode":  # server.http.protocol.Request: the message names the field
        return first["msg"] + ".", first["ctx"]["param"]
    if not loc:
        return "The request body must be a JSON object.", None
    param = loc[0]
    where = ".".join(loc)
    if kind == "extra_forbidden":
        return f"Unknown field '{where}'; this server does not support it.", param
    if kind == "missing":
        return f"Missing required field '{where}'.", param
    message = first["msg"].removeprefix("Value error, ")
    return f"Invalid '{where}': {message}.", param


async def _api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(status_code=exc.status, content=exc.body(), headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    message, param = _describe_validation(exc)
    return error_response(400, message, param=param)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    # Its headers too: a 405 must say which methods the path takes (Allow).
    return error_response(
        exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", type=kind, headers=exc.headers
    )


# FastAPI's type of an exception handler: Starlette calls the one registered for the exception's class,
# so each takes its own exception type.
ExceptionHandler = Callable[[Request, Any], Coroutine[Any, Any, Response]]

# The app's exception handlers (FastAPI(exception_handlers=...)): errors a route raises, in OpenAI's format.
EXCEPTION_HANDLERS: dict[int | type[Exception], ExceptionHandler] = {
    APIError: _api_error,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
}


class InternalErrors:
    """An exception no handler took becomes OpenAI's 500, answered here. (Starlette's own handler
    for Exception answers too, but then re-raises it to the server, and uvicorn drops the client's
    kept-alive connection: its next request would fail as well.) A request the server cancels
    (uvicorn, when --shutdown-grace runs out; a client that leaves never cancels one) becomes a
    503 with Retry-After, which lm-eval retries, instead of uvicorn's text/plain 500 and a
    traceback. Pure ASGI: streams pass through."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            # The request's own work was cancelled with it (server.api); the cancellation ends here,
            # with an answer where the status line is not sent yet.
            log.warning(
                "%s %s stopped by the shutdown before it finished%s",
                scope.get("method"),
                scope.get("path"),
                "" if started else "; answered 503",
            )
            # Handled here: the task is not being cancelled any more (Python 3.10 has no count to undo).
            if sys.version_info >= (3, 11) and (task := asyncio.current_task()) is not None:
                task.uncancel()
            if not started:
                await error_response(
                    503,
                    SHUTTING_DOWN,
                    type="server_error",
                    code="shutting_down",
                    headers={"Retry-After": SHUTDOWN_RETRY_AFTER},
                )(scope, receive, send)
        except Exception:
            # Never the exception's text in the response: it can hold paths, prompts or internals.
            log.exception("Unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if started:  # the status line is gone: nothing more can be said to this client
                raise
            await error_response(500, INTERNAL_ERROR, type="server_error")(scope, receive, send)


def without_422(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents a 422 with its own error shape on every route that takes input; this
    server answers those errors 400 in OpenAI's format (above), which each route declares
    (server/api.py). So the published schema loses the 422s and their shapes (edited in place)."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema
