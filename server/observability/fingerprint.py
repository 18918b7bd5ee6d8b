"""The system fingerprint: what decides the numbers a response carries, hashed into one short id.

The same GGUF file gives different logprobs on different builds of llama.cpp (a token's logprob
moved by 0.11 between an AVX2 and an AVX-512 build), with other precision settings, or another
backend. Every completion and chat response carries `system_fingerprint` (OpenAI's field) so that
results can be compared only when it matches; /v1/models lists the parts in full.

Parts: the model's sha256 (a GGUF file, or an MLX folder's files), the backend with its version and
build (llama.cpp's CPU features; MLX's device and BLAS), the settings that change logits (KV cache
type, flash attention, n_batch, max_sequences, prefix cache on or off), numpy (which scores the
logits) and this server's version. n_ctx and n_threads are left out: both changed no logit, bit for
bit, on SmolLM2 (n_ctx 512 / 2048 / 8192, 1 or 2 threads).

Hashing the model reads the whole file once; the digest is kept in the cache folder, keyed by the
file's path, size and modification time, so a restart does not read it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from server.backends.base import Backend, package_version
from server.config import Settings
from server.models.default_model import sha256_of

log = logging.getLogger(__name__)

DIGEST_CACHE = "digests.json"


@dataclass(frozen=True)
class Fingerprint:
    parts: dict[str, str]
    short: str  # "fp_" + 12 hex characters of the parts' hash

    @classmethod
    def of(cls, parts: dict[str, str]) -> Fingerprint:
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        return cls(parts=dict(parts), short="fp_" + digest[:12])


# -- model digests --------------------------------------------------------------------------------

class DigestCache:
    """sha256 of files, kept in a JSON file: {path: {size, mtime_ns, sha256}}; an entry counts only
    while the file's size and modification time are unchanged."""

    def __init__(self, file: Path | None):
        self.file = file
        self.entries: dict[str, dict] = {}
        self.changed = False
        if file is not None:
            try:
                self.entries = json.loads(file.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry["sha256"]
        digest = sha256_of(path)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if self.file is None or not self.changed:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            partial = self.file.with_name(f"{self.file.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(self.entries, indent=0, sort_keys=True))
            partial.replace(self.file)  # atomic: concurrent servers never read half a file
        except OSError as exc:  # a read-only cache folder costs a re-hash next time, nothing else
            log.debug("could not keep model digests in %s: %s", self.file, exc)


def _model_files(folder: Path) -> list[Path]:
    """An MLX folder's files that can change the numbers: everything but hidden files (a download
    tool's .cache) and documentation."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() != ".md"
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def model_sha256(path: Path, cache: DigestCache) -> str:
    """sha256 of a model file; for a folder, of its files' names and sha256s."""
    if not path.is_dir():
        return cache.sha256(path)
    listing = "".join(f"{p.relative_to(path).as_posix()}\t{cache.sha256(p)}\n" for p in _model_files(path))
    return hashlib.sha256(listing.encode()).hexdigest()


def compute(settings: Settings, backend: Backend, model: Path | None, cache_dir: Path | None) -> Fingerprint:
    """The fingerprint of a loaded backend serving `model` (None: a backend built in code, whose
    model is no file)."""
    cache = DigestCache(cache_dir / DIGEST_CACHE if cache_dir is not None else None)
    parts = {
        "model_sha256": model_sha256(model, cache) if model is not None else "none",
        "backend": backend.kind,
        **backend.fingerprint_parts(),
        "n_batch": str(backend.n_batch),
        "max_sequences": str(backend.max_sequences),
        "prefix_cache": "on" if settings.prefix_cache_mb > 0 and backend.supports_snapshots else "off",
        "numpy": package_version("numpy"),
        "machine": platform.machine(),
        "logprobs_server": package_version("logprobs-server"),
    }
    cache.save()
    return Fingerprint.of(parts)
