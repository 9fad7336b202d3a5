"""Waking the agent API's long-polls when published state may have changed, across processes.

Compute runs elsewhere (another Lambda, the local router's thread, another process), so nothing
calls into the agent API when it publishes. Every publication moves the engine head, one small
item in the store (compute reserves it before publishing and commits it after), so one thread per
process reads that item every ``interval`` seconds — only while some request is waiting — and
wakes the waiters it concerns when it moved (below). A waiting agent then costs nothing per poll: before, each one
re-read its bundle pointer and set heads every interval.

Waiters cannot miss a change between reading the store and starting to wait: each thread
remembers the change generation it last saw, and a wait returns at once if the generation moved
since (the caller then reads the store again), as :class:`ringfence.local.wiring.LocalNotifier`.

A waiter may say what it waits for (its workload): then only a change that names it, or one
that names nobody in particular, wakes it. :class:`MovedSince` names them from the records
compute writes before each commit (``Store.moved_after``): with a fleet waiting, one change
otherwise sent every waiting agent back to the store to find it had not moved.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from ringfence.store.base import EngineHead, MovedRecord

log = logging.getLogger("ringfence.aws")
LOOK_GRACE = 1.0  # s a look may take beyond the interval before the watch's mark is not trusted


class StoreChanges:
    """``wait(seconds)``: True once ``read()`` (e.g. the engine head) returned something else than
    at the previous look, or at once when it moved since this thread's last wait; False after
    ``seconds`` without a change. ``read`` is called from one background thread, at most every
    ``interval`` seconds and only while someone waits (or waited in the last ``linger`` seconds);
    the first look after the thread starts counts as a change (one more store read per waiter,
    never a missed change). ``close()`` stops the watch for good (its owner, the wiring, is done:
    its store may be gone) and wakes every waiter."""

    def __init__(
        self,
        read: Callable[[], Hashable],
        interval: float,
        moved: Callable[[Hashable], frozenset[str] | None] | None = None,
    ) -> None:
        self.read = read
        self.interval = interval
        # given the new look, whom a change concerns (None: everyone); without it, everyone
        self.moved = moved
        # the watch outlives its last waiter this long: an agent's next long-poll follows its
        # last at once, and a restarted watch costs every waiter one more store read
        self.linger = max(1.0, 5 * interval)
        self._cond = threading.Condition()
        self._generation = 0
        self._waiters = 0
        self._last: Hashable = None
        self._looked = False
        self._looked_at = 0.0  # time.monotonic() at the end of the last look
        self._watcher: threading.Thread | None = None
        self._seen = threading.local()
        self._closed = threading.Event()
        # the last generations' targets (None: everyone); a waiter further behind wakes anyway
        self._targets: deque[tuple[int, frozenset[str] | None]] = deque(maxlen=256)
        self.reads = 0  # store reads made (what waiting costs)

    def _concerns(self, seen: int | None, key: str | None) -> bool:
        """Did a generation after ``seen`` concern ``key``? (under the lock)"""
        if seen == self._generation:
            return False
        if seen is None or key is None or not self._targets or self._targets[0][0] > seen + 1:
            return True  # a thread's first wait, an untargeted waiter, or history gone: wake
        return any(g > seen and (t is None or key in t) for g, t in self._targets)

    def wait(self, seconds: float, key: str | None = None) -> bool:
        """True once a change concerning ``key`` (any change, without one) happened since this
        thread's last wait; False after ``seconds``."""
        with self._cond:
            seen: int | None = getattr(self._seen, "generation", None)
            if self._concerns(seen, key):
                self._seen.generation = self._generation
                return True
            seen = self._seen.generation = self._generation
            self._waiters += 1
            if self._watcher is None and not self._closed.is_set():
                self._watcher = threading.Thread(target=self._watch, name="ringfence-store-changes", daemon=True)
                self._watcher.start()
            try:
                changed = self._cond.wait_for(lambda: self._concerns(seen, key), timeout=max(seconds, 0.0))
            finally:
                self._waiters -= 1
            self._seen.generation = self._generation
            return changed

    def mark(self) -> int | None:
        """Something that stays equal while the watch has seen no change, for a cache of what a
        change would move (:meth:`ringfence.control.agents.AgentApi`'s set heads); None while
        the watch is not looking (stopped, not yet looked, its last look failed or is older than
        the interval and :data:`LOOK_GRACE`, closed): then a change could go unseen, and nothing
        may be kept on it. What is read after taking the mark is at least that fresh; a change
        after the read moves the mark at the next look."""
        with self._cond:
            if self._watcher is None or not self._looked or self._closed.is_set():
                return None
            # a watch that has not looked for a while (a frozen Lambda container thawed, a
            # starved thread) may have missed a change: no mark until it looks again
            if time.monotonic() - self._looked_at > self.interval + LOOK_GRACE:
                return None
            return self._generation

    def close(self) -> None:
        """Stop the watch (at once, also in the middle of its pause) and wake every waiter; later
        waits only time out. Idempotent."""
        with self._cond:
            self._closed.set()
            watcher = self._watcher
            self._advance(None)  # a waiter re-reads the store itself (and meets what is there)
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=5)

    def _watch(self) -> None:
        idle_since: float | None = None
        while True:
            with self._cond:
                if self._closed.is_set():
                    self._watcher = None
                    return
                if self._waiters:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= self.linger:
                    self._watcher = None  # the next waiter starts another
                    self._looked = False
                    return
            try:
                now = self.read()
            except Exception as exc:  # waiters re-read themselves (and meet the error), as without a watch
                with self._cond:
                    if self._closed.is_set():  # closed during the read: the store is gone, say nothing
                        self._watcher = None
                        return
                    # lingering with nobody waiting (e.g. the store went away at shutdown): quietly
                    (log.warning if self._waiters else log.debug)("reading the store for changes failed: %s", exc)
                    self._advance(None)
                    self._looked = False
            else:
                with self._cond:
                    self.reads += 1
                    first, changed = not self._looked, now != self._last
                    self._last, self._looked = now, True
                    self._looked_at = time.monotonic()
                if first or changed:
                    target = self._target(now)
                    with self._cond:
                        # the first look after a start has nothing to compare with: a waiter may
                        # have read the store just before a change this look already includes
                        self._advance(None if first else target)
            self._closed.wait(self.interval)  # a pause that close() cuts short

    def _target(self, now: Hashable) -> frozenset[str] | None:
        if self.moved is None:
            return None
        try:
            return self.moved(now)
        except Exception as exc:  # cannot tell whom it concerns: everyone
            log.warning("reading which workloads moved failed: %s", exc)
            return None

    def _advance(self, target: frozenset[str] | None) -> None:
        """A new generation concerning ``target`` (None: everyone); under the lock."""
        self._generation += 1
        self._targets.append((self._generation, target))
        self._cond.notify_all()


class MovedSince:
    """Whom a change of the engine head concerns: the workloads of the moved records that chain
    from the last commit accounted for to the new head (:class:`ringfence.store.base.MovedRecord`).
    Anything it cannot account for — the first look, a new policy, a rebuild, a commit without a
    record, a gap — concerns everyone. Called from the watch thread only."""

    def __init__(
        self,
        moved_after: Callable[[int], list[MovedRecord]],
        published_after: Callable[[int], list[tuple[int, list[str] | None]]] | None = None,
    ) -> None:
        self.moved_after = moved_after
        # the publish workers' records (their bundle pointers moved after compute's commit)
        self.published_after = published_after
        self._cursor: int | None = None  # the last committed revision accounted for
        self._policy: int | None = None
        self._published: int | None = None  # the last publish workers' count accounted for
        self.reads = 0

    def __call__(self, mark: Any) -> frozenset[str] | None:
        head: EngineHead = mark
        published = self._published_since(head)
        moved = self._moved(head)
        if published is None or moved is None:
            return None
        return moved | published

    def _published_since(self, head: EngineHead) -> frozenset[str] | None:
        """Whom the publish workers' records since the last look name (None: everyone). A count
        seen before its record is readable (the worker counts, then writes the record), or a
        record naming nobody in particular, wakes everyone: never a missed wake-up."""
        seen, self._published = self._published, head.published
        if seen is None or head.published < seen:  # the first look, or a count that went back
            return frozenset() if head.published == seen == 0 else None
        if head.published == seen or self.published_after is None:
            return frozenset()
        self.reads += 1
        out: set[str] = set()
        expected = seen + 1
        for count, workloads in self.published_after(seen):
            if count > head.published:
                break
            if count != expected or workloads is None:
                return None
            out.update(workloads)
            expected += 1
        return frozenset(out) if expected == head.published + 1 else None

    def _moved(self, head: EngineHead) -> frozenset[str] | None:
        if self._cursor is None or head.policy_version != self._policy or head.revision < self._cursor:
            return self._anchor(head)
        if head.revision == self._cursor:
            # reserved at the committed revision: a rebuild (versions may all move); else nothing moved
            return frozenset() if head.clean else self._anchor(head)
        self.reads += 1
        out: set[str] = set()
        for rec in self.moved_after(self._cursor):
            if rec.revision > head.revision:
                break  # a later batch's: the look at its head takes it
            if rec.previous != self._cursor or rec.workloads is None:
                return self._anchor(head)
            # written after the batch's pointers: what it names can be read already, even
            # before the head is committed
            out.update(rec.workloads)
            self._cursor = rec.revision
        if head.clean and self._cursor != head.revision:
            return self._anchor(head)  # a commit without a record (or one that expired)
        return frozenset(out)

    def _anchor(self, head: EngineHead) -> frozenset[str] | None:
        self._policy = head.policy_version
        self._cursor = head.revision if head.clean else None
        return None
