"""StoreChanges: the agent API's long-polls woken by a change of the engine head (read by one
thread per process), never missing one that lands between a caller's read and its wait."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

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


# --- targeted wake-ups: a waiter named by its workload wakes for its own change only ----------


def test_a_targeted_waiter_sleeps_through_changes_for_others_and_wakes_for_its_own() -> None:
    head = Head()
    whom: dict[int, frozenset[str] | None] = {2: frozenset({"i-b"}), 3: frozenset({"i-a"})}
    changes = StoreChanges(head, interval=0.02, moved=lambda mark: whom.get(mark))
    got: dict[str, Any] = {}

    def waiter() -> None:
        changes.wait(5, "i-a")  # this thread's first wait: at once
        changes.wait(5, "i-a")  # the watch's first look: everyone
        t0 = time.monotonic()
        got["woke"] = changes.wait(30, "i-a")
        got["after"] = time.monotonic() - t0
        got["head"] = head.value

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)
    head.value = 2  # concerns i-b only
    time.sleep(0.3)
    assert t.is_alive() and "woke" not in got  # slept through it
    head.value = 3  # concerns i-a
    t.join(30)
    assert got["woke"] is True and got["head"] == 3


def test_a_change_for_everyone_wakes_a_targeted_waiter_and_a_missed_one_is_not_lost() -> None:
    head = Head()
    whom: dict[int, frozenset[str] | None] = {2: frozenset({"i-b"}), 3: None}
    changes = StoreChanges(head, interval=0.02, moved=lambda mark: whom.get(mark))
    changes.wait(5, "i-a")
    changes.wait(5, "i-a")  # the watch's first look
    head.value = 2
    assert changes.wait(0.3, "i-a") is False  # not its change
    head.value = 3  # None: whom it concerns is unknown
    assert changes.wait(30, "i-a") is True
    # a change for i-a that lands between this thread's read and its wait: at once
    whom[4] = frozenset({"i-a"})
    got: list[bool] = []
    keep = threading.Thread(target=lambda: got.append(changes.wait(30)))  # keeps the watch looking
    keep.start()
    head.value = 4
    keep.join(30)
    assert got == [True] and changes.wait(30, "i-a") is True


def moved_log(*recs: tuple[int, int, list[str] | None]) -> Any:
    from ringfence.store.base import MovedRecord

    log = [MovedRecord(revision=r, previous=p, workloads=w) for r, p, w in recs]
    return log, lambda after: [m for m in log if m.revision > after]


def test_moved_since_names_the_workloads_of_a_complete_chain_and_everyone_otherwise() -> None:
    from ringfence.control.changes import MovedSince
    from ringfence.store.base import EngineHead, MovedRecord

    log, after = moved_log((5, 0, ["i-a"]))
    since = MovedSince(after)
    assert since(EngineHead(revision=5, policy_version=1)) is None  # the first look anchors
    log.append(MovedRecord(revision=9, previous=5, workloads=["i-b", "i-c"]))
    assert since(EngineHead(revision=9, policy_version=1, clean=False)) == {"i-b", "i-c"}  # reserved: record in
    assert since(EngineHead(revision=9, policy_version=1)) == frozenset()  # its commit: nothing more
    # two commits between looks, both recorded
    log += [
        MovedRecord(revision=12, previous=9, workloads=["i-a"]),
        MovedRecord(revision=15, previous=12, workloads=["i-d"]),
    ]
    assert since(EngineHead(revision=15, policy_version=1)) == {"i-a", "i-d"}
    # a commit without a record (an older compute): everyone, then anchored again
    assert since(EngineHead(revision=20, policy_version=1)) is None
    log.append(MovedRecord(revision=22, previous=20, workloads=["i-a"]))
    assert since(EngineHead(revision=22, policy_version=1)) == {"i-a"}
    # a gap in the chain, a record for everyone, a new policy, a rebuild at the same revision
    log.append(MovedRecord(revision=30, previous=25, workloads=["i-a"]))
    assert since(EngineHead(revision=30, policy_version=1)) is None
    log.append(MovedRecord(revision=31, previous=30, workloads=None))
    assert since(EngineHead(revision=31, policy_version=1)) is None
    assert since(EngineHead(revision=31, policy_version=2)) is None
    assert since(EngineHead(revision=31, policy_version=2, clean=False)) is None
    # the next batch's record, written before its head was read: left for the look at its head
    log += [MovedRecord(revision=33, previous=31, workloads=["i-e"])]
    since2 = MovedSince(after)
    since2(EngineHead(revision=31, policy_version=2))
    assert since2(EngineHead(revision=31, policy_version=2, clean=False)) is None  # a rebuild: everyone
    assert since2(EngineHead(revision=31, policy_version=2)) is None  # re-anchored after it
    assert since2(EngineHead(revision=33, policy_version=2)) == {"i-e"}


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


def test_the_mark_holds_while_nothing_moved_and_is_withheld_when_the_watch_is_not_looking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a cache may be kept on: equal while the head stays, different once the watch sees it
    move, and None whenever a move could go unseen (no watch, a watch gone quiet, closed)."""
    import ringfence.control.changes as changes_mod

    head = Head()
    changes = StoreChanges(head, interval=0.02)
    assert changes.mark() is None, "no watch yet"
    stop = threading.Event()

    def agent() -> None:  # waits again after each answer, as an agent's long-polls do
        while not stop.is_set():
            changes.wait(0.2)

    waiting = threading.Thread(target=agent)
    waiting.start()
    deadline = time.monotonic() + 5
    while changes.mark() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    first = changes.mark()
    assert first is not None
    time.sleep(0.1)
    assert changes.mark() == first, "nothing moved: the same mark"
    head.value = 2
    while changes.mark() == first and time.monotonic() < deadline:
        time.sleep(0.01)
    assert changes.mark() not in (None, first), "the head moved: a new mark"
    # a watch that has not looked for longer than its interval and the grace: no mark
    monkeypatch.setattr(changes_mod, "LOOK_GRACE", -1.0)
    assert changes.mark() is None
    monkeypatch.setattr(changes_mod, "LOOK_GRACE", 1.0)
    stop.set()
    waiting.join(5)
    changes.close()
    assert changes.mark() is None, "closed"
