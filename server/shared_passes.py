"""Whether prompts run together in one forward pass keep the numbers each gives alone.

A backend that can run several fresh prompts in one pass (Backend.shares_prompt_passes: MLX, where
the batched float32 products are faster) rounds them differently from one prompt's pass. The
server checks at start-up, on prompts of three lengths, that no logit moves by more than the
tolerance, and runs every prompt alone where one does.
"""

from __future__ import annotations

import numpy as np

from server.prefix_cache import PROBE_TEXT

# The tolerance of the tests (and of prefix reuse, server.prefix_cache.SPLIT_TOLERANCE), in logits.
SHARED_TOLERANCE = 1e-4


def shared_pass_drift(backend) -> float:
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
