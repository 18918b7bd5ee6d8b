"""Scoring on an MLX device: numerics/scoring.py's definitions, computed where the logits are (a
GPU's memory), so that only the numbers a response needs come back to the host.

The same definitions as score_rows (float32 logit - logsumexp, so a target in the top-k has the
identical float in both places; top-k best logit first, ties by lower id; ranks in that order).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from server.numerics.scoring import ScoredRows, lowest_tied_ids, ranks_from_counts

# An MLX array. mlx is an optional extra: its own stubs are read only where it is installed, so
# its arrays are Any here, for the same checks with or without it.
MxArray = Any


def _logsumexp(logits: MxArray) -> MxArray:
    """Row-wise logsumexp in MLX, summed in two levels: mx.logsumexp's single float32 running sum
    was off by 1.4e-4 over 49152 entries (numpy's pairwise sum: 1e-6)."""
    import mlx.core as mx

    n, n_vocab = logits.shape
    row_max = mx.max(logits, axis=1, keepdims=True)
    shifted = mx.exp(logits - row_max)
    block = 256
    padded = -n_vocab % block
    if padded:
        shifted = mx.pad(shifted, [(0, 0), (0, padded)])
    total = mx.sum(mx.sum(shifted.reshape(n, -1, block), axis=2), axis=1)
    return row_max[:, 0] + mx.log(total)


def token_ranks(rows: MxArray, targets: np.ndarray, target_logits: np.ndarray) -> np.ndarray:
    """numerics.scoring.token_ranks, counted on the device; only rows with ties are copied back."""
    import mlx.core as mx

    value = mx.array(np.asarray(target_logits, dtype=np.float32))[:, None]
    above, ties = np.array(mx.sum(rows > value, axis=1)), np.array(mx.sum(rows == value, axis=1))
    return ranks_from_counts(above, ties, targets, lambda i: np.array(rows[mx.array(i)].astype(mx.float32)))


def _count_equal(rows: MxArray, kth: np.ndarray) -> np.ndarray:
    import mlx.core as mx

    return np.array(mx.sum(rows == mx.array(kth)[:, None], axis=1))


def score_rows_mlx(logits: MxArray, targets: np.ndarray, k: int, ranks: bool = False) -> ScoredRows:
    """score_rows for an MLX array, computed on the device: only n + 2nk numbers come back.
    argpartition picks the k best (the lowest ids among tied ones), which are then ordered here
    (best logit first, ties by lower id)."""
    import mlx.core as mx

    n, n_vocab = logits.shape
    k = min(k, n_vocab)
    logits = logits.astype(mx.float32)
    lse = _logsumexp(logits)
    target_logits = mx.take_along_axis(logits, mx.array(targets, dtype=mx.int32)[:, None], axis=1)[:, 0]
    token_lp = target_logits - lse
    rank = token_ranks(logits, targets, np.array(target_logits)) if ranks else None
    if not k:
        mx.eval(token_lp)
        return ScoredRows(np.array(token_lp), np.empty((n, 0), np.int64), np.empty((n, 0), np.float32), rank)
    if k == 1:  # lm-eval's case: argmax (lowest id on ties) is ~8x cheaper than argpartition on CPU
        part = mx.argmax(logits, axis=1)[:, None]
    else:
        part = mx.argpartition(logits, kth=n_vocab - k, axis=1)[:, n_vocab - k :]
    part_values = mx.take_along_axis(logits, part, axis=1)
    part_lp = part_values - lse[:, None]
    mx.eval(token_lp, part, part_lp, part_values, lse)
    ids, ids_lp, ids_values = np.array(part).astype(np.int64), np.array(part_lp), np.array(part_values)
    if k > 1:
        host_lse = np.array(lse)
        for i, tied in lowest_tied_ids(logits, ids, ids_values, k, lambda kth: _count_equal(logits, kth)):
            ids[i] = tied
            ids_values[i] = np.asarray(logits[i], dtype=np.float32)[tied]
            ids_lp[i] = ids_values[i] - host_lse[i]  # float32, as on the device
    # By logit, as score_rows: two logits can round to the same logprob.
    order = np.lexsort((ids, -ids_values), axis=1)
    return ScoredRows(
        np.array(token_lp), np.take_along_axis(ids, order, axis=1), np.take_along_axis(ids_lp, order, axis=1), rank
    )
