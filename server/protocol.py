"""The HTTP schema: OpenAI's legacy completions API and vLLM's tokenizer endpoints.

Requests are pydantic models (validated, with errors turned into 400s by server.errors).
Responses are plain dicts built by the serving code; their shapes are documented here as
TypedDicts, because validating thousands of logprob entries per response would cost more than
scoring them.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator

Prompt = list[str] | list[list[int]]


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class CompletionRequest(BaseModel):
    # Unknown fields are an error, not silently ignored: a typo must not change results unnoticed.
    model_config = ConfigDict(extra="forbid")

    prompt: Any = Field(description="A string, a list of strings, a list of token ids, or a list of lists of token ids.")
    model: str | None = None
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # an end-user id for the caller's bookkeeping; no effect here

    # Accepted by OpenAI, not supported here: anything but their neutral value is rejected.
    suffix: str | None = None
    n: int | None = 1
    best_of: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Prompt:
        """Normalize to a list of prompts, each a string or a list of token ids."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value):
                return value
            if _is_token_list(value):
                return [value]
            if all(_is_token_list(p) for p in value):
                return value
        if isinstance(value, list) and not value:
            raise ValueError("prompt is an empty list; send at least one prompt")
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids (integers), "
            "or a list of lists of token ids"
        )

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to something this server does not do yet."""
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported; put all text in the prompt"
        if self.n not in (None, 1):
            return "n", "n > 1 is not supported yet; send the prompt n times instead"
        if self.best_of not in (None, 1):
            return "best_of", "best_of > 1 is not supported"
        if self.stream:
            return "stream", "stream=true is not supported yet; send stream=false"
        if self.presence_penalty:
            return "presence_penalty", "presence_penalty is not supported yet; send 0"
        if self.frequency_penalty:
            return "frequency_penalty", "frequency_penalty is not supported yet; send 0"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported yet"
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[int]
    model: str | None = None


# -- response shapes ------------------------------------------------------------------------------

class CompletionLogprobs(TypedDict):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(TypedDict):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ErrorBody(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None
