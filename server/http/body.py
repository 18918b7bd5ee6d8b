"""Request bodies parsed and validated off the event loop.

FastAPI reads a JSON body and validates it against the route's request model on the event loop; a
body at the size limit (8 MiB of one-token prompts: 1.6 million of them) takes seconds to parse and
validate, and /health and every other client would wait as long. Routes of this class do both in a
worker thread and hand FastAPI the validated model, which it accepts as it is; an invalid body gets
the same RequestValidationError (so the same 400) that FastAPI would raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect


def _json_content(request: Request, strict: bool) -> bool:
    """FastAPI's rule: application/json or application/*+json, or (not strict) no content type."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind:
        return not strict
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """The body as `model`, or FastAPI's own RequestValidationError for it."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
            ]
        ) from None
    except RecursionError:  # nested deeper than the parser goes
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", 0),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": "it nests too deeply"},
                }
            ]
        ) from None
    except UnicodeDecodeError:
        raise  # FastAPI's handler reports bytes that are not UTF-8 (it reads the body again: cheap)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        ) from None


class OffLoopBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = self.body_field.field_info.annotation if self.body_field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return handler

        strict = getattr(self.strict_content_type, "value", self.strict_content_type)  # a DefaultPlaceholder

        async def route(request: Request) -> Response:
            if not _json_content(request, bool(strict)):
                return await handler(request)
            try:
                raw = await request.body()
            except ClientDisconnect:  # FastAPI's handler reads again and answers as it always has
                return await handler(request)
            if raw:
                # Starlette's Request.json() returns what is cached here: FastAPI validates the model
                # instance, which pydantic passes through unchanged. Undecodable bytes: FastAPI's own
                # reading answers them as it always has.
                with contextlib.suppress(UnicodeDecodeError):
                    request._json = await asyncio.to_thread(parse_body, model, raw)
            return await handler(request)

        return route
