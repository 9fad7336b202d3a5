"""Registering and importing on-premise workloads under ``ringfence serve`` over SQLite (the real
HTTP server, the library's routes, LocalWiring): a grant stays with the host it was made for, an
address is one workload's, and a label problem in the data is answered."""

from __future__ import annotations

import time

from ringfence.model import Workload
from ringfence.store.base import InventoryRecord
from tests.onprem.conftest import ESTATE, Served

PRIVILEGED = {"ringfence:role": "jumpbox", "ringfence:app": "admin"}
JUMP = {"id": "jb-1", "ips": ["192.168.50.5"], "tags": {**PRIVILEGED, "ringfence:env": "prod", "ringfence:loc": "ca"}}
ELSEWHERE = "10.66.66.66"
HEADER = "id,ips,ringfence:role,ringfence:app,ringfence:env,ringfence:loc\n"


def _granted(served: Served) -> None:
    """jb-1 registered by a caller who may bind (onboarding and policy-author): granted."""
    r = served.call("pat", "POST", "/admin/workloads", {**JUMP, "reason": "CHG-1 jumpbox"})
    assert r.status_code in (200, 201) and "held" not in r.json(), r.text
    rec = served.wiring.store.get("jb-1")
    assert (
        rec is not None
        and rec.labels["role"] == "jumpbox"
        and rec.workload.label_grants
        == {
            "role": "jumpbox",
            "app": "admin",
        }
    )


def _not_privileged(served: Served) -> None:
    rec = served.wiring.store.get("jb-1")
    assert rec is not None and rec.workload.ips == [ELSEWHERE]
    assert rec.workload.label_grants == {}, "the grant must not follow the id to the new address"
    assert rec.labels.get("role") != "jumpbox" and rec.labels.get("app") != "admin", rec.labels
    assert rec.labels.get("env") == "prod", "the workload keeps its labels that are not privileged"


def test_attack_onboarding_cannot_move_a_granted_workload_to_another_address(served: Served) -> None:
    """A policy author's grant (role=jumpbox, app=admin) was for the host at its addresses. An
    ``onboarding`` token re-registering the workload with an address it did not have (same tags)
    would carry the grant there: SSH to every host from an address of its choosing. The grant is
    dropped and the privileged values held, as a new privileged tag from that caller is: answered
    and audited as ``held`` (the audit names the grants dropped), until a policy author binds
    again; a later binding of another dimension does not bring it back. The same by CMDB import.
    Dropping an address, or re-registering the same ones, keeps the grant."""
    store = served.wiring.store
    _granted(served)
    # a binding (of app alone) records the governed dimensions' writes, the grants among them
    r = served.call("paula", "PUT", "/admin/workloads/jb-1/labels", {"labels": {"app": "admin"}, "reason": "CHG-1b"})
    assert r.status_code == 200, r.text
    # the same addresses (a routine sync) and one address fewer keep the grant
    r = served.call("otto", "POST", "/admin/workloads", {**JUMP, "reason": "sync"})
    assert r.status_code == 200 and "held" not in r.json(), r.text
    assert (rec := store.get("jb-1")) is not None and rec.labels["role"] == "jumpbox"

    r = served.call("otto", "POST", "/admin/workloads", {**JUMP, "ips": [ELSEWHERE], "reason": "otto moves it"})
    assert r.status_code == 200 and r.json()["held"] == {"role": "jumpbox", "app": "admin"}, r.text
    _not_privileged(served)
    last = served.audit("workload.register")[-1]
    assert last.principal == "otto" and last.detail["held"] == {"role": "jumpbox", "app": "admin"}
    assert last.detail["grants_dropped"] == {"role": "jumpbox", "app": "admin"} and "label_grants" not in last.detail
    # a policy author binding app alone brings nothing of the old grant back (its writes are gone)
    r = served.call("paula", "PUT", "/admin/workloads/jb-1/labels", {"labels": {"app": "admin"}, "reason": "CHG-2"})
    assert r.status_code == 200, r.text
    assert (rec := store.get("jb-1")) is not None and rec.labels.get("role") != "jumpbox", rec.labels
    # a policy author binds role again: the workload at its new address is a jumpbox
    r = served.call("paula", "PUT", "/admin/workloads/jb-1/labels", {"labels": {"role": "jumpbox"}, "reason": "CHG-3"})
    assert r.status_code == 200, r.text
    assert (rec := store.get("jb-1")) is not None and rec.labels["role"] == "jumpbox"

    # by CMDB import: granted again at the first address, then moved by onboarding's file
    assert served.call("pat", "POST", "/admin/workloads", {**JUMP, "reason": "CHG-4 back"}).status_code == 200
    assert (rec := store.get("jb-1")) is not None and rec.workload.label_grants == {"role": "jumpbox", "app": "admin"}
    csv = HEADER + f"jb-1,{ELSEWHERE},jumpbox,admin,prod,ca\n"
    r = served.call("otto", "POST", "/admin/workloads/import", {"csv": csv, "source": "cmdb.csv"})
    assert r.status_code == 200 and r.json()["held"] == {"jb-1": {"role": "jumpbox", "app": "admin"}}, r.text
    _not_privileged(served)
    imported = served.audit("workload.import")[-1]
    assert imported.detail["grants_dropped"] == {"jb-1": {"role": "jumpbox", "app": "admin"}}
    assert imported.detail["held"] == {"jb-1": {"role": "jumpbox", "app": "admin"}}


def test_attack_an_address_another_workload_holds_is_refused(served: Served) -> None:
    """Peers' sets resolve an address to one workload (the last written): a workload registered
    or imported with dc1-db-1's address and role web would give the database host web's access.
    Refused: 409 for one registration, the whole file (as ``file:line:column``) for an import, so
    an address given to two rows; an address a cloud instance holds likewise. A workload's own
    addresses, a deregistered workload's, and a file that moves an address from a workload it
    also registers are not conflicts."""
    store = served.wiring.store
    web = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}
    r = served.call("otto", "POST", "/admin/workloads", {"id": "r5-a", "ips": ["192.168.10.31"], "tags": web})
    assert r.status_code == 409 and "192.168.10.31 is held by workload dc1-db-1" in r.json()["detail"], r.text
    assert store.get("r5-a") is None
    csv = HEADER + "r5-a,192.168.10.31,web,ordering,prod,ca\nr5-b,10.5.0.9,web,ordering,prod,ca\n"
    csv += "r5-c,10.5.0.8 10.5.0.9,lb,ordering,prod,ca\n"
    r = served.call("otto", "POST", "/admin/workloads/import", {"csv": csv, "source": "rack5.csv"})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"].splitlines()
    assert "rack5.csv:2:6: address 192.168.10.31 is held by workload dc1-db-1" in detail[-1], detail
    assert detail[0] == "rack5.csv:4:6: address 10.5.0.9 is also r5-b's (line 3)", detail
    assert all(store.get(w) is None for w in ("r5-a", "r5-b", "r5-c")), "the whole file is refused"
    # a cloud instance's address
    cloud = Workload(id="i-0123456789abcdef0", ips=["10.9.9.9"], cloud="aws")
    store.observe(InventoryRecord(id=cloud.id, workload=cloud, observed_at=time.time()))
    r = served.call("otto", "POST", "/admin/workloads", {"id": "r5-d", "ips": ["10.9.9.9"], "tags": web})
    assert r.status_code == 409 and "i-0123456789abcdef0" in r.json()["detail"], r.text

    # not conflicts: a workload's own address; one a file takes from a workload it also moves
    assert served.call("otto", "POST", "/admin/workloads", ESTATE[2]).status_code == 200
    csv = HEADER + "dc1-db-1,192.168.10.32,database,ordering,prod,ca\nr5-a,192.168.10.31,web,ordering,prod,ca\n"
    r = served.call("otto", "POST", "/admin/workloads/import", {"csv": csv, "source": "swap.csv"})
    assert r.status_code == 200, r.text
    assert (db := store.get("dc1-db-1")) is not None and db.workload.ips == ["192.168.10.32"]
    # a deregistered workload's address is free
    assert served.call("otto", "DELETE", "/admin/workloads/dc1-web-1", {"reason": "gone"}).status_code == 200
    r = served.call("otto", "POST", "/admin/workloads", {"id": "r5-e", "ips": ["192.168.10.11"], "tags": web})
    assert r.status_code == 201, r.text


def test_attack_an_address_with_a_zone_index_is_not_a_second_owner(served: Served) -> None:
    """``2001:db8::31%1`` is not the string ``2001:db8::31`` (the one-owner check compared
    strings), but the firewall drops the zone index: both workloads' sets carried
    ``2001:db8::31/128``. An address with a zone index is refused at registration and import,
    naming it; a record holding one (stored before) is read without it."""
    store = served.wiring.store
    db6 = {"ringfence:role": "database", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}
    web = {**db6, "ringfence:role": "web"}
    assert (
        served.call("otto", "POST", "/admin/workloads", {"id": "db6", "ips": ["2001:db8::31"], "tags": db6}).status_code
        == 201
    )
    for scoped in ("2001:db8::31%1", "2001:db8::31%eth0"):
        r = served.call("otto", "POST", "/admin/workloads", {"id": "evil", "ips": [scoped], "tags": web})
        assert r.status_code in (400, 422) and "zone index" in r.text, r.text
        r = served.call(
            "otto", "POST", "/admin/workloads/import",
            {"csv": HEADER + f"evil2,{scoped},web,ordering,prod,ca\n", "source": "z.csv"},
        )  # fmt: skip
        assert r.status_code == 400 and "z.csv:2:" in r.text and "zone index" in r.text, r.text
    assert store.get("evil") is None and store.get("evil2") is None
    assert Workload(id="old", ips=["fe80::1%eth0"]).ips == ["fe80::1"]


def test_a_label_problem_in_the_data_is_answered_and_strict_refuses_it(served: Served) -> None:
    """A label typo (role=databse) left the workload under-labelled behind a plain success. The
    answer and the audit record now carry each workload's label problems; ``strict: true``
    refuses the registration or the whole file for any (400, nothing written)."""
    store = served.wiring.store
    csv = HEADER + "r4-a,10.4.0.1,databse,ordering,prod,ca\nr4-b,10.4.0.2,web,ordering,prod,ca\n"
    r = served.call("otto", "POST", "/admin/workloads/import", {"csv": csv, "source": "rack4.csv", "strict": True})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("rack4.csv:2:1: r4-a: role='databse' (tag ringfence:role) is not an allowed")
    assert store.get("r4-a") is None and store.get("r4-b") is None
    r = served.call("otto", "POST", "/admin/workloads/import", {"csv": csv, "source": "rack4.csv"})
    assert r.status_code == 200, r.text
    problems = r.json()["problems"]
    assert list(problems) == ["r4-a"] and "'databse'" in problems["r4-a"][0], problems
    assert served.audit("workload.import")[-1].detail["problems"] == problems

    typo = {"id": "r6", "ips": ["10.6.0.1"], "tags": {"ringfence:role": "databse"}}
    r = served.call("otto", "POST", "/admin/workloads", {**typo, "strict": True})
    assert r.status_code == 400 and "'databse'" in r.json()["detail"] and store.get("r6") is None, r.text
    r = served.call("otto", "POST", "/admin/workloads", typo)
    assert r.status_code == 201 and any("'databse'" in p for p in r.json()["problems"]), r.text
    assert served.audit("workload.register")[-1].detail["problems"] == r.json()["problems"]
    # a clean registration answers none
    r = served.call("otto", "POST", "/admin/workloads", ESTATE[0])
    assert r.status_code == 200 and "problems" not in r.json(), r.text
