"""The engine: one model thread that scores and generates for every request, batched.

A request is a list of jobs (one per prompt and sample), submitted together. The model thread
admits queued jobs, from any request, while the backend has free sequences; runs each admitted
prompt through the model on its own (reusing cached prefixes: a prompt's numbers must not depend
on what else is running; the MLX backend, where that is faster, runs fresh prompts together, each
within 1e-4 of alone), then generates for all running jobs in lock-step, one decode step per
token carrying every running sequence. Jobs join and leave between steps.

A request whose client goes away is cancelled as a whole: its queued jobs never run, and its
running ones stop before their next forward pass (a long prompt between its chunks).
The event loop only waits on results, so /health and tokenization stay responsive.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from server.backends.base import Backend, Step
from server.fair_queue import FairQueue, current_client
from server.prefix_cache import MIN_REUSE, PrefixCache, Reuse, common_prefix
from server.request_id import current_request_id
from server.sampling import Sampler, SamplingParams
from server.scoring import ScoredRows, first_rows, score_rows
from server.text import StopStringWatcher

log = logging.getLogger(__name__)


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
class PromptResult:
    prompt_scores: ScoredRows | None  # rows for prompt tokens 1..n-1 (token 0 has no context)
    generated: list[int]
    generated_scores: ScoredRows | None
    generated_text: str  # without stop string, without end-of-generation tokens
    finish_reason: str  # "stop" or "length"


@dataclass
class PromptScored:
    """The prompt pass is done (for streaming: the echoed prompt can be sent)."""

    scores: ScoredRows | None  # as PromptResult.prompt_scores


@dataclass
class TokenEvent:
    """One generated token, as it happens (for streaming)."""

    token: int
    scores: ScoredRows | None
    text: str  # all generated text so far, a found stop string cut off


class Cancelled(Exception):
    """The client went away; the job stopped early."""


class QueueFull(Exception):
    """Admitting a request would put more than max_queued_tokens in the queue."""

    def __init__(self, cost: int, queued: int, limit: int, retry_after: int):
        super().__init__(f"{cost} tokens requested with {queued} already waiting (limit {limit})")
        self.cost, self.queued, self.limit, self.retry_after = cost, queued, limit, retry_after


class EngineHooks:
    """What an observer (the metrics) hears from the model thread; every method must be cheap."""

    def job_admitted(self, waited: float) -> None:
        """A job left the queue for a sequence after `waited` seconds."""

    def job_ended(self, prompt_tokens_run: int, prompt_tokens_reused: int, generated: int) -> None:
        """A job finished, failed or was stopped (its counts so far)."""


Listener = Callable[[PromptScored | TokenEvent], None]


def _concat(parts: list[ScoredRows], k: int) -> ScoredRows:
    if not parts:
        return ScoredRows(np.empty(0, np.float32), np.empty((0, k), np.int64), np.empty((0, k), np.float32))
    return ScoredRows(
        np.concatenate([p.token_logprobs for p in parts]),
        np.concatenate([p.top_ids for p in parts]),
        np.concatenate([p.top_logprobs for p in parts]),
    )


def job_cost(job: PromptJob) -> int:
    """What a job may cost the model, in tokens: its prompt and everything it may generate."""
    return len(job.tokens) + job.max_tokens


class _Request:
    """The jobs of one request: cancelled together. The model thread counts how each cancelled job
    ended, and logs it once the last one has."""

    def __init__(self, n_jobs: int):
        self.cancel = threading.Event()
        self.unresolved = n_jobs
        self.never_ran = self.stopped = self.finished = 0
        self.reason = "the client went away"
        self.request_id = current_request_id()  # made in Engine.stream, in the request's context


class _Running:
    """A job on the model: its sequence, its sampling state, and what it has produced so far."""

    def __init__(self, job: PromptJob, request: _Request, listener: Listener | None):
        self.job, self.request, self.listener = job, request, listener
        self.cost = job_cost(job)
        self.queued_at = time.perf_counter()
        self.prompt_tokens_run = 0
        self.future: concurrent.futures.Future[PromptResult] = concurrent.futures.Future()
        self.seq = -1
        self.k = job.logprobs or 0
        self.score_prompt = job.echo and job.logprobs is not None
        self.reuse: Reuse | None = None
        self.looked_up = False  # the prefix cache was asked (once: it counts hits)
        self.prompt_parts: list[ScoredRows] = []
        self.prompt_scores: ScoredRows | None = None
        self.next_logits: np.ndarray | None = None
        self.sampler = Sampler(job.sampling, job.tokens, job.sample_index)
        self.watcher = StopStringWatcher(job.stop)
        self.generated: list[int] = []
        self.generated_parts: list[ScoredRows] = []
        self.finish_reason = "length"

    @property
    def cancelled(self) -> bool:
        return self.request.cancel.is_set()

    def emit(self, event: PromptScored | TokenEvent) -> None:
        if self.listener is not None:
            self.listener(event)

    def result(self) -> PromptResult:
        return PromptResult(
            prompt_scores=self.prompt_scores,
            generated=self.generated,
            generated_scores=_concat(self.generated_parts, self.k) if self.job.logprobs is not None else None,
            generated_text=self.watcher.finish(),
            finish_reason=self.finish_reason,
        )


class Engine:
    def __init__(self, backend: Backend, prefix_cache_mb: int = 0, max_queued_tokens: int = 1 << 62,
                 hooks: EngineHooks | None = None):
        self.backend = backend
        self.hooks = hooks or EngineHooks()
        self.max_queued_tokens = max_queued_tokens
        self.queued_tokens = 0  # cost of the jobs in the queue (changed under self._wake)
        self._busy_seconds, self._tokens_run = 0.0, 0  # for Retry-After: how fast the queue drains
        use_cache = prefix_cache_mb > 0 and backend.supports_snapshots
        self.cache = PrefixCache(prefix_cache_mb << 20) if use_cache else None
        self._queue: FairQueue[_Running] = FairQueue()  # taken in turn by client
        self._wake = threading.Condition()
        self._closed = False
        self._purge = False  # a request was cancelled: drop its queued jobs at the next chance
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self._thread.start()

    # -- the event loop's side ------------------------------------------------------------------
    @property
    def queued_jobs(self) -> int:
        return len(self._queue)

    def stream(self, jobs: list[PromptJob], progress: bool = True,
               ) -> AsyncIterator[tuple[int, PromptScored | TokenEvent | PromptResult]]:
        """Submit a request's jobs, all at once, now (QueueFull if the queue has no room for them,
        before anything is sent to the client), and return an iterator of (job index, event) as
        they run: with `progress`, each scored prompt and each generated token; always, (index,
        result) when a job ends. Closing the iterator early, or cancelling the task that iterates
        it (the client went away), cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request = _Request(len(jobs))

        def deliver(index: int, future: concurrent.futures.Future) -> None:
            item = future.exception() or future.result()
            loop.call_soon_threadsafe(queue.put_nowait, (index, item))

        submitted = []
        for index, job in enumerate(jobs):
            listener = (lambda event, index=index: loop.call_soon_threadsafe(queue.put_nowait, (index, event))) \
                if progress else None
            running = _Running(job, request, listener)
            running.future.add_done_callback(lambda f, index=index: deliver(index, f))
            submitted.append(running)
        cost = sum(r.cost for r in submitted)
        with self._wake:
            if self.queued_tokens + cost > self.max_queued_tokens:
                raise QueueFull(cost, self.queued_tokens, self.max_queued_tokens, self._retry_after())
            self.queued_tokens += cost
            self._queue.extend(current_client(), submitted)
            self._wake.notify()
        return self._events(jobs, request, queue)

    async def _events(self, jobs: list[PromptJob], request: _Request, queue: asyncio.Queue):
        started = time.perf_counter()
        results: dict[int, PromptResult] = {}
        try:
            while len(results) < len(jobs):
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, PromptResult):
                    results[index] = item
                yield index, item
            self._log_done(jobs, [results[i] for i in range(len(jobs))], time.perf_counter() - started)
        finally:
            request.cancel.set()  # a no-op when every job has finished
            if len(results) < len(jobs):
                with self._wake:  # the model thread drops the rest between two forward passes
                    self._purge = True
                    self._wake.notify()

    def _retry_after(self) -> int:
        """Seconds until the queue has drained at the rate the model has been working (1..60)."""
        rate = self._tokens_run / self._busy_seconds if self._busy_seconds > 1 else 100.0
        return int(min(60, max(1, self.queued_tokens / rate)))

    async def complete(self, jobs: list[PromptJob]) -> list[PromptResult]:
        """A request's results, in job order (the same path as stream(), without the progress)."""
        results: list[PromptResult | None] = [None] * len(jobs)
        async for index, item in self.stream(jobs, progress=False):
            results[index] = item
        return results

    def _log_done(self, jobs: list[PromptJob], results: list[PromptResult], elapsed: float) -> None:
        n_prompt = sum(len(j.tokens) for j in jobs)
        n_gen = sum(len(r.generated) for r in results)
        cache = self.cache
        log.info(
            "completed %d prompt(s): %d prompt + %d generated tokens in %.2f s (%.0f tokens/s)%s",
            len(jobs), n_prompt, n_gen, elapsed, (n_prompt + n_gen) / max(elapsed, 1e-9),
            "" if cache is None else f"; prefix cache: {cache.hits}/{cache.lookups} hits, "
            f"{cache.reused_tokens} tokens reused, {len(cache)} prompts in {cache.used / 2**20:.0f} MB",
        )

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the model thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        active: list[_Running] = []
        free = list(range(self.backend.max_sequences))
        while True:
            admitted: list[_Running] = []
            with self._wake:
                while not self._queue and not active and not self._closed:
                    self._wake.wait()
                if self._closed:
                    self._cancel_all(active, free)
                    return
                if self._purge:
                    self._drop_cancelled(free)
                admitted = self._admit(free)
            started = time.perf_counter()
            active += self._run_prompts(admitted, free)
            active = self._step(active, free)
            self._busy_seconds += time.perf_counter() - started

    def _cancel_all(self, active: list[_Running], free: list[int]) -> None:
        """At shutdown: nothing is left waiting on a result that will never come."""
        for running in [*active, *self._queue]:
            running.request.reason = "the server is shutting down"
            running.request.cancel.set()
            self._finish(running, free, error=Cancelled())
        self._queue.clear()

    def _drop_cancelled(self, free: list[int]) -> None:
        for running in self._queue.remove_if(lambda r: r.cancelled):
            self.queued_tokens -= running.cost
            self._finish(running, free, error=Cancelled())
        self._purge = False

    def _admit(self, free: list[int]) -> list[_Running]:
        """Jobs from the queue, clients in turn, while sequences are free. Each sequence has a context
        of its own, and requests were checked to fit one. Jobs of cancelled requests are dropped."""
        admitted: list[_Running] = []
        while self._queue and free:
            running = self._queue.popleft()
            self.queued_tokens -= running.cost
            if running.cancelled:
                self._finish(running, free, error=Cancelled())
                continue
            running.seq = free.pop(0)
            self.hooks.job_admitted(time.perf_counter() - running.queued_at)
            admitted.append(running)
        return admitted

    def _run_prompts(self, admitted: list[_Running], free: list[int]) -> list[_Running]:
        """The prompt passes of newly admitted jobs; returns those that go on to generate.

        On llama.cpp prompts run one at a time: sharing passes gained nothing on CPUs (0.83-1.07x
        with groups padded to equal length, which keep every number; ragged groups, which llama.cpp
        splits into small ubatches, move them: bench/shared_passes.py, README "Prompts in shared
        forward passes"). A backend whose batched passes are faster and stay within 1e-4 of each
        prompt alone (MLX: Backend.shares_prompt_passes) runs the fresh ones together first; the
        rest (long prompts, and those that reuse a cached prefix, including one that a prompt of
        the group is about to leave in the cache) then run one by one, as on llama.cpp."""
        going_on, one_by_one = [], admitted
        if self.backend.shares_prompt_passes and len(admitted) > 1:
            fresh, others = self._fresh_prompts(admitted)
            one_by_one = []
            for group in self._shared_passes(fresh):
                if len(group) > 1:
                    going_on += self._prefill_together(group, free)
                else:
                    one_by_one += group
            one_by_one += others
        for r in one_by_one:
            try:
                if self._prefill(r, free):
                    going_on.append(r)
            except Exception as exc:  # fails this job only (its own sequence), not the server
                log.exception("prompt pass failed")
                self._finish(r, free, error=exc)
        return going_on

    def _look_up(self, r: _Running) -> None:
        """Only scored prompts (lm-eval's loglikelihood requests) reuse and are cached: that is
        where reuse pays, and where tests show it changes no number. Looked up just before the
        prompt's pass, not at admission, so that jobs admitted together (one request's choices)
        reuse each other."""
        if self.cache is not None and r.score_prompt and not r.looked_up:
            r.reuse = self.cache.find(r.job.tokens, r.k)
        r.looked_up = True

    def _fresh_prompts(self, admitted: list[_Running]) -> tuple[list[_Running], list[_Running]]:
        """(prompts to run together, the others): a prompt joins the group when it fits one pass
        and has nothing to reuse, neither in the cache nor from a prompt of the group (the other
        choices of an lm-eval request wait for their context to be cached, and reuse it)."""
        together, others = [], []
        for r in admitted:
            tokens = r.job.tokens
            if len(tokens) > self.backend.n_batch:
                others.append(r)
                continue
            if self.cache is not None and r.score_prompt and any(
                    common_prefix(tokens, g.job.tokens) > MIN_REUSE for g in together if g.score_prompt):
                others.append(r)  # looked up after the group has run
                continue
            self._look_up(r)
            (others if r.reuse is not None else together).append(r)
        return together, others

    def _shared_passes(self, fresh: list[_Running]) -> list[list[_Running]]:
        """Fresh prompts in groups of similar length (longest first: less padding) whose padded
        batch holds at most n_batch tokens, so that a shared pass holds no more logits than a
        prompt's pass does."""
        groups: list[list[_Running]] = []
        for r in sorted(fresh, key=lambda r: -len(r.job.tokens)):
            if groups and (len(groups[-1]) + 1) * len(groups[-1][0].job.tokens) <= self.backend.n_batch:
                groups[-1].append(r)  # the group's first prompt is its longest
            else:
                groups.append([r])
        return groups

    def _prefill_together(self, group: list[_Running], free: list[int]) -> list[_Running]:
        """Fresh prompts, each whole, in one forward pass of the backend's (shares_prompt_passes)."""
        running = []
        for r in group:
            if r.cancelled:
                self._finish(r, free, error=Cancelled())
            else:
                running.append(r)
        if not running:
            return []
        wanted_from = [0 if r.score_prompt else len(r.job.tokens) - 1 for r in running]
        try:
            blocks = self.backend.prefill_together([(r.seq, r.job.tokens, w) for r, w in zip(running, wanted_from)])
        except Exception as exc:  # a backend failure fails the jobs in that forward pass
            log.exception("shared prompt pass failed")
            for r in running:
                self._finish(r, free, error=exc)
            return []
        going_on = []
        for r, block, w in zip(running, blocks, wanted_from):
            try:
                n = len(r.job.tokens)
                r.prompt_tokens_run += n
                self._tokens_run += n
                self._take_block(r, block, w, last=True)
                self._prompt_done(r)
                going_on.append(r)
            except Exception as exc:  # scoring one prompt fails that job only
                log.exception("prompt scoring failed")
                self._finish(r, free, error=exc)
        return going_on

    def _prefill(self, r: _Running, free: list[int]) -> bool:
        """Run a newly admitted job's prompt (its uncached part), n_batch tokens per call, scoring
        the rows a response needs. False if the request was cancelled meanwhile."""
        backend = self.backend
        tokens, n, start = r.job.tokens, len(r.job.tokens), 0
        self._look_up(r)
        if r.reuse is not None:
            backend.restore(r.seq, r.reuse.entry.state, r.reuse.length)
            start = r.reuse.length
            r.prompt_parts.append(first_rows(r.reuse.entry.scores, start, r.k))
        # Row i predicts token i + 1; the last row predicts the first generated token. Logits are
        # asked for only for the rows used.
        wanted_from = start if r.score_prompt else n - 1
        for lo in range(start, n, backend.n_batch):
            if r.cancelled:
                self._finish(r, free, error=Cancelled())
                return False
            chunk = tokens[lo:lo + backend.n_batch]
            block = backend.prefill(r.seq, chunk, lo, max(0, wanted_from - lo))
            r.prompt_tokens_run += len(chunk)
            self._tokens_run += len(chunk)
            if block is not None:
                self._take_block(r, block, max(lo, wanted_from), last=lo + len(chunk) == n)
        self._prompt_done(r)
        return True

    def _take_block(self, r: _Running, block, i: int, last: bool) -> None:
        """Score a block of prompt logits whose first row is at position i (row i predicts token
        i + 1); the prompt's last row, in its last block, predicts the first generated token."""
        tokens, n = r.job.tokens, len(r.job.tokens)
        in_prompt = min(len(block), n - 1 - i)
        if r.score_prompt and in_prompt > 0:
            targets = np.asarray(tokens[i + 1:i + 1 + in_prompt])
            r.prompt_parts.append(self.backend.score(block[:in_prompt], targets, r.k))
        if last:
            r.next_logits = np.array(block[-1], dtype=np.float32)  # a copy: the block is reused

    def _prompt_done(self, r: _Running) -> None:
        """The prompt has run: its scores are complete, cached (scored prompts) and reported."""
        tokens = r.job.tokens
        r.prompt_scores = _concat(r.prompt_parts, r.k) if r.score_prompt else None
        if self.cache is not None and r.score_prompt and (r.reuse is None or r.reuse.entry.tokens != tokens):
            state, size = self.backend.snapshot(r.seq)
            scores = r.prompt_scores
            size += scores.top_ids.nbytes + scores.top_logprobs.nbytes + scores.token_logprobs.nbytes
            self.cache.add(tokens, state, size, scores, r.k)
        r.emit(PromptScored(r.prompt_scores))

    def _step(self, active: list[_Running], free: list[int]) -> list[_Running]:
        """Choose one token for every running job, then one decode step for those that go on."""
        tokens = self.backend.tokens
        going_on = []
        for r in active:
            if r.cancelled:
                self._finish(r, free, error=Cancelled())
                continue
            if len(r.generated) >= r.job.max_tokens:
                self._finish(r, free)
                continue
            try:  # one job's failure (say, its sampling) is its own: the others go on
                stopped = self._choose(r, tokens)
            except Exception as exc:
                log.exception("choosing a token failed")
                self._finish(r, free, error=exc)
                continue
            if stopped:
                r.finish_reason = "stop"
                self._finish(r, free)
            elif len(r.generated) == r.job.max_tokens:
                self._finish(r, free)
            else:
                going_on.append(r)
        if going_on:
            steps = [Step(r.seq, r.generated[-1], len(r.job.tokens) + len(r.generated) - 1) for r in going_on]
            try:
                logits = self.backend.decode(steps)
            except Exception as exc:  # a backend failure fails the jobs in that forward pass
                log.exception("decode step failed")
                for r in going_on:
                    self._finish(r, free, error=exc)
                return []
            self._tokens_run += len(steps)
            for r, row in zip(going_on, logits):
                r.next_logits = row
        return going_on

    def _choose(self, r: _Running, tokens) -> bool:
        """Sample the job's next token and report it; True if it ends the generation."""
        token = r.sampler.choose(r.next_logits)
        r.generated.append(token)
        scores = score_rows(r.next_logits[None, :], np.array([token]), r.k) if r.job.logprobs is not None else None
        if scores is not None:
            r.generated_parts.append(scores)
        # An end-of-generation token is reported (as vLLM does), its text is not.
        stopped = tokens.is_end_of_generation(token) or r.watcher.feed(tokens.pieces[token])
        r.emit(TokenEvent(token, scores, r.watcher.text))
        return stopped

    def _finish(self, r: _Running, free: list[int], error: BaseException | None = None) -> None:
        ran = r.seq >= 0
        if ran:
            self.backend.release(r.seq)
            free.append(r.seq)
            r.seq = -1
            self.hooks.job_ended(r.prompt_tokens_run, r.reuse.length if r.reuse else 0, len(r.generated))
        if r.future.done():
            return
        request = r.request
        request.unresolved -= 1
        if error is None:
            request.finished += 1
            r.future.set_result(r.result())
        else:
            if isinstance(error, Cancelled):
                if ran:
                    request.stopped += 1
                else:
                    request.never_ran += 1
            r.future.set_exception(error)
        if request.unresolved == 0 and request.cancel.is_set() and (request.never_ran or request.stopped):
            log.info("request cancelled (%s): %d queued job(s) dropped before running, "
                     "%d running job(s) stopped early, %d had finished",
                     request.reason, request.never_ran, request.stopped, request.finished,
                     extra={"request_id": request.request_id})  # the model thread has no request context
