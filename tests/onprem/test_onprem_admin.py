"""On-premise admin: register workloads, import a CMDB CSV (all or nothing), deregister; audited."""

from __future__ import annotations

import time

import pytest

from ringfence.cmdb import CmdbError, parse_cmdb_csv
from ringfence.local.wiring import LocalWiring
from ringfence.model import Workload
from ringfence.store.base import InventoryRecord
from tests.onprem.conftest import boot
from tests.onprem.test_wiring import in_sets, served

GOOD = """\ufeffid,name,ips,site,ringfence:role,ringfence:app,ringfence:env,label:loc,owner
dc2-web-1,web one,192.168.20.11;192.168.20.12,dc2,web,ordering,prod,ca,team-a
dc2-web-2,"web, two",192.168.20.13 | fd00::13,dc2,web,ordering,prod,,
dc2-db-1,db,192.168.20.31,dc2,database,ordering,prod,ca,
"""

BAD = """id,ips,role
ok-1,10.0.0.1,web
bad id,10.0.0.2,web
ok-2,10.0.0.300,web
ok-1,10.0.0.4,web
ok-3,"10.0.0.5
10.0.0.x",web
ok-4,,web
ok-5,10.0.0.6
"""


def test_cmdb_rows_become_workloads() -> None:
    ws = {w.id: w for w in parse_cmdb_csv(GOOD, "cmdb.csv")}
    assert list(ws) == ["dc2-web-1", "dc2-web-2", "dc2-db-1"]
    w = ws["dc2-web-1"]
    assert w.ips == ["192.168.20.11", "192.168.20.12"] and w.name == "web one" and w.site == "dc2"
    assert w.tags == {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "owner": "team-a"}
    assert w.labels == {"loc": "ca"} and w.cloud == "onprem"
    assert ws["dc2-web-2"].ips == ["192.168.20.13", "fd00::13"] and ws["dc2-web-2"].labels == {}


def test_every_bad_row_is_named_by_file_line_and_column() -> None:
    with pytest.raises(CmdbError) as exc:
        parse_cmdb_csv(BAD, "/srv/cmdb/export.csv")
    assert exc.value.errors == [
        "/srv/cmdb/export.csv:3:1: workload id 'bad id' must be 1-128 of A-Z a-z 0-9 _ . : - and start with a letter or digit",
        "/srv/cmdb/export.csv:4:6: not an IP address: '10.0.0.300'",
        "/srv/cmdb/export.csv:5:1: workload ok-1 appears twice (first on line 2)",
        "/srv/cmdb/export.csv:6:6: not an IP address: '10.0.0.x'",  # the cell starts on line 6
        "/srv/cmdb/export.csv:8:6: workload ok-4 has no address",
        "/srv/cmdb/export.csv:9:1: row has 2 fields, the header has 3",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "cmdb.csv:1:1: no header row"),
        ("name,ips\nx,10.0.0.1\n", "cmdb.csv:1:1: no 'id' column"),
        ("id,ips,role,role\n", "cmdb.csv:1:13: column 'role' appears twice"),
        ("id,ips,,x\n", "cmdb.csv:1:8: column 3 has no name"),
        ("id,ips,label:\n", "cmdb.csv:1:8: label: column without a dimension name"),
    ],
)
def test_header_problems(text: str, message: str) -> None:
    with pytest.raises(CmdbError) as exc:
        parse_cmdb_csv(text)
    assert str(exc.value).startswith(message), str(exc.value)


def test_import_is_all_or_nothing_and_audited(wiring: LocalWiring) -> None:
    admin = boot(wiring)
    before = (wiring.store.all_records(), wiring.store.audit_log())
    r = admin.import_cmdb("bob", BAD, "export.csv")
    assert r.status == 400 and r.body["error"] == "CMDB file rejected: nothing imported"
    assert "export.csv:4:6: not an IP address: '10.0.0.300'" in r.body["detail"]
    assert (wiring.store.all_records(), wiring.store.audit_log()) == before, "a bad file writes nothing"
    # a row naming a cloud instance refuses the file too
    ec2 = Workload(id="i-0abc", ips=["10.0.0.9"], cloud="aws", account="1", region="ca-central-1")
    wiring.store.observe(InventoryRecord(id=ec2.id, workload=ec2, observed_at=time.time()))
    r = admin.import_cmdb("bob", "id,ips\ndc2-x,10.1.1.1\ni-0abc,10.1.1.2\n", "cloud.csv")
    assert r.status == 409 and "i-0abc is a aws instance" in r.body["detail"]
    assert wiring.store.get("dc2-x") is None

    r = admin.import_cmdb("bob", GOOD, "cmdb.csv", reason="CHG-1")
    assert r.status == 200 and r.body["imported"] == 3 and r.body["created"] == 3
    assert wiring.settle(60)
    rec = wiring.store.get("dc2-db-1")
    assert rec is not None and rec.workload.cloud == "onprem" and rec.labels.get("role") == "database"
    last = wiring.store.audit_log()[-1]
    assert (last.principal, last.action, last.target, last.reason) == ("bob", "workload.import", "cmdb.csv", "CHG-1")
    assert last.detail["created"] == ["dc2-db-1", "dc2-web-1", "dc2-web-2"]
    # imported web servers are peers of the processing tier now
    assert in_sets(served(wiring, "dc1-proc-1"), "192.168.20.11")
    # dc2-web-2 has no loc: a missing value is shared with nobody, so it is no peer of dc1 (ca)
    assert not in_sets(served(wiring, "dc1-proc-1"), "192.168.20.13")
    # importing again updates, and says so
    r = admin.import_cmdb("bob", GOOD, "cmdb.csv")
    assert r.body["updated"] == 3 and r.body["created"] == 0


def test_register_update_and_deregister(wiring: LocalWiring) -> None:
    admin = boot(wiring)
    assert admin.register_workload("alice", {"id": "bad id", "ips": ["10.0.0.1"]}).status == 400
    assert admin.register_workload("alice", {"id": "x", "ips": []}).status == 400
    assert admin.register_workload("alice", {"id": "x", "ips": ["10.0.0.300"]}).status == 400
    reserved = admin.register_workload("alice", {"id": "import", "ips": ["10.0.0.1"]})
    assert reserved.status == 400 and "reserved" in str(reserved.body), reserved.body
    spec = {
        "id": "dc1-web-2",
        "ips": ["192.168.10.12"],
        "tags": {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"},
    }
    assert admin.register_workload("alice", spec).status == 201
    moved = {**spec, "ips": ["192.168.10.99"]}
    r = admin.register_workload("alice", moved, reason="re-IP")
    assert r.status == 200 and r.body["created"] is False
    assert wiring.settle(60)
    doc = served(wiring, "dc1-proc-1")
    assert in_sets(doc, "192.168.10.99") and not in_sets(doc, "192.168.10.12")
    assert admin.deregister_workload("alice", "dc1-web-2", "decommissioned").status == 200
    assert wiring.settle(60)
    assert not in_sets(served(wiring, "dc1-proc-1"), "192.168.10.99")
    assert admin.deregister_workload("alice", "nobody").status == 404
    ec2 = Workload(id="i-0abc", ips=["10.0.0.9"], cloud="aws", account="1", region="ca-central-1")
    wiring.store.observe(InventoryRecord(id=ec2.id, workload=ec2, observed_at=time.time()))
    assert admin.register_workload("alice", {"id": "i-0abc", "ips": ["10.0.0.10"]}).status == 409
    assert admin.deregister_workload("alice", "i-0abc").status == 409
    assert wiring.store.get("i-0abc").workload.ips == ["10.0.0.9"]  # type: ignore[union-attr]
    actions = [(a.action, a.target) for a in wiring.store.audit_log() if a.action.startswith("workload.")]
    assert actions[-3:] == [
        ("workload.register", "dc1-web-2"),
        ("workload.register", "dc1-web-2"),
        ("workload.deregister", "dc1-web-2"),
    ]


def test_an_operator_who_may_bind_registering_a_jumpbox_is_an_audited_binding_of_its_privileged_values(
    wiring: LocalWiring,
) -> None:
    """On premise no cloud event names a tagger: the registration (audited) of an operator who may
    bind privileged values (``label.bind``: a policy author) is what grants ``role: jumpbox`` and
    ``app: admin``, so the jumpbox is never held and its SSH rule reaches the database; the audit
    record names the grant. Anyone else's is held (tests/onprem/test_attack_admin_roles.py)."""
    admin = boot(wiring)
    jump = {
        "id": "dc1-jump-1",
        "ips": ["192.168.99.5"],
        "tags": {"ringfence:role": "jumpbox", "ringfence:app": "admin", "ringfence:env": "shared"},
    }
    assert admin.register_workload("alice", jump, reason="CHG-7", may_bind=True).status == 201
    assert wiring.settle(60)
    rec = wiring.store.get("dc1-jump-1")
    assert rec is not None and rec.workload.held_labels is None
    assert rec.workload.label_grants == {"role": "jumpbox", "app": "admin"}
    assert rec.labels["role"] == "jumpbox" and rec.labels["app"] == "admin"
    last = wiring.store.audit_log()[-1]
    assert (last.principal, last.action, last.reason) == ("alice", "workload.register", "CHG-7")
    assert last.detail["label_grants"] == {"role": "jumpbox", "app": "admin"}
    assert in_sets(served(wiring, "dc1-db-1"), "192.168.99.5")  # the jumpbox's SSH reaches the database
    # an ordinary workload grants nothing
    r = admin.import_cmdb("bob", GOOD, "cmdb.csv")
    assert r.status == 200 and "label_grants" not in wiring.store.audit_log()[-1].detail


def test_state_changes_carry_before_and_after_digests_in_one_verified_chain(wiring: LocalWiring) -> None:
    from ringfence.audit import state_digest, verify
    from ringfence.model import Mode
    from tests.onprem.conftest import policy_files

    admin = boot(wiring)
    first = wiring.store.audit_log()[-1]
    assert first.action == "policy.provision" and first.before == "" and first.after == first.detail["digest"]
    files = policy_files()
    files["tests.yaml"] += "\n"
    assert admin.provision("bob", files, "a second version").status == 201
    second = wiring.store.audit_log()[-1]
    assert (second.before, second.after) == (first.after, second.detail["digest"]) and second.after != first.after
    assert admin.set_mode("bob", "dc1-web-1", Mode.OBSERVE, "try").status == 200
    assert admin.quarantine("carol", "dc1-web-1", True, "IR-1").status == 200
    mode, quar = wiring.store.audit_log()[-2:]
    untouched = state_digest({"mode": None, "quarantined": False})
    observing = state_digest({"mode": "observe", "quarantined": False})
    assert (mode.before, mode.after) == (untouched, observing)
    assert (quar.before, quar.after) == (observing, state_digest({"mode": "observe", "quarantined": True}))
    assert verify(wiring.store.audit_log(), wiring.store.audit_head()).ok
