"""Backends: choose and load one from a model path."""

from __future__ import annotations

from pathlib import Path

from server.backends.base import Backend, ModelInfo
from server.config import ConfigError

__all__ = ["Backend", "ModelInfo", "load_backend", "detect_backend"]


def detect_backend(path: Path) -> str:
    """'gguf' for a GGUF file, 'mlx' for a model folder with config.json; anything else is refused
    with a message that says why."""
    from server.backends.gguf import is_gguf_file

    if not path.exists():
        raise ConfigError(f"Model path {path} does not exist. Pass --model (or LOGPROBS_MODEL) with a .gguf file "
                          "or an mlx-lm model folder.")
    if path.is_dir():
        if (path / "config.json").exists():
            return "mlx"
        raise ConfigError(f"{path} is a folder without config.json: not an mlx-lm model folder.")
    if is_gguf_file(path):
        return "gguf"
    raise ConfigError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")


def load_backend(path: Path, backend: str | None, *, n_ctx: int, n_threads: int, n_batch: int,
                 kv_cache_type: str, max_sequences: int) -> Backend:
    detected = detect_backend(path)
    kind = backend or detected
    if kind != detected:
        raise ConfigError(f"--backend {kind} does not match {path}, which is a{'n mlx-lm folder' if detected == 'mlx' else ' GGUF file'}.")
    if kind == "gguf":
        from server.backends.gguf import GGUFBackend

        return GGUFBackend(str(path), n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, kv_cache_type=kv_cache_type,
                           max_sequences=max_sequences)
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        raise ConfigError("The MLX backend needs mlx-lm: pip install 'logprobs-server[mlx]'") from None
    from server.backends.mlx import MLXBackend

    return MLXBackend(str(path), n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, max_sequences=max_sequences)
