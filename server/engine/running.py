"""A job's state while the engine holds it: the request it belongs to (cancelled as a whole), its
prompt pass and its generation. Only the model thread changes these, except the cancel flag."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np

from server.engine.jobs import Listener, PromptJob, PromptResult, PromptScored, TokenEvent, job_cost
from server.engine.prefix_cache import Reuse
from server.numerics.sampling import Sampler
from server.numerics.scoring import ScoredRows, concat_rows
from server.text.decoding import StopStringWatcher


class RequestState:
    """The jobs of one request: cancelled together. The model thread counts how each cancelled job
    ended, and logs it once the last one has."""

    def __init__(self, n_jobs: int, request_id: str):
        self.cancel = threading.Event()
        self.unresolved = n_jobs
        self.never_ran = self.stopped = self.finished = 0
        self.reason = "the client went away"
        self.request_id = request_id  # for the model thread's log lines, which have no request context


class PromptPass:
    """How far the prompt has run: what it reuses from the prefix cache and its scored rows."""

    def __init__(self) -> None:
        self.reuse: Reuse | None = None
        self.looked_up = False  # the prefix cache was asked (once: it counts hits)
        self.parts: list[ScoredRows] = []
        self.scores: ScoredRows | None = None
        self.distributions: list[np.ndarray] = []  # full log-distributions, block by block
        self.tokens_run = 0

    @property
    def reused(self) -> int:
        return self.reuse.length if self.reuse else 0


class Generation:
    """The tokens chosen so far, their scores, and the stop-string watch over their text."""

    def __init__(self, job: PromptJob) -> None:
        self.sampler = Sampler(job.sampling, job.tokens, job.sample_index)
        self.watcher = StopStringWatcher(job.stop)
        self.tokens: list[int] = []
        self.parts: list[ScoredRows] = []
        self.finish_reason = "length"


class RunningJob:
    """A job on its way through the engine: queued, then on a sequence of the backend (seq >= 0)."""

    def __init__(self, job: PromptJob, request: RequestState, listener: Listener | None, overhead: int = 0):
        self.job, self.request, self.listener = job, request, listener
        self.cost = job_cost(job, overhead)
        self.queued_at = time.perf_counter()
        self.future: concurrent.futures.Future[PromptResult] = concurrent.futures.Future()
        self.seq = -1
        self.rows = job.outputs.prompt_rows  # how its prompt rows are scored (None: not scored)
        self.prompt = PromptPass()
        self.output = Generation(job)
        self.next_logits: np.ndarray | None = None  # the row that chooses the next token
        self.logits_from = job.outputs.first_row(len(job.tokens))  # the first row whose logits it needs

    @property
    def cancelled(self) -> bool:
        return self.request.cancel.is_set()

    def emit(self, event: PromptScored | TokenEvent) -> None:
        if self.listener is not None:
            self.listener(event)

    def result(self) -> PromptResult:
        output = self.output
        return PromptResult(
            prompt_scores=self.prompt.scores,
            generated=output.tokens,
            generated_scores=concat_rows(output.parts, self.job.outputs.generated_k)
            if self.job.outputs.generated is not None
            else None,
            generated_text=output.watcher.finish(),
            finish_reason=output.finish_reason,
            distributions=np.concatenate(self.prompt.distributions)
            if self.job.outputs.distributions is not None and self.prompt.distributions
            else None,
        )
