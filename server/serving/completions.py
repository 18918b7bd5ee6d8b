"""/v1/completions: prompts (strings or token ids) to jobs, and OpenAI's legacy completion shapes,
with the echoed prompt and per-token logprobs that lm-eval scores with."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi.responses import Response

from server.engine import Origin, Outputs, PromptJob, PromptResult
from server.http.errors import APIError
from server.http.protocol import CompletionLogprobs, CompletionRequest, PromptLogprob, PromptLogprobs
from server.numerics.scoring import ScoredRows
from server.serving.base import (
    ChoiceBuilder,
    StreamedToken,
    check_fits,
    check_logprobs_limit,
    check_request_cost,
    check_token_ids,
    respond,
    sampling_params,
)
from server.text.decoding import join_pieces

if TYPE_CHECKING:  # the serving code is handed the state; it never builds one
    from server.state import ServerState


@dataclass
class TokenizedPrompt:
    tokens: list[int]
    text: str | None  # the prompt as sent, when it was a string
    added_bos: bool  # the tokenizer put BOS first: it has no text of its own


def prompt_tokens(state: ServerState, request: CompletionRequest) -> list[TokenizedPrompt]:
    """Token ids of each prompt: strings as /tokenize does with add_special_tokens=true, ids as given."""
    info = state.backend.info
    prompts = []
    for p, prompt in enumerate(request.prompt):
        if isinstance(prompt, str):
            tokens = state.backend.tokenize(prompt, add_special_tokens=True)
            added_bos = info.add_bos and tokens[:1] == [info.bos_id]
            prompts.append(TokenizedPrompt(tokens, prompt, added_bos))
        else:
            check_token_ids(state, prompt, param="prompt", where=f"Prompt {p}")
            prompts.append(TokenizedPrompt(prompt, None, False))
        if not prompts[-1].tokens:
            raise APIError(f"Prompt {p} is empty (0 tokens); there is nothing to score or continue.", param="prompt")
    return prompts


def build_jobs(state: ServerState, request: CompletionRequest) -> tuple[list[PromptJob], list[TokenizedPrompt]]:
    """One job per choice: each prompt n times, choice index = prompt index * n + sample index.
    Returns the jobs and, for each job, its prompt."""
    if len(request.prompt) > state.settings.max_prompts:
        raise APIError(
            f"{len(request.prompt)} prompts sent; this server takes at most {state.settings.max_prompts} "
            "per request (--max-prompts). Split them over several requests.",
            param="prompt",
            code="limit_exceeded",
        )
    sampling = sampling_params(state, request)
    check_logprobs_limit(state, request.logprobs, "logprobs")
    check_logprobs_limit(state, request.prompt_logprobs, "prompt_logprobs")
    outputs = Outputs.of(echo=request.echo, logprobs=request.logprobs, prompt_logprobs=request.prompt_logprobs)
    jobs, job_prompts = [], []
    for p, prompt in enumerate(prompt_tokens(state, request)):
        max_tokens = check_fits(state, prompt.tokens, request.max_tokens, f"Prompt {p}")
        for sample in range(request.n or 1):
            jobs.append(
                PromptJob(
                    tokens=prompt.tokens,
                    max_tokens=max_tokens,
                    outputs=outputs,
                    sampling=sampling,
                    stop=request.stop_list(),
                    sample_index=sample,
                )
            )
            job_prompts.append(prompt)
    check_request_cost(state, jobs)
    return jobs, job_prompts


def echo_text(state: ServerState, prompt: TokenizedPrompt) -> tuple[str, list[int]]:
    """The echoed prompt and each prompt token's character offset in it. A string prompt comes back
    as sent (as OpenAI and vLLM do): a BOS the tokenizer added stays among the tokens, with a
    zero-width offset of 0, so offsets still index the text."""
    pieces = [state.backend.tokens.pieces[t] for t in prompt.tokens]
    if prompt.added_bos:
        pieces[0] = b""
    text, offsets = join_pieces(pieces)
    return (prompt.text if prompt.text is not None else text), offsets


def _scored(scores: ScoredRows | None) -> ScoredRows:
    assert scores is not None  # an echo with logprobs has its prompt scored (Outputs.prompt_rows)
    return scores


class CompletionChoices(ChoiceBuilder):
    id_prefix = "cmpl"
    object = chunk_object = "text_completion"

    def __init__(self, state: ServerState, jobs: list[PromptJob], prompts: list[TokenizedPrompt]):
        super().__init__(state, jobs)
        self.echoes: dict[int, tuple[str, list[int]]] = {}  # job index -> (text, offsets), for echoing jobs
        for index, (job, prompt) in enumerate(zip(jobs, prompts)):
            if job.outputs.echo is not None:
                self.echoes[index] = echo_text(state, prompt)

    def _logprobs(
        self, ids: list[int], scores: list[ScoredRows | None], offsets: list[int], first_is_null: bool
    ) -> CompletionLogprobs:
        """logprobs for tokens `ids`; scores cover them in order (all but the first, if it is null).
        Each top_logprobs dict also holds the token that is there, with its own value."""
        strings = self.state.backend.tokens.strings
        token_logprobs: list[float | None] = [None] if first_is_null else []
        top_logprobs: list[dict[str, float] | None] = [None] if first_is_null else []
        scored_ids = iter(ids[1:] if first_is_null else ids)
        for part in scores:
            assert part is not None  # every token of a job that asked for logprobs is scored
            # scored_ids comes last: zip stops at a part's end before taking the next part's id.
            for token_lp, top_ids, top_lps, token in zip(
                part.token_logprobs.tolist(), part.top_ids.tolist(), part.top_logprobs.tolist(), scored_ids
            ):
                top: dict[str, float] = {}
                for i, lp in zip(top_ids, top_lps):
                    top.setdefault(strings[i], lp)
                top.setdefault(strings[token], token_lp)
                token_logprobs.append(token_lp)
                top_logprobs.append(top)
        return {
            "tokens": [strings[t] for t in ids],
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    def _prompt_logprobs(self, job: PromptJob, scores: ScoredRows | None) -> PromptLogprobs:
        """vLLM's prompt_logprobs: null for the first token, then token id -> {logprob, rank,
        decoded_token} for the N best at each position and the prompt's own token."""
        asked = job.outputs.prompt_logprobs
        assert asked is not None  # only a job that asked for them is answered them
        strings, n = self.state.backend.tokens.strings, asked.k
        out: PromptLogprobs = [None]
        if len(job.tokens) < 2:  # one token: nothing to score
            return out
        # Asked for prompt_logprobs: the prompt's rows are scored, with ranks (engine/running.py).
        assert scores is not None and scores.token_ranks is not None
        for token, token_lp, rank, top_ids, top_lps in zip(
            job.tokens[1:],
            scores.token_logprobs.tolist(),
            scores.token_ranks.tolist(),
            scores.top_ids[:, :n].tolist(),
            scores.top_logprobs[:, :n].tolist(),
        ):
            entry: dict[str, PromptLogprob] = {
                str(i): {"logprob": lp, "rank": place, "decoded_token": strings[i]}
                for place, (i, lp) in enumerate(zip(top_ids, top_lps), start=1)
            }
            entry.setdefault(str(token), {"logprob": token_lp, "rank": rank, "decoded_token": strings[token]})
            out.append(entry)
        return out

    def _prompt_logprobs_field(self, job: PromptJob, scores: ScoredRows | None) -> dict[str, PromptLogprobs]:
        """The choice's prompt_logprobs, where the job asked for them (vLLM's key appears only then)."""
        if job.outputs.prompt_logprobs is None:
            return {}
        return {"prompt_logprobs": self._prompt_logprobs(job, scores)}

    def echo_length(self, index: int) -> int:
        return len(self.echoes[index][0]) if index in self.echoes else 0

    def choice(self, index: int, result: PromptResult) -> dict[str, Any]:
        """The echoed prompt (if echo) followed by the generated text, and their logprobs."""
        job = self.jobs[index]
        outputs, echo = job.outputs, job.outputs.echo
        prompt_text, prompt_offsets = self.echoes.get(index, ("", []))
        text = prompt_text + result.generated_text
        extra = self._prompt_logprobs_field(job, result.prompt_scores)
        if outputs.generated is None:
            return {"text": text, "logprobs": None, "finish_reason": result.finish_reason, **extra}
        # End-of-generation tokens are reported in logprobs but add no text.
        _, gen_offsets = join_pieces(self.state.backend.tokens.text_pieces(result.generated))
        ids = (job.tokens if echo is not None else []) + result.generated
        parts = ([echo.rows(_scored(result.prompt_scores))] if echo is not None else []) + [result.generated_scores]
        offsets = prompt_offsets + [len(prompt_text) + o for o in gen_offsets]
        logprobs = self._logprobs(ids, parts, offsets, first_is_null=echo is not None)
        return {"text": text, "logprobs": logprobs, "finish_reason": result.finish_reason, **extra}

    def opening(self, index: int, scores: ScoredRows | None) -> dict[str, Any] | None:
        job = self.jobs[index]
        extra, echo = self._prompt_logprobs_field(job, scores), job.outputs.echo
        if echo is None:
            return {"text": "", "logprobs": None, **extra} if extra else None
        text, offsets = self.echoes[index]
        logprobs = (
            None
            if echo.k is None
            else self._logprobs(job.tokens, [echo.rows(_scored(scores))], offsets, first_is_null=True)
        )
        return {"text": text, "logprobs": logprobs, **extra}

    def piece(self, index: int, text: str, tokens: list[StreamedToken]) -> dict[str, Any]:
        logprobs = None
        if self.jobs[index].outputs.generated is not None:
            logprobs = self._logprobs(
                [t.token for t in tokens], [t.scores for t in tokens], [t.offset for t in tokens], first_is_null=False
            )
        return {"text": text, "logprobs": logprobs}


async def create_completion(
    state: ServerState, request: CompletionRequest, origin: Origin, deadline: float | None = None
) -> Response | AsyncIterator[str]:
    """The response (or, with stream, its events); validation happens before any model work.
    Tokenizing runs off the event loop, which must stay free for other clients and /health."""
    fmt = await asyncio.to_thread(lambda: CompletionChoices(state, *build_jobs(state, request)))
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return await respond(state, fmt, bool(request.stream), include_usage, origin, deadline)
