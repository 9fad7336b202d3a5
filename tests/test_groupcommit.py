"""GroupCommit: queued items share one write, and each caller gets its own item's outcome."""

from __future__ import annotations

import threading

import pytest

from ringfence.groupcommit import GroupCommit


class _HeldWrites:
    """A write function whose first write waits until released; it doubles each item, and refuses
    negative ones."""

    def __init__(self, outcomes_short: bool = False) -> None:
        self.writes: list[list[int]] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self.outcomes_short = outcomes_short

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.writes.append(items)
        if len(self.writes) == 1:
            self.entered.set()
            assert self.release.wait(10)
        out: list[int | BaseException] = [ValueError(f"{i} refused") if i < 0 else 2 * i for i in items]
        return out[:-1] if self.outcomes_short and len(self.writes) > 1 else out


def _behind_a_held_write(writes: _HeldWrites, items: list[int]) -> dict[int, int | Exception]:
    group: GroupCommit[int, int] = GroupCommit(writes)
    got: dict[int, int | Exception] = {}

    def one(i: int) -> None:
        try:
            got[i] = group.commit(i)
        except Exception as exc:
            got[i] = exc

    first = threading.Thread(target=one, args=(items[0],))
    first.start()
    assert writes.entered.wait(10)
    others = [threading.Thread(target=one, args=(i,)) for i in items[1:]]
    for t in others:
        t.start()
    while group.queued < len(others):
        threading.Event().wait(0.01)
    writes.release.set()
    for t in [first, *others]:
        t.join(10)
    assert group.writes == len(writes.writes)
    return got


def test_each_caller_gets_its_own_items_outcome() -> None:
    writes = _HeldWrites()
    got = _behind_a_held_write(writes, [1, 2, -3, 4])
    assert len(writes.writes) == 2 and sorted(writes.writes[1]) == [-3, 2, 4], "the queued went together"
    assert {k: v for k, v in got.items() if k != -3} == {1: 2, 2: 4, 4: 8}
    assert isinstance(got[-3], ValueError) and str(got[-3]) == "-3 refused"


def test_a_write_that_answers_for_fewer_items_fails_every_item_it_held() -> None:
    got = _behind_a_held_write(_HeldWrites(outcomes_short=True), [1, 2, 3])
    assert got[1] == 2
    for i in (2, 3):
        assert isinstance(got[i], RuntimeError) and "1 outcomes for 2 items" in str(got[i])


def test_a_lone_commit_writes_at_once() -> None:
    group: GroupCommit[int, int] = GroupCommit(lambda items: [i + 1 for i in items])
    assert group.commit(1) == 2 and group.writes == 1
    with pytest.raises(ZeroDivisionError):
        GroupCommit[int, int](lambda items: [1 // 0]).commit(1)
