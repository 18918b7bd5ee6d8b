"""Start-up exactness probes: run on the loaded backend before the engine starts, they turn off
what would change the numbers with this model file on this machine.

- Prefix reuse: a prompt run in two passes (the restored prefix, then the tail, as after a cache
  hit) must give the logits of one pass. llama.cpp gives identical floats on Q4_1, Q8_0, F16 and
  F32 files and 1e-6 on some others, but its repacked Q4_0/Q4_K kernels take other paths for other
  pass sizes (1.25 on a Q3_K_M file, 1.0 on Gemma 3 Q4_K_M); MLX: 3e-5.
- Shared passes: a backend that can run several fresh prompts in one pass (MLX, where the batched
  float32 products are faster) rounds them differently from one prompt's pass; prompts of three
  lengths run together must stay within the tolerance of each alone.
"""

from __future__ import annotations

import logging

import numpy as np

from server.backends.base import Backend
from server.config import Settings

log = logging.getLogger(__name__)

# Both tolerances are the tests' (reuse vs none, shared vs alone), in logit units.
SPLIT_TOLERANCE = 1e-4
SHARED_TOLERANCE = 1e-4
PROBE_TEXT = ("The old lighthouse keeper climbed the stairs every evening, counting the steps as his father "
              "had taught him, and lit the lamp at the top.")


def split_drift(backend: Backend, min_reuse: int) -> float:
    """How far a prompt's logits move when it runs as after a cache hit (the restored prefix, then
    the tail from there) instead of from the start: the largest |difference| over every row, for
    tails of 2 tokens (the shortest the cache runs) and of half the prompt. Both ways run in
    n_batch chunks, as the engine does. Run at start-up on sequence 0, before the engine starts.
    `min_reuse`: the shortest prefix the cache reuses."""
    tokens = backend.tokenize(PROBE_TEXT, True)[:backend.info.n_ctx]  # a tiny --n-ctx still fits
    n = len(tokens)
    if n < min_reuse + 2:
        return 0.0  # no prompt that fits could reuse anything

    def rows(start: int, stop: int) -> list[np.ndarray]:
        return [np.array(backend.prefill(0, tokens[lo:min(lo + backend.n_batch, stop)], lo, 0))
                for lo in range(start, stop, backend.n_batch)]

    whole = np.concatenate(rows(0, n))
    drift = 0.0
    for cut in (n - 2, n // 2):
        split = np.concatenate(rows(0, cut) + rows(cut, n))
        drift = max(drift, float(np.abs(split - whole).max()))
    backend.release(0)
    return drift


def shared_pass_drift(backend: Backend) -> float:
    """The largest |difference| of any logit of any row between three prompts (a third, two thirds
    and all of the probe text, each cut to one pass) run together and each run alone. Run at
    start-up on sequences 0..2, before the engine starts."""
    tokens = backend.tokenize(PROBE_TEXT, True)[:min(backend.n_batch, backend.info.n_ctx)]
    lengths = sorted({max(2, len(tokens) * i // 3) for i in (1, 2, 3)})[:backend.max_sequences]
    prompts = [(seq, tokens[:n], 0) for seq, n in enumerate(lengths)]
    if len(prompts) < 2:
        return 0.0
    alone = [np.array(backend.prefill(seq, p, 0, 0), dtype=np.float32) for seq, p, _ in prompts]
    together = [np.array(block, dtype=np.float32) for block in backend.prefill_together(prompts)]
    for seq, _, _ in prompts:
        backend.release(seq)
    return max(float(np.abs(a - b).max()) for a, b in zip(alone, together))


def run_probes(backend: Backend, settings: Settings, min_reuse: int) -> Settings:
    """Both probes, as the settings ask for them; returns the settings with the prefix cache off
    where reuse would change results, and turns shared passes off on the backend where they would."""
    if settings.prefix_cache_mb and backend.supports_snapshots:
        drift = split_drift(backend, min_reuse)
        if drift > SPLIT_TOLERANCE:
            log.warning("Prefix cache off: with this model file, a prompt run in two passes (as after a cache "
                        "hit) gives other numbers than in one (logits moved by up to %.3g; llama.cpp's repacked "
                        "Q4_0/Q4_K kernels do this), so reuse would change results. Scoring runs every prompt "
                        "whole. A Q4_1, Q8_0 or F16 file of the model keeps reuse exact.", drift)
            settings = settings.model_copy(update={"prefix_cache_mb": 0})
    if backend.shares_prompt_passes:
        drift = shared_pass_drift(backend)
        if drift > SHARED_TOLERANCE:
            log.warning("Prompts run one at a time: run together in one forward pass, they gave logits up "
                        "to %.3g away from each prompt alone, past the %.0e this server allows.",
                        drift, SHARED_TOLERANCE)
            backend.shares_prompt_passes = False
        else:
            log.info("Fresh prompts admitted together share forward passes (logits within %.2g of each "
                     "prompt alone in the start-up check)", drift)
    return settings
