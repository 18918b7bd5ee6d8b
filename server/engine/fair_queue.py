"""The jobs waiting for the model, taken in turn by client.

A plain first-in-first-out queue gives a client with more connections (or longer requests) more of
the model: 300 prompts sent first make everyone behind them wait for all 300. Here each client has
its own queue, in arrival order, and the engine takes one job from each client in turn: a client's
next job waits for at most one job of every other client that has work queued. Who is a client is
decided by the HTTP layer (server.api: the API key, else the address) and handed over with the jobs
(jobs.Origin); jobs submitted outside a request (tests, the engine used alone) share one client and
keep plain arrival order.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._turns: OrderedDict[str, deque[T]] = OrderedDict()  # clients with work, next turn first
        self._length = 0

    def extend(self, client: str, items: Iterable[T]) -> None:
        waiting = self._turns.setdefault(client, deque())  # a new client takes the last turn
        before = len(waiting)
        waiting.extend(items)
        self._length += len(waiting) - before

    def popleft(self) -> T:
        """The first job of the client whose turn it is; that client's next turn comes after every
        other client's."""
        client, waiting = next(iter(self._turns.items()))
        item = waiting.popleft()
        self._length -= 1
        if waiting:
            self._turns.move_to_end(client)
        else:
            del self._turns[client]
        return item

    def remove_if(self, condition: Callable[[T], bool]) -> list[T]:
        """Take out (and return) the jobs for which condition holds; the others keep their order."""
        removed: list[T] = []
        for client in list(self._turns):
            kept: deque[T] = deque()
            for item in self._turns[client]:
                (removed if condition(item) else kept).append(item)
            if kept:
                self._turns[client] = kept
            else:
                del self._turns[client]
        self._length -= len(removed)
        return removed

    def clear(self) -> None:
        self._turns.clear()
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return self._length > 0

    def __iter__(self) -> Iterator[T]:
        for waiting in self._turns.values():
            yield from waiting
