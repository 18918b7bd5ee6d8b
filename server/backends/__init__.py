"""Backends: tell a model file's kind once, and load the backend that runs it."""

from __future__ import annotations

from pathlib import Path

from server.backends.base import Backend, ModelInfo
from server.config import ConfigError, Settings, default_threads

__all__ = ["Backend", "ModelInfo", "detect_backend", "load_backend"]


def detect_backend(path: Path) -> str:
    """'gguf' for a GGUF file, 'mlx' for a model folder with config.json; anything else is refused
    with a message that says why."""
    from server.backends.gguf import is_gguf_file

    if not path.exists():
        raise ConfigError(
            f"Model path {path} does not exist. Pass --model (or LOGPROBS_MODEL) with a .gguf file "
            "or an mlx-lm model folder."
        )
    if path.is_dir():
        if (path / "config.json").exists():
            return "mlx"
        raise ConfigError(f"{path} is a folder without config.json: not an mlx-lm model folder.")
    if is_gguf_file(path):
        return "gguf"
    raise ConfigError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")


def load_backend(path: Path, settings: Settings) -> Backend:
    """The backend for `path` (of the kind --backend names, which must match the file), with the
    settings' context, threads, batch, KV type and sequences."""
    detected = detect_backend(path)
    kind = settings.backend or detected
    if kind != detected:
        what = "an mlx-lm folder" if detected == "mlx" else "a GGUF file"
        raise ConfigError(f"--backend {kind} does not match {path}, which is {what}.")
    n_threads = settings.n_threads or default_threads()
    if kind == "gguf":
        from server.backends.gguf import GGUFBackend

        return GGUFBackend(
            str(path),
            n_ctx=settings.n_ctx,
            n_threads=n_threads,
            n_batch=settings.n_batch,
            kv_cache_type=settings.kv_cache_type,
            max_sequences=settings.max_sequences,
        )
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        raise ConfigError("The MLX backend needs mlx-lm: pip install -e '.[mlx]' (from the checkout)") from None
    from server.backends.mlx import MLXBackend

    return MLXBackend(
        str(path),
        n_ctx=settings.n_ctx,
        n_batch=settings.n_batch,
        n_threads=n_threads,
        max_sequences=settings.max_sequences,
    )
