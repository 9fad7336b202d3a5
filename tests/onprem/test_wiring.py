"""LocalWiring runs the same services (Admin, AgentApi, Compute) over SQLite, files and a worker thread."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ringfence import bundle
from ringfence.agentapi import EnrollRequest
from ringfence.control.agents import AgentApi
from ringfence.control.api import secret_hash
from ringfence.local.publish import BadKey, FilePublisher
from ringfence.local.wiring import LocalWiring, StateInUse
from ringfence.model import Workload
from ringfence.store.base import InventoryRecord
from ringfence.store.sqlite import SqliteStore
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import ESTATE, boot, signing_key_file


def served(w: LocalWiring, wid: str) -> bundle.Bundle:
    """What the workload's agent enforces: the served bundle with the served deltas folded in."""
    api = AgentApi(w)
    cur = api.current(wid)
    assert isinstance(cur, tuple), f"no bundle for {wid}: {cur}"
    verifier = bundle.Verifier.from_pem(w.signer.public_pem())
    doc = bundle.load_bundle(cur[1])
    verifier.verify(doc)
    got = api.deltas(wid, doc.version)
    assert got.status == 200, got
    deltas = [bundle.load_delta(json.dumps(d)) for d in json.loads(got.body)["deltas"]]
    for d in deltas:
        verifier.verify(d)
    return bundle.fold_deltas(doc, deltas)


def in_sets(doc: bundle.Bundle, ip: str) -> bool:
    return any(f"{ip}/32" in s.v4 for s in doc.sets.values())


def test_policy_to_signed_bundles_on_one_machine(wiring: LocalWiring) -> None:
    boot(wiring)
    assert isinstance(wiring.store, SqliteStore)
    head = wiring.store.head()
    assert head.clean and head.policy_version == 1 and head.revision > 0
    for wid in ("dc1-web-1", "dc1-proc-1", "dc1-db-1"):
        ptr = wiring.store.bundle_pointer(wid)
        assert ptr is not None
        assert (wiring.state_dir / "objects" / ptr.key).is_file(), "bundles are files under the state directory"
    # the processing tier accepts the web tier: web's address is in one of its sets
    assert in_sets(served(wiring, "dc1-proc-1"), "192.168.10.11")
    pv = wiring.store.active_policy()
    assert pv is not None and pv.keys and all((wiring.state_dir / "objects" / k).is_file() for k in pv.keys.values())


def test_a_change_reaches_a_long_poll_through_the_notifier(wiring: LocalWiring) -> None:
    admin = boot(wiring)
    proc = "dc1-proc-1"
    api = AgentApi(wiring)
    v0 = api.latest_version(proc)
    assert v0 is not None
    wiring.store.put_token(secret_hash("proc-token"), proc, 600)  # each wake-up authorizes the wait again
    answers: list[tuple[float, int | None]] = []

    def long_poll() -> None:  # GET /v1/agents/{id}/wait?version=v0&timeout=20
        r = api.wait(proc, v0, 20, authorization="Bearer proc-token")
        answers.append((time.monotonic(), r.body["latest_version"]))

    t = threading.Thread(target=long_poll)
    t.start()
    time.sleep(0.3)  # the poll is waiting
    assert not answers, "nothing changed: the poll waits"
    spec = {
        "id": "dc1-web-2",
        "ips": ["192.168.10.12"],
        "tags": {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"},
    }
    changed_at = time.monotonic()
    assert admin.register_workload("alice", spec).status == 201
    t.join(30)
    assert answers and answers[0][1] is not None and answers[0][1] > v0
    assert answers[0][0] - changed_at < 15, "answered on the change, not at the 20 s timeout"
    assert in_sets(served(wiring, proc), "192.168.10.12")


def test_wait_for_change_times_out_without_a_change(wiring: LocalWiring) -> None:
    wiring.notifier.wait(0)  # a thread's first wait reports "maybe changed": consume it
    t0 = time.monotonic()
    assert wiring.notifier.wait(0.3) is False
    assert time.monotonic() - t0 >= 0.25


def enroll(w: LocalWiring, wid: str, key: str) -> tuple[int, dict[str, str]]:
    api = AgentApi(w)
    nonce = api.nonce().body["nonce"]
    fields = AgentKey().enroll_fields(wid, nonce)
    r = api.enroll(EnrollRequest(method="pairing", nonce=nonce, workload_id=wid, pairing_key=key, **fields))
    return r.status, r.body


def test_pairing_attacks_are_refused(wiring: LocalWiring) -> None:
    admin = boot(wiring)
    minted = admin.pairing_key("alice", "dc1-db-1", uses=1, ttl=600)
    assert minted.status == 201
    key = minted.body["pairing_key"]
    # foreign id: the key was issued for dc1-db-1
    status, body = enroll(wiring, "dc1-web-1", key)
    assert status == 401 and "not issued for dc1-web-1" in body["detail"]
    status, body = enroll(wiring, "dc1-db-1", key)
    assert status == 200 and body["workload_id"] == "dc1-db-1"
    assert wiring.store.token_workload(secret_hash(body["token"])) == "dc1-db-1"
    # used up
    status, body = enroll(wiring, "dc1-db-1", key)
    assert status == 401 and "used up" in body["detail"]
    # expired
    wiring.store.put_pairing(secret_hash("stale"), "dc1-db-1", uses=3, ttl=-1)
    status, body = enroll(wiring, "dc1-db-1", "stale")
    assert status == 401 and "expired" in body["detail"]
    # a cloud instance's id: refused at minting and at enrollment
    ec2 = Workload(id="i-0abc", ips=["10.0.0.9"], cloud="aws", account="1", region="ca-central-1")
    wiring.store.observe(InventoryRecord(id=ec2.id, workload=ec2, observed_at=time.time()))
    assert admin.pairing_key("alice", "i-0abc", uses=1, ttl=600).status == 409
    wiring.store.put_pairing(secret_hash("k"), "i-0abc", uses=1, ttl=600)
    status, body = enroll(wiring, "i-0abc", "k")
    # refused as any bad key is: the answer tells no one which ids are cloud instances
    assert status == 401 and "pairing key is unknown" in body["detail"], body
    assert admin.pairing_key("alice", "never-registered", uses=1, ttl=600).status == 404
    actions = [a.action for a in wiring.store.audit_log()]
    assert actions.count("pairing.create") == 1


def test_the_local_control_plane_enrolls_by_pairing_only(wiring: LocalWiring) -> None:
    api = AgentApi(wiring)
    nonce = api.nonce().body["nonce"]
    r = api.enroll(EnrollRequest(method="aws-iid", nonce=nonce, document="{}", document_signature="x"))
    assert r.status == 400 and "aws-iid is not enabled" in r.body["detail"]


def test_the_state_directory_has_one_control_plane(wiring: LocalWiring, tmp_path: Path) -> None:
    with pytest.raises(StateInUse):
        LocalWiring(wiring.database, signing_key=signing_key_file(tmp_path))


def test_the_state_directory_keeps_its_own_signing_key(tmp_path: Path) -> None:
    db = tmp_path / "rf" / "state.db"  # what `ringfence serve --store sqlite:PATH` passes
    with LocalWiring(db) as w:
        first = w.signer.public_pem()
    private = tmp_path / "rf" / "signing-key.pem"
    assert private.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "rf" / "signing-key.pub.pem").read_bytes() == first
    with LocalWiring(db) as w:
        assert w.signer.public_pem() == first, "a restart signs with the same key"


def test_a_failed_start_leaves_the_state_directory_free(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    bad.chmod(0o600)
    with pytest.raises(ValueError):
        LocalWiring(tmp_path / "rf" / "state.db", signing_key=bad)
    LocalWiring(tmp_path / "rf" / "state.db", signing_key=signing_key_file(tmp_path)).close()


def test_published_keys_never_leave_the_directory(tmp_path: Path) -> None:
    """Nor alias another key: a key that is not its own normal form (``a//b``, ``a/``) is refused."""
    pub = FilePublisher(tmp_path / "objects")
    for key in ("../x", "/etc/passwd", "a/../../b", ".hidden", "a\\b", "", "policies/v000001//p.yaml", "a/"):
        with pytest.raises(BadKey):
            pub.put_text(key, "x")
    pub.put_text("policies/v000001/p.yaml", "rules: []\n")
    assert pub.get("policies/v000001/p.yaml") == b"rules: []\n"
    assert not [p for p in (tmp_path / "objects").rglob(".tmp-*")], "no temporary file is left behind"


def test_the_label_mapper_never_keeps_no_policy(wiring: LocalWiring) -> None:
    """The mapper is cached (AWS: 30 s), but not its absence: the first observation after a policy
    is provisioned resolves labels (the perimeter places a launching instance by them)."""
    wiring.mapper_ttl = 30.0
    assert wiring.mapper() is None
    boot(wiring)
    assert wiring.mapper() is not None


def test_compute_refresh_resigns_bundles_near_expiry_at_the_same_version(wiring: LocalWiring) -> None:
    """The schedule's refresh (reconcile in AWS, the worker's idle timer here): compute re-signs
    the bundles expiring within bundle_refresh_before, same version, later expiry, new ETag;
    the others stay as they are. Only compute signs."""
    boot(wiring)
    near, far = "dc1-web-1", "dc1-db-1"
    before = {w: wiring.store.bundle_pointer(w) for w in (near, far)}
    old = bundle.load_bundle(wiring.publisher.get(before[near].key))  # type: ignore[union-attr]
    wiring.compute.expiry[near] = int(time.time()) + 60  # as if signed long ago
    wiring.cfg.bundle_ttl += 3600  # (within the same second, a re-signed bundle would be the same bytes)
    wiring.enqueue_compute(refresh=True)
    assert wiring.settle(60)
    after = {w: wiring.store.bundle_pointer(w) for w in (near, far)}
    assert after[far] == before[far]
    p0, p1 = before[near], after[near]
    assert p0 is not None and p1 is not None
    assert p1.version == p0.version and p1.key != p0.key and p1.etag != p0.etag
    new = bundle.load_bundle(wiring.publisher.get(p1.key))
    bundle.Verifier.from_pem(wiring.signer.public_pem()).verify(new)
    assert new.content() == old.content() and (new.expires_at or 0) > (old.expires_at or 0)


def test_the_agent_api_reads_a_stored_document_once(wiring: LocalWiring, monkeypatch: Any) -> None:
    boot(wiring)
    api = AgentApi(wiring)
    reads: list[str] = []
    real_get = wiring.publisher.get

    def counted(key: str) -> bytes:
        reads.append(key)
        return real_get(key)

    monkeypatch.setattr(wiring.publisher, "get", counted)
    first = api.current("dc1-proc-1")
    again = api.current("dc1-proc-1")
    assert isinstance(first, tuple) and isinstance(again, tuple) and first[1] == again[1]
    ptr = wiring.store.bundle_pointer("dc1-proc-1")
    assert ptr is not None and reads == [ptr.key], "the second fetch of the same document was not read again"
    api.current("dc1-web-1")
    assert len(reads) == 2, "another document is read"


def test_agent_reports_become_flow_rows_on_one_machine(wiring: LocalWiring) -> None:
    """No S3 event on premise: the agent API folds a report batch into the flow rows at once."""
    from ringfence.agentapi import ReportBatch
    from ringfence.flows.aggregate import merge

    boot(wiring)
    now = time.time()
    batch = ReportBatch.model_validate(
        {
            "flows": [{"start": now, "end": now + 1, "src": "192.168.10.11", "dst": "192.168.10.21", "proto": "tcp",
                       "dport": 8443, "packets": 3, "bytes": 90, "direction": "outbound"}],
            "drops": [{"time": now, "direction": "outbound", "src": "192.168.10.11", "dst": "192.168.10.31",
                       "proto": "tcp", "dport": 5432, "action": "drop", "count": 2}],
        }
    )  # fmt: skip
    assert AgentApi(wiring).reports("dc1-web-1", batch).status == 202
    rows = {(r.dst.rsplit("role=", 1)[1], r.decision): r for r in merge(wiring.store.flow_rows())}
    assert rows[("processing", "allowed")].flows == 1 and "web-to-processing" in rows[("processing", "allowed")].rule
    assert rows[("database", "blocked")].flows == 2


def test_attack_an_agent_inventing_flows_between_other_workloads_is_not_taken(wiring: LocalWiring) -> None:
    """Root on one host could report a flow between two others (processing → database): it
    would steer the dependency map and rule suggestions. Only flows with an end that is the
    reporter's own address are taken."""
    from ringfence.agentapi import ReportBatch

    boot(wiring)
    now = time.time()
    flow = {"start": now, "end": now + 1, "proto": "tcp", "packets": 3, "bytes": 90, "direction": "outbound"}
    batch = ReportBatch.model_validate(
        {
            "flows": [
                {**flow, "src": "192.168.10.21", "dst": "192.168.10.31", "dport": 5432},  # proc → db: not its own
                {**flow, "src": "192.168.10.11", "dst": "192.168.10.21", "dport": 8443},  # its own
                {**flow, "src": "192.168.10.21", "dst": "192.168.10.11", "dport": 22, "direction": "inbound"},  # own
            ]
        }
    )
    assert AgentApi(wiring).reports("dc1-web-1", batch).status == 202
    rows = wiring.store.flow_rows()
    assert rows and not any("role=database" in r.dst for r in rows), rows
    assert sum(r.flows for r in rows) == 2
    # the batch itself is still archived as sent (a later ingest applies the same rule)
    from ringfence.flows.ingest import FlowIngest

    policy = wiring.active_policy()
    assert policy is not None
    result = FlowIngest(wiring.store, policy[1]).agent_batch("dc1-web-1", batch.model_dump(mode="json"))
    assert result.foreign == 1 and result.flows == 2


def test_the_governing_policy_is_read_once_per_batch_and_fresh_outside_one(wiring: LocalWiring) -> None:
    """Inside begin_batch/end_batch the store's active policy is read once (a batch of ten events
    made ten reads of it); outside a batch, and in the next batch, it is read when asked, so a
    provision between batches governs the next one."""
    boot(wiring)
    reads: list[int] = []
    real = wiring.store.active_policy

    def counted() -> Any:
        reads.append(1)
        return real()

    wiring.store.active_policy = counted  # type: ignore[method-assign]
    wiring.begin_batch()
    first = [wiring.governing_policy() for _ in range(10)]
    assert len(reads) == 1 and all(p is first[0] for p in first) and first[0] is not None
    wiring.end_batch()
    wiring.governing_policy()
    wiring.governing_policy()
    assert len(reads) == 3, "outside a batch: read every time"
    wiring.begin_batch()
    wiring.governing_policy()
    assert len(reads) == 4, "a new batch reads again"
    wiring.end_batch()


def test_reports_read_the_whole_inventory_only_when_it_may_have_changed(
    wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each report used to note every workload's addresses (a read of the whole inventory: 45 ms
    at 1,000 workloads, 316 ms at 5,000, per report). Now the agent API does that pass only when
    compute moved the engine head or an inventory record changed since the last one, or once it
    is FLOW_SYNC_MAX_AGE old; in between, the reporter's own addresses are noted. An agent's
    heartbeat is no change of the inventory's; a pass that failed is tried again at the next report."""
    from ringfence.agentapi import ReportBatch
    from ringfence.control import agents

    admin = boot(wiring)
    passes = [0]
    whole = wiring.store.all_records

    def counted() -> list[InventoryRecord]:
        passes[0] += 1
        return whole()

    monkeypatch.setattr(wiring.store, "all_records", counted)
    api = AgentApi(wiring)

    def report(wid: str, src: str) -> None:
        now = time.time()
        flow = {"start": now, "end": now + 1, "src": src, "dst": "192.168.10.21", "proto": "tcp", "dport": 8443}
        batch = ReportBatch.model_validate({"flows": [{**flow, "packets": 1, "bytes": 60, "direction": "outbound"}]})
        assert api.reports(wid, batch).status == 202

    def taken_from(src_labels: str) -> int:
        return sum(r.flows for r in wiring.store.flow_rows() if src_labels in r.src)

    report("dc1-web-1", "192.168.10.11")
    wiring.store.set_liveness("dc1-web-1", heartbeat=time.time())
    report("dc1-web-1", "192.168.10.11")
    assert passes[0] == 1, "the second report, after only a heartbeat, read no whole inventory"
    # a workload stored (say, an observation) that compute has not reached: the next report
    # notes it with the rest, so its flows and its peers' flows to it count at once
    new = Workload(id="dc1-web-9", ips=["192.168.10.19"], tags={"ringfence:role": "web", "ringfence:app": "ordering",
                   "ringfence:env": "prod", "ringfence:loc": "dc1"}, cloud="onprem")  # fmt: skip
    wiring.store.observe(InventoryRecord(id=new.id, workload=new, observed_at=time.time()))
    before = taken_from("role=web")
    report("dc1-web-9", "192.168.10.19")
    assert passes[0] == 2 and taken_from("role=web") == before + 1
    # compute moved the head: the next report makes the pass; so does its age
    revision = wiring.store.head().revision
    counted_so_far = passes[0]
    assert admin.register_workload("alice", {**ESTATE[0], "id": "dc1-web-8", "ips": ["192.168.10.18"]}).status == 201
    passes[0] = counted_so_far  # the registration's own read (its address check) is no report's pass
    assert wiring.settle(60) and wiring.store.head().revision > revision
    report("dc1-web-1", "192.168.10.11")
    assert passes[0] == 3
    report("dc1-web-1", "192.168.10.11")
    assert passes[0] == 3
    monkeypatch.setattr(agents, "FLOW_SYNC_MAX_AGE", 0.0)
    report("dc1-web-1", "192.168.10.11")
    assert passes[0] == 4
    monkeypatch.setattr(agents, "FLOW_SYNC_MAX_AGE", 30.0)
    # a pass that fails (the store busy, say) is not taken for done: the next report tries again
    wiring.store.set_operator("dc1-web-8", quarantined=True)
    failing = [True]

    def flaky() -> list[InventoryRecord]:
        passes[0] += 1
        if failing.pop() if failing else False:
            raise RuntimeError("database is locked")
        return whole()

    monkeypatch.setattr(wiring.store, "all_records", flaky)
    report("dc1-web-1", "192.168.10.11")
    report("dc1-web-1", "192.168.10.11")
    assert passes[0] == 6, "the failed pass was made again"
    report("dc1-web-1", "192.168.10.11")
    assert passes[0] == 6


def test_reports_during_a_full_address_pass_take_the_fast_path(
    wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full pass is recorded only once it succeeded, so every report arriving while one ran
    started its own (at 5,000 agents: dozens of 300 ms passes after each inventory change, each
    writing the same intervals again). One report makes the pass; the others note their own
    addresses meanwhile and their flows are taken; a pass that raised lets the next report make it."""
    from ringfence.agentapi import ReportBatch

    boot(wiring)
    api = AgentApi(wiring)
    whole = wiring.store.all_records
    passes = [0]
    entered, release = threading.Event(), threading.Event()
    failing = [False]

    def blocking() -> list[InventoryRecord]:
        passes[0] += 1
        if failing[0]:
            failing[0] = False
            raise RuntimeError("database is locked")
        if passes[0] == 2:  # the pass after the inventory changed: held until released
            entered.set()
            release.wait(10)
        return whole()

    monkeypatch.setattr(wiring.store, "all_records", blocking)

    def report(wid: str, src: str, dst: str) -> None:
        now = time.time()
        flow = {"start": now, "end": now + 1, "src": src, "dst": dst, "proto": "tcp", "dport": 8443}
        batch = ReportBatch.model_validate({"flows": [{**flow, "packets": 1, "bytes": 60, "direction": "outbound"}]})
        assert api.reports(wid, batch).status == 202

    def taken_from(src_labels: str) -> int:
        return sum(r.flows for r in wiring.store.flow_rows() if src_labels in r.src)

    report("dc1-web-1", "192.168.10.11", "192.168.10.21")
    assert passes[0] == 1
    wiring.store.set_operator("dc1-db-1", quarantined=True)  # an inventory change: the next report passes
    first = threading.Thread(target=report, args=("dc1-web-1", "192.168.10.11", "192.168.10.21"))
    first.start()
    try:
        assert entered.wait(10), "the first report's pass started"
        second = threading.Thread(target=report, args=("dc1-proc-1", "192.168.10.21", "192.168.10.31"))
        second.start()
        second.join(10)
        assert not second.is_alive(), "the second report did not wait for the pass"
        assert passes[0] == 2, "the report during the pass made none of its own"
        assert taken_from("role=processing") == 1, "its flows were taken by its own addresses"
    finally:
        release.set()
        first.join(10)
    assert not first.is_alive() and taken_from("role=web") == 2
    report("dc1-web-1", "192.168.10.11", "192.168.10.21")
    assert passes[0] == 2, "the pass that ended was recorded"
    # a pass that raised is not in progress any more: the next report makes it again
    wiring.store.set_operator("dc1-db-1", quarantined=False)
    failing[0] = True
    report("dc1-web-1", "192.168.10.11", "192.168.10.21")
    assert passes[0] == 3
    report("dc1-web-1", "192.168.10.11", "192.168.10.21")
    assert passes[0] == 4, "the failed pass was made again"
    report("dc1-web-1", "192.168.10.11", "192.168.10.21")
    assert passes[0] == 4


def test_a_shared_address_does_not_change_hands_at_every_report(wiring: LocalWiring) -> None:
    """Two running workloads with the same private address (two sites, two VPCs): the full pass
    names one owner; reports of the other must not take the address back at each report (each
    flip opened an interval in the address history, without end). The other's flows are its own
    all the same: they are taken, under its labels, not dropped as foreign (they were, at every
    report). A workload that does not hold the address (any more) still cannot report for it."""
    from ringfence.agentapi import ReportBatch
    from ringfence.flows.aggregate import merge

    boot(wiring)
    api = AgentApi(wiring)
    twin = Workload(id="dc2-web-1", ips=["192.168.10.11"], tags={"ringfence:role": "web", "ringfence:app": "ordering",
                    "ringfence:env": "prod", "ringfence:loc": "dc2"}, cloud="onprem")  # fmt: skip
    wiring.store.observe(InventoryRecord(id=twin.id, workload=twin, observed_at=time.time()))
    # a third that had the address once and stopped: its record lists it, it holds it no more
    gone = twin.model_copy(update={"id": "dc3-web-1"})
    wiring.store.observe(InventoryRecord(id=gone.id, workload=gone, observed_at=time.time(), state="stopped"))

    def report(wid: str, src: str = "192.168.10.11", dport: int = 8443) -> None:
        now = time.time()
        flow = {"start": now, "end": now + 1, "src": src, "dst": "192.168.10.21", "proto": "tcp"}
        batch = ReportBatch.model_validate({"flows": [{**flow, "dport": dport, "packets": 1, "bytes": 60,
                                                      "direction": "outbound"}]})  # fmt: skip
        assert api.reports(wid, batch).status == 202

    for _ in range(3):
        report("dc1-web-1")
        report("dc2-web-1")
    history = wiring.store.address_history(["192.168.10.11"])["192.168.10.11"]
    assert len(history) == 1, [(o.since, o.workload_id) for o in history]
    # each twin's flows under its own labels (dc2's loc is no allowed value: no loc label)
    rows = {(r.src, r.port): r.flows for r in merge(wiring.store.flow_rows())}
    assert rows.pop(("app=ordering,env=prod,loc=ca,role=web", 8443)) == 3, rows
    assert rows.pop(("app=ordering,env=prod,role=web", 8443)) == 3, rows
    assert not rows, rows
    # the stopped one, and a running one that never had the address, report for it: not taken
    report("dc3-web-1", dport=9000)
    report("dc1-db-1", dport=9001)
    report("dc1-db-1", src="192.168.10.99", dport=9002)  # nobody's address
    assert not [r for r in wiring.store.flow_rows() if r.port in (9000, 9001, 9002)]
    history = wiring.store.address_history(["192.168.10.11"])["192.168.10.11"]
    assert len(history) == 1, [(o.since, o.workload_id) for o in history]


def test_a_rewrite_refused_by_a_newer_decision_is_made_on_the_record_as_it_is_now(wiring: LocalWiring) -> None:
    """A terminate lifecycle action's write (``rewrite_governed``): a binding landing after the
    caller's read refuses the write, which is made again on the record read anew, so the binding
    stays; and when the record meanwhile left (EC2 said terminated), nothing is written over it."""
    from ringfence.clouds.aws.ingest import _store_leaving

    w = Workload(id="i-1", ips=["10.0.0.1"], tags={"ringfence:env": "prod"}, cloud="aws")
    wiring.store.observe(InventoryRecord(id="i-1", workload=w, observed_at=10.0))

    def bind(grants: dict[str, str], t: float) -> None:
        now = wiring.store.get("i-1")
        assert now is not None
        granted = now.workload.model_copy(update={"label_grants": grants})
        wiring.store.observe(now.model_copy(update={"workload": granted, "observed_at": t}))

    stale = wiring.store.get("i-1")
    assert stale is not None
    bind({"role": "jumpbox"}, 11.0)
    assert _store_leaving(wiring, stale, 20.0) is True
    now = wiring.store.get("i-1")
    assert now is not None and now.state == "terminating" and now.workload.label_grants == {"role": "jumpbox"}

    wiring.store.observe(InventoryRecord(id="i-2", workload=w.model_copy(update={"id": "i-2"}), observed_at=10.0))
    stale = wiring.store.get("i-2")
    assert stale is not None
    gone = stale.model_copy(update={"state": "terminated", "observed_at": 12.0})
    grant = stale.workload.model_copy(update={"label_grants": {"role": "jumpbox"}})
    wiring.store.observe(stale.model_copy(update={"workload": grant, "observed_at": 11.0}))
    wiring.store.observe(gone)
    assert _store_leaving(wiring, stale, 20.0) is False
    after = wiring.store.get("i-2")
    assert after is not None and after.state == "terminated", "a terminated record is not made terminating again"
