"""What a running server holds: settings, the loaded backend (with its token table), the engine."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from server.backends import load_backend
from server.backends.base import Backend
from server.config import Settings, default_threads
from server.default_model import ensure_default_model
from server.engine import Engine
from server.fingerprint import Fingerprint
from server.fingerprint import compute as compute_fingerprint
from server.metrics import Metrics
from server.prefix_cache import SPLIT_TOLERANCE, split_drift
from server.shared_passes import SHARED_TOLERANCE, shared_pass_drift

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    settings: Settings
    backend: Backend
    engine: Engine
    model_name: str
    fingerprint: Fingerprint  # what decides the numbers; responses carry fingerprint.short
    metrics: Metrics  # this server's Prometheus registry (GET /metrics)

    @classmethod
    def load(cls, settings: Settings) -> ServerState:
        path = Path(settings.model) if settings.model else ensure_default_model(settings.cache_path())
        n_threads = settings.n_threads or default_threads()
        log.info("Loading %s (threads for llama.cpp: %d)", path, n_threads)
        started = time.perf_counter()
        backend = load_backend(path, settings.backend, n_ctx=settings.n_ctx, n_threads=n_threads,
                               n_batch=settings.n_batch, kv_cache_type=settings.kv_cache_type,
                               max_sequences=settings.max_sequences)
        load_seconds = time.perf_counter() - started
        info = backend.info
        log.info(
            "Model loaded in %.1f s: %s; vocabulary %d, context %d tokens (trained on %d), BOS %s, chat template %s",
            load_seconds, info.description, info.n_vocab, info.n_ctx, info.n_ctx_train,
            "added" if info.add_bos else "not added", "present" if info.chat_template else "absent",
        )
        if settings.prefix_cache_mb and backend.supports_snapshots:
            drift = split_drift(backend)
            if drift > SPLIT_TOLERANCE:
                log.warning("Prefix cache off: with this model file, a prompt run in two passes (as after a cache "
                            "hit) gives other numbers than in one (logits moved by up to %.3g; llama.cpp's repacked "
                            "Q4_0/Q4_K kernels do this), so reuse would change results. Scoring runs every prompt "
                            "whole. A Q4_1, Q8_0 or F16 file of the model keeps reuse exact.", drift)
                settings = settings.model_copy(update={"prefix_cache_mb": 0})
        if backend.shares_prompt_passes:
            drift = shared_pass_drift(backend)
            if drift > SHARED_TOLERANCE:
                log.warning("Prompts run one at a time: run together in one forward pass, they gave logits up "
                            "to %.3g away from each prompt alone, past the %.0e this server allows.",
                            drift, SHARED_TOLERANCE)
                backend.shares_prompt_passes = False
            else:
                log.info("Fresh prompts admitted together share forward passes (logits within %.2g of each "
                         "prompt alone in the start-up check)", drift)
        log.info("Runs up to %d sequence(s) at once, in batches of up to %d tokens; prefix cache: %s",
                 backend.max_sequences, settings.n_batch,
                 f"{settings.prefix_cache_mb} MB" if settings.prefix_cache_mb and backend.supports_snapshots else "off")
        name = settings.model_name or (path.name if path.is_dir() else path.stem)
        fingerprint = compute_fingerprint(settings, backend, path, "mlx" if path.is_dir() else "gguf",
                                          settings.cache_path())
        log.info("System fingerprint %s: %s", fingerprint.short,
                 ", ".join(f"{k}={v}" for k, v in fingerprint.parts.items()))
        metrics = Metrics()
        engine = Engine(backend, settings.prefix_cache_mb, max_queued_tokens=settings.max_queued_tokens,
                        hooks=metrics.hooks)
        metrics.describe_server(engine, name, fingerprint, load_seconds)
        return cls(settings=settings, backend=backend, engine=engine, model_name=name, fingerprint=fingerprint,
                   metrics=metrics)

    def close(self) -> None:
        self.engine.close()
        self.backend.close()
