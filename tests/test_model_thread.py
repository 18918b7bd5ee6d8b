"""Every forward pass a server runs, from loading and the start-up probes to the requests, runs on
one thread: GNU OpenMP keeps a team of workers for each thread that runs llama.cpp, and more teams
than cores made every decode step sleep at its barriers (server/engine/model_thread.py)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from server.config import Settings
from server.engine.model_thread import ModelThread
from server.models import ResolvedModel
from server.state import ServerState
from testing.fake_backend import ByteBackend
from tests.test_engine import greedy_job


class ThreadRecordingBackend(ByteBackend):
    """The fake model, noting the thread of each forward pass and state copy."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: dict[str, set[int]] = {}

    def _note(self, what: str) -> None:
        self.threads.setdefault(what, set()).add(threading.get_ident())

    def prefill(self, seq, tokens, start, logits_from):
        self._note("prefill")
        return super().prefill(seq, tokens, start, logits_from)

    def decode(self, steps):
        self._note("decode")
        return super().decode(steps)

    def snapshot(self, seq):
        self._note("snapshot")
        return super().snapshot(seq)

    def restore(self, seq, state, n_tokens):
        self._note("restore")
        return super().restore(seq, state, n_tokens)


def test_loading_probes_and_requests_run_on_one_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    loaded_on: list[int] = []

    def load(path: Path, settings: Settings, kind: str | None) -> ThreadRecordingBackend:
        loaded_on.append(threading.get_ident())
        return ThreadRecordingBackend()

    monkeypatch.setattr("server.state.load_backend", load)
    weights = tmp_path / "byte-model.bin"  # what the fingerprint digests
    weights.write_bytes(b"fake weights")
    settings = Settings(cache_dir=str(tmp_path / "cache"))
    state = ServerState.build(settings, model=ResolvedModel(weights, None, "byte-model"))
    backend = state.backend
    assert isinstance(backend, ThreadRecordingBackend)
    try:
        # The probes ran passes and state copies before the engine started.
        assert {"prefill", "snapshot", "restore"} <= backend.threads.keys()
        job = greedy_job(backend.tokenize("a prompt the cache has seen", True), max_tokens=5)
        for _ in range(2):  # the second time from the prefix cache
            (result,) = asyncio.run(state.engine.complete([job]))
            assert len(result.generated) == 5
    finally:
        state.close()
    threads = set().union(*backend.threads.values())
    assert threads == set(loaded_on), backend.threads
    assert threading.get_ident() not in threads  # not the thread that started the server


def test_a_failed_call_raises_in_the_caller_and_the_thread_goes_on() -> None:
    thread = ModelThread("test-model")

    def fails() -> None:
        raise ValueError("could not load")

    with pytest.raises(ValueError, match="could not load"):
        thread.call(fails)
    assert thread.call(threading.get_ident) != threading.get_ident()
    thread.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
