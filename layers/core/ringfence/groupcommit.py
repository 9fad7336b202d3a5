"""Group commit: threads that write at the same time share one write.

Why: some writes are one at a time by nature — a FIFO queue with a single message group, an
append-only hash chain whose every record names the one before it. When a fleet enrolls at once,
dozens of ``ringfence serve`` request threads each wait their turn for a round trip of their
own. With :class:`GroupCommit`, a thread whose item finds a write in flight waits for it, and the
next write carries every item that queued meanwhile. Nothing is delayed when nobody else writes
(the first writer writes at once), and nothing is lost: each caller returns only once a write
that carried its item succeeded, with its own result, or raises that item's error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """``commit(item)`` from any thread. ``write`` is called by one thread at a time with every
    item queued (in the order they came) and returns one outcome per item: its result, or the
    exception that item's caller raises. An exception ``write`` raises fails every item it held."""

    def __init__(self, write: Callable[[list[T]], Sequence[R | BaseException]]) -> None:
        self.write = write
        self._cond = threading.Condition()
        self._queued: list[_Ticket[T, R]] = []
        self._writing = False
        self.writes = 0  # writes made (what grouping saved: items committed minus this)

    @property
    def queued(self) -> int:
        """Items waiting for the write in flight to finish (a test's way to know they queued)."""
        with self._cond:
            return len(self._queued)

    def commit(self, item: T) -> R:
        ticket: _Ticket[T, R] = _Ticket(item)
        with self._cond:
            self._queued.append(ticket)
            while self._writing and not ticket.done:
                self._cond.wait()
            if not ticket.done:
                # this thread writes whatever queued up, its own item included
                self._writing = True
                group, self._queued = self._queued, []
        if not ticket.done:
            self._write(group)
        return ticket.outcome()

    def _write(self, group: list[_Ticket[T, R]]) -> None:
        try:
            outcomes = list(self.write([t.item for t in group]))
            if len(outcomes) != len(group):
                raise RuntimeError(f"group commit: {len(outcomes)} outcomes for {len(group)} items")
        except BaseException as exc:  # every caller in the group gets it, as if it had written alone
            outcomes = [exc] * len(group)
        with self._cond:
            self.writes += 1
            for t, out in zip(group, outcomes, strict=True):
                t.done, t.result = True, out
            self._writing = False
            self._cond.notify_all()


class _Ticket(Generic[T, R]):
    __slots__ = ("done", "item", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = False
        self.result: R | BaseException | None = None

    def outcome(self) -> R:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result  # type: ignore[return-value]
