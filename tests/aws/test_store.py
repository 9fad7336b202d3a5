"""The store contract: DynamoStore (moto server) and SqliteStore are held to the same behaviour.

Every test here runs against both. The races at the end run on SQLite only, across threads and
across processes: moto serialises requests itself, so a race against it proves nothing about
DynamoDB (whose conditional writes are atomic by contract).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from ringfence.audit import verify
from ringfence.model import Mode, Workload
from ringfence.store.base import (
    UNREAD,
    AuditRecord,
    BundlePointer,
    ConflictError,
    DeltaPointer,
    EngineHead,
    GovernanceMoved,
    Grant,
    InventoryRecord,
    PolicyVersion,
    Store,
)
from ringfence.store.sqlite import SCHEMA_VERSION, SqliteStore

WID = "i-0123456789abcdef0"


def make_dynamo(moto_url: str, owed_writer: str = "reconcile") -> Store:
    """A DynamoStore on fresh tables; ``owed_writer``: the function whose owed partition it marks."""
    from ringfence.store.dynamodb import DynamoStore

    requests.post(f"{moto_url}/moto-api/reset", timeout=10)
    ddb = boto3.resource("dynamodb")
    for name, keys in {
        "rf-inventory": [("id", "HASH")],
        "rf-state": [("pk", "HASH"), ("sk", "RANGE")],
        "rf-audit": [("pk", "HASH"), ("sk", "RANGE")],
    }.items():
        ddb.create_table(
            TableName=name,
            KeySchema=[{"AttributeName": k, "KeyType": t} for k, t in keys],
            AttributeDefinitions=[{"AttributeName": k, "AttributeType": "S"} for k, _ in keys],
            BillingMode="PAY_PER_REQUEST",
        )
    return DynamoStore("rf-inventory", "rf-state", "rf-audit", resource=ddb, owed_writer=owed_writer)


@pytest.fixture(params=["dynamodb", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "dynamodb":
        yield make_dynamo(request.getfixturevalue("moto_url"))
    else:
        st = SqliteStore(tmp_path / "state.db")
        yield st
        assert st.integrity_check() == "ok"
        st.close()


def rec(t: float, env_tag: str, state: str = "running", wid: str = WID, cloud: str = "aws") -> InventoryRecord:
    w = Workload(id=wid, ips=["10.0.0.1"], tags={"ringfence:env": env_tag}, cloud=cloud)  # type: ignore[arg-type]
    return InventoryRecord(id=w.id, workload=w, state=state, observed_at=t)


# --- inventory -----------------------------------------------------------------------------------


def test_older_observation_never_wins(store: Store) -> None:
    assert store.observe(rec(10, "prod")) is True
    assert store.observe(rec(5, "dev")) is False
    got = store.get(WID)
    assert got is not None and got.workload.tags == {"ringfence:env": "prod"}
    assert store.observe(rec(11, "prod")) is False, "same cloud view: no change to compute"
    assert store.observe(rec(12, "dev")) is True


def test_the_inventory_generation_moves_with_records_not_with_liveness(store: Store) -> None:
    """A reader that would otherwise read every record (inline flow reports) asks this first."""
    from ringfence.store.dynamodb import DynamoStore

    gen = store.inventory_generation
    if isinstance(store, DynamoStore):
        assert gen() is None, "DynamoDB keeps none"
        return
    seen = [gen()]

    def moved() -> bool:
        seen.append(gen())
        return seen[-1] != seen[-2]

    store.observe(rec(10, "prod"))
    assert moved(), "a new record"
    store.set_liveness(WID, heartbeat=11.0, enrolled=True)
    assert not moved(), "liveness is not the inventory's"
    store.observe(rec(12, "dev"))
    assert moved(), "new tags"
    store.set_operator(WID, quarantined=True)
    assert moved(), "an operator's quarantine"
    store.observe(rec(13, "dev", state="terminated"))
    assert moved(), "gone"


def test_the_inventory_generation_moves_when_an_agent_goes_offline_or_comes_back(store: Store) -> None:
    """``offline`` takes a record out of peers' sets (:attr:`InventoryRecord.active`) as much as its
    state does: a reader that skips its pass while the generation stands would miss it."""
    from ringfence.store.dynamodb import DynamoStore

    if isinstance(store, DynamoStore):
        return  # keeps none (the test above)
    store.observe(rec(10, "prod"))
    before = store.inventory_generation()
    store.set_liveness(WID, offline=True)
    offline = store.inventory_generation()
    assert offline != before, "gone offline: out of peers' sets"
    store.set_liveness(WID, offline=True)
    store.set_liveness(WID, heartbeat=11.0)
    assert store.inventory_generation() == offline, "no flip, or a heartbeat alone: nothing moved"
    store.set_liveness(WID, offline=False, heartbeat=12.0)
    assert store.inventory_generation() != offline, "back online"


def test_a_file_opened_by_this_release_counts_offline_flips_whatever_trigger_it_had(tmp_path: Path) -> None:
    """A file written by a release whose update trigger did not watch ``offline`` gets this
    release's trigger when opened (same schema version: only a trigger changed)."""
    import sqlite3

    path = tmp_path / "old.db"
    st = SqliteStore(path)
    st.observe(rec(1.0, "prod"))
    st.close()
    db = sqlite3.connect(path)
    db.executescript(
        "BEGIN; DROP TRIGGER inventory_gen_update;"
        " CREATE TRIGGER inventory_gen_update AFTER UPDATE OF workload, state, op_mode, op_quarantined ON inventory"
        " WHEN OLD.workload IS NOT NEW.workload OR OLD.state IS NOT NEW.state"
        " OR OLD.op_mode IS NOT NEW.op_mode OR OLD.op_quarantined IS NOT NEW.op_quarantined"
        " BEGIN UPDATE inventory_gen SET gen = gen + 1; END; COMMIT;"
    )
    db.close()
    st = SqliteStore(path)
    try:
        before = st.inventory_generation()
        st.set_liveness(WID, offline=True)
        assert st.inventory_generation() != before
        assert st._db().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert st.integrity_check() == "ok"
    finally:
        st.close()


def test_terminating_is_sticky_while_the_instance_still_runs(store: Store) -> None:
    store.observe(rec(10, "prod"))
    store.observe(rec(11, "prod", state="terminating"))
    store.observe(rec(12, "prod", state="running"))
    assert store.get(WID).state == "terminating"  # type: ignore[union-attr]
    store.observe(rec(13, "prod", state="terminated"))
    assert store.get(WID).state == "terminated"  # type: ignore[union-attr]


def test_tag_version_never_goes_backwards(store: Store) -> None:
    store.observe(rec(10, "prod").model_copy(update={"tag_version": 5}))
    store.observe(rec(11, "dev").model_copy(update={"tag_version": 3}))
    assert store.get(WID).tag_version == 5  # type: ignore[union-attr]


def test_observations_keep_operator_and_liveness_fields(store: Store) -> None:
    with pytest.raises(KeyError):
        store.set_operator("nobody", quarantined=True)
    with pytest.raises(KeyError):
        store.set_liveness("nobody", enrolled=True)
    store.observe(rec(10, "prod"))
    store.set_operator(WID, mode=Mode.ENFORCE, quarantined=True)
    store.set_liveness(WID, enrolled=True, heartbeat=123.5, offline=True)
    store.observe(rec(20, "dev"))
    got = store.get(WID)
    assert got is not None
    assert (got.op_mode, got.op_quarantined, got.enrolled, got.last_heartbeat, got.offline) == (
        Mode.ENFORCE,
        True,
        True,
        123.5,
        True,
    )
    assert got.effective().quarantined and got.effective().mode is Mode.ENFORCE and not got.active
    store.set_operator(WID, mode=None)
    store.set_liveness(WID, offline=False)
    got = store.get(WID)
    assert got is not None and got.op_mode is None and got.op_quarantined and got.active


def test_observe_many_is_observe_for_each(store: Store) -> None:
    store.observe(rec(10, "prod", wid="w0", cloud="onprem"))
    changed = store.observe_many(
        [
            rec(5, "dev", wid="w0", cloud="onprem"),  # older: loses
            rec(11, "prod", wid="w1", cloud="onprem"),  # new
            rec(12, "prod", wid="w2", cloud="onprem"),
        ]
    )
    assert changed == {"w1", "w2"}
    assert store.get("w0").workload.tags == {"ringfence:env": "prod"}  # type: ignore[union-attr]
    assert store.observe_many([]) == set()


def test_get_many_and_all_records(store: Store) -> None:
    for i in range(3):
        store.observe(rec(1, "prod", wid=f"w{i}", cloud="onprem"))
    assert sorted(store.get_many(["w0", "w2", "missing", "w0"])) == ["w0", "w2"]
    assert sorted(r.id for r in store.all_records()) == ["w0", "w1", "w2"]
    assert store.get("missing") is None


# --- engine head, policy, published artifacts ----------------------------------------------------


def test_engine_head_and_bundle_pointer_compare_and_swap(store: Store) -> None:
    assert store.head() == EngineHead()
    store.put_head(EngineHead(revision=3, policy_version=1, clean=False), 0)
    with pytest.raises(ConflictError):
        store.put_head(EngineHead(revision=4, policy_version=1), 2)
    store.put_head(EngineHead(revision=4, policy_version=1), 3)
    assert store.head() == EngineHead(revision=4, policy_version=1, clean=True)
    assert store.bundle_pointer("w") is None
    ptr = BundlePointer(workload_id="w", version=5, key="k5", etag='"5"', rules_revision=5, sets={"s": 5})
    assert store.put_bundle_pointer(ptr)
    assert store.put_bundle_pointer(ptr), "the same version again is not backwards"
    assert not store.put_bundle_pointer(ptr.model_copy(update={"version": 4}))  # never backwards
    assert not store.put_bundle_pointer(ptr.model_copy(update={"version": 9}), expected_version=4)
    assert store.put_bundle_pointer(ptr.model_copy(update={"version": 9}), expected_version=5)
    assert store.bundle_pointer("w") == ptr.model_copy(update={"version": 9})
    fresh = ptr.model_copy(update={"workload_id": "new"})
    assert not store.put_bundle_pointer(fresh, expected_version=5), "compare-and-swap needs a stored pointer"


def test_policy_versions_are_numbered_and_one_is_active(store: Store) -> None:
    assert store.active_policy() is None
    assert [store.next_policy_version() for _ in range(3)] == [1, 2, 3]
    pv = PolicyVersion(number=3, author="alice", message="m", digest="d", keys={"p.yaml": "policies/v000003/p.yaml"})
    store.activate_policy(pv)
    assert store.active_policy() == pv


def test_activating_a_policy_over_the_version_read_is_a_compare_and_swap(store: Store) -> None:
    """Two provisions race: each activates only over the version it read as active. The loser
    gets ConflictError and records nothing (neither active nor in the history)."""

    def pv(n: int) -> PolicyVersion:
        return PolicyVersion(
            number=n, author="a", message="m", digest=f"d{n}", keys={"p.yaml": f"policies/v{n}/p.yaml"}
        )

    store.activate_policy(pv(1), expected_active=None)
    with pytest.raises(ConflictError, match="version 1 became active meanwhile"):
        store.activate_policy(pv(2), expected_active=None)  # read "no policy" before v1 landed
    v3 = pv(3)  # one value: created_at is the second it is made, and a second may pass
    store.activate_policy(v3, expected_active=1)
    with pytest.raises(ConflictError, match="version 3 became active meanwhile"):
        store.activate_policy(pv(2), expected_active=1)  # the older one finishing last
    assert store.active_policy() == v3
    if isinstance(store, SqliteStore):
        assert [v.number for v in store.policy_versions()] == [1, 3]
    else:
        from ringfence.store.dynamodb import DynamoStore

        assert isinstance(store, DynamoStore)
        assert "Item" not in store.state.get_item(Key={"pk": "policy", "sk": "v00000002"})
        assert "Item" in store.state.get_item(Key={"pk": "policy", "sk": "v00000003"})
    v4 = pv(4)
    store.activate_policy(v4)  # unconditional, as before
    assert store.active_policy() == v4


def test_set_heads_move_forward_and_deltas_are_listed_in_order(store: Store) -> None:
    store.put_set_head("s", 5)
    store.put_set_head("s", 3)
    store.put_set_head("t", 1)
    assert store.set_heads(["s", "t", "u"]) == {"s": 5, "t": 1}
    for frm, to in ((1, 3), (3, 5), (5, 8)):
        store.put_delta(DeltaPointer(set="s", from_version=frm, to_version=to, key=f"d{to}"))
    store.put_delta(DeltaPointer(set="t", from_version=0, to_version=4, key="t4"))
    assert [d.key for d in store.deltas_after("s", 3)] == ["d5", "d8"]
    assert [d.key for d in store.deltas_after("s", 0)] == ["d3", "d5", "d8"]
    assert store.deltas_after("s", 8) == []


def test_moved_records_are_listed_in_revision_order_after_a_revision(store: Store) -> None:
    from ringfence.store.base import MovedRecord

    for rev, prev, who in ((12, 7, ["i-b"]), (7, 3, ["i-a", "i-c"]), (30, 12, None)):
        store.put_moved(MovedRecord(revision=rev, previous=prev, workloads=who))
    assert [(m.revision, m.previous, m.workloads) for m in store.moved_after(3)] == [
        (7, 3, ["i-a", "i-c"]),
        (12, 7, ["i-b"]),
        (30, 12, None),
    ]
    assert [m.revision for m in store.moved_after(12)] == [30] and store.moved_after(30) == []


# --- agent auth -----------------------------------------------------------------------------------


def test_nonces_and_claims_are_single_use(store: Store) -> None:
    store.put_nonce("n1", 60)
    assert store.burn_nonce("n1") and not store.burn_nonce("n1") and not store.burn_nonce("never-issued")
    store.put_nonce("old", -1)
    assert not store.burn_nonce("old")
    assert not store.claimed("iid#i-1#t")
    assert store.claim_once("iid#i-1#t", 60) and not store.claim_once("iid#i-1#t", 60)
    assert store.claimed("iid#i-1#t") and not store.claimed("iid#i-3#t"), "a read, claiming nothing"
    assert store.claim_once("iid#i-2#t", 60)
    assert store.claim_once("spent", -1) and not store.claimed("spent"), "an expired claim is no claim"


def test_tokens_name_their_workload_until_they_expire(store: Store) -> None:
    store.put_token("h1", "w1", 60)
    store.put_token("h2", "w2", -1)
    assert store.token_workload("h1") == "w1"
    assert store.token_workload("h2") is None and store.token_workload("nope") is None


def test_a_tokens_expiry_is_read_until_it_expires(store: Store) -> None:
    """How far into its lifetime a token is (the renewal by token waits for half of it)."""
    now = time.time()
    store.put_token("h1", "w1", 600)
    store.put_token("h2", "w2", -1)
    expires = store.token_expires("h1")
    assert expires is not None and now + 598 <= expires <= time.time() + 600
    assert store.token_expires("h2") is None and store.token_expires("nope") is None
    store.put_token("h1", "w1", 60)  # the same token written again: its new expiry
    assert (store.token_expires("h1") or 0) <= time.time() + 60


def test_one_active_token_per_workload_and_revocation(store: Store) -> None:
    store.put_token("old", "w1", 60)
    store.put_token("other", "w2", 60)
    store.put_token("new", "w1", 60)
    assert store.token_workload("old") is None, "a workload's new token revokes its previous one"
    assert store.token_workload("new") == "w1" and store.token_workload("other") == "w2"
    assert store.revoke_tokens("w1") and not store.revoke_tokens("w1")
    assert store.token_workload("new") is None and store.token_workload("other") == "w2"


def test_a_new_token_deletes_the_one_it_replaces_without_reading_first(moto_url: str) -> None:
    """DynamoDB: the put of a workload's ``tokenof`` item hands back the one it replaced, so an
    enrollment or renewal writes its token in two puts and deletes the old one, no read first."""
    store = make_dynamo(moto_url)
    store.put_token("old", "w1", 60)
    calls: list[str] = []
    events = store.state.meta.client.meta.events  # type: ignore[attr-defined]
    events.register("before-call.dynamodb", lambda model, **_: calls.append(model.name))
    store.put_token("new", "w1", 60)
    assert calls == ["PutItem", "PutItem", "DeleteItem"]
    assert store.state.get_item(Key={"pk": "token#old", "sk": "token"}).get("Item") is None  # type: ignore[attr-defined]
    assert store.token_workload("old") is None and store.token_workload("new") == "w1"
    calls.clear()
    store.put_token("first", "w2", 60)
    assert calls == ["PutItem", "PutItem"], "nothing replaced: nothing to delete"
    assert store.token_workload("first") == "w2" and store.token_workload("new") == "w1"


def test_a_token_grant_reads_the_token_and_the_workload_it_is_for_together(store: Store) -> None:
    """What every agent request is authorized with: the token's current owner, and that
    workload's record and bundle pointer only when the token is the requested workload's own."""
    store.observe(rec(1.0, "prod"))
    other = "i-other"
    store.observe(rec(1.0, "prod", wid=other))
    store.put_token("mine", WID, 60)
    store.put_token("theirs", other, 60)
    owner, found, ptr = store.token_grant("mine", WID)[:3]
    assert owner == WID and found is not None and found.id == WID and found.state == "running"
    assert ptr is None, "nothing published for it yet"
    published = BundlePointer(
        workload_id=WID, version=7, key="bundles/k", etag='"7"', rules_revision=7, sets={"web": 7}
    )
    assert store.put_bundle_pointer(published)
    assert store.token_grant("mine", WID).pointer == published
    assert store.token_grant("theirs", WID)[:3] == (other, None, None), "another workload's token: its owner only"
    assert store.token_grant("nope", WID)[:3] == (None, None, None)
    store.put_token("newer", WID, 60)
    assert store.token_grant("mine", WID)[:3] == (None, None, None), "a replaced token grants nothing"
    store.put_token("expired", other, -1)
    assert store.token_grant("expired", other)[:3] == (None, None, None)
    store.put_token("ghost", "w-unknown", 60)
    assert store.token_grant("ghost", "w-unknown")[:3] == ("w-unknown", None, None), "no record: the API refuses it"
    store.revoke_tokens(WID)
    assert store.token_grant("newer", WID)[:3] == (None, None, None)


def test_agent_key_first_binding_wins_unless_replaced(store: Store) -> None:
    assert store.agent_key("w") is None
    assert store.bind_agent_key("w", "K1") == "K1"
    assert store.bind_agent_key("w", "K2") == "K1", "a second key does not displace the first"
    assert store.agent_key("w") == "K1"
    assert store.bind_agent_key("w", "K3", replace=True) == "K3"
    store.drop_agent_key("w")
    assert store.agent_key("w") is None


def test_a_token_holds_only_while_the_agent_key_it_was_issued_under_is_bound(store: Store) -> None:
    """An operator's reset (the key dropped) or a rebinding ends every token issued under the old
    key, including one written after the reset by a renewal that checked the key before it."""
    from ringfence.control.credentials import agent_key_fingerprint, agent_key_id
    from tests.aws.test_pipeline import AgentKey

    first, second = AgentKey(), AgentKey()
    store.bind_agent_key("w1", first.pem)
    store.put_token("t1", "w1", 60, agent_key=agent_key_id(first.pem))
    assert store.token_workload("t1") == "w1" and store.token_grant("t1", "w1").workload_id == "w1"
    store.drop_agent_key("w1")  # the reset
    store.put_token("t2", "w1", 60, agent_key=agent_key_id(first.pem))  # the renewal in flight
    assert store.token_workload("t2") is None and store.token_grant("t2", "w1") == Grant(None)
    store.bind_agent_key("w1", second.pem)  # the reinstalled agent enrolls
    assert store.token_workload("t2") is None, "nor under the next key"
    store.put_token("t3", "w1", 60, agent_key=agent_key_id(second.pem))
    assert store.token_grant("t3", "w1").workload_id == "w1"
    # tokens are issued under the whole fingerprint now (a 64-bit id could be searched to match)
    whole = agent_key_fingerprint(second.pem)
    store.put_token("t5", "w1", 60, agent_key=whole)
    assert store.token_grant("t5", "w1").workload_id == "w1"
    store.put_token("t6", "w1", 60, agent_key=whole[:16] + "0" * 48)  # the id matches, the key does not
    assert store.token_workload("t6") is None
    store.bind_agent_key("w1", first.pem, replace=True)  # an operator-issued pairing rebinds
    assert store.token_workload("t3") is None
    # issued without a key (a pairing without one): good only while no key is bound
    store.put_token("t4", "w2", 60)
    assert store.token_workload("t4") == "w2"
    store.bind_agent_key("w2", second.pem)
    assert store.token_workload("t4") is None and store.token_grant("t4", "w2") == Grant(None)


def test_a_pairing_use_binds_its_agent_key_in_the_same_step(store: Store) -> None:
    store.bind_agent_key("w", "OLD")
    store.put_pairing("k", "w", uses=1, ttl=60)
    assert not store.use_pairing("k", "other", agent_key="THEIRS"), "not issued for it"
    assert store.agent_key("other") is None and store.agent_key("w") == "OLD", "a refused use binds nothing"
    assert store.use_pairing("k", "w", agent_key="NEW") and store.agent_key("w") == "NEW"
    assert not store.use_pairing("k", "w", agent_key="LATER") and store.agent_key("w") == "NEW", "used up"


def test_a_named_key_alone_binds_after_a_reset_and_binding_it_ends_the_expectation(store: Store) -> None:
    from ringfence.control.credentials import agent_key_fingerprint
    from ringfence.store.base import NotTheNamedKey
    from tests.aws.test_pipeline import AgentKey

    named, thief, later = AgentKey(), AgentKey(), AgentKey()
    store.expect_agent_key("w", agent_key_fingerprint(named.pem))
    with pytest.raises(NotTheNamedKey):
        store.bind_agent_key("w", thief.pem)
    store.put_pairing("k", "w", uses=2, ttl=60)
    with pytest.raises(NotTheNamedKey):
        store.use_pairing("k", "w", agent_key=thief.pem)
    assert store.agent_key("w") is None, "nothing bound"
    assert store.expected_agent_key("w") == agent_key_fingerprint(named.pem)
    assert store.use_pairing("k", "w", agent_key=named.pem) and store.agent_key("w") == named.pem
    assert store.expected_agent_key("w") is None, "the named key bound: the expectation is met"
    assert store.use_pairing("k", "w", agent_key=later.pem), "a later rebinding is not held to it"
    assert store.agent_key("w") == later.pem


def test_drop_pairings_revokes_every_key_of_that_workload_only(store: Store) -> None:
    store.put_pairing("a", "w", uses=2, ttl=60)
    store.put_pairing("b", "w", uses=1, ttl=60)
    store.put_pairing("spent", "w", uses=1, ttl=60)
    assert store.use_pairing("spent", "w", agent_key="K")
    store.put_pairing("gone", "w", uses=1, ttl=-1)
    store.put_pairing("theirs", "other", uses=1, ttl=60)
    assert store.drop_pairings("w") == 2, "the keys that could still enroll"
    assert not any(store.use_pairing(k, "w", agent_key="K") for k in ("a", "b", "spent", "gone"))
    assert store.drop_pairings("w") == 0
    assert store.use_pairing("theirs", "other", agent_key="K"), "another workload's key is untouched"


def test_a_version_2_sqlite_token_holds_until_it_expires(tmp_path: Path) -> None:
    """A token written by the previous release (schema 2: tokens record no agent key) still
    authorizes after the upgrade, until it expires: agents are not all sent to renew at once."""
    import sqlite3

    path = tmp_path / "old.db"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.executescript(
        "BEGIN; DROP TABLE token; CREATE TABLE token (hash TEXT PRIMARY KEY, workload_id TEXT NOT NULL,"
        " expires REAL NOT NULL); INSERT INTO token VALUES ('old', 'w1', 9e12); PRAGMA user_version = 2; COMMIT;"
    )
    db.close()
    st = SqliteStore(path)
    try:
        assert st._db().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert st.token_workload("old") == "w1"
        st.put_token("new", "w1", 60, agent_key="")
        assert st.token_workload("new") == "w1" and st.token_workload("old") is None
        assert st.integrity_check() == "ok"
    finally:
        st.close()


def test_pairing_key_enrolls_only_its_workload_a_limited_number_of_times(store: Store) -> None:
    store.put_pairing("h", "w", uses=2, ttl=60)
    assert not store.use_pairing("h", "other", agent_key="K"), "a key issued for w never enrolls another id"
    assert [store.use_pairing("h", "w", agent_key="K") for _ in range(3)] == [True, True, False]
    assert not store.use_pairing("unknown", "w", agent_key="K")
    store.put_pairing("h2", "w", uses=5, ttl=-1)
    assert not store.use_pairing("h2", "w", agent_key="K"), "expired"
    with pytest.raises(ValueError):
        store.put_pairing("h3", "", uses=1, ttl=60)


def test_connections(store: Store) -> None:
    assert store.connection("w") is None
    store.put_token("t1", "w", ttl=60)
    assert store.put_connection("w", "c1", "t1")
    assert store.put_connection("w", "c2", "t1")
    assert store.connection("w") == "c2"
    store.drop_connection("w", "c1")  # a gone connection's cleanup: not the current one
    assert store.connection("w") == "c2"
    store.drop_connection("w", "c2")
    assert store.connection("w") is None
    assert store.put_connection("w", "c3", "t1")
    store.drop_connection("w")
    assert store.connection("w") is None
    # only while the token is the workload's current one
    store.put_token("t2", "w", ttl=60)
    assert not store.put_connection("w", "c4", "t1")
    assert not store.put_connection("w", "c4", "unknown")
    assert not store.put_connection("other", "c4", "t2")
    store.revoke_tokens("w")
    assert not store.put_connection("w", "c4", "t2")
    assert store.connection("w") is None


def test_enforcement_reports_replace_per_workload_and_list_all(store: Store) -> None:
    from ringfence.store.base import EnforcementReport

    assert store.enforcement("w1") is None and store.enforcement_reports() == []
    first = EnforcementReport(workload_id="w1", time=1.0, version=3, kernel_digest="a" * 64, latest_version=4)
    store.put_enforcement(first)
    store.put_enforcement(EnforcementReport(workload_id="w2", time=2.0, version=None, behind_since=2.0))
    later = first.model_copy(update={"time": 5.0, "version": 4, "expected_digest": "a" * 64})
    store.put_enforcement(later)
    assert store.enforcement("w1") == later
    assert sorted((r.workload_id, r.time) for r in store.enforcement_reports()) == [("w1", 5.0), ("w2", 2.0)]
    # the tamper bookkeeping round-trips, and a heartbeat's grant reads the report with the token
    tampered = later.model_copy(update={"tamper_reapplied": 3, "tampered_at": 5.0, "tamper_repairs": 2})
    store.put_enforcement(tampered)
    assert store.enforcement("w1") == tampered
    store.put_token("tw1", "w1", 60)
    store.put_token("tw3", "w3", 60)
    grant = store.token_grant("tw1", "w1", with_enforcement=True)
    assert grant.workload_id == "w1" and grant.enforcement_read and grant.enforcement == tampered
    assert store.token_grant("tw3", "w3", with_enforcement=True)[3:] == (None, True), "read, none"
    assert store.token_grant("tw1", "w1")[3:] == (None, False), "not asked for: not read"


def test_audit_is_append_only(store: Store) -> None:
    first = AuditRecord(principal="arn:aws:iam::1:user/a", action="x", target="t", time=time.time() - 10)
    second = AuditRecord(principal="alice", action="y", target="t", detail={"k": [1, 2]})
    sealed = [store.audit(second), store.audit(first)]
    with pytest.raises(ConflictError):
        store.audit(first.model_copy(update={"action": "rewritten"}))  # the same record can never be rewritten
    assert store.audit_log() == sealed, "in the order written (the chain's), not by time"
    assert [(r.seq, r.id) for r in sealed] == [(1, second.id), (2, first.id)] and sealed[1].prev == sealed[0].hash


def test_audit_with_writes_the_record_and_the_change(store: Store) -> None:
    """Store.audit_with: the record and the change in one transaction (SQLite: one BEGIN
    IMMEDIATE, DynamoDB: one TransactWriteItems); a change refused by its own condition (an
    unknown workload, a lost compare-and-swap) leaves no record, and the chain goes on."""
    from ringfence.store.base import ChangeFailed, OperatorChange, PolicyActivation

    assert store.observe(rec(1.0, "prod"))
    first = AuditRecord(principal="alice", action="workload.quarantine", target=WID)
    sealed = store.audit_with(first, OperatorChange(WID, quarantined=True))
    got = store.get(WID)
    assert got is not None and got.op_quarantined and store.audit_log() == [sealed]

    second = AuditRecord(principal="alice", action="workload.mode", target="nobody")
    with pytest.raises(ChangeFailed) as caught:
        store.audit_with(second, OperatorChange("nobody", set_mode=True, mode=Mode.IDLE))
    assert isinstance(caught.value.cause, KeyError)
    assert store.audit_log() == [sealed] and store.get("nobody") is None, "neither written"

    pv = PolicyVersion(number=store.next_policy_version(), keys={}, digest="d1", author="alice")
    third = store.audit_with(
        AuditRecord(principal="alice", action="policy.provision", target="v1"), PolicyActivation(pv, None)
    )
    active = store.active_policy()
    assert active is not None and active.number == pv.number
    lost = PolicyVersion(number=store.next_policy_version(), keys={}, digest="d2", author="bob")
    with pytest.raises(ChangeFailed) as caught:  # bob read no active version: another became active
        store.audit_with(
            AuditRecord(principal="bob", action="policy.provision", target="v2"), PolicyActivation(lost, None)
        )
    assert isinstance(caught.value.cause, ConflictError)
    active = store.active_policy()
    assert active is not None and active.number == pv.number, "the winner stays active"
    fourth = store.audit_with(
        AuditRecord(principal="alice", action="workload.mode", target=WID),
        OperatorChange(WID, set_mode=True, mode=Mode.OBSERVE),
    )
    log = store.audit_log()
    assert log == [sealed, third, fourth] and [r.seq for r in log] == [1, 2, 3]
    assert verify(log, store.audit_head()).ok
    got = store.get(WID)
    assert got is not None and got.op_mode is Mode.OBSERVE and got.op_quarantined


def test_a_store_opens_from_its_spec(tmp_path: Path, moto_url: str) -> None:
    from ringfence.store import open_store
    from ringfence.store.dynamodb import DynamoStore

    make_dynamo(moto_url)
    st = open_store(f"sqlite:{tmp_path / 'sub' / 'state.db'}")
    assert isinstance(st, SqliteStore) and (tmp_path / "sub" / "state.db").exists()
    dyn = open_store("dynamodb:rf-inventory,rf-state,rf-audit")
    assert isinstance(dyn, DynamoStore) and dyn.head() == EngineHead()
    for bad in ("sqlite:", "postgres://x", "dynamodb:a,b", "state.db"):
        with pytest.raises(ValueError, match="expected sqlite:PATH"):
            open_store(bad)


# --- SQLite: what only a file shared by threads and processes needs --------------------------------


def test_sqlite_audit_log_refuses_rewrites_even_from_sql(tmp_path: Path) -> None:
    import sqlite3

    st = SqliteStore(tmp_path / "s.db")
    st.audit(AuditRecord(principal="a", action="x", target="t"))
    db = sqlite3.connect(tmp_path / "s.db")
    for stmt in ("UPDATE audit SET doc = '{}'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(stmt)
    assert len(st.audit_log()) == 1


def test_sqlite_is_wal_and_fully_synchronous(tmp_path: Path) -> None:
    st = SqliteStore(tmp_path / "s.db")
    db = st._db()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_sqlite_closes_the_connections_of_ended_threads(tmp_path: Path) -> None:
    st = SqliteStore(tmp_path / "s.db")
    for i in range(20):  # a server's worker threads come and go
        t = threading.Thread(target=st.put_nonce, args=(f"n{i}", 60))
        t.start()
        t.join()
    st.get("x")  # this thread's connection reaps the ended threads'
    assert st.open_connections() <= 2
    assert all(st.burn_nonce(f"n{i}") for i in range(20))


def _race(path: str, start: Any, out: Any) -> None:
    """One racer: at each barrier, every racer tries the same single-winner operation at once."""
    st = SqliteStore(path)
    start.wait()
    try:
        st.put_head(EngineHead(revision=1, policy_version=1), 0)
        out.put(("head", True))
    except ConflictError:
        out.put(("head", False))
    start.wait()
    out.put(("pairing", sum(st.use_pairing("h", "w", agent_key="K") for _ in range(3))))
    start.wait()
    out.put(("nonce", st.burn_nonce("n")))
    st.close()


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_sqlite_conditions_hold_across_threads_and_processes(tmp_path: Path, mode: str) -> None:
    import queue as queue_mod

    path = tmp_path / "race.db"
    st = SqliteStore(path)
    st.put_head(EngineHead(revision=0), 0)
    st.put_pairing("h", "w", uses=5, ttl=60)
    st.put_nonce("n", 60)
    n = 6
    if mode == "threads":
        spawn: Callable[..., Any] = threading.Thread
        barrier: Any = threading.Barrier(n)
        results: Any = queue_mod.Queue()
    else:
        ctx = multiprocessing.get_context("spawn")
        spawn, barrier, results = ctx.Process, ctx.Barrier(n), ctx.Queue()
    racers = [spawn(target=_race, args=(str(path), barrier, results)) for _ in range(n)]
    for r in racers:
        r.start()
    got: dict[str, list[Any]] = {"head": [], "pairing": [], "nonce": []}
    for _ in range(3 * n):
        kind, value = results.get(timeout=120)
        got[kind].append(value)
    for r in racers:
        r.join(60)
    assert sorted(got["head"]) == [False] * (n - 1) + [True], "exactly one writer moves the head"
    assert sum(got["pairing"]) == 5, "a key with 5 uses enrolls exactly 5 times"
    assert sorted(got["nonce"]) == [False] * (n - 1) + [True], "a nonce burns exactly once"
    assert st.integrity_check() == "ok"


def test_launch_hold_merges_both_facts_and_the_first_report_wins(store: Store) -> None:
    assert store.launch_hold("i-1") is None
    first = store.hold_launch("i-1", enforced_version=7, enforced_at=1.0)
    assert first.enforced_version == 7 and first.lifecycle is None
    both = store.hold_launch("i-1", lifecycle={"hook_name": "h", "token": "t"}, perimeter_at=2.5, perimeter="attached")
    assert (
        both.enforced_version == 7 and both.lifecycle == {"hook_name": "h", "token": "t"} and both.perimeter_at == 2.5
    )
    again = store.hold_launch("i-1", enforced_version=9, enforced_at=3.0)
    assert again.enforced_version == 7 and again.enforced_at == 1.0, "the first report is the fact"
    store.hold_launch("i-1", released_at=4.0, outcome="continue")
    got = store.launch_hold("i-1")
    assert got is not None and got.outcome == "continue" and got.perimeter == "attached"
    with pytest.raises(ValueError, match="unknown fields"):
        store.hold_launch("i-1", nonsense=1)


def test_dynamodb_keeps_the_agents_fact_apart_from_computes_hold(moto_url: str) -> None:
    """In DynamoDB the agent API's fact is an item under a partition of its own (enforcing#), the
    only launch item its role may write; compute's facts are the hold (launch#). (SQLite keeps
    one row: the split is for IAM.)"""
    from ringfence.store.dynamodb import DynamoStore

    store = make_dynamo(moto_url)
    assert isinstance(store, DynamoStore)
    store.hold_launch("i-2", lifecycle={"hook_name": "h", "token": "t"}, perimeter_at=1.0, perimeter="attached")
    got = store.hold_launch("i-2", enforced_version=3, enforced_at=2.0)
    assert got.lifecycle == {"hook_name": "h", "token": "t"}, "the agent's write reads compute's back"
    agent = store.state.get_item(Key={"pk": "enforcing#i-2", "sk": "agent"})["Item"]
    hold = store.state.get_item(Key={"pk": "launch#i-2", "sk": "hold"})["Item"]
    assert "enforced_version" in agent and "lifecycle" not in agent
    assert "enforced_version" not in hold and "lifecycle" in hold
    with pytest.raises(ValueError, match="written apart"):
        store.hold_launch("i-2", enforced_version=4, released_at=5.0)


def test_flow_rows_fold_per_day_and_key_and_expire(store: Store) -> None:
    from ringfence.flows.aggregate import FlowRow

    def row(day: str, n: int, first: float, last: float, origin: str = "agent") -> FlowRow:
        return FlowRow(
            day=day, src="app=a,role=web", dst="app=a,role=db", proto="tcp", port=5432, decision="allowed",
            rule="outbound: allow a/web-db (a.yaml:3)", flows=n, packets=n * 10, bytes=n * 100,
            first_seen=first, last_seen=last, sample_src="10.0.0.1", sample_dst="10.0.0.2", origins=[origin],
        )  # fmt: skip

    today = time.strftime("%Y-%m-%d", time.gmtime())
    store.add_flows([row(today, 2, 100.0, 200.0)], ttl=3600)
    store.add_flows([row(today, 3, 50.0, 150.0, "vpc")], ttl=3600)
    store.add_flows([row(today, 1, 120.0, 300.0)], ttl=3600)
    (got,) = store.flow_rows()
    assert (got.flows, got.packets, got.bytes) == (6, 60, 600)
    assert (got.first_seen, got.last_seen) == (50.0, 300.0)
    assert got.origins == ["agent", "vpc"] and got.rule.startswith("outbound: allow")
    store.add_flows([row(today, 1, 1.0, 2.0).model_copy(update={"decision": "blocked"})], ttl=-10)
    assert [r.decision for r in store.flow_rows()] == ["allowed"]  # the expired row is gone


def test_flow_rows_keep_who_reported_them(store: Store) -> None:
    """Which ends reported a row (src, dst, vpc) and the reporting workloads (at most
    MAX_REPORTERS named) fold across writes; a row written without them (stored before they
    were recorded) still loads, with none."""
    from ringfence.flows.aggregate import MAX_REPORTERS, FlowRow

    today = time.strftime("%Y-%m-%d", time.gmtime())

    def row(by: list[str], reporters: list[str], port: int = 4444) -> FlowRow:
        return FlowRow(
            day=today, src="app=a,role=db", dst="app=a,role=web", proto="tcp", port=port, decision="blocked",
            flows=1, first_seen=1.0, last_seen=2.0, origins=["vpc" if by == ["vpc"] else "agent"], reported_by=by,
            reporters=reporters,
        )  # fmt: skip

    store.add_flows([row(["dst"], ["web-9"])], ttl=3600)
    (got,) = store.flow_rows()
    assert (got.reported_by, got.reporters) == (["dst"], ["web-9"])
    store.add_flows([row(["src"], ["db-1"])], ttl=3600)
    store.add_flows([row(["vpc"], [])], ttl=3600)
    (got,) = store.flow_rows()
    assert (got.reported_by, got.reporters, got.flows) == (["dst", "src", "vpc"], ["db-1", "web-9"], 3)
    many = [f"web-{i:02}" for i in range(2 * MAX_REPORTERS)]
    store.add_flows([row(["dst"], many[:5])], ttl=3600)
    store.add_flows([row(["dst"], many[5:])], ttl=3600)
    (got,) = store.flow_rows()
    assert len(got.reporters) == MAX_REPORTERS and {"db-1", "web-9"} <= set(got.reporters), got.reporters
    old = row([], [], port=22)  # as a row stored before: no reported_by, no reporters
    store.add_flows([old], ttl=3600)
    (legacy,) = [r for r in store.flow_rows() if r.port == 22]
    assert (legacy.reported_by, legacy.reporters) == ([], [])


def test_address_history_keeps_every_owner_in_order(store: Store) -> None:
    from ringfence.flows.resolve import AddressOwner

    a = Workload(id="i-a", ips=["10.0.0.9"])
    b = Workload(id="i-b", ips=["10.0.0.9"])
    store.note_addresses([AddressOwner(address="10.0.0.9", since=200.0, workload_id="i-b", workload=b)])
    store.note_addresses(
        [
            AddressOwner(address="10.0.0.9", since=100.0, workload_id="i-a", workload=a),
            AddressOwner(address="10.0.0.9", since=150.0),  # released
        ]
    )
    hist = store.address_history(["10.0.0.9", "10.0.0.10"])
    assert list(hist) == ["10.0.0.9"]
    assert [(o.since, o.workload_id) for o in hist["10.0.0.9"]] == [(100.0, "i-a"), (150.0, ""), (200.0, "i-b")]
    assert hist["10.0.0.9"][0].workload == a


def test_an_inventory_item_holding_its_key_alone_is_no_record(moto_url: str) -> None:
    """moto's UpdateItem on a new key stores the key before its attributes: a read racing an
    instance's first observation saw the key alone and failed with KeyError 'workload' (an agent's
    enrollment answered 500). Such an item is no record, for every read."""
    store = make_dynamo(moto_url)
    boto3.resource("dynamodb").Table("rf-inventory").put_item(Item={"id": "i-0keyonly"})
    assert store.get("i-0keyonly") is None
    assert store.get_many(["i-0keyonly"]) == {}
    assert all(r.id != "i-0keyonly" for r in store.all_records())


def test_observe_with_the_record_the_caller_read_decides_as_reading_it(store: Store) -> None:
    """``previous``: the stored record as the caller just read it (observe_instances reads the
    batch's records for governance anyway). The answer is the same as the store reading it, and a
    newer stored observation still wins over a caller's stale view."""
    first = rec(2.0, "prod")
    assert store.observe(first, previous=None)
    same = rec(3.0, "prod")
    assert not store.observe(same, previous=store.get(WID)), "the cloud view did not change"
    moved = rec(4.0, "dev")
    assert store.observe(moved, previous=store.get(WID))
    stale = rec(1.0, "staging")
    assert not store.observe(stale, previous=None), "an older observation never wins, whatever the caller read"
    got = store.get(WID)
    assert got is not None and got.observed_at == 4.0 and got.workload.tags == moved.workload.tags


def _granted(t: float, grants: dict[str, str], base: InventoryRecord | None) -> InventoryRecord:
    """An observation at ``t`` decided from ``base`` (its governance version), with these grants."""
    r = rec(t, "prod")
    return r.model_copy(
        update={
            "workload": r.workload.model_copy(update={"label_grants": grants}),
            "governed_rev": base.governed_rev if base is not None else 0,
        }
    )


def test_a_decision_landing_between_read_and_write_refuses_the_write(store: Store) -> None:
    """The lost update: a writer reads a record, a binding stores a grant, then the writer stores
    its newer observation decided without it. The store refuses that write (GovernanceMoved,
    nothing written); a write decided from the current version goes through, and the version
    moves only when the held labels or grants change."""
    store.observe(rec(1.0, "prod"))
    read = store.get(WID)
    assert read is not None and read.governed_rev == 0
    # the binding, decided from what it read
    assert store.observe(_granted(1.0, {"role": "jumpbox"}, read), previous=read) is False
    bound = store.get(WID)
    assert bound is not None and bound.governed_rev == 1 and bound.workload.label_grants == {"role": "jumpbox"}
    # the writer that read before the binding: refused, whether it hands over its read or not
    for previous in (read, UNREAD):
        with pytest.raises(GovernanceMoved):
            store.observe(_granted(2.0, {}, read), previous=previous)
    got = store.get(WID)
    assert got is not None and got.observed_at == 1.0 and got.workload.label_grants == {"role": "jumpbox"}
    # decided again from the stored version: written, the grant kept, the version unchanged
    store.observe(_granted(2.0, {"role": "jumpbox"}, bound), previous=bound)
    got = store.get(WID)
    assert got is not None and got.observed_at == 2.0 and got.governed_rev == 1
    # an older observation is dropped as before (no error), and a tombstone needs no version
    assert store.observe(_granted(0.5, {}, read), previous=read) is False
    assert store.observe(rec(3.0, "prod", state="terminated"))
    got = store.get(WID)
    assert got is not None and got.state == "terminated" and got.governed_rev == 2


def test_a_tombstone_written_from_an_old_read_still_moves_the_version(store: Store) -> None:
    """A tombstone is written whatever governance was decided meanwhile, so its version cannot be
    one computed from the caller's read: a binding landing in between would share it, and a record
    decided from the binding's state would then pass the version check over the tombstone."""
    store.observe(rec(1.0, "prod"))
    read = store.get(WID)
    assert read is not None
    store.observe(_granted(1.0, {"role": "jumpbox"}, read), previous=read)
    bound = store.get(WID)
    assert bound is not None and bound.governed_rev == 1
    store.observe(rec(2.0, "prod", state="terminated"), previous=read)  # read before the binding
    gone = store.get(WID)
    assert gone is not None and gone.state == "terminated" and gone.governed_rev > bound.governed_rev
    with pytest.raises(GovernanceMoved):
        store.observe(_granted(3.0, {"role": "jumpbox"}, bound), previous=bound)


def test_a_leaving_write_from_a_read_older_than_the_tombstone_is_refused(store: Store, tmp_path: Path) -> None:
    """A terminate lifecycle action's write (``_store_leaving``) made from a read taken before the
    instance's tombstone, with no grant or hold in between: the tombstone moved the version, so
    the write is refused, read again and dropped. A record that left never comes back as leaving."""
    from ringfence.clouds.aws import ec2
    from ringfence.clouds.aws.ingest import _store_leaving
    from ringfence.control.governance import store_governed
    from ringfence.local.wiring import LocalWiring

    w = LocalWiring(tmp_path / "wiring" / "state.db", store=store, start=False)
    try:
        store.observe(rec(1.0, "prod"))
        stale = store.get(WID)
        assert stale is not None and stale.state == "running"
        gone = ec2.tombstone(WID, "111111111111", "us-east-1", 2.0)
        assert gone.governance() == stale.governance(), "no governance change: only the tombstone moves it"
        store_governed(w, [gone], {WID: stale})  # ingest's write, from the same read
        assert _store_leaving(w, stale, 3.0) is False
        got = store.get(WID)
        assert got is not None and got.state == "terminated" and got.observed_at == 2.0
        with pytest.raises(GovernanceMoved):
            store.observe(stale.model_copy(update={"state": "terminating", "observed_at": 3.0}))
    finally:
        w.close()


def test_a_version_1_sqlite_file_gains_the_governance_version(tmp_path: Path) -> None:
    """A file written by the previous release (schema 1, no ``governed_rev``) opens, keeps its
    records (at version 0) and takes the new conditional writes."""
    import sqlite3

    path = tmp_path / "old.db"
    st = SqliteStore(path)
    st.observe(rec(1.0, "prod"))
    st.close()
    db = sqlite3.connect(path)
    cols = "id, workload, state, observed_at, tag_version, labels, problems, op_mode, op_quarantined, enrolled, "
    cols += "last_heartbeat, offline"
    db.executescript(
        "BEGIN; ALTER TABLE inventory RENAME TO inv2; CREATE TABLE inventory (id TEXT PRIMARY KEY,"
        " workload TEXT NOT NULL, state TEXT NOT NULL, observed_at REAL NOT NULL, tag_version INTEGER,"
        " labels TEXT NOT NULL DEFAULT '{}', problems TEXT NOT NULL DEFAULT '[]', op_mode TEXT,"
        " op_quarantined INTEGER NOT NULL DEFAULT 0, enrolled INTEGER NOT NULL DEFAULT 0, last_heartbeat REAL,"
        f" offline INTEGER NOT NULL DEFAULT 0); INSERT INTO inventory SELECT {cols} FROM inv2; DROP TABLE inv2;"
        " PRAGMA user_version = 1; COMMIT;"
    )
    db.close()
    st = SqliteStore(path)
    try:
        got = st.get(WID)
        assert got is not None and got.governed_rev == 0 and got.workload.tags == {"ringfence:env": "prod"}
        assert st.observe(_granted(2.0, {"role": "jumpbox"}, got), previous=got) is False
        assert st.get(WID).governed_rev == 1  # type: ignore[union-attr]
        assert st._db().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert st.integrity_check() == "ok"
    finally:
        st.close()


def test_an_expectation_stored_as_a_64_bit_key_id_binds_no_key(store: Store) -> None:
    """Resets made before keys were named by their whole fingerprint stored the 64-bit id: after
    the upgrade it matches no key (fail closed), the named one included; the operator resets again."""
    from ringfence.control.credentials import agent_key_id
    from ringfence.store.base import NotTheNamedKey
    from tests.aws.test_pipeline import AgentKey

    named = AgentKey()
    store.expect_agent_key("w", agent_key_id(named.pem))
    with pytest.raises(NotTheNamedKey):
        store.bind_agent_key("w", named.pem)
    assert store.agent_key("w") is None


def test_observe_addressed_refuses_an_address_another_active_workload_holds(store: Store) -> None:
    """The one-owner check in the write (both stores): an address held by another active record
    refuses the records, nothing written; one given twice among them likewise; an address moves
    between records written together; a tombstone's addresses are free. A cloud record (no claim)
    is found in the write on SQLite only. (The races: tests/onprem and tests/aws
    test_attack_address_race.py.)"""
    from ringfence.store.base import AddressTaken

    def onprem(wid: str, ips: list[str], t: float, state: str = "running") -> InventoryRecord:
        w = Workload(id=wid, ips=ips, cloud="onprem")
        return InventoryRecord(id=wid, workload=w, state=state, observed_at=t)

    assert store.observe_addressed([onprem("a", ["10.0.0.1"], 1.0), onprem("b", ["10.0.0.2"], 1.0)]) == {"a", "b"}
    with pytest.raises(AddressTaken) as taken:
        store.observe_addressed([onprem("c", ["10.0.0.3"], 2.0), onprem("d", ["10.0.0.9", "10.0.0.1"], 2.0)])
    assert taken.value.taken == {"10.0.0.1": "a"} and str(taken.value) == "10.0.0.1 is held by workload a"
    assert store.get("c") is None and store.get("d") is None
    with pytest.raises(AddressTaken) as taken:
        store.observe_addressed([onprem("c", ["10.0.0.3"], 2.0), onprem("d", ["10.0.0.3"], 2.0)])
    assert taken.value.taken == {"10.0.0.3": "c"}
    # a swap between records written together; a workload keeping its own address
    assert store.observe_addressed([onprem("a", ["10.0.0.2"], 3.0), onprem("b", ["10.0.0.1"], 3.0)]) == {"a", "b"}
    assert store.observe_addressed([onprem("a", ["10.0.0.2"], 4.0)]) == set()
    store.observe_addressed([onprem("b", [], 5.0, state="terminated")])
    assert store.observe_addressed([onprem("e", ["10.0.0.1"], 6.0)]) == {"e"}
    cloud = rec(7.0, "prod")  # a cloud instance holding 10.0.0.1 too (not checked at observation)
    store.observe(cloud.model_copy(update={"workload": cloud.workload.model_copy(update={"ips": ["10.0.0.5"]})}))
    if isinstance(store, SqliteStore):  # every active record is read in the write
        with pytest.raises(AddressTaken) as taken:
            store.observe_addressed([onprem("f", ["10.0.0.5"], 8.0)])
        assert taken.value.taken == {"10.0.0.5": WID}
    else:  # only claims are checked in the write: the caller's inventory read finds this holder
        assert store.observe_addressed([onprem("f", ["10.0.0.5"], 8.0)]) == {"f"}


def test_an_operator_change_decided_from_a_tombstone_lands_on_no_registration_after_it(store: Store) -> None:
    """set_operator with ``as_read`` checks the whole registration read (check_as_read, as the
    pairing and reset paths do): the version and deregistered or not. A registration over a
    tombstone that changes nothing governed keeps the tombstone's version, so a change decided from
    the tombstone, checked by the version alone, landed on the host registered after it. (The admin
    routes answer 404 for a deregistered workload before any write, so none of their changes is
    decided from a tombstone: the version alone told theirs apart. This holds the store to its
    contract, in set_operator and in audit_with, DynamoDB's own transaction.)"""
    from ringfence.store.base import ChangeFailed, OperatorChange, WorkloadChanged

    w = Workload(id="dc1-app-1", ips=["192.168.10.5"], cloud="onprem")
    store.observe(InventoryRecord(id=w.id, workload=w, state="running", observed_at=1.0))
    store.observe(InventoryRecord(id=w.id, workload=w, state="terminated", observed_at=2.0))
    gone = store.get(w.id)
    assert gone is not None and gone.state == "terminated"
    again = InventoryRecord(id=w.id, workload=w, state="running", observed_at=3.0, governed_rev=gone.governed_rev)
    store.observe(again, previous=gone)
    new = store.get(w.id)
    assert new is not None and new.state == "running" and new.governed_rev == gone.governed_rev, "the version kept"

    changes = [OperatorChange(w.id, quarantined=True, as_read=gone)]
    changes.append(OperatorChange(w.id, set_mode=True, mode=Mode.IDLE, as_read=gone))
    for change in changes:
        with pytest.raises(WorkloadChanged, match="registered again"):
            change.apply(store)
        with pytest.raises(ChangeFailed) as caught:
            store.audit_with(AuditRecord(principal="ivy", action="workload.quarantine", target=w.id), change)
        assert isinstance(caught.value.cause, WorkloadChanged)
    got = store.get(w.id)
    assert got is not None and not got.op_quarantined and got.op_mode is None, "a change read from the tombstone landed"
    assert store.audit_log() == [], "a refused change left its record"
    # decided from the registration stored: made
    store.audit_with(
        AuditRecord(principal="ivy", action="workload.quarantine", target=w.id), changes[0]._replace(as_read=new)
    )
    store.set_operator(w.id, mode=Mode.IDLE, as_read=new)
    got = store.get(w.id)
    assert got is not None and got.op_quarantined and got.op_mode is Mode.IDLE
