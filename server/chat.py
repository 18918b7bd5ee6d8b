"""Request handling for /v1/chat/completions: the model's own chat template, then the same engine.

The template is the one the model ships (GGUF metadata or the tokenizer's chat_template), rendered
with Jinja2 in a sandbox the way Hugging Face's apply_chat_template does, for both backends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.completions import StreamedChoice, _usage, check_fits, sampling_params, sse
from server.engine import PromptJob, PromptResult, PromptScored, TokenEvent
from server.errors import APIError
from server.protocol import ChatCompletionRequest, ChatTokenLogprob
from server.scoring import ScoredRows
from server.state import ServerState


def _raise(message: str):
    raise TemplateError(message)


@lru_cache(maxsize=4)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(state: ServerState, request: ChatCompletionRequest) -> str:
    template = state.backend.info.chat_template
    if not template:
        raise APIError("This model has no chat template; use /v1/completions with your own prompt format.",
                       param="messages")
    messages = []
    for message in request.messages:
        item = message.model_dump(exclude_none=True)
        if isinstance(item.get("content"), list):  # content parts: keep the text ones
            item["content"] = "".join(p.get("text", "") for p in item["content"] if p.get("type") == "text")
        messages.append(item)
    info, strings = state.backend.info, state.token_strings
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=request.add_generation_prompt,
            bos_token=strings[info.bos_id] if info.bos_id is not None else "",
            eos_token=strings[info.eos_id] if info.eos_id is not None else "",
            **(request.chat_template_kwargs or {}),
        )
    except TemplateError as exc:
        raise APIError(f"The model's chat template rejected these messages: {exc}", param="messages") from None


def build_chat_job(state: ServerState, request: ChatCompletionRequest) -> tuple[list[PromptJob], int]:
    sampling = sampling_params(state, request)
    limit = state.settings.max_logprobs
    if request.top_logprobs is not None and request.top_logprobs > limit:
        raise APIError(f"top_logprobs={request.top_logprobs} is above this server's limit of {limit}.",
                       param="top_logprobs")
    if request.top_logprobs and not request.logprobs:
        raise APIError("top_logprobs needs logprobs=true.", param="top_logprobs")
    tokens = state.backend.tokenize(render_chat(state, request), add_special_tokens=False)
    requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    max_tokens = check_fits(state, tokens, requested, "The rendered conversation")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    jobs = [PromptJob(tokens=tokens, max_tokens=max_tokens, logprobs=logprobs, echo=False, sampling=sampling,
                      stop=request.stop_list(), sample_index=i) for i in range(request.n or 1)]
    return jobs, len(tokens)


def _content_logprobs(state: ServerState, ids: list[int], scores: list[ScoredRows], k: int) -> list[ChatTokenLogprob]:
    """OpenAI's chat logprobs; end-of-generation tokens are left out, as they add no text."""
    entries = []
    position = 0
    for part in scores:
        for row in range(len(part.token_logprobs)):
            token = ids[position]
            position += 1
            if state.backend.is_end_of_generation(token):
                continue
            top = [{"token": state.token_strings[i], "logprob": lp, "bytes": list(state.backend.token_bytes(i))}
                   for i, lp in zip(part.top_ids[row, :k].tolist(), part.top_logprobs[row, :k].tolist())]
            entries.append({"token": state.token_strings[token], "logprob": float(part.token_logprobs[row]),
                            "bytes": list(state.backend.token_bytes(token)), "top_logprobs": top})
    return entries


def _head(state: ServerState, kind: str) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": state.model_name}


async def create_chat_completion(state: ServerState, request: ChatCompletionRequest) -> dict:
    jobs, _ = build_chat_job(state, request)
    results: list[PromptResult] = await state.engine.complete(jobs)
    choices = []
    for index, (job, result) in enumerate(zip(jobs, results)):
        logprobs = None
        if job.logprobs is not None:
            logprobs = {"content": _content_logprobs(state, result.generated, [result.generated_scores], job.logprobs)}
        choices.append({"index": index, "message": {"role": "assistant", "content": result.generated_text},
                        "logprobs": logprobs, "finish_reason": result.finish_reason})
    return _head(state, "chat.completion") | {
        "choices": choices, "usage": _usage(jobs, sum(len(r.generated) for r in results))}


async def stream_chat_completion(state: ServerState, request: ChatCompletionRequest) -> AsyncIterator[str]:
    jobs, _ = build_chat_job(state, request)
    head = _head(state, "chat.completion.chunk")

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> str:
        return sse(head | {"choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish_reason}]})

    def logprobs_of(streamed: StreamedChoice):
        pending, streamed.pending = streamed.pending, []
        if streamed.job.logprobs is None:
            return None
        return {"content": _content_logprobs(state, [t for t, _, _ in pending], [s for _, s, _ in pending],
                                             streamed.job.logprobs)}

    async def events() -> AsyncIterator[str]:
        choices: dict[int, StreamedChoice] = {}
        n_generated = 0
        async for index, item in state.engine.stream(jobs):
            if isinstance(item, PromptScored):
                choices[index] = StreamedChoice(state, jobs[index], 0)
                yield chunk(index, {"role": "assistant", "content": ""})
            elif isinstance(item, TokenEvent):
                text = choices[index].add(item)
                if text is not None:
                    yield chunk(index, {"content": text}, logprobs_of(choices[index]))
            else:
                n_generated += len(item.generated)
                text = choices[index].finish(item)
                yield chunk(index, {"content": text} if text else {}, logprobs_of(choices[index]), item.finish_reason)
        if request.stream_options and request.stream_options.include_usage:
            yield sse(head | {"choices": [], "usage": _usage(jobs, n_generated)})
        yield sse("[DONE]")

    return events()
