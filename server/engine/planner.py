"""Which prompts run how: what each reuses from the prefix cache, and which fresh prompts share a
forward pass (on a backend whose shared passes stay within 1e-4 of each prompt alone).

Only scored prompts (lm-eval's loglikelihood requests) reuse and are cached: that is where reuse
pays, and where tests show it changes no number. A prompt is looked up just before its pass, not
at admission, so that jobs admitted together (one request's choices) reuse each other.
"""

from __future__ import annotations

from server.backends.base import Backend
from server.engine.prefix_cache import MIN_REUSE, PrefixCache, common_prefix
from server.engine.running import RunningJob


class PromptPlanner:
    def __init__(self, backend: Backend, cache: PrefixCache | None, shared_passes: bool):
        """`shared_passes`: the start-up check's decision (Exactness.shared_passes)."""
        self.backend, self.cache, self.shared_passes = backend, cache, shared_passes

    def look_up(self, r: RunningJob) -> None:
        """Ask the cache for the job's longest cached prefix, once (a lookup counts as a hit or miss)."""
        if self.cache is not None and r.rows is not None and not r.prompt.looked_up:
            r.prompt.reuse = self.cache.find(r.job.tokens, r.rows.k, ranks=r.rows.ranks)
        r.prompt.looked_up = True

    def plan(self, admitted: list[RunningJob]) -> tuple[list[list[RunningJob]], list[RunningJob]]:
        """(groups that share a pass, prompts that run one by one, in this order).

        On llama.cpp every prompt runs alone: sharing passes gained nothing on CPUs (0.83-1.07x
        with groups padded to equal length, which keep every number; ragged groups, which llama.cpp
        splits into small ubatches, move them: bench/shared_passes.py). A backend whose batched
        passes are faster and exact enough (the start-up check's shared_passes) runs the fresh ones
        together first; the rest (long prompts, and those that reuse a cached prefix, including
        one that a prompt of a group is about to leave in the cache) then run one by one."""
        if not self.shared_passes or len(admitted) < 2:
            return [], admitted
        fresh, others = self._fresh_prompts(admitted)
        groups: list[list[RunningJob]] = []
        alone: list[list[RunningJob]] = []
        for group in self._shared_passes(fresh):
            (groups if len(group) > 1 else alone).append(group)
        return groups, [r for group in alone for r in group] + others

    def _fresh_prompts(self, admitted: list[RunningJob]) -> tuple[list[RunningJob], list[RunningJob]]:
        """(prompts to run together, the others): a prompt joins the group when it fits one pass
        and has nothing to reuse, neither in the cache nor from a prompt of the group (the other
        choices of an lm-eval request wait for their context to be cached, and reuse it)."""
        together: list[RunningJob] = []
        others: list[RunningJob] = []
        for r in admitted:
            tokens = r.job.tokens
            if len(tokens) > self.backend.n_batch:
                others.append(r)
                continue
            if (
                self.cache is not None
                and r.rows is not None
                and any(common_prefix(tokens, g.job.tokens) > MIN_REUSE for g in together if g.rows is not None)
            ):
                others.append(r)  # looked up after the group has run
                continue
            self.look_up(r)
            (others if r.prompt.reuse is not None else together).append(r)
        return together, others

    def _shared_passes(self, fresh: list[RunningJob]) -> list[list[RunningJob]]:
        """Fresh prompts in groups of similar length (longest first: less padding) whose padded
        batch holds at most n_batch tokens, so that a shared pass holds no more logits than a
        prompt's pass does."""
        groups: list[list[RunningJob]] = []
        for r in sorted(fresh, key=lambda r: -len(r.job.tokens)):
            if groups and (len(groups[-1]) + 1) * len(groups[-1][0].job.tokens) <= self.backend.n_batch:
                groups[-1].append(r)  # the group's first prompt is its longest
            else:
                groups.append([r])
        return groups
