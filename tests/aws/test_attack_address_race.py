"""The on-premise one-owner races over DynamoDB (moto server): ``ringfence serve``'s admin routes
over a LocalWiring whose store is a DynamoStore, two servers with a store each over the same
tables, as two admin processes (or two instances of the AWS admin function, which serves the same
routes) would be: the store's claims (``addrowner#<ip>``) are what any host of these routes over
DynamoDB relies on. Also: a record stored before the claims, a claim left behind,
releases, and a CMDB file swapping addresses between two of its workloads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.wiring import LocalWiring
from ringfence.model import Workload
from ringfence.store.base import InventoryRecord
from ringfence.store.dynamodb import CLAIM, DynamoStore
from tests.aws.test_store import make_dynamo
from tests.onprem.test_attack_address_race import TAGS, Admin, owners, race_new_registrations, race_readdress, serving


@pytest.fixture
def wirings(moto_url: str, tmp_path: Path) -> Iterator[tuple[LocalWiring, LocalWiring]]:
    first = make_dynamo(moto_url)
    assert isinstance(first, DynamoStore)
    second = DynamoStore("rf-inventory", "rf-state", "rf-audit", resource=first.ddb)
    a = LocalWiring(tmp_path / "a" / "state.db", store=first, start=False)
    b = LocalWiring(tmp_path / "b" / "state.db", store=second, start=False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def admins(wirings: tuple[LocalWiring, LocalWiring], tmp_path: Path) -> Iterator[tuple[Admin, Admin]]:
    a, b = wirings
    first = serving(a, tmp_path / "a")
    second = serving(b, tmp_path / "b")
    yield next(first), next(second)
    for gen in (first, second):
        gen.close()


def test_attack_two_registrations_racing_for_one_address_leave_one_owner_on_dynamodb(
    admins: tuple[Admin, Admin],
) -> None:
    """Two admin servers over one set of tables each register a new workload with one address
    at the same moment: one lands, the other gets the sequential check's 409 naming the address
    and the winner (the claim's conditional put lost). Before: both were written."""
    race_new_registrations(*admins)


@pytest.mark.slow
def test_attack_a_readdress_racing_a_registration_leaves_one_owner_on_dynamodb(admins: tuple[Admin, Admin]) -> None:
    """A workload registered again with a new address on one server while another server
    registers a new workload with that address: one lands; the address given up is released."""
    race_readdress(*admins)


def _claim(store: DynamoStore, ip: str) -> str | None:
    item = store.state.get_item(Key={"pk": CLAIM + ip, "sk": "owner"}, ConsistentRead=True).get("Item")
    return str(item["owner"]) if item else None


def test_claims_are_released_taken_over_when_left_behind_and_records_before_them_still_count(
    wirings: tuple[LocalWiring, LocalWiring],
) -> None:
    """A record stored before claims existed (no claim) still refuses its address (the inventory
    read) and gets its claims when registered again; a re-address and a deregistration release
    theirs; a claim whose owner no longer holds the address (left behind) is taken over; a CMDB
    file swapping two of its workloads' addresses lands (both records and claims in one
    transaction)."""
    w, _ = wirings
    store = w.store
    assert isinstance(store, DynamoStore)
    admin = OnPremAdmin(w)
    old = Workload(id="legacy", ips=["10.80.0.1"], tags=TAGS, cloud="onprem")
    store.observe(InventoryRecord(id=old.id, workload=old, observed_at=1.0))
    r = admin.register_workload("otto", {"id": "intruder", "ips": ["10.80.0.1"], "tags": TAGS})
    assert r.status == 409 and "10.80.0.1 is held by workload legacy" in r.body["detail"], r.body
    assert _claim(store, "10.80.0.1") is None
    assert admin.register_workload("otto", {"id": "legacy", "ips": ["10.80.0.1"], "tags": TAGS}).status == 200
    assert _claim(store, "10.80.0.1") == "legacy"

    assert admin.register_workload("otto", {"id": "legacy", "ips": ["10.80.0.2"], "tags": TAGS}).status == 200
    assert _claim(store, "10.80.0.1") is None and _claim(store, "10.80.0.2") == "legacy"
    assert admin.deregister_workload("otto", "legacy").status == 200
    assert _claim(store, "10.80.0.2") is None

    store.state.put_item(Item={"pk": CLAIM + "10.80.0.3", "sk": "owner", "owner": "gone"})
    assert admin.register_workload("otto", {"id": "fresh", "ips": ["10.80.0.3"], "tags": TAGS}).status == 201
    assert _claim(store, "10.80.0.3") == "fresh"

    header = "id,ips,ringfence:role,ringfence:app,ringfence:env,ringfence:loc\n"
    csv = header + "sw-a,10.80.1.1,web,shop,prod,ca\nsw-b,10.80.1.2,web,shop,prod,ca\n"
    assert admin.import_cmdb("otto", csv, "one.csv").status == 200
    swapped = header + "sw-a,10.80.1.2,web,shop,prod,ca\nsw-b,10.80.1.1,web,shop,prod,ca\n"
    r = admin.import_cmdb("otto", swapped, "two.csv")
    assert r.status == 200, r.body
    assert owners(store, "10.80.1.1") == ["sw-b"] and owners(store, "10.80.1.2") == ["sw-a"]
    assert _claim(store, "10.80.1.1") == "sw-b" and _claim(store, "10.80.1.2") == "sw-a"
