"""Prompt passes: each admitted job's prompt through the model (its uncached part, in n_batch
chunks), or fresh prompts together in one pass where the planner grouped them; the rows a
response needs are scored, the scored prompt is cached, and the row that chooses the first
generated token is kept."""

from __future__ import annotations

import numpy as np

from server.backends.base import Backend, Logits, grid_chunks
from server.engine.admission import DrainRate
from server.engine.jobs import Cancelled, PromptScored
from server.engine.planner import PromptPlanner
from server.engine.prefix_cache import PrefixCache
from server.engine.running import RunningJob
from server.engine.sequences import Sequences
from server.numerics.scoring import concat_rows, first_rows, log_softmax_rows


class PromptRunner:
    def __init__(
        self,
        backend: Backend,
        cache: PrefixCache | None,
        sequences: Sequences,
        rate: DrainRate,
        shared_passes: bool,
        reuse_generations: bool = False,
    ):
        self.backend, self.cache, self.sequences, self.rate = backend, cache, sequences, rate
        self.planner = PromptPlanner(backend, cache, shared_passes, reuse_generations)

    def run(self, admitted: list[RunningJob]) -> list[RunningJob]:
        """The prompt passes of newly admitted jobs; returns those that go on to generate."""
        groups, one_by_one = self.planner.plan(admitted)
        going_on = []
        for group in groups:
            going_on += self._together(group)
        for r in one_by_one:
            try:
                if self._alone(r):
                    going_on.append(r)
            except Exception as exc:  # fails this job only (its own sequence), not the server
                self.sequences.fail([r], exc, "prompt pass")
        return going_on

    def _together(self, group: list[RunningJob]) -> list[RunningJob]:
        """Fresh prompts, each whole, in one forward pass of the backend's (shares_prompt_passes)."""
        running = self.sequences.drop_cancelled(group)
        if not running:
            return []
        wanted_from = [r.logits_from for r in running]
        try:
            blocks = self.backend.prefill_together([(r.seq, r.job.tokens, w) for r, w in zip(running, wanted_from)])
        except Exception as exc:  # a backend failure fails the jobs in that forward pass
            self.sequences.fail(running, exc, "shared prompt pass")
            return []
        going_on = []
        for r, block, w in zip(running, blocks, wanted_from):
            try:
                n = len(r.job.tokens)
                r.prompt.tokens_run += n
                self.rate.tokens_run += n
                self._take_block(r, block, w, last=True)
                self._done(r)
                going_on.append(r)
            except Exception as exc:  # scoring one prompt fails that job only
                self.sequences.fail([r], exc, "prompt scoring")
        return going_on

    def _alone(self, r: RunningJob) -> bool:
        """Run a job's prompt (its uncached part), n_batch tokens per call, scoring the rows a
        response needs. False if the request was cancelled meanwhile."""
        backend = self.backend
        tokens, n, start = r.job.tokens, len(r.job.tokens), 0
        self.planner.look_up(r)
        reuse = r.prompt.reuse
        if reuse is not None:
            backend.restore(r.seq, reuse.entry.state, reuse.length)
            start = reuse.length
            if r.rows is not None:  # a scored prompt's lookup found scored rows (PrefixCache.find)
                assert reuse.entry.scores is not None
                r.prompt.parts.append(first_rows(reuse.entry.scores, start, r.rows.k))
        # Row i predicts token i + 1; the last row predicts the first generated token. Logits are
        # asked for only for the rows used.
        wanted_from = max(start, r.logits_from)
        for lo, hi in grid_chunks(start, n, backend.n_batch):
            if r.cancelled:
                self.sequences.finish(r, error=Cancelled())
                return False
            chunk = tokens[lo:hi]
            block = backend.prefill(r.seq, chunk, lo, max(0, wanted_from - lo))
            r.prompt.tokens_run += len(chunk)
            self.rate.tokens_run += len(chunk)
            if block is not None:
                self._take_block(r, block, max(lo, wanted_from), last=lo + len(chunk) == n)
        self._done(r)
        return True

    def _take_block(self, r: RunningJob, block: Logits, i: int, last: bool) -> None:
        """Score a block of prompt logits whose first row is at position i (row i predicts token
        i + 1); the prompt's last row, in its last block, predicts the first generated token."""
        tokens, n = r.job.tokens, len(r.job.tokens)
        in_prompt = min(len(block), n - 1 - i)
        rows, distributions = r.rows, r.job.outputs.distributions
        if rows is not None and in_prompt > 0:
            targets = np.asarray(tokens[i + 1 : i + 1 + in_prompt])
            r.prompt.parts.append(self.backend.score(block[:in_prompt], targets, rows.k, ranks=rows.ranks))
        if distributions is not None and in_prompt > 0:
            skip = max(0, distributions.start - i)
            if skip < in_prompt:
                r.prompt.distributions.append(log_softmax_rows(np.array(block[skip:in_prompt], dtype=np.float32)))
        if last:
            r.next_logits = np.array(block[-1], dtype=np.float32)  # a copy: the block is reused

    def _done(self, r: RunningJob) -> None:
        """The prompt has run: its scores are complete, cached (scored prompts; generations where
        they reuse too) and reported."""
        tokens, reuse = r.job.tokens, r.prompt.reuse
        scores = concat_rows(r.prompt.parts, r.rows.k) if r.rows is not None else None
        r.prompt.scores = scores
        # Cached where a prompt like it would look it up (the planner's rule: scored prompts, and
        # generations where reuse is exact; never prompts whose full distributions were asked for).
        if self.cache is not None and self.planner.reuses(r) and (reuse is None or reuse.entry.tokens != tokens):
            state, size = self.backend.snapshot(r.seq)
            if scores is not None:
                size += (
                    scores.top_ids.nbytes
                    + scores.top_logprobs.nbytes
                    + scores.token_logprobs.nbytes
                    + (0 if scores.token_ranks is None else scores.token_ranks.nbytes)
                )
            self.cache.add(tokens, state, size, scores, r.rows.k if r.rows is not None else -1)
        r.emit(PromptScored(r.prompt.scores))
