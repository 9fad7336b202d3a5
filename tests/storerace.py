"""A concurrent observation landing between an ingest's read of a record and its write (the race
``store_governed`` retries over), made through the real store; a store step failing once, and
the compute messages a local wiring sends (what a failing delivery handed on)."""

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


def fail_once(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str) -> list[str]:
    """``obj.name`` (a store's step: ``claim_once``, ``revoke_tokens``...) raises the first time it
    is called from now on, as a store refusing one request would; the list returned gets an entry
    when it did."""
    real = getattr(obj, name)
    failed: list[str] = []

    def once(*a: Any, **kw: Any) -> Any:
        if not failed:
            failed.append(name)
            raise RuntimeError(f"{name}: the store is unavailable")
        return real(*a, **kw)

    monkeypatch.setattr(obj, name, once)
    return failed


def computed(monkeypatch: pytest.MonkeyPatch, w: Any) -> list[str]:
    """Every workload id a compute message of the local wiring ``w`` names from now on (either lane)."""
    ids: list[str] = []
    real = w.send_compute

    def send(message: dict[str, Any], **kw: Any) -> None:
        ids.extend(message.get("ids") or [])
        real(message, **kw)

    monkeypatch.setattr(w, "send_compute", send)
    return ids


def lanes(monkeypatch: pytest.MonkeyPatch, w: Any) -> list[tuple[bool, list[str]]]:
    """Every compute message of the local wiring ``w`` from now on: (urgent, the ids it names)."""
    sent: list[tuple[bool, list[str]]] = []
    real = w.send_compute

    def send(message: dict[str, Any], *, urgent: bool = False) -> None:
        sent.append((urgent, list(message.get("ids") or [])))
        real(message, urgent=urgent)

    monkeypatch.setattr(w, "send_compute", send)
    return sent


def refuse_first_enqueue(monkeypatch: pytest.MonkeyPatch, w: Any) -> list[list[str]]:
    """The first ``w.enqueue_compute`` from now on raises (compute's queue refusing it); the ids of
    each later one, which goes through, are in the list returned."""
    real = w.enqueue_compute
    sent: list[list[str]] = []
    down = [True]

    def enqueue(ids: Any, *args: Any, **kw: Any) -> Any:
        if down:
            down.clear()
            raise RuntimeError("queue unavailable")
        sent.append(list(ids))
        return real(ids, *args, **kw)

    monkeypatch.setattr(w, "enqueue_compute", enqueue)
    return sent
