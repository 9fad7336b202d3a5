"""StoreChanges: the agent API's long-polls woken by a change of the engine head (read by one
thread per process), never missing one that lands between a caller's read and its wait."""

from __future__ import annotations

import threading
import time
from typing import Any

from ringfence.control.changes import StoreChanges


class Head:
    """The value the watch reads (the engine head in the wiring), counting reads."""

    def __init__(self) -> None:
        self.value = 1
        self.reads = 0
        self.read_once = threading.Event()

    def __call__(self) -> int:
        self.reads += 1
        self.read_once.set()
        return self.value


def test_a_waiter_wakes_when_the_head_moves_and_not_before() -> None:
    head = Head()
    changes = StoreChanges(head, interval=0.02)
    assert changes.wait(5)  # a thread's first wait: a change may have happened before it
    assert changes.wait(5)  # the watch's first look counts as a change (a read just before it)
    assert not changes.wait(0.3)  # nothing moved: the timeout
    got: dict[str, Any] = {}
    first = threading.Event()

    def waiter() -> None:
        got["first"] = changes.wait(60)  # a new thread's first wait returns at once
        first.set()
        got["woke"] = changes.wait(60)

    t = threading.Thread(target=waiter)
    t.start()
    assert first.wait(30) and got["first"] is True
    t.join(0.5)
    assert t.is_alive() and "woke" not in got  # the head did not move: still waiting
    head.value = 2
    t.join(30)
    assert not t.is_alive() and got["woke"] is True


def test_a_change_between_reading_and_waiting_is_not_missed() -> None:
    head = Head()
    changes = StoreChanges(head, interval=0.02)
    changes.wait(5)
    changes.wait(5)
    ready = threading.Event()
    got: dict[str, bool] = {}

    def other() -> None:  # keeps the watch running while this thread is between read and wait
        changes.wait(0)
        ready.set()
        got["other"] = changes.wait(30)

    t = threading.Thread(target=other)
    t.start()
    ready.wait(5)
    head.value = 2  # lands after this thread's "read", before it waits
    t.join(30)
    assert got["other"] is True
    assert changes.wait(30) is True  # the generation moved since this thread's last wait: at once


def test_nobody_waiting_nothing_read_and_many_waiters_share_one_watch() -> None:
    head = Head()
    changes = StoreChanges(head, interval=0.05)
    threading.Event().wait(0.2)
    assert head.reads == 0  # nobody waits: nothing is read
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.extend([changes.wait(1), changes.wait(1)])) for _ in range(20)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - t0
    assert len(results) == 40
    # one watch for all 20 waiters: at most a read per interval, however many wait
    assert 1 <= head.reads <= elapsed / 0.05 + 2
    for _ in range(100):  # the watch notices nobody waits any more and stops
        if changes._watcher is None:
            break
        threading.Event().wait(0.05)
    stopped = head.reads
    threading.Event().wait(0.3)
    assert changes._watcher is None and head.reads == stopped
