"""Group commit for queue messages: threads that send at the same time share one send.

Why: the compute queue is FIFO with one message group, and Lambda hands compute at most ten
messages per invocation, so every message is a slice of one serialized worker's time. When a
fleet enrolls at once, each of ``ringfence serve``'s request threads asked compute for its own
instance: 49 one-id messages in a 50-instance scale-out, five compute runs of queueing. With
:class:`GroupSend`, a thread whose message finds a send in flight waits for it, and the next
send carries every message that queued meanwhile, merged where they can be. Nothing is delayed
when nobody else sends (the first sender sends at once), and nothing is lost: each caller
returns only once a send that carried its message succeeded, and gets that send's error if it
failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ringfence.groupcommit import GroupCommit

Message = dict[str, Any]


class GroupSend:
    """``send(message)`` from any thread: ``deliver`` is called with ``merge(queued messages)``
    (one list, in the order the messages came) by one thread at a time (a
    :class:`~ringfence.groupcommit.GroupCommit` of messages)."""

    def __init__(self, deliver: Callable[[list[Message]], None], merge: Callable[[list[Message]], list[Message]]):
        self.deliver = deliver
        self.merge = merge
        self._group: GroupCommit[Message, None] = GroupCommit(self._write)

    def _write(self, messages: list[Message]) -> list[None]:
        self.deliver(self.merge(messages))
        return [None] * len(messages)

    @property
    def sends(self) -> int:
        """Deliveries made (what grouping saved: messages sent minus this)."""
        return self._group.writes

    @property
    def queued(self) -> int:
        """Messages waiting for the send in flight to finish."""
        return self._group.queued

    def send(self, message: Message) -> None:
        self._group.commit(message)


# the fields of a compute message that merge by union; any other field set makes a message
# travel alone (a lifecycle action, a rebuild, a refresh: each keeps its own message and place)
_UNION = ("ids", "publish", "enforced")
_QUIET: dict[str, Any] = {"rebuild": False, "lifecycle": None, "refresh": False, "lifecycles": []}


def merge_compute(messages: list[Message]) -> list[Message]:
    """Compute messages as fewer: consecutive plain ones (workloads to take in, bundles to
    re-render, agents that now enforce) become one with the union of each list, in order; any
    other message stays whole and keeps its place among them. Compute takes a batch's messages
    together, so the merged message asks exactly what the separate ones did."""
    out: list[Message] = []
    last_plain = False
    for m in messages:
        plain = all(m.get(k, v) == v for k, v in _QUIET.items()) and set(m) <= set(_UNION) | set(_QUIET)
        if plain and last_plain:
            for k in _UNION:
                if m.get(k):
                    out[-1][k] = list(dict.fromkeys([*out[-1].get(k, []), *m[k]]))
            continue
        out.append(dict(m))
        last_plain = plain
    return out
