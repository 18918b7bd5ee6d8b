"""Which replica a prompt goes to, so that N replicas reuse what one server reuses: the replica that
already holds the longest stretch of the prompt's prefix, unless that would load it past a bound;
else the least loaded.

A prompt is cut into blocks (BLOCK_TOKENS token ids, or BLOCK_CHARS characters of a string prompt)
and each block is named by a hash chained over all blocks before it, so a block's name stands for
the whole prefix up to its end (as vLLM names its KV blocks). Each replica remembers the names of
the prompts sent to it (a bounded LRU, as its prefix cache is bounded); the match of a prompt on a
replica is how many of its leading names that replica holds.

Why this rule (measured on lm-eval's requests in tests/test_affinity.py and `make scale-test`):
- hashing a fixed-length prefix sends every few-shot prompt (which share one long prefix across
  every item of a task) to one replica; hashing the whole prompt separates the choices of one
  item, whose contexts are what the prefix cache reuses;
- the longest match finds the item: its context is on one replica only, while a few-shot prefix,
  once on most replicas, is no reason to prefer any of them, and then load decides;
- the load bound (bounded-load consistent hashing's rule: no replica above (1 + SLACK) x the mean
  count of prompts sent, + BURST so that an item's choices stay together while few prompts have
  been sent) keeps a hot prefix from piling on one replica.
A prompt is remembered on its replica as soon as it is chosen, so the next choice of the same
item, arriving before the first has run, already finds it.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

BLOCK_TOKENS = 16
BLOCK_CHARS = 64  # ~16 tokens of English text
SLACK = 0.2  # the load bound: a replica takes a prompt by affinity up to (1 + SLACK) x the mean
BURST = 4  # ... + this many: the choices of one item (sent together) stay together from the start
REMEMBERED_BLOCKS = 1 << 17  # per replica (~3 MB of names): far more than a prefix cache holds


def block_names(prompt: Sequence[int] | str) -> list[bytes]:
    """The chained names of a prompt's whole blocks (a partial last block is left out: it cannot
    be matched by another prompt before it is complete)."""
    encode: Callable[[Any], bytes]  # takes a block of the prompt: a str, or a sequence of token ids
    if isinstance(prompt, str):
        size, kind, encode = BLOCK_CHARS, b"s", lambda block: block.encode("utf-8", "surrogatepass")
    else:
        size, kind, encode = BLOCK_TOKENS, b"t", lambda block: b",".join(b"%d" % t for t in block)
    names: list[bytes] = []
    previous = kind
    for start in range(0, len(prompt) - size + 1, size):
        previous = hashlib.blake2b(previous + encode(prompt[start : start + size]), digest_size=12).digest()
        names.append(previous)
    return names


class Replica:
    """What the router knows of one replica: the block names sent to it, and how many prompts."""

    def __init__(self, capacity: int = REMEMBERED_BLOCKS):
        self.names: OrderedDict[bytes, None] = OrderedDict()
        self.capacity = capacity
        self.sent = 0

    def match(self, names: list[bytes]) -> int:
        """How many leading blocks of a prompt this replica holds."""
        n = 0
        for name in names:
            if name not in self.names:
                break
            n += 1
        return n

    def remember(self, names: list[bytes]) -> None:
        for name in names:
            self.names[name] = None
            self.names.move_to_end(name)
        while len(self.names) > self.capacity:
            self.names.popitem(last=False)


class PrefixAffinity:
    """The rule, over whatever replicas exist now (replica ids are opaque strings)."""

    def __init__(self, slack: float = SLACK, capacity: int = REMEMBERED_BLOCKS):
        self.slack, self.capacity = slack, capacity
        self.replicas: dict[str, Replica] = {}

    def sync(self, current: Sequence[str]) -> None:
        """Forget replicas that are gone; a replica that joins (a restart, a scale-up) starts with
        nothing remembered and the mean count of the others, so that it takes its share from now
        on rather than every prompt until it has caught up with their history."""
        for gone in set(self.replicas) - set(current):
            del self.replicas[gone]
        joining = [rid for rid in current if rid not in self.replicas]
        if joining:
            mean = sum(r.sent for r in self.replicas.values()) // len(self.replicas) if self.replicas else 0
            for rid in joining:
                self.replicas[rid] = Replica(self.capacity)
                self.replicas[rid].sent = mean

    def order(self, prompt: Sequence[int] | str | None, current: Sequence[str]) -> list[str]:
        """The replicas in the order to try them for this prompt (the first is the choice)."""
        self.sync(current)
        names = block_names(prompt) if prompt is not None else []
        total = sum(r.sent for r in self.replicas.values())
        bound = math.ceil((1 + self.slack) * (total + 1) / max(len(current), 1)) + BURST
        matches = {rid: self.replicas[rid].match(names) for rid in current}
        # Least loaded first (ties by id, so every router orders alike); then, among replicas
        # under the bound, the longest match leads. A match that most replicas hold (a shared
        # few-shot prefix, once spread) says nothing: only what goes beyond it counts, and a
        # replica that holds nothing yet is still among the least loaded.
        by_load = sorted(current, key=lambda rid: (self.replicas[rid].sent, rid))
        floor = sorted(matches.values(), reverse=True)[len(current) // 2] if current else 0
        affine = [rid for rid in by_load if matches[rid] > floor and self.replicas[rid].sent + 1 <= bound]
        affine.sort(key=lambda rid: -matches[rid])  # stable: equal matches stay least loaded first
        return affine + [rid for rid in by_load if rid not in affine]

    def unsend(self, replica: str) -> None:
        """A prompt counted for `replica` went elsewhere after all (its blocks may stay: a hint)."""
        if replica in self.replicas and self.replicas[replica].sent > 0:
            self.replicas[replica].sent -= 1

    def sent(self, replica: str, prompt: Sequence[int] | str | None) -> None:
        """A prompt went to `replica`: count it and remember its blocks there."""
        state = self.replicas.setdefault(replica, Replica(self.capacity))
        state.sent += 1
        if prompt is not None:  # remembered now, so the item's next choice, sent right after, finds it
            state.remember(block_names(prompt))
