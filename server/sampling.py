"""Choosing the next token from one row of logits: greedy, or temperature + nucleus (top_p) sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


class Sampler:
    """One per generated sequence: holds that sequence's random state, so a seed reproduces it."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def choose(self, logits: np.ndarray) -> int:
        if self.params.temperature == 0:
            return int(np.argmax(logits))  # ties: the lowest id, deterministically
        scaled = logits.astype(np.float64) / self.params.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.params.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            keep = order[: int(np.searchsorted(cumulative, self.params.top_p)) + 1]
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        return int(self.rng.choice(len(probs), p=probs))
