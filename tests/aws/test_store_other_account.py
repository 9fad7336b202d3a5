"""The store contract for accounts, DynamoStore (moto server) and SqliteStore alike: an observation
of one account (AWS account, Azure subscription, GCP project) never replaces the record of a
workload stored under another (:func:`ringfence.store.base.other_account`), checked with the
write itself, so a caller that read nothing, or read before the other account's record landed,
is refused too."""

from __future__ import annotations

import pytest

from ringfence.model import Workload
from ringfence.store.base import UNREAD, InventoryRecord, OtherAccount, Store
from ringfence.store.dynamodb import DynamoStore
from tests.aws.test_store import WID, store

__all__ = ["store"]  # the fixture (both stores), used by name

B, A = "123456789012", "210987654321"


def seen(
    t: float, account: str | None, state: str = "running", cloud: str = "aws", ips: str = "10.0.0.1"
) -> InventoryRecord:
    w = Workload(id=WID, ips=[ips] if state != "terminated" else [], cloud=cloud, account=account, region="r")  # type: ignore[arg-type]
    return InventoryRecord(id=WID, workload=w, state=state, observed_at=t)


def test_attack_neither_store_replaces_a_workload_with_another_accounts_observation(store: Store) -> None:
    assert store.observe(seen(10, B))
    stored = store.get(WID)
    for rec in (seen(20, A, "terminated"), seen(20, A, ips="10.9.9.9")):
        # as read (previous), unread, and read as absent: the write's own check refuses it too
        for previous in (stored, UNREAD, None):
            with pytest.raises(OtherAccount, match=f"of account {A} refused: the workload is stored under account {B}"):
                store.observe(rec, previous=previous)
            assert store.get(WID) == stored, (rec.state, previous)
        with pytest.raises(OtherAccount):
            store.observe_many([rec])
        assert store.get(WID) == stored

    # the workload's own account still changes it and ends it
    assert store.observe(seen(30, B, ips="10.0.0.2"), previous=store.get(WID))
    assert store.observe(seen(40, B, "terminated"))
    gone = store.get(WID)
    assert gone is not None and gone.state == "terminated" and gone.workload.account == B
    with pytest.raises(OtherAccount):  # another account's tombstone changes no tombstone either
        store.observe(seen(50, A, "terminated"))
    # a live observation in another account replaces the tombstone: the cloud gave the id there now
    assert store.get(WID) == gone
    assert store.observe(seen(60, A).model_copy(update={"governed_rev": gone.governed_rev}), previous=gone)
    now = store.get(WID)
    assert now is not None and now.state == "running" and now.workload.account == A
    with pytest.raises(OtherAccount):
        store.observe(seen(70, B, "terminated"))


def test_accounts_compare_without_case_and_a_record_without_one_is_anyones(store: Store) -> None:
    sub = "0A1B2C3D-0000-4000-8000-00000000ABCD"  # an Azure subscription, as ARM may spell it
    assert store.observe(seen(10, sub, cloud="azure"))
    assert store.observe(seen(20, sub.lower(), "terminated", cloud="azure"))
    assert store.get(WID).state == "terminated"  # type: ignore[union-attr]

    store2_id = "dc1-db-1"  # on-premise: no account, written and ended as ever
    w = Workload(id=store2_id, ips=["192.168.10.5"], cloud="onprem")
    assert store.observe(InventoryRecord(id=store2_id, workload=w, state="running", observed_at=1))
    gone = w.model_copy(update={"ips": []})
    assert store.observe(InventoryRecord(id=store2_id, workload=gone, state="terminated", observed_at=2))
    assert store.get(store2_id).state == "terminated"  # type: ignore[union-attr]


def test_an_item_stored_before_accounts_were_kept_beside_it_is_judged_from_its_document(store: Store) -> None:
    """DynamoDB keeps the account beside the workload's document for its condition; an item
    written before it was (an upgrade) has none there and is judged from the document read."""
    assert store.observe(seen(10, B))
    if isinstance(store, DynamoStore):
        store.inventory.update_item(Key={"id": WID}, UpdateExpression="REMOVE account")
        assert "account" not in store.inventory.get_item(Key={"id": WID})["Item"]
    with pytest.raises(OtherAccount):
        store.observe(seen(20, A, "terminated"))
    assert store.get(WID).state == "running"  # type: ignore[union-attr]
    assert store.observe(seen(30, B, ips="10.0.0.3"), previous=store.get(WID))  # its own account: kept again
    if isinstance(store, DynamoStore):
        assert store.inventory.get_item(Key={"id": WID})["Item"]["account"] == B
