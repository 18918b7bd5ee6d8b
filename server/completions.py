"""Request handling for /v1/completions: validate and tokenize, run the engine, shape the response."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from server.engine import PromptJob, PromptResult, PromptScored, TokenEvent
from server.errors import APIError
from server.protocol import CompletionLogprobs, CompletionRequest, CompletionResponse, SamplingFields
from server.sampling import SamplingParams
from server.scoring import ScoredRows
from server.state import ServerState
from server.text import join_pieces, unsafe_suffix_length


def check_model(state: ServerState, requested: str | None) -> None:
    if requested is not None and requested != state.model_name:
        raise APIError(
            f"The model '{requested}' is not served here; this server serves '{state.model_name}' "
            "(see GET /v1/models). Omit 'model' or send that id.",
            status=404, param="model", code="model_not_found",
        )


def check_token_ids(state: ServerState, tokens: list[int], *, param: str, where: str) -> None:
    n_vocab = state.backend.info.n_vocab
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise APIError(f"{where} holds token id {bad}, outside this model's vocabulary (valid ids: 0..{n_vocab - 1}).",
                       param=param)


def sampling_params(state: ServerState, request: SamplingFields) -> SamplingParams:
    """Validated sampling settings of a completions or chat request."""
    check_model(state, request.model)
    stops = request.stop_list()
    if len(stops) > state.settings.max_stop:
        raise APIError(f"{len(stops)} stop strings sent; at most {state.settings.max_stop} are accepted "
                       "(restart the server with a higher --max-stop to allow more).", param="stop")
    bias: dict[int, float] = {}
    for key, value in (request.logit_bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise APIError(f"logit_bias keys are token ids as strings; '{key}' is not one.", param="logit_bias")
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


def check_fits(state: ServerState, tokens: list[int], max_tokens: int | None, where: str) -> int:
    """max_tokens to use (None: up to the context); a prompt that cannot fit is a 400 with numbers."""
    n_ctx = state.backend.info.n_ctx
    if max_tokens is None:
        if len(tokens) >= n_ctx:
            raise APIError(f"{where} has {len(tokens)} tokens: that does not fit this server's context of {n_ctx} "
                           "with room to generate. Shorten the prompt.", param="prompt")
        return n_ctx - len(tokens)
    if len(tokens) + max_tokens > n_ctx:
        raise APIError(
            f"{where} has {len(tokens)} tokens and max_tokens is {max_tokens}: {len(tokens) + max_tokens} "
            f"tokens do not fit this server's context of {n_ctx}. Shorten the prompt or lower max_tokens.",
            param="prompt" if len(tokens) >= n_ctx else "max_tokens",
        )
    return max_tokens


def prompt_tokens(state: ServerState, request: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt: strings as /tokenize does with add_special_tokens=true, ids as given."""
    prompts = []
    for p, prompt in enumerate(request.prompt):
        if isinstance(prompt, str):
            tokens = state.backend.tokenize(prompt, add_special_tokens=True)
        else:
            tokens = prompt
            check_token_ids(state, tokens, param="prompt", where=f"Prompt {p}")
        if not tokens:
            raise APIError(f"Prompt {p} is empty (0 tokens); there is nothing to score or continue.",
                           param="prompt")
        prompts.append(tokens)
    return prompts


def build_jobs(state: ServerState, request: CompletionRequest) -> list[PromptJob]:
    """One job per choice: each prompt n times, choice index = prompt index * n + sample index."""
    if (unsupported := request.unsupported()) is not None:
        field, message = unsupported
        raise APIError(message, param=field)
    sampling = sampling_params(state, request)
    limit = state.settings.max_logprobs
    if request.logprobs is not None and request.logprobs > limit:
        raise APIError(
            f"logprobs={request.logprobs} is above this server's limit of {limit}; ask for at most {limit} "
            "(or restart the server with a higher --max-logprobs).", param="logprobs",
        )
    jobs = []
    for p, tokens in enumerate(prompt_tokens(state, request)):
        max_tokens = check_fits(state, tokens, request.max_tokens, f"Prompt {p}")
        for sample in range(request.n or 1):
            jobs.append(PromptJob(tokens=tokens, max_tokens=max_tokens, logprobs=request.logprobs,
                                  echo=request.echo, sampling=sampling, stop=request.stop_list(),
                                  sample_index=sample))
    return jobs


def _token_entries(state: ServerState, token_ids: list[int], scores: ScoredRows) -> tuple[list, list]:
    """token_logprobs and top_logprobs entries for scored tokens; each top dict also holds the token itself."""
    strings = state.token_strings
    logprobs = scores.token_logprobs.tolist()
    tops = []
    for token, token_lp, ids, lps in zip(token_ids, logprobs, scores.top_ids.tolist(), scores.top_logprobs.tolist()):
        top = {}
        for i, lp in zip(ids, lps):
            top.setdefault(strings[i], lp)
        top.setdefault(strings[token], token_lp)
        tops.append(top)
    return logprobs, tops


def _logprobs_block(state: ServerState, ids: list[int], scores: list[ScoredRows | None], offsets: list[int],
                    first_is_null: bool) -> CompletionLogprobs:
    token_logprobs: list[float | None] = [None] if first_is_null else []
    top_logprobs: list[dict[str, float] | None] = [None] if first_is_null else []
    scored_ids = ids[1:] if first_is_null else ids
    for part in scores:
        n = len(part.token_logprobs)
        lps, tops = _token_entries(state, scored_ids[:n], part)
        scored_ids = scored_ids[n:]
        token_logprobs += lps
        top_logprobs += tops
    return {"tokens": [state.token_strings[t] for t in ids], "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets}


def _echo(state: ServerState, job: PromptJob) -> tuple[str, list[int]]:
    return join_pieces([state.backend.token_bytes(t) for t in job.tokens]) if job.echo else ("", [])


def build_choice_logprobs(state: ServerState, job: PromptJob, result: PromptResult) -> tuple[str, CompletionLogprobs | None]:
    """The choice's text and logprobs: echoed prompt tokens (if echo) followed by generated ones."""
    backend = state.backend
    echo_text, echo_offsets = _echo(state, job)
    # End-of-generation tokens are reported in logprobs but add no text.
    gen_pieces = [b"" if backend.is_end_of_generation(t) else backend.token_bytes(t) for t in result.generated]
    _, gen_offsets = join_pieces(gen_pieces)
    text = echo_text + result.generated_text
    if job.logprobs is None:
        return text, None
    echo_ids = job.tokens if job.echo else []
    parts = ([result.prompt_scores] if job.echo else []) + [result.generated_scores]
    offsets = echo_offsets + [len(echo_text) + o for o in gen_offsets]
    return text, _logprobs_block(state, echo_ids + result.generated, parts, offsets, first_is_null=job.echo)


def _usage(jobs: list[PromptJob], n_generated: int) -> dict:
    # A prompt sampled n times is counted once, as OpenAI does.
    n_prompt = sum(len(j.tokens) for j in jobs if j.sample_index == 0)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_generated, "total_tokens": n_prompt + n_generated}


async def create_completion(state: ServerState, request: CompletionRequest) -> CompletionResponse:
    jobs = build_jobs(state, request)
    results = await state.engine.complete(jobs)
    choices = []
    for index, (job, result) in enumerate(zip(jobs, results)):
        text, logprobs = build_choice_logprobs(state, job, result)
        choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason})
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
        "choices": choices,
        "usage": _usage(jobs, sum(len(r.generated) for r in results)),
    }


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class StreamedChoice:
    """What one choice has sent so far. Text is released only once no stop string can still
    begin in it, so a stop string never leaks partially; its tokens go out with it."""

    def __init__(self, state: ServerState, job: PromptJob, echo_length: int):
        self.state, self.job = state, job
        self.sent = 0  # characters of generated text already sent
        self.echo_length = echo_length
        self.pending: list[tuple[int, ScoredRows | None, int]] = []  # (token, scores, offset)
        self.text_length = 0

    def add(self, event: TokenEvent) -> str | None:
        """Text that can be sent now, or None."""
        self.pending.append((event.token, event.scores, self.echo_length + self.text_length))
        self.text_length = len(event.text)
        safe = len(event.text) - unsafe_suffix_length(event.text, self.job.stop)
        if safe <= self.sent:
            return None
        text, self.sent = event.text[self.sent:safe], safe
        return text

    def finish(self, result: PromptResult) -> str:
        text, self.sent = result.generated_text[self.sent:], len(result.generated_text)
        return text

    def take_logprobs(self) -> CompletionLogprobs | None:
        if self.job.logprobs is None:
            return None
        ids = [t for t, _, _ in self.pending]
        block = _logprobs_block(self.state, ids, [s for _, s, _ in self.pending], [o for _, _, o in self.pending],
                                first_is_null=False)
        self.pending = []
        return block


async def stream_completion(state: ServerState, request: CompletionRequest) -> AsyncIterator[str]:
    """Server-Sent Events in OpenAI's format; validation happens before the first byte is sent."""
    jobs = build_jobs(state, request)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}

    def chunk(index: int, text: str, logprobs, finish_reason=None) -> str:
        return sse(head | {"choices": [{"index": index, "text": text, "logprobs": logprobs,
                                        "finish_reason": finish_reason}]})

    async def events() -> AsyncIterator[str]:
        choices: dict[int, StreamedChoice] = {}
        n_generated = 0
        async for index, item in state.engine.stream(jobs):
            job = jobs[index]
            if isinstance(item, PromptScored):
                echo_text, echo_offsets = _echo(state, job)
                choices[index] = StreamedChoice(state, job, len(echo_text))
                if job.echo:
                    logprobs = None if job.logprobs is None else _logprobs_block(
                        state, job.tokens, [item.scores], echo_offsets, first_is_null=True)
                    yield chunk(index, echo_text, logprobs)
                continue
            streamed = choices[index]
            if isinstance(item, TokenEvent):
                text = streamed.add(item)
                if text is not None:
                    yield chunk(index, text, streamed.take_logprobs())
            else:
                n_generated += len(item.generated)
                yield chunk(index, streamed.finish(item), streamed.take_logprobs(), item.finish_reason)
        if request.stream_options and request.stream_options.include_usage:
            yield sse(head | {"choices": [], "usage": _usage(jobs, n_generated)})
        yield sse("[DONE]")

    return events()
