"""HTTP routes: OpenAI's /v1 endpoints and vLLM's tokenizer endpoints (used by lm-eval's remote tokenizer)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from server.engine import Origin
from server.http.body import OffLoopBodyRoute
from server.http.protocol import (
    HOST_REFUSED,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    DistributionsRequest,
    Health,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    error_responses,
    event_stream_schema,
)
from server.http.request_id import current_request_id
from server.serving.base import check_model, check_token_ids, timeout_error
from server.serving.chat import create_chat_completion
from server.serving.completions import create_completion
from server.serving.distributions import MEDIA_TYPE, create_distributions
from server.state import ServerState

router = APIRouter(route_class=OffLoopBodyRoute)  # bodies parsed and validated off the event loop
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away; nobody reads it

# -- the OpenAPI schema's responses ---------------------------------------------------------------
# The models are documentation only: handlers return dicts or ready Responses, which FastAPI sends
# as they are (a route has no response_model: those returning a dict say response_model=None, else
# FastAPI would take their return annotation for one and validate what they return with it).


def ok(model: Any, description: str, stream: Any = None) -> dict[int | str, dict[str, Any]]:
    response: dict[str, Any] = {"model": model, "description": description}
    if stream is not None:
        response["content"] = {"text/event-stream": event_stream_schema(stream)}
    return {200: response}


def ok_not_json(description: str, **fields: Any) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that answers other than JSON (no model; its `content`, if given)."""
    return {200: {"description": description, **fields}}


GENERATION = (400, 401, 404, 413, 429, 500, 503)


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the body was read already, so the next ASGI
    message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_of(request: Request, keyed: bool) -> str:
    """Who the engine takes turns between: on a keyed server the key's holder (its digest, never the
    key), else the address the request came from (on loopback, every local process is one client)."""
    authorization = request.headers.get("authorization")
    if keyed and authorization:
        return "key:" + hashlib.sha256(authorization.encode()).hexdigest()[:16]
    return "address:" + (request.client.host if request.client else "unknown")


Body = TypeVar("Body", bound=BaseModel)
# A generation handler (server/serving): its response, or with stream its events.
Create = Callable[[ServerState, Body, Origin, float | None], Awaitable[Response | AsyncIterator[str]]]


async def _run_within_deadline(request: Request, create: Create[Body], body: Body) -> Response:
    """Run a generation handler, within --request-timeout (then 503). A non-streamed response is
    cancelled, with its engine jobs, as soon as its client disconnects; a streamed one when
    Starlette stops iterating its events (and its deadline is checked between events)."""
    state = _state(request)
    timeout = state.settings.request_timeout or None
    deadline = None if timeout is None else time.monotonic() + timeout
    keyed = state.settings.api_key is not None or state.settings.api_key_file is not None
    origin = Origin(current_request_id(), client_of(request, keyed))
    task = asyncio.ensure_future(create(state, body, origin, deadline))
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
    if task.cancelled():
        if watcher.done() and not watcher.cancelled():
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        raise timeout_error(state)
    result = task.result()
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return result


@router.post(
    "/v1/completions",
    responses=ok(
        CompletionResponse,
        "The completion (application/json), or with `stream: true` its Server-Sent Events (text/event-stream).",
        stream=CompletionChunk,
    )
    | error_responses(*GENERATION),
)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _run_within_deadline(request, create_completion, body)


@router.post(
    "/v1/chat/completions",
    responses=ok(
        ChatCompletionResponse,
        "The chat completion (application/json), or with `stream: true` its Server-Sent Events (text/event-stream).",
        stream=ChatCompletionChunk,
    )
    | error_responses(*GENERATION),
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _run_within_deadline(request, create_chat_completion, body)


@router.get(
    "/v1/models",
    response_model=None,
    responses=ok(ModelList, "The one model served.") | error_responses(400, 401, 413, 500, bad_request=HOST_REFUSED),
)
async def models(request: Request) -> ModelList:
    state = _state(request)
    return {
        "object": "list",
        "data": [
            {
                "id": state.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "logprobs-server",
                "max_model_len": state.backend.info.n_ctx,
                # What decides the numbers (server/observability/fingerprint.py): responses carry its hash.
                "system_fingerprint": state.fingerprint.short,
                "fingerprint": state.fingerprint.parts,
            }
        ],
    }


@router.get(
    "/health",
    response_model=None,
    responses=ok(Health, "The server is up (no API key needed).")
    | error_responses(400, 413, 500, bad_request=HOST_REFUSED),
)
async def health() -> Health:
    return {"status": "ok"}


def _special_token_text(state: ServerState, token_id: int | None) -> str | None:
    return None if token_id is None else state.backend.tokens.strings[token_id]


@router.get(
    "/tokenizer_info",
    response_model=None,
    responses=ok(
        TokenizerInfo,
        "The tokenizer's special tokens and chat template (vLLM's endpoint, read by lm-eval's remote tokenizer).",
    )
    | error_responses(400, 401, 413, 500, bad_request=HOST_REFUSED),
)
async def tokenizer_info(request: Request) -> TokenizerInfo:
    state = _state(request)
    info = state.backend.info
    return {
        "eos_token": _special_token_text(state, info.eos_id),
        "bos_token": _special_token_text(state, info.bos_id),
        "pad_token": _special_token_text(state, info.pad_id),
        "add_bos_token": info.add_bos,
        "chat_template": info.chat_template,
        "model_max_length": info.n_ctx,
    }


@router.post(
    "/v1/distributions",
    response_class=Response,
    responses=ok_not_json(
        "This server's extension: the full log-distribution at each position from `start` on, as "
        "little-endian float32 (or float16) rows [x-rows, x-vocab], row after row.",
        content={MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    )
    | error_responses(*GENERATION),
)
async def distributions(body: DistributionsRequest, request: Request) -> Response:
    return await _run_within_deadline(request, create_distributions, body)


@router.post(
    "/tokenize",
    response_model=None,
    responses=ok(TokenizeResponse, "The prompt's token ids.") | error_responses(400, 401, 404, 413, 500),
)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _state(request)
    check_model(state, body.model)
    tokens = await asyncio.to_thread(state.backend.tokenize, body.prompt, body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": state.backend.info.n_ctx}


@router.post(
    "/detokenize",
    response_model=None,
    responses=ok(DetokenizeResponse, "The text of the token ids.") | error_responses(400, 401, 404, 413, 500),
)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = _state(request)
    check_model(state, body.model)

    def detokenize() -> DetokenizeResponse:  # millions of ids take a second: off the event loop
        check_token_ids(state, body.tokens, param="tokens", where="'tokens'")
        return {"prompt": state.backend.tokens.detokenize(body.tokens)}

    return await asyncio.to_thread(detokenize)


# The OpenAPI schema's responses (the route's 200 is text/plain, from response_class).
METRICS_RESPONSES = ok_not_json("Prometheus' text exposition format.") | error_responses(
    400,
    401,
    413,
    500,
    bad_request=HOST_REFUSED,
    by_reference=True,
    unauthorized="Missing or wrong API key: only when the server runs with an API key and without --metrics-public.",
)


@router.get("/metrics", response_class=PlainTextResponse, responses=METRICS_RESPONSES)
async def metrics_endpoint(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
