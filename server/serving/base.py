"""What /v1/completions and /v1/chat/completions share: request checks, running a request's jobs
through the engine, the response envelope, and the one streaming loop.

Each endpoint builds its jobs and supplies a ChoiceBuilder, the few shapes in which it differs
(a choice, a streamed chunk's fields); everything else about serving a request happens here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi.responses import Response

from server.engine import Events, Origin, PromptJob, PromptResult, PromptScored, QueueFull, TokenEvent, job_cost
from server.http.errors import INTERNAL_ERROR, APIError, error_body
from server.http.protocol import SamplingFields
from server.numerics.sampling import SamplingParams
from server.numerics.scoring import ScoredRows

if TYPE_CHECKING:  # the serving code is handed the state; it never builds one
    from server.state import ServerState

log = logging.getLogger(__name__)


# -- checks ---------------------------------------------------------------------------------------

TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,12}")  # str.isdigit() also takes '²'; int() refuses 5000 digits


def check_model(state: ServerState, requested: str | None) -> None:
    if requested is not None and requested != state.model_name:
        raise APIError(
            f"The model '{requested}' is not served here; this server serves '{state.model_name}' "
            "(see GET /v1/models). Omit 'model' or send that id.",
            status=404,
            param="model",
            code="model_not_found",
        )


def check_token_ids(state: ServerState, tokens: list[int], *, param: str, where: str) -> None:
    n_vocab = state.backend.info.n_vocab
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise APIError(
            f"{where} holds token id {bad}, outside this model's vocabulary (valid ids: 0..{n_vocab - 1}).", param=param
        )


def check_logprobs_limit(state: ServerState, value: int | None, param: str) -> None:
    limit = state.settings.max_logprobs
    if value is not None and value > limit:
        raise APIError(
            f"{param}={value} is above this server's limit of {limit}; ask for at most {limit} "
            "(or restart the server with a higher --max-logprobs).",
            param=param,
        )


def sampling_params(state: ServerState, request: SamplingFields) -> SamplingParams:
    """Validated sampling settings of a completions or chat request."""
    check_model(state, request.model)
    if (unsupported := request.unsupported()) is not None:
        field, message = unsupported
        raise APIError(message, param=field)
    if request.stream_options is not None and not request.stream:
        raise APIError(
            "stream_options is only allowed when stream is true; drop it or set stream: true.", param="stream_options"
        )
    stops = request.stop_list()
    if len(stops) > state.settings.max_stop:
        raise APIError(
            f"{len(stops)} stop strings sent; at most {state.settings.max_stop} are accepted "
            "(restart the server with a higher --max-stop to allow more).",
            param="stop",
        )
    if (chars := sum(map(len, stops))) > state.settings.max_stop_chars:
        raise APIError(
            f"The stop strings hold {chars} characters together; at most "
            f"{state.settings.max_stop_chars} are accepted (restart the server with a higher "
            "--max-stop-chars to allow more).",
            param="stop",
            code="limit_exceeded",
        )
    n, max_n = request.n or 1, state.settings.max_n
    if n > max_n:
        raise APIError(
            f"n={n} is above this server's limit of {max_n} samples per prompt "
            "(restart the server with a higher --max-n to allow more).",
            param="n",
            code="limit_exceeded",
        )
    bias: dict[int, float] = {}
    for key, value in (request.logit_bias or {}).items():
        if not TOKEN_ID_KEY.fullmatch(key):
            raise APIError(
                f"logit_bias keys are token ids as strings of ASCII digits; {key[:40]!r} is not one.",
                param="logit_bias",
            )
        check_token_ids(state, [int(key)], param="logit_bias", where="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(f"logit_bias values must be within -100..100; token {key} has {value}.", param="logit_bias")
        bias[int(key)] = value
    return SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        min_p=request.min_p or 0.0,
        seed=request.seed,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        logit_bias=bias,
    )


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code, which clients (litellm) test for


def check_fits(
    state: ServerState, tokens: list[int], max_tokens: int | None, where: str, prompt_param: str = "prompt"
) -> int:
    """max_tokens to use (None: --default-max-tokens, or what room the context has left); a prompt
    that cannot fit is a 400 with numbers and OpenAI's code. prompt_param: the field that holds
    the prompt (chat: messages)."""
    n_ctx = state.backend.info.n_ctx
    if max_tokens is None:
        if len(tokens) >= n_ctx:
            raise APIError(
                f"{where} has {len(tokens)} tokens: that does not fit this server's context of {n_ctx} "
                "with room to generate. Shorten the prompt.",
                param=prompt_param,
                code=CONTEXT_LENGTH_EXCEEDED,
            )
        return min(state.settings.default_max_tokens, n_ctx - len(tokens))
    if len(tokens) + max_tokens > n_ctx:
        raise APIError(
            f"{where} has {len(tokens)} tokens and max_tokens is {max_tokens}: {len(tokens) + max_tokens} "
            f"tokens do not fit this server's context of {n_ctx}. Shorten the prompt or lower max_tokens.",
            param=prompt_param if len(tokens) >= n_ctx else "max_tokens",
            code=CONTEXT_LENGTH_EXCEEDED,
        )
    return max_tokens


def check_request_cost(state: ServerState, jobs: list[PromptJob]) -> None:
    """The tokens a request may cost (each choice's prompt plus its max_tokens, plus what each choice
    costs whatever its length) within --max-request-tokens."""
    overhead = state.settings.job_overhead_tokens
    cost, limit = sum(job_cost(job, overhead) for job in jobs), state.settings.max_request_tokens
    if cost > limit:
        raise APIError(
            f"This request may cost {cost} tokens (prompt tokens plus max_tokens plus {overhead} for each of its "
            f"{len(jobs)} choices, --job-overhead-tokens); this server's limit is {limit} per request "
            "(--max-request-tokens). Split it into smaller requests or lower max_tokens.",
            param="prompt",
            code="limit_exceeded",
        )


# -- responses ------------------------------------------------------------------------------------


def usage(jobs: list[PromptJob], n_generated: int) -> dict[str, int]:
    # A prompt sampled n times is counted once, as OpenAI does.
    n_prompt = sum(len(j.tokens) for j in jobs if j.sample_index == 0)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_generated, "total_tokens": n_prompt + n_generated}


def sse(payload: dict[str, Any] | str) -> str:
    """One Server-Sent Event in OpenAI's framing."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class StreamedToken:
    token: int
    scores: ScoredRows | None  # None when the request asked for no logprobs
    offset: int  # character offset in the choice's text (echoed prompt included)


class StreamedChoice:
    """What one streamed choice has sent so far. Text is released only once no stop string can
    still begin in it, so a stop string never leaks partially; its tokens go out with it."""

    def __init__(self, job: PromptJob, echo_length: int):
        self.job = job
        self.sent = 0  # characters of generated text already sent
        self.echo_length = echo_length
        self.pending: list[StreamedToken] = []
        self.text_length = 0

    def add(self, event: TokenEvent) -> str | None:
        """Text that can be sent now, or None."""
        self.pending.append(StreamedToken(event.token, event.scores, self.echo_length + self.text_length))
        self.text_length = len(event.text)
        safe = len(event.text) - event.held
        if safe <= self.sent:
            return None
        text, self.sent = event.text[self.sent : safe], safe
        return text

    def finish(self, result: PromptResult) -> str:
        text, self.sent = result.generated_text[self.sent :], len(result.generated_text)
        return text

    def take(self) -> list[StreamedToken]:
        """The tokens not yet sent, which go out with the text just released."""
        pending, self.pending = self.pending, []
        return pending


class ChoiceBuilder(ABC):
    """An endpoint's response shapes for one request (whose jobs it was built with)."""

    id_prefix: str
    object: str
    chunk_object: str

    def __init__(self, state: ServerState, jobs: list[PromptJob]):
        self.state, self.jobs = state, jobs

    @abstractmethod
    def choice(self, index: int, result: PromptResult) -> dict[str, Any]:
        """A whole choice of a non-streamed response, without its index."""

    def echo_length(self, index: int) -> int:
        """Characters of the choice's text that precede the generated text (the echoed prompt)."""
        return 0

    @abstractmethod
    def opening(self, index: int, scores: ScoredRows | None) -> dict[str, Any] | None:
        """A streamed choice's first chunk's fields, sent when its prompt has run, or None."""

    @abstractmethod
    def piece(self, index: int, text: str, tokens: list[StreamedToken]) -> dict[str, Any]:
        """A streamed chunk's fields for newly released text and the tokens that made it."""


def json_response(content: dict[str, Any]) -> Response:
    """A JSON response serialized as FastAPI's JSONResponse would be, for callers that build it
    off the event loop (a long echo's logprobs are megabytes of JSON)."""
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
    return Response(body.encode("utf-8"), media_type="application/json")


def submit(state: ServerState, jobs: list[PromptJob], progress: bool, origin: Origin) -> Events:
    """The engine's event iterator for these jobs, or a 429 when its queue has no room."""
    try:
        return state.engine.stream(jobs, progress=progress, origin=origin)
    except QueueFull as full:
        raise APIError(
            f"The server is busy: {full.queued} tokens of work are waiting and this request adds {full.cost}, "
            f"past its limit of {full.limit} (--max-queued-tokens). Retry after {full.retry_after} s.",
            status=429,
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(full.retry_after)},
        ) from None


async def respond(
    state: ServerState,
    fmt: ChoiceBuilder,
    stream: bool,
    include_usage: bool,
    origin: Origin,
    deadline: float | None = None,
) -> Response | AsyncIterator[str]:
    """Run a request's jobs: the whole response, or (stream) its Server-Sent Events, which stop
    with an error event at `deadline` (time.monotonic()). Work on the request's jobs is only
    submitted here, after every check."""
    head: dict[str, Any] = {
        "id": f"{fmt.id_prefix}-{uuid.uuid4().hex}",
        "object": fmt.object,
        "created": int(time.time()),
        "model": state.model_name,
        "system_fingerprint": state.fingerprint.short,
    }  # see server/observability/fingerprint.py
    events = submit(state, fmt.jobs, progress=stream, origin=origin)
    if stream:
        return _sse(state, fmt, events, head | {"object": fmt.chunk_object}, include_usage, deadline)
    found: dict[int, PromptResult] = {}
    async for index, item in events:
        assert isinstance(item, PromptResult)  # without progress, only results come
        found[index] = item
    results = [found[i] for i in range(len(fmt.jobs))]  # the events end once every job has its result

    def build() -> Response:
        choices = [{"index": i} | fmt.choice(i, result) for i, result in enumerate(results)]
        return json_response(
            head | {"choices": choices, "usage": usage(fmt.jobs, sum(len(r.generated) for r in results))}
        )

    return await asyncio.to_thread(build)


async def _sse(
    state: ServerState,
    fmt: ChoiceBuilder,
    events: Events,
    head: dict[str, Any],
    include_usage: bool,
    deadline: float | None,
) -> AsyncIterator[str]:
    def chunk(index: int, fields: dict[str, Any], finish_reason: str | None = None) -> str:
        return sse(head | {"choices": [{"index": index} | fields | {"finish_reason": finish_reason}]})

    choices: dict[int, StreamedChoice] = {}
    n_generated = 0
    try:
        while True:
            try:
                if deadline is None:
                    index, item = await anext(events)
                else:
                    index, item = await asyncio.wait_for(anext(events), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                break
            if isinstance(item, PromptScored):
                choices[index] = StreamedChoice(fmt.jobs[index], fmt.echo_length(index))
                # An echoed prompt's logprobs can be large: built off the event loop.
                if (fields := await asyncio.to_thread(fmt.opening, index, item.scores)) is not None:
                    yield chunk(index, fields)
            elif isinstance(item, TokenEvent):
                text = choices[index].add(item)
                if text is not None:
                    yield chunk(index, fmt.piece(index, text, choices[index].take()))
            else:
                n_generated += len(item.generated)
                streamed = choices[index]
                yield chunk(index, fmt.piece(index, streamed.finish(item), streamed.take()), item.finish_reason)
    except asyncio.TimeoutError:
        # The headers are sent: the error goes in an event (as vLLM does), then the stream ends.
        yield sse(timeout_error(state).body())
        return
    except Exception:
        log.exception("streamed request failed")
        yield sse(error_body(INTERNAL_ERROR, type="server_error"))
        return
    finally:
        await events.aclose()  # cancels what is left of the request
    if include_usage:
        yield sse(head | {"choices": [], "usage": usage(fmt.jobs, n_generated)})
    yield sse("[DONE]")


def timeout_error(state: ServerState) -> APIError:
    seconds = state.settings.request_timeout
    return APIError(
        f"The request did not finish within {seconds:g} s (the server's --request-timeout) and was "
        "cancelled. Send less per request, or ask the operator to raise the limit.",
        status=503,
        type="server_error",
        code="timeout",
    )
