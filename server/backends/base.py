"""The one interface every model backend implements.

A backend knows its tokenizer and runs forward passes; nothing else. Scoring math (log-softmax,
top-k), sampling, stop strings and the HTTP schema live above it and are shared by all backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from server.scoring import ScoredRows, score_rows


@dataclass(frozen=True)
class Pass:
    """Tokens to run through the model on one sequence (see Backend.forward)."""

    seq: int
    tokens: Sequence[int]
    start: int
    logits_from: int


@dataclass(frozen=True)
class ModelInfo:
    path: str
    n_ctx: int  # the context this server uses (prompt + generated tokens)
    n_ctx_train: int
    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool  # whether tokenizing with special tokens puts BOS first
    chat_template: str | None
    description: str  # one line for the log: architecture, size, quantization


class Backend(ABC):
    info: ModelInfo
    supports_snapshots = False  # snapshot()/restore() work: the prefix cache can be used

    # -- tokenizer --------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`. Special-token text (e.g. "<|im_end|>") is parsed as that token, as
        Hugging Face tokenizers do; `add_special_tokens` adds BOS where the model's tokenizer does."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (special tokens as their text)."""

    @abstractmethod
    def is_end_of_generation(self, token_id: int) -> bool:
        """True for EOS and the other tokens that end a turn."""

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")

    # -- forward pass -------------------------------------------------------------------------
    max_sequences = 1  # sequences the backend holds at once (each its own KV), decoded together

    @abstractmethod
    def forward(self, passes: Sequence[Pass]) -> Iterator[tuple[int, int, np.ndarray]]:
        """Run each pass's tokens at positions start, start+1, ... of its sequence, forgetting any
        state that sequence held at positions >= start (start=0 begins a new sequence). Passes
        of different sequences may run in one batch.

        Yields (pass index, i, block): float32 logits of shape [k, n_vocab] for that pass's
        tokens[i : i + k], for every i >= logits_from, in order and in bounded chunks, so that
        callers never hold the logits of a whole long prompt at once. Row j of a block is the
        distribution of the token that follows tokens[i + j]. A block may be a view of the
        backend's buffer: it is valid only until the generator is resumed, so copy what must
        outlive that.
        """

    scoring_threads = 1  # CPU threads for the numpy scoring of logits blocks

    def score(self, logits, targets: np.ndarray, k: int) -> ScoredRows:
        """Log-probabilities of `targets` and the top-k under each row of a block from forward().
        Backends whose logits live on a device override this to do the math there."""
        return score_rows(logits, targets, k, threads=self.scoring_threads)

    def release(self, seq: int) -> None:
        """Forget a finished sequence (frees its KV cells)."""

    def snapshot(self, seq: int) -> tuple[object, int]:
        """A sequence's KV state and its size in bytes, for the prefix cache."""
        raise NotImplementedError

    def restore(self, seq: int, state: object, n_tokens: int) -> None:
        """Make a sequence the first n_tokens of a snapshot (forward() continues from there)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model (the server calls this at shutdown)."""
