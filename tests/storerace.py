"""A concurrent observation landing between an ingest's read of a record and its write (the race
``store_governed`` retries over), made through the real store."""

from __future__ import annotations

from typing import Any

import pytest

from ringfence.store.base import InventoryRecord


def race_a_role_in_before_the_write(
    monkeypatch: pytest.MonkeyPatch, store: Any, s0: InventoryRecord, role: str = "database"
) -> list[str]:
    """The next write of ``s0``'s workload through ``store.observe`` first lets another
    invocation's observation in (``ringfence:role`` = ``role``, timed between ``s0`` and the
    write); returns the role the store held just before that write (filled in when it ran)."""
    real = store.observe
    raced: list[str] = []

    def observe(rec: Any, **kw: Any) -> bool:
        if rec.id == s0.id and not raced:
            t = (rec.observed_at + s0.observed_at) / 2
            tags = {**s0.workload.tags, "ringfence:role": role}
            w1 = s0.workload.model_copy(update={"tags": tags, "observed_at": t})
            s1 = s0.model_copy(update={"workload": w1, "observed_at": t, "labels": {**s0.labels, "role": role}})
            assert real(s1, previous=s0)
            now = store.get(s0.id)
            assert now is not None
            raced.append(now.workload.tags["ringfence:role"])
        return bool(real(rec, **kw))

    monkeypatch.setattr(store, "observe", observe)
    return raced
