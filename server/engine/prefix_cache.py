"""Reusing the work of earlier prompts that share a token prefix with a new one.

lm-eval sends each multiple-choice context once per choice, and not next to each other (it sorts
requests by length); its generation tasks send every question after the same few-shot examples.
So the cache keeps the KV state of recent prompts (a snapshot taken out of the backend) together
with their scored rows where they were scored, under a memory bound, evicting the least recently
used. A new prompt that starts with r + 1 tokens of a cached one restores that KV for positions
0..r-1, reuses the scores of rows 0..r-1 (which predict tokens 1..r) where it is scored, and runs
the forward pass from position r only, where r is cut back to where the backend's ReuseRule
(decided by the start-up check) lets a tail start with the whole pass's floats: a generation then
starts from the same last row as without the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from server.backends.base import ReuseRule
from server.numerics.scoring import ScoredRows

KEY_TOKENS = 8  # entries are found by their first tokens, then compared in full
MIN_REUSE = 8  # shorter shared prefixes are not worth a restore


@dataclass(eq=False)  # entries are compared by identity
class CachedPrompt:
    tokens: list[int]
    state: object  # the backend's KV snapshot of these tokens
    size: int  # bytes
    scores: ScoredRows | None  # rows for tokens[1:]; None: the prompt was not scored (a generation's)
    k: int  # top-k width of `scores` (-1: none)


@dataclass
class Reuse:
    entry: CachedPrompt
    length: int  # positions whose KV (and, when scoring, rows) come from the cache


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, max_bytes: int, rule: ReuseRule | None = None, n_batch: int = 1 << 30):
        self.max_bytes = max_bytes
        # Where a tail may start (prompt passes run on the n_batch grid).
        self.rule, self.n_batch = rule or ReuseRule(), n_batch
        self.used = 0
        self._entries: OrderedDict[int, CachedPrompt] = OrderedDict()  # LRU order, by id(entry)
        self._by_key: dict[tuple[int, ...], list[CachedPrompt]] = {}
        self.hits = self.lookups = self.reused_tokens = 0

    def find(self, tokens: list[int], k: int | None, ranks: bool = False) -> Reuse | None:
        """The longest usable cached prefix for a prompt scored with top-k (ranks: and ranks), or,
        with k None, for one whose rows are not scored (only the KV is reused)."""
        self.lookups += 1
        best: Reuse | None = None
        for entry in self._by_key.get(tuple(tokens[:KEY_TOKENS]), []):
            if k is not None and (entry.scores is None or entry.k < k or (ranks and entry.scores.token_ranks is None)):
                continue
            length = self.rule.restore_length(
                common_prefix(entry.tokens, tokens), len(tokens), self.n_batch, cached=len(entry.tokens)
            )
            if length >= MIN_REUSE and (best is None or length > best.length):
                best = Reuse(entry, length)
        if best is not None:
            self.hits += 1
            self.reused_tokens += best.length
            self._entries.move_to_end(id(best.entry))
        return best

    def add(self, tokens: list[int], state: object, size: int, scores: ScoredRows | None, k: int) -> None:
        if len(tokens) < MIN_REUSE or size > self.max_bytes:
            return
        entry = CachedPrompt(list(tokens), state, size, scores, k)
        while self.used + size > self.max_bytes:
            self._evict_oldest()
        self._entries[id(entry)] = entry
        self._by_key.setdefault(tuple(tokens[:KEY_TOKENS]), []).append(entry)
        self.used += size

    def _evict_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        siblings = self._by_key[tuple(entry.tokens[:KEY_TOKENS])]
        siblings.remove(entry)
        if not siblings:
            del self._by_key[tuple(entry.tokens[:KEY_TOKENS])]
        self.used -= entry.size

    def __len__(self) -> int:
        return len(self._entries)
