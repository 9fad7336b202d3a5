"""The old host's credentials dropped by a re-registration, over DynamoDB (moto): only while the id
is still the tombstone read, each transaction conditional on it (the SQLite race and its story:
tests/onprem/test_attack_reregister_credential_race.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.api import secret_hash
from ringfence.control.credentials import agent_key_id
from ringfence.local.wiring import LocalWiring
from ringfence.store.base import OldHostRetirement
from ringfence.store.dynamodb import DynamoStore
from tests.aws.test_pipeline import AgentKey
from tests.aws.test_store import make_dynamo
from tests.onprem.conftest import signing_key_file
from tests.onprem.test_attack_pairing_keys import WID, Plane
from tests.onprem.test_attack_reregister_credential_race import (
    SPEC,
    _import,
    _register,
    stale_registration_meets_a_live_host,
)


@pytest.fixture
def w(moto_url: str, tmp_path: Path) -> Iterator[LocalWiring]:
    wiring = LocalWiring(
        tmp_path / "state" / "state.db", store=make_dynamo(moto_url), signing_key=signing_key_file(tmp_path)
    )
    yield wiring
    wiring.close()


def test_attack_stale_reregistration_leaves_the_live_hosts_credentials_ddb(
    w: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_registration_meets_a_live_host(w, monkeypatch, _register)


def test_attack_stale_reimport_leaves_the_live_hosts_credentials_ddb(
    w: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_registration_meets_a_live_host(w, monkeypatch, _import)


def test_a_reregistration_drops_more_pairing_keys_than_one_transaction_takes_ddb(w: LocalWiring) -> None:
    """A token, a bound key and 120 pairing keys left on the tombstone (what pairings in flight
    across the deregistration leave; 240 items with their index): all gone with the registration,
    the token's revocation recorded once."""
    plane = Plane(w)
    plane.register()
    assert plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"})[0] == 200
    old = AgentKey()
    w.store.bind_agent_key(WID, old.pem, replace=True)
    w.store.put_token(secret_hash("left-token"), WID, ttl=600, agent_key=agent_key_id(old.pem))
    for i in range(120):
        w.store.put_pairing(f"left-{i}", WID, uses=1, ttl=600)
    revocations = sum(x.action == "token.revoke" for x in w.store.audit_log())

    r = OnPremAdmin(w).register_workload("otto", SPEC, "new box")
    assert r.status == 200, r.body
    assert w.store.active_token(WID) is None and w.store.agent_key(WID) is None
    assert not any(w.store.use_pairing(f"left-{i}", WID, agent_key=AgentKey().pem) for i in range(120))
    assert sum(x.action == "token.revoke" for x in w.store.audit_log()) == revocations + 1
    status, body = plane.pair(plane.mint(uses=1), AgentKey())
    assert status == 200 and plane.bundle(body["token"]) == 200, body


def test_an_old_host_retirement_over_another_registration_drops_nothing_ddb(w: LocalWiring) -> None:
    """The store's own refusal: a retirement decided from a tombstone no longer stored (the id
    registered again) drops nothing, however many transactions it takes."""
    plane = Plane(w)
    plane.register()
    assert plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"})[0] == 200
    tomb = w.store.get(WID)
    assert tomb is not None and tomb.state == "terminated"
    plane.register()  # registered again: the live host pairs
    for i in range(60):
        w.store.put_pairing(f"live-{i}", WID, uses=1, ttl=600)
    key = AgentKey()
    status, body = plane.pair(plane.mint(uses=1), key)
    assert status == 200, body
    store = w.store
    assert isinstance(store, DynamoStore)
    with pytest.raises(Exception, match="registered or deregistered again"):
        store.retire_old_host(OldHostRetirement(WID, tomb.observed_at, None))
    assert plane.bundle(body["token"]) == 200
    assert store.agent_key(WID) == key.pem
    assert store.use_pairing("live-59", WID, agent_key=key.pem) and store.use_pairing("live-0", WID, agent_key=key.pem)


def test_an_old_host_retirement_over_a_token_expired_within_the_second_drops_it_ddb(w: LocalWiring) -> None:
    """A token left on the tombstone that expired less than a second ago reads as none (its whole
    ttl is below the time read): the retirement's condition agrees (before, compared with the
    time's whole second, it found the token still there and refused every retry in that second)."""
    plane = Plane(w)
    plane.register()
    assert plane.call(plane.admin, "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"})[0] == 200
    tomb = w.store.get(WID)
    assert tomb is not None and tomb.state == "terminated"
    store = w.store
    assert isinstance(store, DynamoStore)
    while not 0.05 < time.time() % 1 < 0.4:  # early in a second: the retirement lands within it
        time.sleep(0.02)
    store.put_token(secret_hash("left-token"), WID, ttl=0)  # its ttl the whole second just begun
    assert store.active_token(WID) is None  # expired as read
    store.retire_old_host(OldHostRetirement(WID, tomb.observed_at, None))
    assert store.state.get_item(Key={"pk": f"tokenof#{WID}", "sk": "token"}).get("Item") is None
