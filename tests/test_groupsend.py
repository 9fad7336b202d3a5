"""GroupSend: concurrent senders share one delivery; nobody returns before its message is sent."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from ringfence.control.groupsend import GroupSend, merge_compute


def _plain(*ids: str, **more: Any) -> dict[str, Any]:
    return {"ids": list(ids), "rebuild": False, "lifecycle": None, "publish": [], **more}


class _Recorder:
    """A deliver function whose first delivery blocks until released, so others queue behind it."""

    def __init__(self, fail_first: bool = False) -> None:
        self.delivered: list[list[dict[str, Any]]] = []
        self.in_first = threading.Event()
        self.release = threading.Event()
        self.fail_first = fail_first
        self._lock = threading.Lock()

    def __call__(self, messages: list[dict[str, Any]]) -> None:
        with self._lock:
            first = not self.delivered
            self.delivered.append(messages)
        if first:
            self.in_first.set()
            assert self.release.wait(10)
            if self.fail_first:
                raise ConnectionError("queue unreachable")

    def ids(self) -> list[str]:
        return [i for group in self.delivered for m in group for i in m["ids"]]


def test_a_lone_sender_delivers_its_message_at_once() -> None:
    sent: list[list[dict[str, Any]]] = []
    group = GroupSend(sent.append, merge_compute)
    group.send(_plain("i-1"))
    assert sent == [[_plain("i-1")]]


def test_senders_that_queue_behind_a_send_go_out_together_and_return_only_once_sent() -> None:
    rec = _Recorder()
    group = GroupSend(rec, merge_compute)
    returned: dict[str, int] = {}  # id → deliveries made when its sender returned

    def send(iid: str) -> None:
        group.send(_plain(iid))
        returned[iid] = len(rec.delivered)

    first = threading.Thread(target=send, args=("i-0",))
    first.start()
    assert rec.in_first.wait(10)
    others = [threading.Thread(target=send, args=(f"i-{n}",)) for n in range(1, 6)]
    for t in others:
        t.start()
    # every other sender is queued behind the first delivery, none has returned
    while group.queued < 5:
        threading.Event().wait(0.01)
    assert returned == {}
    rec.release.set()
    for t in [first, *others]:
        t.join(10)
    assert len(rec.delivered) == 2, "the five queued messages went out in one delivery"
    (merged,) = rec.delivered[1]  # one message: queue order is the threads', so compare sorted
    assert sorted(merged["ids"]) == [f"i-{n}" for n in range(1, 6)]
    assert sorted(rec.ids()) == [f"i-{n}" for n in range(6)], "nothing lost, nothing twice"
    assert returned["i-0"] >= 1 and all(returned[f"i-{n}"] == 2 for n in range(1, 6))
    assert group.sends == 2


def test_a_failed_delivery_fails_every_sender_it_carried_and_the_next_send_works() -> None:
    rec = _Recorder(fail_first=True)
    group = GroupSend(rec, merge_compute)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            group.send(_plain("i-1"))
        except ConnectionError as exc:
            errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    assert rec.in_first.wait(10)
    rec.release.set()
    t.join(10)
    assert [str(e) for e in errors] == ["queue unreachable"]
    group.send(_plain("i-2"))  # the group is usable again
    assert rec.delivered[-1] == [_plain("i-2")]


def test_merge_keeps_lifecycle_and_rebuild_messages_whole_and_in_place() -> None:
    lc = {"instance_id": "i-9", "transition": "autoscaling:EC2_INSTANCE_LAUNCHING"}
    merged = merge_compute(
        [
            _plain("i-1"),
            _plain("i-2", "i-1", enforced=["i-7"]),
            _plain("i-3", lifecycle=lc),
            _plain("i-4", publish=["i-4"]),
            _plain(rebuild=True),
            _plain("i-5"),
        ]
    )
    assert merged == [
        _plain("i-1", "i-2", enforced=["i-7"]),
        _plain("i-3", lifecycle=lc),
        _plain("i-4", publish=["i-4"]),
        _plain(rebuild=True),
        _plain("i-5"),
    ]


@pytest.mark.parametrize("extra", [{"refresh": True}, {"lifecycles": [{"instance_id": "i-1"}]}, {"other": 1}])
def test_merge_never_folds_a_message_with_anything_but_the_plain_fields(extra: dict[str, Any]) -> None:
    assert merge_compute([_plain("i-0"), _plain("i-1", **extra)]) == [_plain("i-0"), _plain("i-1", **extra)]
