"""A deregistered on-premise id registered again, over DynamoDB (moto), through the admin routes'
service (OnPremAdmin) over a DynamoStore: the old host's mode and quarantine (the record's
``op_mode`` and the ``quarantine`` state item) are cleared in the transaction that writes the new
record, on the condition that the record is still the tombstone read. Before, they were cleared
ahead of the write, unconditionally: an import then refused "nothing imported" (a row too large
for one transaction) had cleared them and counted SafeguardsLowered, and a registration decided
from a stale read cleared the quarantine of a host registered meanwhile."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.admin import SAFEGUARDS_LOWERED
from ringfence.local.wiring import LocalWiring
from ringfence.model import Mode
from ringfence.store.dynamodb import QUARANTINE, DynamoStore
from tests.aws.test_store import make_dynamo

TAGS = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}
SPEC = {"id": "x1", "ips": ["10.90.0.1"], "tags": TAGS}


@pytest.fixture
def w(moto_url: str, tmp_path: Path) -> Iterator[LocalWiring]:
    wiring = LocalWiring(tmp_path / "state.db", store=make_dynamo(moto_url), start=False)
    yield wiring
    wiring.close()


def _quarantine_item(w: LocalWiring) -> bool:
    store = w.store
    assert isinstance(store, DynamoStore)
    return "Item" in store.state.get_item(Key={"pk": QUARANTINE, "sk": "x1"}, ConsistentRead=True)


def _deregistered_idle_quarantined(w: LocalWiring) -> tuple[OnPremAdmin, list[str]]:
    lowered: list[str] = []
    a = OnPremAdmin(w)
    a.metric = lambda name, value: lowered.append(name) if name == SAFEGUARDS_LOWERED else None
    assert a.register_workload("otto", SPEC).status == 201
    assert a.set_mode("paula", "x1", Mode.IDLE, "old box").status == 200
    assert a.quarantine("ivy", "x1", True, "IR-7").status == 200
    assert a.deregister_workload("otto", "x1", "decommissioned").status == 200
    lowered.clear()  # the idle above counted
    return a, lowered


def test_attack_refused_import_leaves_the_tombstones_operator_state_ddb(w: LocalWiring) -> None:
    a, lowered = _deregistered_idle_quarantined(w)
    big = " ".join(f"10.91.{i // 250}.{i % 250 + 1}" for i in range(150))  # more than one transaction takes
    r = a.import_cmdb("otto", f"id,ips\nx1,10.90.0.9\nhuge,{big}\n", "c.csv", "nightly")
    assert r.status == 400 and "nothing imported" in r.body["error"], r.body
    rec = w.store.get("x1")
    assert rec is not None and rec.state == "terminated"
    assert rec.op_mode is Mode.IDLE and rec.op_quarantined and _quarantine_item(w), (
        "a refused import cleared the tombstone's mode or quarantine"
    )
    assert lowered == [], "a refused import counted SafeguardsLowered"
    actions = [x.action for x in w.store.audit_log() if x.action.startswith("workload.import")]
    assert actions == ["workload.import", "workload.import.failed"]

    # registered again for real: cleared with the write, counted once
    r = a.register_workload("otto", {**SPEC, "ips": ["10.90.0.9"]}, "new box")
    assert r.status == 200, r.body
    rec = w.store.get("x1")
    assert rec is not None and rec.state == "running" and rec.op_mode is None and not rec.op_quarantined
    assert not _quarantine_item(w)
    assert lowered == [SAFEGUARDS_LOWERED]


def test_attack_stale_reregistration_keeps_the_live_hosts_quarantine_ddb(w: LocalWiring) -> None:
    a, lowered = _deregistered_idle_quarantined(w)
    b = OnPremAdmin(w)
    read: Callable[[], Any] = a._governing
    done: list[int] = []

    def then() -> Any:  # after A read the tombstone: B registers the id, ivy quarantines, paula enforces
        if not done:
            done.append(1)
            assert b.register_workload("cmdb-sync", SPEC).status == 200
            assert b.quarantine("ivy", "x1", True, "INC-1 compromised").status == 200
            assert b.set_mode("paula", "x1", Mode.ENFORCE, "CHG-9").status == 200
        return read()

    a._governing = then  # type: ignore[method-assign]
    r = a.import_cmdb("otto", "id,ips\nx1,10.90.0.1\n", "c.csv", "nightly")
    rec = w.store.get("x1")
    assert rec is not None and rec.state == "running"
    assert rec.op_quarantined and _quarantine_item(w), "a stale import released the live host's quarantine"
    assert rec.op_mode is Mode.ENFORCE, f"a stale import cleared the live host's mode ({rec.op_mode})"
    assert r.status == 409, r.body
    assert lowered == []


def test_attack_a_quarantine_released_before_the_reregistration_lands_is_not_counted_as_its_lowering_ddb(
    w: LocalWiring,
) -> None:
    """The registration read the tombstone quarantined; an incident responder releases it before
    the registration's transaction. Over DynamoDB the write landed anyway and recorded clearing a
    quarantine it never cleared (SafeguardsLowered counted, ``operator_cleared`` naming it), where
    SQLite refuses (its check compares the quarantine inside the transaction). Both refuse now:
    409, nothing written, nothing counted."""
    a, lowered = _deregistered_idle_quarantined(w)
    store = w.store
    assert isinstance(store, DynamoStore)
    write = store._observe_group
    done: list[int] = []

    def released_first(*args: Any) -> Any:  # between observe_addressed's read and its transaction
        if not done:
            done.append(1)
            store.set_operator("x1", quarantined=False)
        return write(*args)

    store._observe_group = released_first  # type: ignore[method-assign]
    r = a.register_workload("otto", {**SPEC, "ips": ["10.90.0.7"]}, "new box")
    assert done, "the transaction was reached"
    rec = w.store.get("x1")
    assert rec is not None
    assert r.status == 409, (r.status, r.body, rec.state)
    assert rec.state == "terminated" and rec.op_mode is Mode.IDLE
    assert lowered == [], "counted a lowering the registration did not make"


def test_a_reregistration_too_large_for_one_transaction_says_the_quarantine_clear_is_one_item_ddb(
    w: LocalWiring,
) -> None:
    a, _ = _deregistered_idle_quarantined(w)
    ips = [f"10.92.0.{i + 1}" for i in range(99)]  # 1 record + 99 claims + the quarantine item's delete
    r = a.register_workload("otto", {**SPEC, "ips": ips}, "new box")
    assert r.status == 400, r.body
    assert "registered again takes one item more" in str(r.body), r.body
