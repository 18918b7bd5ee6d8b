"""The engine: one model thread that scores and generates for every request, batched.

A request is a list of jobs (one per prompt and sample), submitted together. The model thread
admits queued jobs, from any request, while the backend has free sequences (admission.py); runs
each admitted prompt through the model (prefill.py; reusing cached prefixes: a prompt's numbers
must not depend on what else is running; the MLX backend, where that is faster, runs fresh prompts
together, each within 1e-4 of alone: planner.py), then generates for all running jobs in
lock-step, one decode step per token carrying every running sequence (decode.py). Jobs join and
leave between steps.

A request whose client goes away is cancelled as a whole: its queued jobs never run, and its
running ones stop before their next forward pass (a long prompt between its chunks).
The event loop only waits on results, so /health and tokenization stay responsive.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import AsyncGenerator

from server.backends.base import Backend
from server.backends.probes import Exactness
from server.engine.admission import Admission, DrainRate
from server.engine.decode import Decoder
from server.engine.jobs import (
    Cancelled,
    EngineHooks,
    Listener,
    Origin,
    PromptJob,
    PromptResult,
    PromptScored,
    TokenEvent,
)
from server.engine.model_thread import ModelThread
from server.engine.prefill import PromptRunner
from server.engine.prefix_cache import PrefixCache
from server.engine.running import RequestState, RunningJob
from server.engine.sequences import Sequences

log = logging.getLogger(__name__)

# What the model thread hands the event loop for a request: (job index, an event, a job's result,
# or the exception a job ended with).
Delivery = tuple[int, PromptScored | TokenEvent | PromptResult | BaseException]
# A request's (job index, event) as they run (Engine.stream); closing it cancels the request.
Events = AsyncGenerator[tuple[int, PromptScored | TokenEvent | PromptResult], None]


class Engine:
    def __init__(
        self,
        backend: Backend,
        prefix_cache_mb: int = 0,
        max_queued_tokens: int = 1 << 62,
        hooks: EngineHooks | None = None,
        job_overhead_tokens: int = 0,
        exactness: Exactness | None = None,
        thread: ModelThread | None = None,
    ):
        """`exactness`: what the start-up probes decided (the prefix cache, its rule, shared
        passes); without it (an engine built in code), Exactness.unchecked with prefix_cache_mb.
        `thread`: the thread that loaded the model and ran the probes (one is started if none)."""
        self.backend = backend
        self.exactness = exactness or Exactness.unchecked(backend, prefix_cache_mb)
        x = self.exactness
        self.cache = PrefixCache(x.prefix_cache_bytes, x.reuse_rule, backend.n_batch) if x.prefix_cache else None
        rate = DrainRate()
        self.admission = Admission(max_queued_tokens, rate, job_overhead_tokens)
        self.sequences = Sequences(backend, hooks or EngineHooks())
        self.prompts = PromptRunner(backend, self.cache, self.sequences, rate, x.shared_passes, x.reuse_generations)
        self.decoder = Decoder(backend, self.sequences, rate, x.decode_rows)
        self._thread = thread or ModelThread()
        self._thread.start(self._loop)

    @property
    def queued_jobs(self) -> int:
        return len(self.admission)

    @property
    def queued_tokens(self) -> int:
        return self.admission.queued_tokens

    # -- the event loop's side ------------------------------------------------------------------
    def stream(
        self,
        jobs: list[PromptJob],
        progress: bool = True,
        origin: Origin = Origin(),  # noqa: B008 (frozen: one shared default is safe)
    ) -> Events:
        """Submit a request's jobs, all at once, now (QueueFull if the queue has no room for them,
        before anything is sent to the client), and return an iterator of (job index, event) as
        they run: with `progress`, each scored prompt and each generated token; always, (index,
        result) when a job ends. Closing the iterator early, or cancelling the task that iterates
        it (the client went away), cancels the request. `origin`: its id (for log lines) and client."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        request = RequestState(len(jobs), origin.request_id)

        def deliver(index: int, future: concurrent.futures.Future[PromptResult]) -> None:
            item = future.exception() or future.result()
            loop.call_soon_threadsafe(queue.put_nowait, (index, item))

        def report(index: int, event: PromptScored | TokenEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        submitted: list[RunningJob] = []
        for index, job in enumerate(jobs):
            listener: Listener | None = functools.partial(report, index) if progress else None
            running = RunningJob(job, request, listener, self.admission.job_overhead_tokens)
            running.future.add_done_callback(functools.partial(deliver, index))
            submitted.append(running)
        self.admission.submit(submitted, origin.client)
        return self._events(jobs, request, queue)

    async def _events(self, jobs: list[PromptJob], request: RequestState, queue: asyncio.Queue[Delivery]) -> Events:
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
                self.admission.purge_soon()

    async def complete(self, jobs: list[PromptJob], origin: Origin = Origin()) -> list[PromptResult]:  # noqa: B008
        """A request's results, in job order (the same path as stream(), without the progress)."""
        results: dict[int, PromptResult] = {}
        async for index, item in self.stream(jobs, progress=False, origin=origin):
            assert isinstance(item, PromptResult)  # without progress, only results come
            results[index] = item
        return [results[i] for i in range(len(jobs))]  # the stream ends once every job has its result

    def _log_done(self, jobs: list[PromptJob], results: list[PromptResult], elapsed: float) -> None:
        n_prompt = sum(len(j.tokens) for j in jobs)
        n_gen = sum(len(r.generated) for r in results)
        cache = self.cache
        log.info(
            "completed %d prompt(s): %d prompt + %d generated tokens in %.2f s (%.0f tokens/s)%s",
            len(jobs),
            n_prompt,
            n_gen,
            elapsed,
            (n_prompt + n_gen) / max(elapsed, 1e-9),
            ""
            if cache is None
            else f"; prefix cache: {cache.hits}/{cache.lookups} hits, "
            f"{cache.reused_tokens} tokens reused, {len(cache)} prompts in {cache.used / 2**20:.0f} MB",
        )

    def close(self) -> None:
        self.admission.close()
        self._thread.join(timeout=30)

    # -- the model thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        active: list[RunningJob] = []
        while True:
            taken = self.admission.take(len(self.sequences.free), busy=bool(active))
            if taken is None:
                self._cancel_all(active)
                return
            admitted, dropped = taken
            for r in dropped:
                self.sequences.finish(r, error=Cancelled())
            for r in admitted:
                self.sequences.assign(r)
            started = time.perf_counter()
            active += self.prompts.run(admitted)
            active = self.decoder.step(active)
            self.admission.rate.busy_seconds += time.perf_counter() - started

    def _cancel_all(self, active: list[RunningJob]) -> None:
        """At shutdown: nothing is left waiting on a result that will never come."""
        for r in [*active, *self.admission.drain()]:
            r.request.reason = "the server is shutting down"
            r.request.cancel.set()
            self.sequences.finish(r, error=Cancelled())
