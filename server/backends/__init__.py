"""Backends: choose and load one from a model path."""

from __future__ import annotations

from pathlib import Path

from server.backends.base import Backend, ModelInfo
from server.config import ConfigError

__all__ = ["Backend", "ModelInfo", "load_backend", "detect_backend"]


def detect_backend(path: Path) -> str:
    """'gguf' for a GGUF file; anything else is refused with a message that says why."""
    from server.backends.gguf import is_gguf_file

    if not path.exists():
        raise ConfigError(f"Model path {path} does not exist. Pass --model (or LOGPROBS_MODEL) with a .gguf file.")
    if path.is_dir():
        raise ConfigError(
            f"{path} is a folder. This server loads GGUF files (.gguf); MLX model folders are not supported yet."
        )
    if is_gguf_file(path):
        return "gguf"
    raise ConfigError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")


def load_backend(path: Path, backend: str | None, *, n_ctx: int, n_threads: int, n_batch: int) -> Backend:
    kind = backend or detect_backend(path)
    if kind == "gguf":
        detect_backend(path)  # same checks for an explicit --backend gguf: clear errors, not llama.cpp's
        from server.backends.gguf import GGUFBackend

        return GGUFBackend(str(path), n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch)
    raise ConfigError(f"The '{kind}' backend is not available in this version; use 'gguf'.")
