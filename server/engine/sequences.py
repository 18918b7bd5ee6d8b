"""The backend's sequences, handed to admitted jobs and taken back when a job ends, however it
ends: finished, failed or cancelled. Ending a job resolves its future and, for a cancelled request,
logs once how its jobs ended."""

from __future__ import annotations

import bisect
import logging
import time

from server.backends.base import Backend
from server.engine.jobs import Cancelled, EngineHooks
from server.engine.running import RunningJob

log = logging.getLogger(__name__)


class Sequences:
    def __init__(self, backend: Backend, hooks: EngineHooks):
        self.backend, self.hooks = backend, hooks
        self.free = list(range(backend.max_sequences))

    def assign(self, r: RunningJob) -> None:
        # The lowest free id: llama.cpp decodes sequences of consecutive ids in one pass.
        r.seq = self.free.pop(0)
        self.hooks.job_admitted(time.perf_counter() - r.queued_at)

    def finish(self, r: RunningJob, error: BaseException | None = None) -> None:
        """End a job: its sequence back to the pool, its result (or error) to the request."""
        ran = r.seq >= 0
        if ran:
            self.backend.release(r.seq)
            bisect.insort(self.free, r.seq)
            r.seq = -1
            self.hooks.job_ended(r.prompt.tokens_run, r.prompt.reused, len(r.output.tokens))
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
            log.info(
                "request cancelled (%s): %d queued job(s) dropped before running, "
                "%d running job(s) stopped early, %d had finished",
                request.reason,
                request.never_ran,
                request.stopped,
                request.finished,
                extra={"request_id": request.request_id},
            )

    def fail(self, jobs: list[RunningJob], error: BaseException, what: str) -> None:
        """A forward pass failed: the jobs in it fail, the server goes on."""
        log.error("%s failed", what, exc_info=error)
        for r in jobs:
            self.finish(r, error=error)

    def drop_cancelled(self, jobs: list[RunningJob]) -> list[RunningJob]:
        """The jobs still wanted; the others end as cancelled."""
        kept = []
        for r in jobs:
            if r.cancelled:
                self.finish(r, error=Cancelled())
            else:
                kept.append(r)
        return kept
