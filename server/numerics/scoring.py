"""Scoring math: log-probabilities of tokens from raw logits, vectorized, with no vocabulary sort.

log p(token) = logit[token] - logsumexp(logits). Only the rows a response needs are ever passed
in, in bounded blocks; the full log-softmax matrix is never built. Top-k uses argpartition
(linear time) and sorts only the k survivors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

# Logits processed at once per worker: bounds the temporary exp() buffer (8 MB) and keeps it in
# cache; at n_vocab 262144 that is 8 rows, at 49152 it is 42.
ELEMENTS_PER_STEP = 1 << 21


@dataclass
class ScoredRows:
    """For each scored position: the logprob of the token that was there (or chosen), and the
    ids and logprobs of the top-k alternatives, best first."""

    token_logprobs: np.ndarray  # [n] float32
    top_ids: np.ndarray  # [n, k] int64
    top_logprobs: np.ndarray  # [n, k] float32
    # [n] int64, where asked for (vLLM's prompt_logprobs): the token's 1-based place in the order
    # the top-k uses (best logit first, ties by lower id), so a token in the top-k has its index + 1.
    token_ranks: np.ndarray | None = None


def first_rows(rows: ScoredRows, n: int, k: int) -> ScoredRows:
    """The first n rows with the top-k narrowed to k (the kept columns are the best k, in order)."""
    ranks = None if rows.token_ranks is None else rows.token_ranks[:n]
    return ScoredRows(rows.token_logprobs[:n], rows.top_ids[:n, :k], rows.top_logprobs[:n, :k], ranks)


def concat_rows(parts: list[ScoredRows], k: int) -> ScoredRows:
    """Scored rows one after another (an empty list: no rows, k columns)."""
    if not parts:
        return ScoredRows(np.empty(0, np.float32), np.empty((0, k), np.int64), np.empty((0, k), np.float32))
    ranks = None if any(p.token_ranks is None for p in parts) else np.concatenate([p.token_ranks for p in parts])
    return ScoredRows(
        np.concatenate([p.token_logprobs for p in parts]),
        np.concatenate([p.top_ids for p in parts]),
        np.concatenate([p.top_logprobs for p in parts]),
        ranks,
    )


def token_ranks(rows: np.ndarray, targets: np.ndarray, target_logits: np.ndarray) -> np.ndarray:
    """Each target's 1-based place among its row's logits, best first and ties by lower id (the
    top-k's order): 1 + (logits above it) + (logits equal to it at a lower id)."""
    value = np.asarray(target_logits, dtype=rows.dtype)[:, None]
    return ranks_from_counts((rows > value).sum(axis=1), (rows == value).sum(axis=1), targets, lambda i: rows[i])


def ranks_from_counts(
    above: np.ndarray, ties: np.ndarray, targets: np.ndarray, tied_rows: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """token_ranks from each row's count of logits above its target's and equal to it (counted
    where the logits are: a device backend counts on its device); `tied_rows(indices)` gives those
    rows as numpy arrays, asked only for rows where another logit ties the target's (rarely)."""
    ranks = above.astype(np.int64) + 1
    tied = np.flatnonzero(ties > 1)
    if len(tied):  # count the tied ones before the target, for those rows only, in one copy
        sub = tied_rows(tied)
        t = np.asarray(targets)[tied]
        before = np.arange(sub.shape[1])[None, :] < t[:, None]
        ranks[tied] += ((sub == sub[np.arange(len(tied)), t][:, None]) & before).sum(axis=1)
    return ranks


def logsumexp_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp(x))) in float32, shifted by the row max for stability."""
    row_max = logits.max(axis=1)
    shifted = np.subtract(logits, row_max[:, None])
    np.exp(shifted, out=shifted)
    lse: np.ndarray = row_max + np.log(shifted.sum(axis=1))
    return lse


def log_softmax_rows(logits: np.ndarray, rows_per_step: int = 16) -> np.ndarray:
    """Each row's full log-distribution, computed in float64 and returned as float32 (so the only
    rounding is the last one), a few rows at a time to bound the float64 temporaries."""
    out = np.empty(logits.shape, dtype=np.float32)
    for lo in range(0, len(logits), rows_per_step):
        x = logits[lo : lo + rows_per_step].astype(np.float64)
        x -= x.max(axis=1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
        out[lo : lo + rows_per_step] = x
    return out


@functools.cache
def _workers(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="scoring")


def score_rows(logits: np.ndarray, targets: np.ndarray, k: int, threads: int = 1, ranks: bool = False) -> ScoredRows:
    """Logprob of targets[i] under row i of `logits`, and each row's top-k.

    Every value is logit - lse computed the same way in float32, so a target that is also in the
    top-k carries exactly the same float in both places (lm-eval's greedy check uses ==).
    Rows are split among `threads` workers (numpy releases the GIL; the forward pass is idle
    meanwhile); each writes its own rows of the result, so the numbers do not depend on it.
    ranks: also each target's rank (token_ranks), one more pass over the rows.
    """
    n, n_vocab = logits.shape
    k = min(k, n_vocab)
    out = ScoredRows(
        np.empty(n, dtype=np.float32),
        np.empty((n, k), dtype=np.int64),
        np.empty((n, k), dtype=np.float32),
        np.empty(n, dtype=np.int64) if ranks else None,
    )
    step = max(1, min(ELEMENTS_PER_STEP // n_vocab, -(-n // threads)))
    spans = [(lo, min(lo + step, n)) for lo in range(0, n, step)]

    def score_span(span: tuple[int, int]) -> None:
        _score_span(logits, targets, k, *span, out)

    if threads > 1 and len(spans) > 1:
        list(_workers(threads).map(score_span, spans))
    else:
        for span in spans:
            _score_span(logits, targets, k, *span, out)
    return out


def _count_equal(rows: np.ndarray, kth: np.ndarray) -> np.ndarray:
    counts: np.ndarray = (rows == kth[:, None]).sum(axis=1)
    return counts


def _score_span(logits: np.ndarray, targets: np.ndarray, k: int, lo: int, hi: int, out: ScoredRows) -> None:
    rows = logits[lo:hi]
    n_vocab = rows.shape[1]
    lse = logsumexp_rows(rows)
    r = np.arange(hi - lo)
    target_logits = rows[r, targets[lo:hi]]
    out.token_logprobs[lo:hi] = target_logits - lse
    if out.token_ranks is not None:
        out.token_ranks[lo:hi] = token_ranks(rows, targets[lo:hi], target_logits)
    if not k:
        return
    if k == 1:  # lm-eval's case: argmax (lowest id on ties) is ~15x cheaper than argpartition
        ids = rows.argmax(axis=1)[:, None]
    else:
        part = np.argpartition(rows, n_vocab - k, axis=1)[:, n_vocab - k :]
        for i, ids in lowest_tied_ids(rows, part, rows[r[:, None], part], k, partial(_count_equal, rows)):
            part[i] = ids
        # Best first; ties broken by the lower token id so results are deterministic.
        order = np.lexsort((part, -rows[r[:, None], part]), axis=1)
        ids = np.take_along_axis(part, order, axis=1)
    out.top_ids[lo:hi] = ids
    out.top_logprobs[lo:hi] = rows[r[:, None], ids] - lse[:, None]


def lowest_tied_ids(
    rows: Any, part: np.ndarray, part_values: np.ndarray, k: int, count_equal: Callable[[np.ndarray], np.ndarray]
) -> Iterator[tuple[int, np.ndarray]]:
    """argpartition keeps any of the tokens tied at the k-th best value: for each row where it left
    out a lower id than one it kept, yield (row, the k best ids with the lowest ids among the tied),
    so that top-k is the first k of a stable sort (as argmax is for k=1) whatever k is. `rows`:
    the logits (numpy, or a device's array: only such rows are copied back, rarely);
    `count_equal(kth)`: each row's count of logits equal to its kth value. One pass over the rows."""
    kth = part_values.min(axis=1)
    kept = (part_values == kth[:, None]).sum(axis=1)
    for i in np.flatnonzero(count_equal(kth) > kept):
        row = np.asarray(rows[int(i)], dtype=np.float32)
        above = np.flatnonzero(row > kth[i])
        yield int(i), np.concatenate([above, np.flatnonzero(row == kth[i])[: k - len(above)]])
