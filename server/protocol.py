"""The HTTP schema: OpenAI's legacy completions API and vLLM's tokenizer endpoints.

Requests are pydantic models (validated, with errors turned into 400s by server.errors).
Responses are plain dicts built by the serving code; their shapes are documented here as
TypedDicts, because validating thousands of logprob entries per response would cost more than
scoring them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypedDict

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

Prompt = list[str] | list[list[int]]


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


# Requests: unknown fields are an error, not silently ignored (a typo must not change results
# unnoticed), and so is a value of another JSON type than the schema says (strict): "5" or true is
# not a max_tokens, 1 or "yes" not a boolean. Integers are numbers, and a number without a
# fraction (5.0) is an integer, as in JSON Schema (see integer()).
REQUEST = ConfigDict(extra="forbid", strict=True)


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds: int) -> Any:
    """The type of an integer field within `bounds` (ge, le): an int, or a float with no fraction
    (5.0 is 5); not a string or a boolean. (The bounds go inside, so the JSON Schema keeps them.)"""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole_number)]


Int, NonNegative, Positive = integer(), integer(ge=0), integer(ge=1)
TopK = integer(ge=-1)  # vLLM's: 0 or -1 is no limit
Seed = integer(ge=-2**63, le=2**64 - 1)  # any 64-bit seed, signed or not


class StreamOptions(BaseModel):
    model_config = REQUEST

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Generation settings shared by /v1/completions and /v1/chat/completions."""

    model_config = REQUEST

    model: str | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: TopK | None = None  # vLLM's extension; 0 or -1: no limit
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # vLLM's extension
    n: Positive | None = 1  # at most --max-n (checked with the other limits)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)  # vLLM's extension
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the caller's bookkeeping; no effect here

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: Any = Field(description="A string, a list of strings, a list of token ids, or a list of lists of token ids.")
    max_tokens: NonNegative | None = 16
    logprobs: NonNegative | None = None
    echo: bool = False
    # Accepted by OpenAI, not supported here: anything but their neutral value is rejected.
    suffix: str | None = None
    best_of: Int | None = None

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
        """(field, message) for the first field set to something this server does not do."""
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported; put all text in the prompt"
        if self.best_of not in (None, 1) and self.best_of != self.n:
            return "best_of", "best_of > n is not supported; use n to get several samples"
        return None


class ContentPart(BaseModel):
    """One part of a message's content; only text parts reach the template (images are not read)."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_calls, ...: passed to the chat template

    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: NonNegative | None = None
    max_completion_tokens: NonNegative | None = None
    logprobs: bool | None = False
    top_logprobs: NonNegative | None = None
    add_generation_prompt: bool = True  # vLLM's extension
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension


class TokenizeRequest(BaseModel):
    model_config = REQUEST

    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = REQUEST

    tokens: list[Int]
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


class ChatTopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatChoice(TypedDict):
    index: int
    message: dict[str, str]
    logprobs: dict[str, list[ChatTokenLogprob]] | None
    finish_reason: Literal["stop", "length"]


class ErrorBody(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None
