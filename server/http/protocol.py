"""The HTTP schema: OpenAI's legacy completions API and vLLM's tokenizer endpoints.

Requests are pydantic models (validated, with errors turned into 400s by server.http.errors).
Responses are plain dicts built by the serving code; their shapes are declared here as
TypedDicts, which type the code that builds them and document them in the OpenAPI schema
(server.api names them in `responses=`, so FastAPI never validates or re-serializes through
them: validating thousands of logprob entries per response would cost more than scoring them).
They are closed (no other keys), so tests/test_openapi.py catches a response that grows a field
the schema does not declare.
"""

from __future__ import annotations

import json
from itertools import chain
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import NotRequired, TypedDict

Prompts = list[str] | list[list[int]]  # the prompt field, normalized: a list of prompts

# What the prompt validator accepts (it normalizes to Prompts), as JSON Schema: the field itself
# is typed Any so that a batch of a million token ids is checked once, by _prompt_shape, not
# again by a union of list types. Negative ids and empty prompts are refused later, with the
# prompt's index (an empty string is 0 tokens unless the tokenizer adds BOS).
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_TEXT = {"type": "string", "minLength": 1}
PROMPT_SCHEMA = {
    "anyOf": [
        _TEXT,
        {"type": "array", "items": _TEXT, "minItems": 1},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
    ]
}
# logit_bias is typed dict[str, float]; server.serving.base checks keys and values (with messages
# that say which token). The schema says what it accepts.
LOGIT_BIAS_SCHEMA = {
    "anyOf": [
        {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]{1,12}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
        {"type": "null"},
    ]
}


def _is_token_list(value: Any) -> bool:
    return type(value) is list and set(map(type, value)) <= _INT  # at C speed (a bool's type is not int)


def _are_token_lists(value: list[Any]) -> bool:
    """Every item a list of token ids: checked at C speed, for batches of a million prompts."""
    return set(map(type, value)) <= _LIST and set(map(type, chain.from_iterable(value))) <= _INT


_INT, _LIST = {int}, {list}


# Requests: unknown fields are an error, not silently ignored (a typo must not change results
# unnoticed), and so is a value of another JSON type than the schema says (strict): "5" or true is
# not a max_tokens, 1 or "yes" not a boolean. Integers are numbers, and a number without a
# fraction (5.0) is an integer, as in JSON Schema (see Int).
REQUEST = ConfigDict(extra="forbid", strict=True)


_NUMBERS = {int, float, bool}


def _unencodable(value: Any) -> tuple[object, ...] | None:
    """The path of the first string (or object key) in a JSON value that is not valid Unicode: JSON
    allows escapes of lone surrogates ("\\ud800"), which no tokenizer can encode as UTF-8. A loop,
    not recursion: a body nested as deep as the JSON parser allows must not exhaust the stack."""
    stack: list[tuple[Any, tuple[object, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                stack += [(child, (*path, key)), (key, (*path, key))]  # the key is looked at first
        elif isinstance(item, list) and not set(map(type, item)) <= _NUMBERS:  # token ids: at C speed
            if set(map(type, item)) <= _LIST and set(map(type, chain.from_iterable(item))) <= _NUMBERS:
                continue  # a batch of token-id prompts, also at C speed
            stack += [(child, (*path, i)) for i, child in reversed(list(enumerate(item)))]
    return None


def _escaped(text: str) -> str:
    """Text that may hold a lone surrogate, with it written as its escape (safe to encode)."""
    return text.encode("utf-8", "backslashreplace").decode()


class Request(BaseModel):
    """A request body: strict (see REQUEST), and every text in it valid Unicode, checked before
    anything else reads it (a lone surrogate would fail the tokenizer; it is the client's error)."""

    model_config = REQUEST

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (path := _unencodable(data)) is not None:
            # The path can hold an object key with the surrogate itself: shown escaped.
            where = _escaped(".".join(str(p) for p in path)[:200]) or "the request body"
            raise PydanticCustomError(
                "invalid_unicode",
                "'{where}' is not valid Unicode: it holds a lone surrogate escape (such as "
                "\\ud800), which cannot be encoded as UTF-8; send the text as valid UTF-8",
                {"where": where, "param": _escaped(str(path[0])) if path else None},
            )
        return data


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# The types of integer fields within their bounds (ge, le): an int, or a float with no fraction
# (5.0 is 5); not a string or a boolean. (The bounds go inside, so the JSON Schema keeps them.)
# Written out as aliases, not built by a function, so that type checkers read them as types.
Int: TypeAlias = Annotated[int, Field(), BeforeValidator(_whole_number)]
NonNegative: TypeAlias = Annotated[int, Field(ge=0), BeforeValidator(_whole_number)]
Positive: TypeAlias = Annotated[int, Field(ge=1), BeforeValidator(_whole_number)]
TopK: TypeAlias = Annotated[int, Field(ge=-1), BeforeValidator(_whole_number)]  # vLLM's: 0 or -1 is no limit
# any 64-bit seed, signed or not
Seed: TypeAlias = Annotated[int, Field(ge=-(2**63), le=2**64 - 1), BeforeValidator(_whole_number)]


class StreamOptions(BaseModel):
    model_config = REQUEST

    include_usage: bool = False


class SamplingFields(Request):
    """Generation settings shared by /v1/completions and /v1/chat/completions."""

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
    logit_bias: Annotated[dict[str, float] | None, WithJsonSchema(LOGIT_BIAS_SCHEMA)] = Field(
        None, description="Token id (a string of digits) -> bias added to its logit when sampling, within -100..100."
    )
    user: str | None = None  # an end-user id for the caller's bookkeeping; no effect here

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to something this server does not do."""
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0},
                # lm-eval's loglikelihood request: token ids, nothing generated, the prompt's logprobs.
                {"prompt": [[1, 2, 3, 4]], "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0},
            ]
        }
    )

    prompt: Annotated[Any, WithJsonSchema(PROMPT_SCHEMA)] = Field(
        description="A string, a list of strings, a list of token ids, or a list of lists of token ids."
    )
    max_tokens: NonNegative | None = 16
    logprobs: NonNegative | None = None
    echo: bool = False
    prompt_logprobs: NonNegative | None = Field(
        None,
        description=(
            "vLLM's extension: each prompt token's logprob, rank and the top N alternatives, in each choice's "
            "`prompt_logprobs` (a list, null for the first token), whether or not the prompt is echoed."
        ),
    )
    # Accepted by OpenAI, not supported here: anything but their neutral value is rejected.
    suffix: str | None = None
    best_of: Int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Prompts:
        """Normalize to a list of prompts, each a string or a list of token ids."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(p, str) for p in value):
                return value
            if _is_token_list(value):
                return [value]
            if _are_token_lists(value):
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
    """One part of a message's content. Only text parts are taken: the models served here read text
    only, and a part they cannot see (an image, audio, a file) is refused, never silently dropped."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


# OpenAI's message roles. Chat templates know system, user and assistant (and often tool):
# `developer` (OpenAI's newer name for system instructions) reaches the template as `system`, and
# `function` (the deprecated form of a tool result) as `tool`; `tool` goes as it is, for templates
# that render tool results (others refuse it with a 400 naming the template's complaint).
ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]
TEMPLATE_ROLE = {"developer": "system", "function": "tool"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_calls, ...: passed to the chat template

    role: ChatRole
    content: str | list[ContentPart] | None = None

    @model_validator(mode="after")
    def _text_parts_only(self) -> ChatMessage:
        for i, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.type != "text":
                raise ValueError(
                    f"content part {i} is of type '{part.type[:40]}', which this server cannot pass "
                    "to the model (it reads text only); send text parts only"
                )
            if part.text is None:
                raise ValueError(f"content part {i} is a text part without 'text'")
        return self


class ResponseFormat(BaseModel):
    """OpenAI's response_format: only its default, {"type": "text"}, is served (server.serving.chat
    refuses json_object and json_schema with a 400 that says so, rather than answering free text)."""

    model_config = ConfigDict(extra="allow", strict=True)  # json_schema's own fields: refused with the type

    # Any string is read (so that json_object gets a 400 that says why); the schema says what is served.
    type: Annotated[str, WithJsonSchema({"const": "text"})]


# OpenAI chat fields for what this server does not do (tools, audio, stored completions, service
# tiers, reasoning models): their default values are accepted, as OpenAI's SDKs and proxies send
# them, and any other value is a 400 naming the field (never silently ignored). field -> (the
# values that ask for nothing, why another value is refused).
CHAT_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none", "auto"), "tool calling is not supported (no tools can be given)"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none", "auto"), "function calling is not supported (no functions can be given)"),
    "store": ((None, False), "completions are not stored by this server"),
    "service_tier": ((None, "auto", "default"), "this server has one service tier"),
    "modalities": ((None, ["text"]), "this server generates text only"),
    "audio": ((None,), "this server generates text only"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning effort applies to reasoning models only"),
    "web_search_options": ((None,), "web search is not supported"),
}


def _neutral(field: str) -> WithJsonSchema:
    return WithJsonSchema({"enum": list(CHAT_NEUTRAL[field][0])})


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0},
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: NonNegative | None = None
    max_completion_tokens: NonNegative | None = None
    logprobs: bool | None = False
    top_logprobs: NonNegative | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True  # vLLM's extension
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension
    # No effect here (OpenAI's bookkeeping: the caller's tags), as `user`.
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None  # only means something with tools, which are refused
    # Accepted at their neutral values only (CHAT_NEUTRAL): read as any value of their type, so that
    # another gets a 400 that says why, and published in the schema as those values.
    tools: Annotated[list[Any] | None, _neutral("tools")] = None
    tool_choice: Annotated[str | dict[str, Any] | None, _neutral("tool_choice")] = None
    functions: Annotated[list[Any] | None, _neutral("functions")] = None
    function_call: Annotated[str | dict[str, Any] | None, _neutral("function_call")] = None
    store: Annotated[bool | None, _neutral("store")] = None
    service_tier: Annotated[str | None, _neutral("service_tier")] = None
    modalities: Annotated[list[str] | None, _neutral("modalities")] = None
    audio: Annotated[dict[str, Any] | None, _neutral("audio")] = None
    prediction: Annotated[dict[str, Any] | None, _neutral("prediction")] = None
    reasoning_effort: Annotated[str | None, _neutral("reasoning_effort")] = None
    web_search_options: Annotated[dict[str, Any] | None, _neutral("web_search_options")] = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to something this server does not do."""
        if self.response_format is not None and self.response_format.type != "text":
            kind = self.response_format.type[:40]
            return "response_format", (
                f"response_format type '{kind}' (structured output) is not supported by this "
                'server; omit response_format or send {"type": "text"}'
            )
        if self.response_format is not None and self.response_format.model_extra:
            return "response_format", 'response_format {"type": "text"} takes no other fields'
        for field, (neutral, why) in CHAT_NEUTRAL.items():
            if getattr(self, field) not in neutral:  # strict types: no 0 for False here
                allowed = " or ".join(json.dumps(ok) for ok in neutral)
                return field, f"{field} is accepted only as {allowed}: {why}"
        return None


class TokenizeRequest(Request):
    model_config = REQUEST | ConfigDict(json_schema_extra={"examples": [{"prompt": "Hello, world"}]})

    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DistributionsRequest(Request):
    """POST /v1/distributions (this server's extension): the full log-distribution at each position
    of a token-id prompt from `start` on, in binary, for KL divergence between runtimes."""

    model_config = REQUEST | ConfigDict(
        json_schema_extra={"examples": [{"prompt": [1, 504, 3458, 282, 4649], "start": 2, "dtype": "float32"}]}
    )

    prompt: list[Int] = Field(min_length=2, description="Token ids (used exactly as given: no BOS added).")
    start: NonNegative = Field(
        0,
        description="The first row: row i is the distribution of the token after "
        "prompt[:i + 1]; rows run to the one that predicts the prompt's last token.",
    )
    dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="float32: the log-probabilities as computed (float64 log-softmax, rounded once); "
        "float16 halves the bytes.",
    )
    model: str | None = None


class DetokenizeRequest(Request):
    model_config = REQUEST | ConfigDict(json_schema_extra={"examples": [{"tokens": [1, 2, 3]}]})

    tokens: list[Int]
    model: str | None = None


# -- response shapes ------------------------------------------------------------------------------
# Closed TypedDicts: the code that builds the dicts is typed by them, and the OpenAPI schema lists
# exactly their keys.

closed = with_config(ConfigDict(extra="forbid"))

FinishReason = Literal["stop", "length"]


@closed
class CompletionLogprobs(TypedDict):
    """One entry per token of the choice's text, in order; with echo the prompt's first token has
    no logprob (null). Each top_logprobs dict holds the `logprobs` best tokens and the token itself."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


@closed
class PromptLogprob(TypedDict):
    logprob: float
    rank: int  # 1 = the most likely token (ties ordered by lower id, as the top-k is)
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token, null for the first; else token id (as a JSON key) -> entry,
# the N best and the prompt's own token.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


@closed
class CompletionChoice(TypedDict):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason
    prompt_logprobs: NotRequired[PromptLogprobs]  # only when the request asked for them


@closed
class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@closed
class CompletionResponse(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


@closed
class CompletionChunkChoice(TypedDict):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    prompt_logprobs: NotRequired[PromptLogprobs]  # in a choice's first chunk, when asked for


@closed
class CompletionChunk(TypedDict):
    """One streamed event; the last one (with stream_options.include_usage) has no choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChunkChoice]
    usage: NotRequired[Usage]


@closed
class ChatTopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


@closed
class ChatTokenLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[ChatTopLogprob]


@closed
class ChatLogprobs(TypedDict):
    content: list[ChatTokenLogprob]


@closed
class AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str


@closed
class ChatChoice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


@closed
class ChatCompletionResponse(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


@closed
class ChatDelta(TypedDict, total=False):
    role: Literal["assistant"]
    content: str


@closed
class ChatChunkChoice(TypedDict):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


@closed
class ChatCompletionChunk(TypedDict):
    """One streamed event; the last one (with stream_options.include_usage) has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: NotRequired[Usage]


@closed
class ErrorBody(TypedDict):
    message: str
    type: str  # invalid_request_error, not_found_error, rate_limit_error or server_error
    param: str | None
    code: str | None


@closed
class ErrorResponse(TypedDict):
    """Every error, in OpenAI's format."""

    error: ErrorBody


@closed
class ModelCard(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    system_fingerprint: str
    fingerprint: dict[str, str]  # what decides the numbers (server/observability/fingerprint.py), in full


@closed
class ModelList(TypedDict):
    object: Literal["list"]
    data: list[ModelCard]


@closed
class TokenizeResponse(TypedDict):
    tokens: list[int]
    count: int
    max_model_len: int


@closed
class DetokenizeResponse(TypedDict):
    prompt: str


@closed
class TokenizerInfo(TypedDict):
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    add_bos_token: bool
    chat_template: str | None
    model_max_length: int


@closed
class Health(TypedDict):
    status: Literal["ok"]


# -- errors in the OpenAPI schema ----------------------------------------------------------------
# What each error status means, for the routes' `responses=` (server/api.py, server/observability/metrics.py):
# the statuses the server really sends, from the middleware of server.app, the error handlers of
# server.http.errors and the checks of server.serving.base, all with ErrorResponse as the body.

HOST_REFUSED = "A Host header this server does not answer to (see --allowed-hosts)."
ERROR_DESCRIPTIONS = {
    400: "Invalid request: not JSON, a missing or unknown field, a value of another type or out of range, input "
    "the model cannot take (a token id outside its vocabulary, a prompt longer than its context), or a "
    "request past one of the server's limits (--max-prompts, --max-n, --max-logprobs, --max-stop, "
    "--max-request-tokens). Or: " + HOST_REFUSED,
    401: "Missing or wrong API key: only when the server runs with --api-key or --api-key-file.",
    404: "The request names a `model` that is not the one served here (see GET /v1/models).",
    413: "The request body is larger than --max-body-bytes.",
    429: "The server's queue is full (--max-queued-tokens): retry after Retry-After seconds.",
    500: "An unexpected error (a bug); the server log has the details.",
    503: "The request did not finish within --request-timeout and was cancelled, or the server stopped it while "
    "shutting down (past --shutdown-grace; with Retry-After).",
}
ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer", "required": True, "schema": {"type": "string"}}},
    429: {
        "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}


def error_responses(
    *statuses: int,
    bad_request: str = ERROR_DESCRIPTIONS[400],
    unauthorized: str | None = None,
    by_reference: bool = False,
) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses; `bad_request`, `unauthorized`: what a 400 or
    401 means on this route. by_reference: name the body's schema (for a route whose own media
    type is not JSON) instead of giving FastAPI the model (which puts it in the components)."""
    described = {**ERROR_DESCRIPTIONS, 400: bad_request, 401: unauthorized or ERROR_DESCRIPTIONS[401]}
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"description": described[status]}
        if by_reference:
            out[status]["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        else:
            out[status]["model"] = ErrorResponse
        if status in ERROR_HEADERS:
            out[status]["headers"] = ERROR_HEADERS[status]
    return out


# -- Server-Sent Events ---------------------------------------------------------------------------


def _inlined(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inlined(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _inlined(value, defs) for key, value in schema.items() if key != "$defs"}
    if isinstance(schema, list):
        return [_inlined(item, defs) for item in schema]
    return schema


def inline_schema(shape: Any) -> dict[str, Any]:
    """The JSON Schema of a type with every $ref replaced by its definition, to embed anywhere in
    the OpenAPI document (whose '#' is the document, not this schema)."""
    schema = TypeAdapter(shape).json_schema(mode="serialization")
    inlined: dict[str, Any] = _inlined(schema, schema.get("$defs", {}))  # a dict's inlined copy is a dict
    return inlined


def event_stream_schema(chunk: Any) -> dict[str, Any]:
    """The OpenAPI media type object of a `stream: true` response: each event's `data` is a chunk,
    an error (a stream past --request-timeout, or a failure once the headers are sent) or the
    final "[DONE]". `itemSchema` describes one event, as FastAPI's own event streams do."""
    payload = {"anyOf": [inline_schema(chunk), inline_schema(ErrorResponse)]}
    return {
        "itemSchema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "anyOf": [
                        {"const": "[DONE]"},
                        {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
                    ]
                },
                "event": {"type": "string"},
                "id": {"type": "string"},
                "retry": {"type": "integer", "minimum": 0},
            },
        }
    }
