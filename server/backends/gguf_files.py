"""Which files are GGUF models: a local file by its magic bytes, a Hub repo's by their names (split
models in parts, quantization tags in the names)."""

from __future__ import annotations

import re
from pathlib import Path

from server.config import ConfigError

GGUF_MAGIC = b"GGUF"
DEFAULT_QUANT = "Q4_K_M"  # llama-server's default, when the repo has it
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _gguf_models(files: list[str]) -> dict[str, list[str]]:
    """Each GGUF model of a repo: its name (the first part of a split one) -> all its files."""
    models: dict[str, list[str]] = {}
    for name in sorted(f for f in files if f.lower().endswith(".gguf")):
        split = _SPLIT.search(name)
        if split and split[1] != "00001":
            continue
        if split:
            count = int(split[2])
            models[name] = [_SPLIT.sub(f"-{i:05d}-of-{count:05d}.gguf", name) for i in range(1, count + 1)]
        else:
            models[name] = [name]
    return models


def _matches(name: str, quant: str) -> bool:
    """Whether a file's name carries the quantization tag: after a "-", "." or "_" (or a folder),
    before ".gguf" or the split suffix or another "-"/"." (so Q4_K does not match Q4_K_M)."""
    stem = _SPLIT.sub("", name)
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    return re.search(r"(?:^|[-._/])" + re.escape(quant) + r"(?:[-.]|$)", stem, re.IGNORECASE) is not None


def choose_gguf(repo: str, quant: str | None, file: str | None, files: list[str]) -> list[str]:
    """The files of the GGUF model a Hub reference names (repo:QUANT, repo/FILE.gguf, or the repo
    alone: its Q4_K_M or its only model), first part first."""
    models = _gguf_models(files)
    listing = ", ".join(models) or "none"
    if file is not None:
        for parts in models.values():
            if file in parts:
                return parts
        raise ConfigError(f"{repo} has no file {file}; its GGUF files: {listing}.")
    if not models:
        raise ConfigError(f"{repo} holds no .gguf file (and no MLX model): nothing to serve.")
    if quant is not None:
        found = [name for name in models if _matches(name, quant)]
        if not found:
            raise ConfigError(
                f"{repo} has no file for the quantization {quant}; its GGUF files: {listing}. "
                f"Name one as {repo}:QUANT or {repo}/FILE.gguf."
            )
        if len(found) > 1:
            raise ConfigError(
                f"{repo}: the quantization {quant} matches several files ({', '.join(found)}); "
                f"name one as {repo}/FILE.gguf."
            )
        return models[found[0]]
    default = [name for name in models if _matches(name, DEFAULT_QUANT)]
    if len(default) == 1:
        return models[default[0]]
    if len(models) == 1:
        return next(iter(models.values()))
    raise ConfigError(
        f"{repo} holds several GGUF files ({listing}) and no single {DEFAULT_QUANT}; "
        f"choose one with {repo}:QUANT or {repo}/FILE.gguf."
    )
