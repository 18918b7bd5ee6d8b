"""HTTP routes: OpenAI's /v1 endpoints and vLLM's tokenizer endpoints (used by lm-eval's remote tokenizer)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.chat import create_chat_completion, stream_chat_completion
from server.completions import check_model, check_token_ids, create_completion, stream_completion
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.state import ServerState

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _event_stream(events) -> StreamingResponse:
    # When the client disconnects, Starlette stops iterating `events`; closing it cancels the job.
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    if body.stream:
        return _event_stream(await stream_completion(_state(request), body))
    return await create_completion(_state(request), body)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    if body.stream:
        return _event_stream(await stream_chat_completion(_state(request), body))
    return await create_chat_completion(_state(request), body)


@router.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    return {
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "logprobs-server",
            "max_model_len": state.backend.info.n_ctx,
        }],
    }


@router.get("/health")
async def health():
    return {"status": "ok"}


def _special_token_text(state: ServerState, token_id: int | None) -> str | None:
    return None if token_id is None else state.token_strings[token_id]


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
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


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state = _state(request)
    check_model(state, body.model)
    tokens = state.backend.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": state.backend.info.n_ctx}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state = _state(request)
    check_model(state, body.model)
    check_token_ids(state, body.tokens, param="tokens", where="'tokens'")
    return {"prompt": state.backend.detokenize(body.tokens)}
