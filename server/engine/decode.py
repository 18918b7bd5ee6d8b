"""Generation: one token chosen for every running job, then one decode step carrying all of those
that go on (jobs join and leave between steps), in as many forward passes as the start-up check
allows rows per pass (Exactness.decode_rows: more would change a sequence's numbers)."""

from __future__ import annotations

import numpy as np

from server.backends.base import Backend, Step
from server.engine.admission import DrainRate
from server.engine.jobs import Cancelled, TokenEvent
from server.engine.running import RunningJob
from server.engine.sequences import Sequences
from server.numerics.scoring import score_rows


class Decoder:
    def __init__(self, backend: Backend, sequences: Sequences, rate: DrainRate, rows: int | None = None):
        self.backend, self.sequences, self.rate = backend, sequences, rate
        self.rows = rows or backend.max_sequences  # most sequences in one forward pass

    def step(self, active: list[RunningJob]) -> list[RunningJob]:
        """Choose one token for every running job, then one decode step for those that go on."""
        going_on = []
        for r in active:
            if r.cancelled:
                self.sequences.finish(r, error=Cancelled())
                continue
            if len(r.output.tokens) >= r.job.max_tokens:
                self.sequences.finish(r)
                continue
            try:  # one job's failure (say, its sampling) is its own: the others go on
                stopped = self._choose(r)
            except Exception as exc:
                self.sequences.fail([r], exc, "choosing a token")
                continue
            if stopped:
                r.output.finish_reason = "stop"
                self.sequences.finish(r)
            elif len(r.output.tokens) == r.job.max_tokens:
                self.sequences.finish(r)
            else:
                going_on.append(r)
        if not going_on:
            return going_on
        jobs = {r.seq: r for r in going_on}
        steps = [Step(r.seq, r.output.tokens[-1], len(r.job.tokens) + len(r.output.tokens) - 1) for r in going_on]
        for part in self.backend.decode_passes(steps, self.rows):
            carried = [jobs[s.seq] for s in part]
            try:
                logits = self.backend.decode(part)
            except Exception as exc:  # a backend failure fails the jobs in that forward pass
                self.sequences.fail(carried, exc, "decode step")  # ended: their sequences are given back
                continue
            self.rate.tokens_run += len(part)
            for r, row in zip(carried, logits):
                r.next_logits = row
        return [r for r in going_on if r.seq >= 0]  # all but the jobs of a failed pass

    def _choose(self, r: RunningJob) -> bool:
        """Sample the job's next token and report it; True if it ends the generation."""
        output, tokens, logits = r.output, self.backend.tokens, r.next_logits
        assert logits is not None, "a running job's next row comes from its prompt pass or the last decode step"
        token = output.sampler.choose(logits)
        output.tokens.append(token)
        generated = r.job.outputs.generated  # its tokens' scores, where asked for
        scores = score_rows(logits[None, :], np.array([token]), generated.k) if generated is not None else None
        if scores is not None:
            output.parts.append(scores)
        # An end-of-generation token is reported (as vLLM does), its text is not.
        stopped = tokens.is_end_of_generation(token) or output.watcher.feed(tokens.pieces[token])
        r.emit(TokenEvent(token, scores, output.watcher.text, output.watcher.held))
        return stopped
