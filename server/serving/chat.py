"""Request handling for /v1/chat/completions: the model's own chat template, then the same engine.

The template is the one the model ships (GGUF metadata or the tokenizer's chat_template), rendered
with Jinja2 in a sandbox the way Hugging Face's apply_chat_template does, for both backends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn

from fastapi.responses import Response
from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.engine import Origin, Outputs, PromptJob, PromptResult
from server.http.errors import APIError
from server.http.protocol import (
    TEMPLATE_ROLE,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from server.numerics.scoring import ScoredRows
from server.serving.base import (
    ChoiceBuilder,
    StreamedToken,
    check_fits,
    check_logprobs_limit,
    check_request_cost,
    respond,
    sampling_params,
)

if TYPE_CHECKING:  # the serving code is handed the state; it never builds one
    from server.state import ServerState


def _raise(message: str) -> NoReturn:
    raise TemplateError(message)


@lru_cache(maxsize=4)
def _compile(template: str) -> Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(state: ServerState, request: ChatCompletionRequest) -> str:
    template = state.backend.info.chat_template
    if not template:
        raise APIError(
            "This model has no chat template; use /v1/completions with your own prompt format.", param="messages"
        )
    messages = []
    for message in request.messages:
        item = message.model_dump(exclude_none=True)
        item["role"] = TEMPLATE_ROLE.get(message.role, message.role)
        if isinstance(item.get("content"), list):  # text parts only (the request model refuses others)
            item["content"] = "".join(p["text"] for p in item["content"])
        messages.append(item)
    info, strings = state.backend.info, state.backend.tokens.strings
    own = {
        "messages": messages,
        "add_generation_prompt": request.add_generation_prompt,
        "bos_token": strings[info.bos_id] if info.bos_id is not None else "",
        "eos_token": strings[info.eos_id] if info.eos_id is not None else "",
    }
    extra = request.chat_template_kwargs or {}
    if taken := sorted(own.keys() & extra.keys()):
        raise APIError(
            f"chat_template_kwargs may not set {', '.join(taken)}: the server passes "
            f"{', '.join(own)} to the template itself.",
            param="chat_template_kwargs",
        )
    try:
        return _compile(template).render(**own, **extra)
    except TemplateError as exc:
        raise APIError(f"The model's chat template rejected these messages: {exc}", param="messages") from None
    except Exception as exc:  # a template reading a field of the wrong type, say: the input's fault
        raise APIError(
            f"The model's chat template could not render these messages ({type(exc).__name__}); "
            "check the messages' fields and chat_template_kwargs.",
            param="messages",
        ) from None


def build_chat_jobs(state: ServerState, request: ChatCompletionRequest) -> list[PromptJob]:
    sampling = sampling_params(state, request)
    check_logprobs_limit(state, request.top_logprobs, "top_logprobs")
    if request.top_logprobs and not request.logprobs:
        raise APIError("top_logprobs needs logprobs=true.", param="top_logprobs")
    tokens = state.backend.tokenize(render_chat(state, request), add_special_tokens=False)
    requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    max_tokens = check_fits(state, tokens, requested, "The rendered conversation", prompt_param="messages")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    jobs = [
        PromptJob(
            tokens=tokens,
            max_tokens=max_tokens,
            outputs=Outputs.of(logprobs=logprobs),
            sampling=sampling,
            stop=request.stop_list(),
            sample_index=i,
        )
        for i in range(request.n or 1)
    ]
    check_request_cost(state, jobs)
    return jobs


class ChatChoices(ChoiceBuilder):
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _logprobs(self, index: int, ids: list[int], scores: list[ScoredRows | None]) -> ChatLogprobs | None:
        """OpenAI's chat logprobs; end-of-generation tokens are left out, as they add no text."""
        generated = self.jobs[index].outputs.generated
        if generated is None:
            return None
        k = generated.k
        tokens = self.state.backend.tokens
        entries: list[ChatTokenLogprob] = []
        ids_left = iter(ids)
        for part in scores:
            assert part is not None  # every token of a job that asked for logprobs is scored
            for row, token in zip(range(len(part.token_logprobs)), ids_left):
                if tokens.is_end_of_generation(token):
                    continue
                top: list[ChatTopLogprob] = [
                    {"token": tokens.strings[i], "logprob": lp, "bytes": list(tokens.pieces[i])}
                    for i, lp in zip(part.top_ids[row, :k].tolist(), part.top_logprobs[row, :k].tolist())
                ]
                entries.append(
                    {
                        "token": tokens.strings[token],
                        "logprob": float(part.token_logprobs[row]),
                        "bytes": list(tokens.pieces[token]),
                        "top_logprobs": top,
                    }
                )
        return {"content": entries}

    def choice(self, index: int, result: PromptResult) -> dict[str, Any]:
        return {
            "message": {"role": "assistant", "content": result.generated_text},
            "logprobs": self._logprobs(index, result.generated, [result.generated_scores]),
            "finish_reason": result.finish_reason,
        }

    def opening(self, index: int, scores: ScoredRows | None) -> dict[str, Any] | None:
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None}

    def piece(self, index: int, text: str, tokens: list[StreamedToken]) -> dict[str, Any]:
        return {
            "delta": {"content": text} if text else {},
            "logprobs": self._logprobs(index, [t.token for t in tokens], [t.scores for t in tokens]),
        }


async def create_chat_completion(
    state: ServerState, request: ChatCompletionRequest, origin: Origin, deadline: float | None = None
) -> Response | AsyncIterator[str]:
    """The response (or, with stream, its events); validation happens before any model work.
    Rendering and tokenizing run off the event loop, which must stay free for other clients."""
    jobs = await asyncio.to_thread(build_chat_jobs, state, request)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return await respond(state, ChatChoices(state, jobs), bool(request.stream), include_usage, origin, deadline)
