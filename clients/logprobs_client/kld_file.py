"""llama-perplexity's `--kl-divergence-base` file, read and written byte for byte as llama.cpp's
tools/perplexity/perplexity.cpp does (the version llama-cpp-python 0.3.36 vendors), so that one base
run serves every build and files pass between `logprobs-eval kld` and llama-perplexity both ways.

Layout (little-endian, no padding):
    b"_logits_", uint32 n_ctx, int32 n_vocab, int32 n_chunk,
    int32 tokens[n_chunk * n_ctx]      (the text's tokens as tokenized, BOS not yet put first),
    then, chunk after chunk, for each of the n_ctx - 1 - n_ctx/2 scored positions, one row of
    nv = 2 * ((n_vocab + 1) / 2) + 4 uint16: float32 scale, float32 min_log_prob, then n_vocab
    uint16 q (a zero pad where n_vocab is odd); log p(i) = scale * q[i] + min_log_prob.

The 16 bits cover the 16 nats below a row's top token (the rest is clamped to the bottom): a step
of 16/65535 = 2.4e-4 nats at most. llama-perplexity's KL from such a row counts only tokens whose
log-probability is above -16, without renormalizing; `file_positions` does the same, so the two
tools' numbers are comparable. docs/kld.md measures what the 16 bits cost in KL.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.typing import NDArray

MAGIC = b"_logits_"
HEADER = struct.Struct("<8sIii")
FLOOR = -16.0  # llama-perplexity: the lowest log-probability kept (and counted in the KL)
ROWS_PER_STEP = 32  # rows decoded to float64 at once (bounds memory)


def row_width(n_vocab: int) -> int:
    """uint16 per row: two float32 (scale, min_log_prob), then n_vocab values padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored(n_ctx: int) -> int:
    """Scored positions per window: the second half, less the last token (nothing follows it)."""
    return n_ctx - 1 - n_ctx // 2


def encode_rows(logprobs: np.ndarray) -> np.ndarray:
    """Log-distributions [rows, n_vocab] -> llama-perplexity's rows [rows, nv] uint16, in float32 as
    its log_softmax does (it starts from logits; a log-distribution is the same up to a shift)."""
    lp = np.asarray(logprobs, dtype=np.float32)
    rows, n_vocab = lp.shape
    out = np.zeros((rows, row_width(n_vocab)), dtype="<u2")
    top = lp.max(axis=1, keepdims=True)
    low = np.maximum(lp.min(axis=1, keepdims=True), top - np.float32(16))
    # llama: min_log_prob = min_logit - max_logit - log_sum_exp; from normalized rows the log-sum-exp
    # is 0 up to float32 rounding, so it is recomputed here as llama does it (in float64, then float32).
    lse = np.log(np.exp((lp - top).astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)
    scale = ((top - low) / np.float32(65535)).astype(np.float32)
    head = np.concatenate([scale, (low - top - lse).astype(np.float32)], axis=1)
    out[:, :4] = head.astype("<f4").view("<u2")
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
        q = np.rint(inv * (lp - low)).astype(np.float32)  # nearest_int: round half to even, as np.rint
    q = np.where(lp > low, np.clip(q, 0, 65535), 0)
    out[:, 4 : 4 + n_vocab] = q.astype("<u2")
    return out


def decode_rows(rows: NDArray[np.uint16], n_vocab: int) -> NDArray[np.float32]:
    """llama-perplexity's rows -> log-probabilities [rows, n_vocab] (float32 arithmetic, as llama's)."""
    head: NDArray[np.float32] = np.ascontiguousarray(rows[:, :4]).view("<f4")  # [rows, 2]: scale, min_log_prob
    return head[:, :1] * rows[:, 4 : 4 + n_vocab].astype(np.float32) + head[:, 1:2]


def normalized(rows: np.ndarray) -> np.ndarray:
    """Rows of log-probabilities (float32 or float16, as sent) in float64, renormalized there: they
    were rounded after the server's log-softmax. (max + log-sum-exp by hand: 5x faster than
    np.logaddexp.reduce, to 1e-15.)"""
    x = rows.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    x -= top + np.log(np.exp(x - top).sum(axis=1, keepdims=True))
    return x


def file_positions(
    base_rows: NDArray[np.uint16], n_vocab: int, build: np.ndarray, targets: np.ndarray
) -> dict[str, np.ndarray]:
    """llama-perplexity's statistics at each row of a base file against a build's full
    log-distributions [rows, n_vocab]: KL over the base tokens above FLOOR (not renormalized),
    the base NLL read from the 16 bits, the build's in float64."""
    out = {k: np.empty(len(targets)) for k in ("nll_base", "nll", "kld", "dp")}
    out["same_top"] = np.empty(len(targets), dtype=bool)
    for lo in range(0, len(targets), ROWS_PER_STEP):
        hi = min(lo + ROWS_PER_STEP, len(targets))
        lb = decode_rows(base_rows[lo:hi], n_vocab).astype(np.float64)
        lq = normalized(build[lo:hi])
        rows, t = np.arange(hi - lo), targets[lo:hi]
        out["nll_base"][lo:hi], out["nll"][lo:hi] = -lb[rows, t], -lq[rows, t]
        # (where on the product: a build token at -inf beside a base one below the floor gives 0, not nan)
        out["kld"][lo:hi] = np.where(lb > FLOOR, np.exp(lb) * (lb - lq), 0.0).sum(axis=1)
        out["dp"][lo:hi] = np.exp(lq[rows, t]) - np.exp(lb[rows, t])
        out["same_top"][lo:hi] = lb.argmax(axis=1) == build[lo:hi].argmax(axis=1)
    out["coverage"] = np.ones(len(targets))
    return out


@dataclass
class BaseFile:
    """A base file opened for reading; the rows stay on disk (memory-mapped)."""

    path: Path
    n_ctx: int
    n_vocab: int
    tokens: NDArray[np.int32]  # [n_chunk, n_ctx], as tokenized (BOS not put first)
    rows: NDArray[np.uint16]  # [n_chunk, scored(n_ctx), nv]

    @property
    def n_chunk(self) -> int:
        return len(self.tokens)


def read(path: str | Path) -> BaseFile:
    """Open a base file (llama-perplexity's or ours), checking its header and size."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise ValueError(f"{path} is not a llama-perplexity --kl-divergence-base file (no {MAGIC.decode()} header)")
    _, n_ctx, n_vocab, n_chunk = HEADER.unpack(head)
    if n_ctx < 2 or n_vocab < 1 or n_chunk < 1:
        raise ValueError(f"{path}: n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk} cannot describe a base file")
    nv, per = row_width(n_vocab), scored(n_ctx)
    want = HEADER.size + 4 * n_chunk * n_ctx + 2 * n_chunk * per * nv
    if size != want:
        raise ValueError(
            f"{path} holds {size} bytes; n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk} "
            f"need {want} (a truncated file, or written with other settings)"
        )
    tokens = np.fromfile(path, dtype="<i4", count=n_chunk * n_ctx, offset=HEADER.size).reshape(n_chunk, n_ctx)
    rows = np.memmap(path, dtype="<u2", mode="r", offset=HEADER.size + 4 * n_chunk * n_ctx, shape=(n_chunk, per, nv))
    return BaseFile(path, n_ctx, n_vocab, tokens, rows)


class Writer:
    """Writes a base file as the windows are scored: the header and every token first (known before
    any scoring), then each window's rows."""

    def __init__(self, path: str | Path, n_ctx: int, n_vocab: int, tokens: np.ndarray):
        tokens = np.asarray(tokens, dtype="<i4")
        self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, n_vocab, len(tokens)
        self._written = 0
        self._file: BinaryIO = Path(path).open("wb")  # noqa: SIM115 (closed by close() or on error)
        try:
            self._file.write(HEADER.pack(MAGIC, n_ctx, n_vocab, self.n_chunk))
            self._file.write(tokens.reshape(self.n_chunk, n_ctx).tobytes())
        except BaseException:  # a full disk: no half-written file left behind
            self.abandon()
            raise

    def add(self, logprobs: np.ndarray) -> None:
        """One window's scored rows [scored(n_ctx), n_vocab]."""
        if logprobs.shape != (scored(self.n_ctx), self.n_vocab):
            raise ValueError(f"a window's rows are {logprobs.shape}, not {(scored(self.n_ctx), self.n_vocab)}")
        for lo in range(0, len(logprobs), ROWS_PER_STEP):
            self._file.write(encode_rows(logprobs[lo : lo + ROWS_PER_STEP]).tobytes())
        self._written += 1

    def close(self) -> None:
        self._file.close()
        if self._written != self.n_chunk:
            raise ValueError(
                f"{self._file.name}: {self._written} of {self.n_chunk} windows written; the file is incomplete"
            )

    def abandon(self) -> None:
        """Close and remove an incomplete file (a run that failed or was interrupted)."""
        self._file.close()
        Path(self._file.name).unlink(missing_ok=True)
