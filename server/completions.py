"""Request handling for /v1/completions: validate and tokenize, run the engine, shape the response."""

from __future__ import annotations

import time
import uuid


from server.engine import PromptJob, PromptResult
from server.errors import APIError
from server.protocol import CompletionLogprobs, CompletionRequest, CompletionResponse
from server.sampling import SamplingParams
from server.scoring import ScoredRows
from server.state import ServerState
from server.text import join_pieces


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
    if (unsupported := request.unsupported()) is not None:
        field, message = unsupported
        raise APIError(message, param=field)
    check_model(state, request.model)
    limit = state.settings.max_logprobs
    if request.logprobs is not None and request.logprobs > limit:
        raise APIError(
            f"logprobs={request.logprobs} is above this server's limit of {limit}; ask for at most {limit} "
            "(or restart the server with a higher --max-logprobs).", param="logprobs",
        )
    n_ctx = state.backend.info.n_ctx
    sampling = SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
    )
    jobs = []
    for p, tokens in enumerate(prompt_tokens(state, request)):
        max_tokens = n_ctx - len(tokens) if request.max_tokens is None else request.max_tokens
        if len(tokens) + max_tokens > n_ctx:
            raise APIError(
                f"Prompt {p} has {len(tokens)} tokens and max_tokens is {max_tokens}: {len(tokens) + max_tokens} "
                f"tokens do not fit this server's context of {n_ctx}. Shorten the prompt or lower max_tokens.",
                param="prompt" if len(tokens) >= n_ctx else "max_tokens",
            )
        jobs.append(PromptJob(tokens=tokens, max_tokens=max_tokens, logprobs=request.logprobs,
                              echo=request.echo, sampling=sampling, stop=request.stop_list()))
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


def build_choice_logprobs(state: ServerState, job: PromptJob, result: PromptResult) -> tuple[str, CompletionLogprobs | None]:
    """The choice's text and logprobs: echoed prompt tokens (if echo) followed by generated ones."""
    backend = state.backend
    echo_ids = job.tokens if job.echo else []
    echo_text, echo_offsets = join_pieces([backend.token_bytes(t) for t in echo_ids])
    # End-of-generation tokens are reported in logprobs but add no text.
    gen_pieces = [b"" if backend.is_end_of_generation(t) else backend.token_bytes(t) for t in result.generated]
    _, gen_offsets = join_pieces(gen_pieces)
    text = echo_text + result.generated_text
    if job.logprobs is None:
        return text, None

    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    if job.echo:
        lps, tops = _token_entries(state, echo_ids[1:], result.prompt_scores)
        token_logprobs += [None] + lps
        top_logprobs += [None] + tops
    lps, tops = _token_entries(state, result.generated, result.generated_scores)
    token_logprobs += lps
    top_logprobs += tops
    ids = echo_ids + result.generated
    return text, {
        "tokens": [state.token_strings[t] for t in ids],
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": echo_offsets + [len(echo_text) + o for o in gen_offsets],
    }


async def create_completion(state: ServerState, request: CompletionRequest) -> CompletionResponse:
    jobs = build_jobs(state, request)
    results = await state.engine.complete(jobs)
    choices = []
    for index, (job, result) in enumerate(zip(jobs, results)):
        text, logprobs = build_choice_logprobs(state, job, result)
        choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason})
    n_prompt = sum(len(j.tokens) for j in jobs)
    n_generated = sum(len(r.generated) for r in results)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
        "choices": choices,
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_generated,
                  "total_tokens": n_prompt + n_generated},
    }
