"""StoreChanges: the agent API's long-polls woken by a change of the engine head (read by one
thread per process), never missing one that lands between a caller's read and its wait."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from ringfence.clouds.aws.changes import StoreChanges


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


def test_close_stops_the_watch_at_once_and_wakes_the_waiters() -> None:
    """The wiring's owner is done (serve stopping, a test's moto going away): the watch stops in
    the middle of its pause, not after it, reads nothing more, and logs nothing about a store
    that is gone; a waiter wakes instead of sitting out its timeout."""
    head = Head()
    changes = StoreChanges(head, interval=60)  # a pause far longer than this test may take
    changes.wait(5)
    got: dict[str, bool] = {}
    waiting = threading.Event()

    def waiter() -> None:
        changes.wait(0)  # started the watch, which read once and now pauses for 60 s
        waiting.set()
        got["woke"] = changes.wait(60)

    t = threading.Thread(target=waiter)
    t.start()
    assert waiting.wait(30) and head.read_once.wait(30)
    watcher = changes._watcher
    assert watcher is not None and watcher.is_alive()
    reads = head.reads
    changes.close()
    t.join(30)
    assert not t.is_alive() and got["woke"] is True  # woken, not timed out after 60 s
    watcher.join(30)
    assert not watcher.is_alive() and changes._watcher is None
    assert changes.wait(0.1)  # this thread's generation moved (the close): it re-reads the store itself
    assert not changes.wait(0.1) and changes._watcher is None  # closed: a wait starts no new watch
    assert head.reads == reads
    changes.close()  # twice is fine


def test_a_read_failing_after_close_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    """The store went away during the watch's last read (moto stopped, then the wiring closed):
    the failure is the expected end, not a warning."""
    entered, release = threading.Event(), threading.Event()

    def read() -> int:
        entered.set()
        release.wait(30)
        raise ConnectionError("the store is gone")

    changes = StoreChanges(read, interval=0.01)
    t = threading.Thread(target=lambda: (changes.wait(0), changes.wait(30)))  # the second starts the watch
    t.start()
    assert entered.wait(30)
    watcher = changes._watcher
    assert watcher is not None
    with caplog.at_level(logging.DEBUG, logger="ringfence.aws"):
        closer = threading.Thread(target=changes.close)
        closer.start()  # joins the watch, which is inside its read
        for _ in range(100):
            if changes._closed.is_set():
                break
            threading.Event().wait(0.01)
        release.set()
        closer.join(30)
        watcher.join(30)
    t.join(30)
    assert not watcher.is_alive() and not t.is_alive()
    assert "reading the store for changes failed" not in caplog.text
