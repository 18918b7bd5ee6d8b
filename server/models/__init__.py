"""Finding the model to serve: a path the user gave, a Hugging Face Hub name (server/models/hub.py),
or the embedded default model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from server.config import ConfigError, Settings
from server.models.default_model import ensure_default_model
from server.models.digests import DIGEST_CACHE, DigestCache
from server.models.hub import HubRef, fetch


@dataclass
class ResolvedModel:
    path: Path  # the .gguf file (a split model's first part) or the model folder
    kind: str | None  # the backend kind's name when known from where it came (a Hub repo); None: from the path
    name: str  # the id /v1/models serves unless --model-name says otherwise
    fingerprint_parts: dict[str, str] = field(default_factory=dict)  # where it came from (Hub repo, commit)


def resolve_model(settings: Settings) -> ResolvedModel:
    """The model `settings` name (--model): an existing path, else a Hub name (fetched, or found in
    the cache), else the default model. A name of neither kind is refused with how to fix it."""
    if not settings.model:
        path = ensure_default_model(settings.cache_path())
        return ResolvedModel(path, None, path.stem)
    path = Path(settings.model).expanduser()
    if path.exists():
        return ResolvedModel(path, None, path.name if path.is_dir() else path.stem)
    ref = HubRef.parse(settings.model)
    if ref is None:
        raise ConfigError(
            f"Model path {path} does not exist. Pass --model (or LOGPROBS_MODEL) with a .gguf file, "
            "an mlx-lm model folder, or a Hugging Face repo: ORG/NAME (MLX), ORG/NAME:QUANT or "
            "ORG/NAME/FILE.gguf (GGUF), each with an optional @REVISION."
        )
    hub = fetch(ref, settings.backend, DigestCache(settings.cache_path() / DIGEST_CACHE))
    return ResolvedModel(hub.path, hub.kind, settings.model, hub.fingerprint_parts())
