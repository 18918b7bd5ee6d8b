"""Which prompts run how: what each reuses from the prefix cache, and which fresh prompts share a
forward pass (on a backend whose shared passes stay within 1e-4 of each prompt alone).

Scored prompts (lm-eval's loglikelihood requests) reuse and are cached, their rows and KV; so are
generations (its generate_until requests, whose few-shot examples repeat), their KV, where the
start-up check found that cache hits give the very same floats (Exactness.reuse_generations). A
prompt is looked up just before its pass, not at admission, so that jobs admitted together (one
request's choices) reuse each other.
"""

from __future__ import annotations

from server.backends.base import Backend
from server.engine.prefix_cache import MIN_REUSE, PrefixCache, common_prefix
from server.engine.running import RunningJob


class PromptPlanner:
    def __init__(
        self, backend: Backend, cache: PrefixCache | None, shared_passes: bool, reuse_generations: bool = False
    ):
        """`shared_passes`, `reuse_generations`: the start-up check's decisions (Exactness)."""
        self.backend, self.cache, self.shared_passes = backend, cache, shared_passes
        self.reuse_generations = reuse_generations

    def reuses(self, r: RunningJob) -> bool:
        """Whether the job's prompt may start from a cached prefix: a scored prompt, or any prompt
        where cache hits give the very same floats; never one whose full distributions are asked
        for (those rows must be computed)."""
        wanted = r.rows is not None or self.reuse_generations
        return self.cache is not None and wanted and r.job.outputs.distributions is None

    def look_up(self, r: RunningJob) -> None:
        """Ask the cache for the job's longest cached prefix, once (a lookup counts as a hit or miss):
        with its scored rows where the job scores its prompt, else its KV alone."""
        if self.reuses(r) and not r.prompt.looked_up:
            assert self.cache is not None
            rows = r.rows
            k, ranks = (rows.k, rows.ranks) if rows is not None else (None, False)
            r.prompt.reuse = self.cache.find(r.job.tokens, k, ranks=ranks)
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
            if self.reuses(r) and any(
                common_prefix(tokens, g.job.tokens) > MIN_REUSE for g in together if self.reuses(g)
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
