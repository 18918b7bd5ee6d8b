"""What the engine takes and gives: a prompt's job, its result, the events it streams, and the
errors a request can end with. The serving layer builds jobs and reads results; nothing here runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server.engine.outputs import Outputs
from server.numerics.sampling import SamplingParams
from server.numerics.scoring import ScoredRows


@dataclass(frozen=True)
class Origin:
    """Who sent a request, as the engine needs it: its id (the model thread's log lines, which have
    no request context) and its client (whose turn it is: fair_queue.py). The HTTP layer decides
    both (server/api.py); work submitted outside a request shares one anonymous client."""

    request_id: str = "-"
    client: str = ""


@dataclass
class PromptJob:
    tokens: list[int]
    max_tokens: int
    outputs: Outputs = field(default_factory=Outputs)  # what its passes extract besides the tokens
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    sample_index: int = 0  # which of a request's n samples this is (its own random stream)


def job_cost(job: PromptJob, overhead: int = 0) -> int:
    """What a job may cost the model, in tokens: its prompt, everything it may generate, and
    `overhead` for what every job costs whatever its length (--job-overhead-tokens)."""
    return len(job.tokens) + job.max_tokens + overhead


@dataclass
class PromptResult:
    prompt_scores: ScoredRows | None  # rows for prompt tokens 1..n-1 (token 0 has no context)
    generated: list[int]
    generated_scores: ScoredRows | None
    generated_text: str  # without stop string, without end-of-generation tokens
    finish_reason: str  # "stop" or "length"
    distributions: np.ndarray | None = None  # [rows, n_vocab] float32 log-probabilities (outputs.Distributions)


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
    held: int = 0  # characters at text's end that may begin a stop string: not to be streamed yet


Listener = Callable[[PromptScored | TokenEvent], None]


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
