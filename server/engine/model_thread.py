"""The one thread that runs the model: its loading, the start-up probes and then the engine's loop.

Why one thread for all of it: llama.cpp's CPU build parallelises each forward pass with OpenMP,
and GNU OpenMP keeps a team of worker threads for every thread that has run a parallel region.
Once more such threads exist than the machine has cores (the probes' team on the thread that
started the server, the engine's on its own), it stops spinning at its barriers and sleeps on
every one: on a 2-core machine a decode step of SmolLM2 took 21-28 ms instead of 13 (measured
2026-12-06, docs/performance.md). With every forward pass on one thread there is one team.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class ModelThread:
    """A thread that runs what it is given, one call after another: `call` waits for a result,
    `start` hands it a function that runs until the thread is to end (the engine's loop)."""

    def __init__(self, name: str = "model"):
        self._work: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) on the model thread; its result here (or its exception, raised here). Not from
        the model thread itself, nor after start(): the call would wait behind the loop forever."""
        assert threading.current_thread() is not self._thread, "ModelThread.call from the model thread"
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, who raises it
                future.set_exception(exc)

        self._work.put(run)
        return future.result()

    def start(self, loop: Callable[[], object]) -> None:
        """Run `loop` on the thread; the thread ends when it returns."""
        self._work.put(loop)
        self._work.put(None)

    def stop(self) -> None:
        """End the thread once what it was given has run (a server whose start-up failed)."""
        self._work.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while (work := self._work.get()) is not None:
            work()
