"""The engine: runs scoring and generation on the model, one job at a time, off the event loop.

A backend holds one model and one KV cache, so every model call goes through a single worker
thread. Requests queue for it in arrival order while the event loop stays free for /health,
tokenization and other clients.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from server.backends.base import Backend
from server.sampling import Sampler, SamplingParams
from server.prefix_cache import PrefixCache
from server.scoring import ScoredRows, first_rows, score_rows
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
    sample_index: int = 0  # which of a request's n samples this is (its own random stream)


@dataclass
class TokenEvent:
    """One generated token, as it happens (for streaming)."""

    token: int
    scores: ScoredRows | None
    text: str  # all generated text so far, a found stop string cut off


@dataclass
class PromptScored:
    """The prompt pass is done (for streaming: the echoed prompt can be sent)."""

    scores: ScoredRows | None  # as PromptResult.prompt_scores


class Cancelled(Exception):
    """The client went away; the job stopped early."""


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


def run_prompt(backend: Backend, job: PromptJob, on_event: Callable[[PromptScored | TokenEvent], None] | None = None,
               cancel: threading.Event | None = None, cache: PrefixCache | None = None) -> PromptResult:
    """Score the prompt (when echoed with logprobs) and generate up to max_tokens after it.
    `on_event` sees the scored prompt, then each generated token; setting `cancel` stops the
    job before its next token. With a prefix cache, a shared prefix is not computed again."""
    tokens, n = job.tokens, len(job.tokens)
    k = job.logprobs or 0
    score_prompt = job.echo and job.logprobs is not None

    prompt_parts: list[ScoredRows] = []
    start = 0
    reuse = cache.find(tokens, k if score_prompt else None) if cache is not None else None
    if reuse is not None:
        backend.restore(reuse.entry.state, reuse.length)
        start = reuse.length
        if score_prompt:
            prompt_parts.append(first_rows(reuse.entry.scores, start, k))

    # One forward pass over the (rest of the) prompt. Row i predicts token i + 1; the last row
    # predicts the first generated token. Logits are requested only for the rows used.
    next_logits = None
    for i, block in backend.forward(tokens[start:], start=start, logits_from=0 if score_prompt else n - 1 - start):
        i += start
        in_prompt = min(len(block), n - 1 - i)
        if score_prompt and in_prompt > 0:
            targets = np.asarray(tokens[i + 1:i + 1 + in_prompt])
            prompt_parts.append(backend.score(block[:in_prompt], targets, k))
        if i + len(block) == n:
            next_logits = np.array(block[-1], dtype=np.float32)  # a copy: the block is reused

    prompt_scores = _concat(prompt_parts, k) if score_prompt else None
    if cache is not None and (reuse is None or reuse.entry.tokens != tokens):
        state, size = backend.snapshot()
        if prompt_scores is not None:
            size += prompt_scores.top_ids.nbytes + prompt_scores.top_logprobs.nbytes + prompt_scores.token_logprobs.nbytes
        cache.add(tokens, state, size, prompt_scores, k)
    if on_event is not None:
        on_event(PromptScored(prompt_scores))

    sampler = Sampler(job.sampling, tokens, job.sample_index)
    watcher = StopStringWatcher(job.stop)
    generated: list[int] = []
    generated_parts: list[ScoredRows] = []
    finish_reason = "length"
    while len(generated) < job.max_tokens:
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        token = sampler.choose(next_logits)
        generated.append(token)
        scores = score_rows(next_logits[None, :], np.array([token]), k) if job.logprobs is not None else None
        if scores is not None:
            generated_parts.append(scores)
        end_of_generation = backend.is_end_of_generation(token)
        # An end-of-generation token is reported (as vLLM does), its text is not.
        stopped = end_of_generation or watcher.feed(backend.token_bytes(token))
        if on_event is not None:
            on_event(TokenEvent(token, scores, watcher.text))
        if stopped:
            finish_reason = "stop"
            break
        if len(generated) == job.max_tokens:
            break
        for _, block in backend.forward([token], start=n + len(generated) - 1, logits_from=0):
            next_logits = np.array(block[-1], dtype=np.float32)

    return PromptResult(
        prompt_scores=prompt_scores,
        generated=generated,
        generated_scores=_concat(generated_parts, k) if job.logprobs is not None else None,
        generated_text=watcher.finish(),
        finish_reason=finish_reason,
    )


class Engine:
    def __init__(self, backend: Backend, prefix_cache_mb: int = 0):
        self.backend = backend
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        use_cache = prefix_cache_mb > 0 and backend.supports_snapshots
        self.cache = PrefixCache(prefix_cache_mb << 20) if use_cache else None

    async def run(self, fn: Callable[[], T]) -> T:
        """Run fn on the model thread (jobs run one at a time, in order) and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    def _run_jobs(self, jobs: list[PromptJob], on_event=None, cancel=None) -> list[PromptResult]:
        """Run jobs in order; on_event(index, event) sees each job's events, then (index, result)."""
        started = time.perf_counter()
        results = []
        for index, job in enumerate(jobs):
            callback = None if on_event is None else (lambda event, index=index: on_event(index, event))
            results.append(run_prompt(self.backend, job, callback, cancel, self.cache))
            if on_event is not None:
                on_event(index, results[-1])
        elapsed = time.perf_counter() - started
        n_prompt = sum(len(j.tokens) for j in jobs)
        n_gen = sum(len(r.generated) for r in results)
        cache = self.cache
        log.info(
            "completed %d prompt(s): %d prompt + %d generated tokens in %.2f s (%.0f tokens/s)%s",
            len(jobs), n_prompt, n_gen, elapsed, (n_prompt + n_gen) / max(elapsed, 1e-9),
            "" if cache is None else f"; prefix cache: {cache.hits}/{cache.lookups} hits, "
            f"{cache.reused_tokens} tokens reused, {len(cache)} prompts in {cache.used / 2**20:.0f} MB",
        )
        return results

    async def complete(self, jobs: list[PromptJob]) -> list[PromptResult]:
        return await self.run(lambda: self._run_jobs(jobs))

    async def stream(self, jobs: list[PromptJob]) -> AsyncIterator[tuple[int, PromptScored | TokenEvent | PromptResult]]:
        """Yield (job index, event) for each scored prompt and generated token, and (index, result)
        when a job ends. Jobs run one after another.
        Closing the iterator early (the client went away) stops the work before its next token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def on_event(index: int, event: PromptScored | TokenEvent | PromptResult) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        def work() -> None:
            try:
                self._run_jobs(jobs, on_event, cancel)
            except Cancelled:
                log.info("generation cancelled: the client disconnected")
            except BaseException as exc:  # handed to the consumer, which raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        loop.run_in_executor(self._worker, work)
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()  # no-op when the work finished; otherwise it stops before the next token

    def close(self) -> None:
        self._worker.shutdown(wait=True)
