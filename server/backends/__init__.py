"""Backends: one kind per model format, each in its own module (its Backend and its BackendKind),
listed once here; the rest of the server asks this registry, never for a kind by name."""

from __future__ import annotations

from pathlib import Path

from server.backends.base import Backend, BackendKind, ModelInfo
from server.backends.gguf import KIND as GGUF
from server.backends.mlx import KIND as MLX
from server.config import ConfigError, Settings

__all__ = ["KINDS", "Backend", "BackendKind", "ModelInfo", "kind_of", "load_backend"]

# --backend's choices, in the order a local path is tried.
KINDS: dict[str, BackendKind] = {kind.name: kind for kind in (GGUF, MLX)}


def kind_of(path: Path) -> BackendKind:
    """The kind of model at a local path; anything else is refused with each kind's reason."""
    if not path.exists():
        raise ConfigError(
            f"Model path {path} does not exist. Pass --model (or LOGPROBS_MODEL) with "
            + " or ".join(kind.files for kind in KINDS.values())
            + "."
        )
    reasons = []
    for kind in KINDS.values():
        reason = kind.refuses(path)
        if reason is None:
            return kind
        reasons.append(reason)
    raise ConfigError(f"{path} is " + ", and ".join(reasons) + ".")


def load_backend(path: Path, settings: Settings, kind: str | None = None) -> Backend:
    """The backend for `path`: of the kind --backend names (which must match the path), else
    `kind` (known from where the model came), else the path's."""
    detected = KINDS[kind] if kind is not None else kind_of(path)
    if settings.backend is not None and settings.backend != detected.name:
        raise ConfigError(f"--backend {settings.backend} does not match {path}, which is {detected.files}.")
    return detected.load(path, settings)
