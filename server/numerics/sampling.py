"""Choosing the next token from one row of logits.

Order, as in vLLM: logit_bias, then repetition / presence / frequency penalties, then greedy
(temperature 0) or temperature -> top_k -> top_p -> min_p -> a draw from the sequence's own RNG.
Reported logprobs always come from the model's raw distribution, not from these adjustments.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

# Temperatures below this sample greedily, as in vLLM: dividing logits by a denormal such as 1e-320
# overflows to inf, and softmax of inf is NaN.
GREEDY_BELOW = 1e-5
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)


class Sampler:
    """One per generated sequence: holds its random state (so a seed reproduces it) and the
    token counts the penalties need."""

    def __init__(self, params: SamplingParams, prompt: list[int], stream_index: int = 0):
        self.params = params
        # Each of a request's n samples draws from its own stream of the same seed.
        # Any 64-bit seed, negative ones too (numpy's seeds are non-negative).
        self.rng = np.random.default_rng(None if params.seed is None else [params.seed % 2**64, stream_index])
        self._needs_counts = params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
        self._prompt_ids = np.unique(np.array(prompt, dtype=np.int64)) if self._needs_counts else None
        self._generated: Counter[int] = Counter()

    def _adjust(self, logits: NDArray[np.floating[Any]]) -> NDArray[np.floating[Any]]:
        p = self.params
        if not (p.logit_bias or self._needs_counts):
            return logits
        adjusted = logits.astype(np.float32, copy=True)
        for token, bias in p.logit_bias.items():
            adjusted[token] += bias
        if p.repetition_penalty != 1.0:
            assert self._prompt_ids is not None  # kept whenever a penalty needs counts (_needs_counts)
            seen = np.union1d(self._prompt_ids, np.fromiter(self._generated, dtype=np.int64))
            values = adjusted[seen]
            adjusted[seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if self._generated and (p.presence_penalty or p.frequency_penalty):
            ids = np.fromiter(self._generated, dtype=np.int64)
            counts = np.fromiter(self._generated.values(), dtype=np.float32)
            adjusted[ids] -= p.presence_penalty + p.frequency_penalty * counts
        # A tiny repetition penalty (5e-324 is allowed: > 0) divides logits by ~0: keep them finite
        # so that the softmax below stays defined.
        return np.nan_to_num(adjusted, nan=-FLOAT32_MAX, posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX, copy=False)

    def choose(self, logits: NDArray[np.floating[Any]]) -> int:
        token = self._choose(self._adjust(logits))
        self._generated[token] += 1
        return token

    def _choose(self, logits: NDArray[np.floating[Any]]) -> int:
        p = self.params
        if p.temperature < GREEDY_BELOW:
            return int(np.argmax(logits))  # ties: the lowest id, deterministically
        scaled = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < len(scaled):
            kth = np.partition(scaled, len(scaled) - p.top_k)[len(scaled) - p.top_k]
            scaled[scaled < kth] = -np.inf
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            drop = order[int(np.searchsorted(cumulative, p.top_p)) + 1 :]
            probs[drop] = 0.0
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0.0
        probs /= probs.sum()
        return int(self.rng.choice(len(probs), p=probs))
