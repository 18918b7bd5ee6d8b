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

Hashing the model reads the whole file once (server/models/digests.py); the digest is kept in the
cache folder, keyed by the file's path, size and modification time, so a restart does not read it
again.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

from server.backends.base import Backend
from server.backends.probes import Exactness
from server.backends.versions import package_version
from server.models.digests import DIGEST_CACHE, DigestCache, model_sha256


@dataclass(frozen=True)
class Fingerprint:
    parts: dict[str, str]
    short: str  # "fp_" + 12 hex characters of the parts' hash

    @classmethod
    def of(cls, parts: dict[str, str]) -> Fingerprint:
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        return cls(parts=dict(parts), short="fp_" + digest[:12])


def compute(
    exactness: Exactness,
    backend: Backend,
    model: Path | None,
    cache_dir: Path | None,
    origin: dict[str, str] | None = None,
) -> Fingerprint:
    """The fingerprint of a loaded backend serving `model` (None: a backend built in code, whose
    model is no file); `origin`: where the model came from (a Hub repo, its commit, its weight
    files' sha256), added to the parts."""
    cache = DigestCache(cache_dir / DIGEST_CACHE if cache_dir is not None else None)
    parts = {
        "model_sha256": model_sha256(model, cache) if model is not None else "none",
        "backend": backend.kind,
        **backend.fingerprint_parts(),
        "n_batch": str(backend.n_batch),
        "max_sequences": str(backend.max_sequences),
        "prefix_cache": "on" if exactness.prefix_cache else "off",
        "numpy": package_version("numpy"),
        "machine": platform.machine(),
        "logprobs_server": package_version("logprobs-server"),
        **(origin or {}),
    }
    cache.save()
    return Fingerprint.of(parts)
