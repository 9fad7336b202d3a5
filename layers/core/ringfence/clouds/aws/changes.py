"""Waking the agent API's long-polls when published state may have changed, across processes.

Compute runs elsewhere (another Lambda, the local router's thread, another process), so nothing
calls into the agent API when it publishes. Every publication moves the engine head, one small
item in the store (compute reserves it before publishing and commits it after), so one thread per
process reads that item every ``interval`` seconds — only while some request is waiting — and
wakes every waiter when it moved. A waiting agent then costs nothing per poll: before, each one
re-read its bundle pointer and set heads every interval.

Waiters cannot miss a change between reading the store and starting to wait: each thread
remembers the change generation it last saw, and a wait returns at once if the generation moved
since (the caller then reads the store again), as :class:`ringfence.local.wiring.LocalNotifier`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger("ringfence.aws")


class StoreChanges:
    """``wait(seconds)``: True once ``read()`` (e.g. the engine head) returned something else than
    at the previous look, or at once when it moved since this thread's last wait; False after
    ``seconds`` without a change. ``read`` is called from one background thread, at most every
    ``interval`` seconds and only while someone waits (or waited in the last ``linger`` seconds);
    the first look after the thread starts counts as a change (one more store read per waiter,
    never a missed change). ``close()`` stops the watch for good (its owner, the wiring, is done:
    its store may be gone) and wakes every waiter."""

    def __init__(self, read: Callable[[], Hashable], interval: float) -> None:
        self.read = read
        self.interval = interval
        # the watch outlives its last waiter this long: an agent's next long-poll follows its
        # last at once, and a restarted watch costs every waiter one more store read
        self.linger = max(1.0, 5 * interval)
        self._cond = threading.Condition()
        self._generation = 0
        self._waiters = 0
        self._last: Hashable = None
        self._looked = False
        self._watcher: threading.Thread | None = None
        self._seen = threading.local()
        self._closed = threading.Event()
        self.reads = 0  # store reads made (what waiting costs)

    def wait(self, seconds: float) -> bool:
        with self._cond:
            seen: int | None = getattr(self._seen, "generation", None)
            if seen != self._generation:
                self._seen.generation = self._generation
                return True
            self._waiters += 1
            if self._watcher is None and not self._closed.is_set():
                self._watcher = threading.Thread(target=self._watch, name="ringfence-store-changes", daemon=True)
                self._watcher.start()
            try:
                changed = self._cond.wait_for(lambda: self._generation != seen, timeout=max(seconds, 0.0))
            finally:
                self._waiters -= 1
            self._seen.generation = self._generation
            return changed

    def close(self) -> None:
        """Stop the watch (at once, also in the middle of its pause) and wake every waiter; later
        waits only time out. Idempotent."""
        with self._cond:
            self._closed.set()
            watcher = self._watcher
            self._generation += 1  # a waiter re-reads the store itself (and meets what is there)
            self._cond.notify_all()
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
                    self._generation += 1
                    self._cond.notify_all()
                    self._looked = False
            else:
                with self._cond:
                    self.reads += 1
                    # the first look after a start has nothing to compare with: a waiter may have
                    # read the store just before a change this look already includes
                    if not self._looked or now != self._last:
                        self._generation += 1
                        self._cond.notify_all()
                    self._last, self._looked = now, True
            self._closed.wait(self.interval)  # a pause that close() cuts short
