"""The engine: runs scoring and generation on the model, one job at a time, off the event loop.

A backend holds one model and one KV cache, so every model call goes through a single worker
thread. Requests queue for it in arrival order while the event loop stays free for /health,
tokenization and other clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from server.backends.base import Backend
from server.sampling import Sampler, SamplingParams
from server.scoring import ScoredRows, score_rows
from server.text import StopStringWatcher

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class PromptJob:
    tokens: list[int]
    max_tokens: int
    logprobs: int | None  # None: no logprobs at all; k: top-k alternatives per token
    echo: bool
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)


@dataclass
class PromptResult:
    prompt_scores: ScoredRows | None  # rows for prompt tokens 1..n-1 (token 0 has no context)
    generated: list[int]
    generated_scores: ScoredRows | None
    generated_text: str  # without stop string, without end-of-generation tokens
    finish_reason: str  # "stop" or "length"


def _concat(parts: list[ScoredRows], k: int) -> ScoredRows:
    if not parts:
        return ScoredRows(np.empty(0, np.float32), np.empty((0, k), np.int64), np.empty((0, k), np.float32))
    return ScoredRows(
        np.concatenate([p.token_logprobs for p in parts]),
        np.concatenate([p.top_ids for p in parts]),
        np.concatenate([p.top_logprobs for p in parts]),
    )


def run_prompt(backend: Backend, job: PromptJob) -> PromptResult:
    """Score the prompt (when echoed with logprobs) and generate up to max_tokens after it."""
    tokens, n = job.tokens, len(job.tokens)
    k = job.logprobs or 0
    score_prompt = job.echo and job.logprobs is not None

    # One forward pass over the prompt. Row i predicts token i + 1; the last row predicts the
    # first generated token. Logits are requested only for the rows used.
    prompt_parts: list[ScoredRows] = []
    next_logits = None
    for i, block in backend.forward(tokens, start=0, logits_from=0 if score_prompt else n - 1):
        in_prompt = min(len(block), n - 1 - i)
        if score_prompt and in_prompt > 0:
            targets = np.asarray(tokens[i + 1:i + 1 + in_prompt])
            prompt_parts.append(backend.score(block[:in_prompt], targets, k))
        if i + len(block) == n:
            next_logits = np.array(block[-1], dtype=np.float32)  # a copy: the block is reused

    sampler = Sampler(job.sampling)
    watcher = StopStringWatcher(job.stop)
    generated: list[int] = []
    generated_parts: list[ScoredRows] = []
    finish_reason = "length"
    while len(generated) < job.max_tokens:
        token = sampler.choose(next_logits)
        generated.append(token)
        if job.logprobs is not None:
            generated_parts.append(score_rows(next_logits[None, :], np.array([token]), k))
        if backend.is_end_of_generation(token):
            finish_reason = "stop"  # the token is reported (as vLLM does), its text is not
            break
        if watcher.feed(backend.token_bytes(token)):
            finish_reason = "stop"
            break
        if len(generated) == job.max_tokens:
            break
        for _, block in backend.forward([token], start=n + len(generated) - 1, logits_from=0):
            next_logits = np.array(block[-1], dtype=np.float32)

    return PromptResult(
        prompt_scores=_concat(prompt_parts, k) if score_prompt else None,
        generated=generated,
        generated_scores=_concat(generated_parts, k) if job.logprobs is not None else None,
        generated_text=watcher.finish(),
        finish_reason=finish_reason,
    )


class Engine:
    def __init__(self, backend: Backend):
        self.backend = backend
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def run(self, fn: Callable[[], T]) -> T:
        """Run fn on the model thread (jobs run one at a time, in order) and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    async def complete(self, jobs: list[PromptJob]) -> list[PromptResult]:
        def work() -> list[PromptResult]:
            started = time.perf_counter()
            results = [run_prompt(self.backend, job) for job in jobs]
            elapsed = time.perf_counter() - started
            n_prompt = sum(len(j.tokens) for j in jobs)
            n_gen = sum(len(r.generated) for r in results)
            log.info(
                "completed %d prompt(s): %d prompt + %d generated tokens in %.2f s (%.0f tokens/s)",
                len(jobs), n_prompt, n_gen, elapsed, (n_prompt + n_gen) / max(elapsed, 1e-9),
            )
            return results

        return await self.run(work)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
