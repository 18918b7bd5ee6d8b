"""The one interface every model backend implements.

A backend knows its tokenizer (it fills the token table) and runs forward passes; nothing else.
Scoring math (log-softmax, top-k), sampling, stop strings and the HTTP schema live above it and
are shared by all backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.config import Settings
from server.numerics.scoring import ScoredRows, score_rows
from server.text.tokens import TokenTable

# A block of logits rows from Backend.prefill(): a float32 numpy array for GGUF (a view of
# llama.cpp's buffer), an MLX array for MLX (on its device). Callers only slice it, take len() and
# copy rows with np.array(); the math on it is the backend's own score(). The two array types share
# no type mypy can name, so a block is Any at this border.
Logits = Any


# n_ctx = 0 means the model's training context, capped here to bound KV memory.
MAX_DEFAULT_CTX = 8192


def default_context(n_ctx: int, n_ctx_train: int) -> int:
    """The context a server uses: the one asked for, else the training context up to MAX_DEFAULT_CTX."""
    return n_ctx or min(n_ctx_train, MAX_DEFAULT_CTX)


@dataclass(frozen=True)
class Step:
    """One decode step of one sequence: `token` goes in at `position` (see Backend.decode)."""

    seq: int
    token: int
    position: int


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


def grid_chunks(start: int, stop: int, n_batch: int) -> Iterator[tuple[int, int]]:
    """The prompt passes (lo, hi) that run positions start..stop-1: chunks of n_batch on one grid
    of absolute positions, so that a tail that starts mid-chunk ends its first pass where the whole
    prompt's pass ends, and runs the same passes after it."""
    lo = start
    while lo < stop:
        hi = min(stop, (lo // n_batch + 1) * n_batch)
        yield lo, hi
        lo = hi


@dataclass(frozen=True)
class ReuseRule:
    """Where the prefix cache may start a cached prompt's tail, so that the tail's rows are the same
    floats as in the whole prompt's passes. Prompt passes run in n_batch chunks on one grid of
    absolute positions (0, n_batch, 2 n_batch, ...), a tail's too; its first chunk starts `align`
    tokens times some whole number past its grid line, and holds at least `min_tail` tokens unless
    it starts on the line. (llama.cpp's CPU kernels take other paths for passes of fewer than 8
    tokens, and its repacked ones group a pass's tokens by 4 from its start: docs/exactness.md.)"""

    align: int = 1
    min_tail: int = 2  # a pass with one token of a prompt takes llama.cpp's single-token path

    def restore_length(self, shared: int, n: int, n_batch: int, cached: int | None = None) -> int:
        """How many of an n-token prompt's first tokens to restore from a cached prompt of `cached`
        tokens (default n) that shares `shared` of them: the row before the first run token must
        predict a token the prompt shares (so at most shared - 1), at least min_tail tokens run
        again, the tail starts where the rule allows, and the restored rows past the last grid line
        came from a pass of the cached prompt that held at least min_tail tokens (else only the
        whole chunks before that line are restored)."""
        length = min(shared - 1, n - self.min_tail)
        if length <= 0:
            return 0
        line = length // n_batch * n_batch
        length = line + (length - line) // self.align * self.align
        first_end = min(n, line + n_batch)
        if length > line and first_end - length < self.min_tail:
            length = line + max(0, first_end - self.min_tail - line) // self.align * self.align
        if length > line and min(n if cached is None else cached, line + n_batch) - line < self.min_tail:
            length = line
        return length

    def __str__(self) -> str:
        return f"tails at multiples of {self.align}, at least {self.min_tail} tokens"


class BackendKind(ABC):
    """One kind of model the server runs, known before one is loaded: how its models look on disk
    and in a Hugging Face Hub repo, and how one is loaded. Each backend module declares its kind
    (KIND) and server/backends/__init__.py lists them: a new backend is its module and that line."""

    name: str  # --backend's value and the fingerprint's `backend` part
    files: str  # how messages name what it serves ("a GGUF file")
    absent: str  # how messages say a Hub repo has none ("holds no .gguf file")
    weight_suffix: str  # the files whose sha256 the fingerprint carries when fetched from the Hub
    # A Hub reference's :QUANT or /FILE names one of a repo's files of this kind (GGUF repos hold
    # several models; an MLX repo is one).
    names_files: bool = False

    @abstractmethod
    def refuses(self, path: Path) -> str | None:
        """None when the local file or folder is a model of this kind, else why not ("not a GGUF
        file (...)"), for the message that lists every kind's reason."""

    @abstractmethod
    def in_repo(self, files: list[str]) -> bool:
        """Whether a Hub repo's file listing holds a model of this kind."""

    @abstractmethod
    def repo_files(self, repo: str, quant: str | None, file: str | None, files: list[str]) -> list[str]:
        """The files of a Hub repo that make the model (the one to load first): ConfigError when
        the reference names none, saying which there are."""

    def model_path(self, first: Path) -> Path:
        """What load() is given, from the downloaded first file of repo_files."""
        return first

    @abstractmethod
    def load(self, path: Path, settings: Settings) -> Backend:
        """The loaded model, with the settings' context, threads, batch, KV type and sequences."""

    def prepare_process(self, argv: list[str]) -> None:  # noqa: B027 (optional: most kinds need nothing)
        """What the command line does before serving a model of this kind (MLX on Linux: restart
        with OpenBLAS preloaded); `argv`: the command's arguments, to restart with."""


class Backend(ABC):
    """What the engine asks of a model: a prompt pass on one sequence at a time, and decode steps
    that advance several sequences by one token each in one forward pass."""

    kind = "?"  # "gguf" or "mlx": the fingerprint's `backend` part
    info: ModelInfo
    tokens: TokenTable  # filled by each backend from its tokenizer
    n_batch: int  # most tokens one prefill() call takes
    max_sequences = 1  # sequences held at once (each its own KV), decoded together
    supports_snapshots = False  # snapshot()/restore() work: the prefix cache can be used
    # The rules under which the prefix cache may be exact, tried at start-up in this order (the
    # first the check passes is used, else the cache is off: backends/probes.py's Exactness).
    reuse_rules: tuple[ReuseRule, ...] = (ReuseRule(),)
    # prefill_together() works and is faster than prompts one by one; the start-up check holds each
    # prompt's numbers within 1e-4 of the prompt alone before the engine uses it (Exactness).
    shares_prompt_passes = False
    scoring_threads = 1  # CPU threads for the numpy scoring of logits blocks

    # -- tokenizer --------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text`. Special-token text (e.g. "<|im_end|>") is parsed as that token, as
        Hugging Face tokenizers do; `add_special_tokens` adds BOS where the model's tokenizer does."""

    # -- forward passes -----------------------------------------------------------------------
    @abstractmethod
    def prefill(self, seq: int, tokens: Sequence[int], start: int, logits_from: int) -> Logits | None:
        """Run up to n_batch prompt tokens on one sequence, at positions start, start+1, ...,
        forgetting whatever that sequence held at positions >= start (start=0 begins it anew).

        Returns the float32 logits of tokens[logits_from:], shape [len(tokens) - logits_from,
        n_vocab] (row j is the distribution of the token after tokens[logits_from + j]), or None
        when logits_from >= len(tokens). The block may be a view of the backend's buffer: it is
        valid until the next call on this backend, so copy what must outlive that. A long prompt
        comes as consecutive calls, so that the caller can stop between them."""

    def prefill_together(self, prompts: Sequence[tuple[int, Sequence[int], int]]) -> list[Logits]:
        """Several whole prompts (seq, tokens, logits_from), each of at most n_batch tokens, each
        beginning its sequence anew, in one forward pass (only if shares_prompt_passes). Returns
        each prompt's block of logits, as prefill(seq, tokens, 0, logits_from) does."""
        raise NotImplementedError

    @abstractmethod
    def decode(self, steps: Sequence[Step]) -> npt.NDArray[np.float32]:
        """One token of each of several sequences (at most max_sequences, each continuing where
        it stands) in one forward pass. Returns the next-token logits as a new float32 array of
        shape [len(steps), n_vocab], row i for steps[i]."""

    def decode_passes(self, steps: Sequence[Step], most: int) -> list[list[Step]]:
        """`steps` as the decode() calls that carry them, at most `most` rows each (the start-up
        check's limit for rows that stay the floats of each sequence alone)."""
        return [list(steps[lo : lo + most]) for lo in range(0, len(steps), most)]

    def score(self, logits: Logits, targets: np.ndarray, k: int, ranks: bool = False) -> ScoredRows:
        """Log-probabilities of `targets` and the top-k under each row of a block from prefill()
        (ranks: and each target's rank). Backends whose logits live on a device override this to
        do the math there."""
        return score_rows(logits, targets, k, threads=self.scoring_threads, ranks=ranks)

    def release(self, seq: int) -> None:  # noqa: B027 (optional: a backend may hold nothing per sequence)
        """Forget a finished sequence (frees its KV cells)."""

    def snapshot(self, seq: int) -> tuple[object, int]:
        """A sequence's KV state and its size in bytes, for the prefix cache."""
        raise NotImplementedError

    def restore(self, seq: int, state: object, n_tokens: int) -> None:
        """Make a sequence the first n_tokens of a snapshot (prefill() continues from there)."""
        raise NotImplementedError

    def fingerprint_parts(self) -> dict[str, str]:
        """What of this backend decides the numbers besides the model file (the runtime's version
        and build, precision settings): parts of the system fingerprint."""
        return {}

    def close(self) -> None:  # noqa: B027 (optional: a backend may have nothing to free)
        """Free the model (the server calls this at shutdown)."""
