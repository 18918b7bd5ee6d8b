"""Typed results of the client's calls, and its one error type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is the [eval] extra's: imported where Distributions.array() runs
    import numpy as np
    from numpy.typing import NDArray


class APIError(Exception):
    """A response other than 2xx, after any retries: the server's OpenAI-format error, when it sent one.

    `status` is the HTTP status; `type`, `code`, `param` and `message` come from the body's
    {"error": {...}}; `retry_after` is the Retry-After header in seconds (None without one)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.retry_after, self.body = retry_after, body


@dataclass(frozen=True)
class ModelInfo:
    """One entry of /v1/models."""

    id: str
    max_model_len: int | None
    system_fingerprint: str | None = None
    fingerprint: dict[str, str] = field(default_factory=dict)  # what the system fingerprint hashes
    owned_by: str | None = None

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ModelInfo:
        return cls(
            id=entry["id"],
            max_model_len=entry.get("max_model_len"),
            system_fingerprint=entry.get("system_fingerprint"),
            fingerprint=entry.get("fingerprint") or {},
            owned_by=entry.get("owned_by"),
        )


@dataclass(frozen=True)
class Distributions:
    """/v1/distributions: `rows` full log-distributions over a vocabulary of `vocab` tokens, from
    position `start` on (row j: the token after prompt[:start + j + 1]), as little-endian bytes."""

    rows: int
    vocab: int
    dtype: str  # "float32" or "float16"
    start: int
    data: bytes
    system_fingerprint: str | None = None

    def array(self) -> NDArray[np.float32 | np.float16]:
        """The rows as a numpy array [rows, vocab] (numpy: the client's [eval] extra)."""
        import numpy as np

        return np.frombuffer(self.data, dtype={"float32": "<f4", "float16": "<f2"}[self.dtype]).reshape(
            self.rows, self.vocab
        )


@dataclass(frozen=True)
class TokenizerInfo:
    """/tokenizer_info: the special tokens as text, whether the tokenizer adds BOS, the context size."""

    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    add_bos_token: bool
    model_max_length: int | None
    chat_template: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TokenizerInfo:
        return cls(
            eos_token=body.get("eos_token"),
            bos_token=body.get("bos_token"),
            pad_token=body.get("pad_token"),
            add_bos_token=bool(body.get("add_bos_token")),
            model_max_length=body.get("model_max_length"),
            chat_template=body.get("chat_template"),
        )


@dataclass(frozen=True)
class Tokenized:
    """/tokenize: token ids, their count, and the server's context size."""

    tokens: list[int]
    count: int
    max_model_len: int | None


@dataclass(frozen=True)
class Logprobs:
    """A completion choice's logprobs, as served (the first echoed token's value and top dict are None)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


@dataclass(frozen=True)
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: Logprobs | None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Completion:
    """A /v1/completions response; `raw` is its JSON as received."""

    id: str
    model: str
    created: int
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: Usage | None
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Completion:
        choices = []
        for c in sorted(body["choices"], key=lambda c: c["index"]):
            lp = c.get("logprobs")
            logprobs = (
                None
                if lp is None
                else Logprobs(
                    tokens=lp["tokens"],
                    token_logprobs=lp["token_logprobs"],
                    top_logprobs=lp["top_logprobs"],
                    text_offset=lp.get("text_offset", []),
                )
            )
            choices.append(
                CompletionChoice(
                    index=c["index"], text=c["text"], finish_reason=c.get("finish_reason"), logprobs=logprobs
                )
            )
        usage = body.get("usage")
        return cls(
            id=body.get("id", ""),
            model=body.get("model", ""),
            created=body.get("created", 0),
            system_fingerprint=body.get("system_fingerprint"),
            choices=choices,
            usage=None
            if usage is None
            else Usage(**{k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}),
            raw=body,
        )


@dataclass(frozen=True)
class Score:
    """The loglikelihood of one continuation after a context, as lm-eval computes it.

    `tokens`, `token_logprobs` and `top_logprobs` cover the continuation's tokens only (the top
    dict holds the most likely token at that position and the token that is there);
    `loglikelihood` is the sum of `token_logprobs` in order, `is_greedy` whether every
    continuation token is the most likely one (its logprob equals the top value, as lm-eval checks)."""

    continuation: str | None  # the text, when the continuation was given as text
    context_tokens: list[int]
    continuation_tokens: list[int]
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    loglikelihood: float
    is_greedy: bool
