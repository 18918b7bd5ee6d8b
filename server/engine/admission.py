"""The queue between the event loop and the model thread: admission against the token bound (with
the Retry-After a refused client is told), clients taken in turn, and cancelled jobs dropped."""

from __future__ import annotations

import threading

from server.engine.fair_queue import FairQueue
from server.engine.jobs import QueueFull
from server.engine.running import RunningJob


class DrainRate:
    """How fast the model has been working, in tokens per busy second (for Retry-After)."""

    def __init__(self) -> None:
        self.busy_seconds, self.tokens_run = 0.0, 0

    def seconds_for(self, tokens: int) -> int:
        """Seconds until `tokens` have run at the rate seen so far (1..60; 100 tokens/s until the
        model has been busy for a second)."""
        rate = self.tokens_run / self.busy_seconds if self.busy_seconds > 1 else 100.0
        return int(min(60, max(1, tokens / rate)))


class Admission:
    """Jobs wait here, in FairQueue's turns between clients, for a free sequence. The event loop
    submits and cancels; the model thread takes. One condition guards both sides."""

    def __init__(self, max_queued_tokens: int, rate: DrainRate, job_overhead_tokens: int = 0):
        self.max_queued_tokens = max_queued_tokens
        self.rate = rate
        self.job_overhead_tokens = job_overhead_tokens  # in each job's cost: the rate counts it as run
        self.queued_tokens = 0  # cost of the jobs in the queue
        self._queue: FairQueue[RunningJob] = FairQueue()
        self._wake = threading.Condition()
        self._closed = False
        self._purge = False  # a request was cancelled: drop its queued jobs at the next chance

    def __len__(self) -> int:
        return len(self._queue)

    # -- the event loop's side --------------------------------------------------------------------
    def submit(self, jobs: list[RunningJob], client: str) -> None:
        """Queue a request's jobs, all or none, in `client`'s turn: QueueFull if they do not fit under the bound."""
        cost = sum(r.cost for r in jobs)
        with self._wake:
            if self.queued_tokens + cost > self.max_queued_tokens:
                raise QueueFull(
                    cost, self.queued_tokens, self.max_queued_tokens, self.rate.seconds_for(self.queued_tokens)
                )
            self.queued_tokens += cost
            self._queue.extend(client, jobs)
            self._wake.notify()

    def purge_soon(self) -> None:
        """A request was cancelled: the model thread drops its queued jobs between two passes."""
        with self._wake:
            self._purge = True
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    # -- the model thread's side ------------------------------------------------------------------
    def take(self, n_free: int, busy: bool) -> tuple[list[RunningJob], list[RunningJob]] | None:
        """Wait until there is work (at once when `busy`), then (admitted, dropped): up to n_free
        jobs, clients in turn, and the queued jobs of cancelled requests. None once closed."""
        with self._wake:
            while not self._queue and not busy and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            dropped: list[RunningJob] = []
            if self._purge:
                dropped = self._queue.remove_if(lambda r: r.cancelled)
                self._purge = False
            admitted: list[RunningJob] = []
            while self._queue and len(admitted) < n_free:
                running = self._queue.popleft()
                (dropped if running.cancelled else admitted).append(running)
            self.queued_tokens -= sum(r.cost for r in admitted + dropped)
            # Retry-After compares queued costs with the rate: what a job counts for beyond its
            # tokens is work done when it runs.
            self.rate.tokens_run += self.job_overhead_tokens * len(admitted)
            return admitted, dropped

    def drain(self) -> list[RunningJob]:
        """At shutdown: every queued job, the queue left empty."""
        with self._wake:
            left = list(self._queue)
            self._queue.clear()
            self.queued_tokens = 0
            return left
