"""What a running server holds (settings, the backend, the engine, the fingerprint, the metrics),
and the one place it is built: the model found and loaded (or a backend given), the start-up
exactness probes run, then the engine started around it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from server.backends import load_backend
from server.backends.base import Backend
from server.backends.probes import run_probes
from server.config import Settings, default_threads
from server.engine import Engine
from server.engine.model_thread import ModelThread
from server.engine.prefix_cache import MIN_REUSE
from server.models import ResolvedModel, resolve_model
from server.observability.fingerprint import Fingerprint
from server.observability.fingerprint import compute as compute_fingerprint
from server.observability.metrics import Metrics

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
    def build(
        cls, settings: Settings, backend: Backend | None = None, model: ResolvedModel | None = None
    ) -> ServerState:
        """Load the model the settings name (`model`: already found), or serve `backend` (built by
        the caller, e.g. a test's fake backend: nothing is read from disk), and start the engine."""
        # Loading, the probes and the engine's loop run on one thread (why: model_thread.py).
        thread = ModelThread()
        try:
            return cls._build(settings, thread, backend, model)
        except BaseException:
            thread.stop()
            raise

    @classmethod
    def _build(
        cls, settings: Settings, thread: ModelThread, backend: Backend | None, model: ResolvedModel | None
    ) -> ServerState:
        if backend is None:
            model = model or resolve_model(settings)  # before the clock: a fetch is not loading
            started = time.perf_counter()
            log.info("Loading %s (threads: %d)", model.path, settings.n_threads or default_threads())
            backend = thread.call(load_backend, model.path, settings, model.kind)
        else:
            started = time.perf_counter()
        load_seconds = time.perf_counter() - started
        info = backend.info
        log.info(
            "Model loaded in %.1f s: %s; vocabulary %d, context %d tokens (trained on %d), BOS %s, chat template %s",
            load_seconds,
            info.description,
            info.n_vocab,
            info.n_ctx,
            info.n_ctx_train,
            "added" if info.add_bos else "not added",
            "present" if info.chat_template else "absent",
        )
        exactness = thread.call(run_probes, backend, settings, MIN_REUSE)
        log.info(
            "Runs up to %d sequence(s) at once%s, in batches of up to %d tokens; prefix cache: %s",
            backend.max_sequences,
            f" (decoded {exactness.decode_rows} per forward pass)" if exactness.decode_rows else "",
            backend.n_batch,
            exactness.describe(),
        )
        name = settings.model_name or (model.name if model else Path(info.path).stem)
        fingerprint = compute_fingerprint(
            exactness,
            backend,
            model.path if model else None,
            settings.cache_path(),
            model.fingerprint_parts if model else {},
        )
        log.info(
            "System fingerprint %s: %s", fingerprint.short, ", ".join(f"{k}={v}" for k, v in fingerprint.parts.items())
        )
        metrics = Metrics()
        engine = Engine(
            backend,
            max_queued_tokens=settings.max_queued_tokens,
            hooks=metrics.hooks,
            job_overhead_tokens=settings.job_overhead_tokens,
            exactness=exactness,
            thread=thread,
        )
        try:
            metrics.describe_server(engine, name, fingerprint, load_seconds)
        except BaseException:
            engine.close()  # its loop holds the thread: build's stop() would wait behind it
            raise
        return cls(
            settings=settings, backend=backend, engine=engine, model_name=name, fingerprint=fingerprint, metrics=metrics
        )

    def close(self) -> None:
        self.engine.close()
        self.backend.close()
