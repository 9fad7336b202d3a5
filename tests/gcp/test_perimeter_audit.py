"""Every change the GCP perimeter makes is audited: one ``perimeter.apply`` record per project and
run that changes something (policies created and associated, rules added and removed), written
before the first change, principal ``ringfence:perimeter``. The real compute SDK client against the
local Google API, the local wiring (SQLite) as the control plane; each record is compared with the
policy as the API holds it before and after, and ``ringfence audit verify`` (the real CLI) checks
the chain."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence.audit import AuditRecord
from ringfence.clouds.gcp.firewall import FwRule, GcpPerimeterConfig, read_rules, rule_doc
from ringfence.clouds.gcp.reconcile import GcpPerimeter, GcpReconcile
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_project import NUMBER, PROJECT, gcp_config
from ringfence.local.wiring import LocalWiring
from ringfence.perimeter import PerimeterConfig
from tests.azure.test_perimeter_audit import verify
from tests.gcp.conftest import gcp_policy_files, web_vm
from tests.onprem.conftest import signing_key_file

PROD = "tagValues/301"


def perimeter(admin: str) -> GcpPerimeter:
    return GcpPerimeter(
        PerimeterConfig(admin_cidrs=[admin], control_plane_cidrs=["10.254.0.0/24"]),
        GcpPerimeterConfig(env_tags={"prod": PROD}),
    )


@pytest.fixture
def api() -> Iterator[GcpApi]:
    with GcpApi() as a:
        a.add_project(PROJECT, NUMBER)
        yield a


@pytest.fixture
def wiring(tmp_path: Path) -> Iterator[LocalWiring]:
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path))
    assert OnPremAdmin(w).provision("alice", gcp_policy_files(), "initial").status == 201
    yield w
    w.close()


def applied(w: LocalWiring) -> list[AuditRecord]:
    return [a for a in w.store.audit_log() if a.action == "perimeter.apply"]


def policies(gcp: GcpApi) -> dict[str, dict[int, FwRule]]:
    """Policy name → its rules by priority, as the API holds them (GCP's predefined rules left out:
    Ringfence neither writes nor audits them)."""
    return {name: read_rules(p["rules"]) for name, p in gcp.firewall_policies.get(PROJECT, {}).items()}


def docs(rules: dict[str, dict[int, FwRule]]) -> list[str]:
    return sorted(
        json.dumps({"policy": name} | rule_doc(prio, r), sort_keys=True)
        for name, rs in rules.items()
        for prio, r in rs.items()
    )


def listed(items: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(i, sort_keys=True) for i in items)


def minus(a: dict[str, dict[int, FwRule]], b: dict[str, dict[int, FwRule]]) -> dict[str, dict[int, FwRule]]:
    return {n: {p: r for p, r in rs.items() if b.get(n, {}).get(p) != r} for n, rs in a.items()}


def test_a_gcp_perimeter_run_that_changes_something_writes_one_record_of_exactly_its_changes(
    api: GcpApi, wiring: LocalWiring, tmp_path: Path
) -> None:
    web_vm(api, "10.31.0.5")
    assert GcpReconcile(wiring, gcp_config(api), perimeter("10.255.0.0/24")).run().failed == {}
    [rec] = applied(wiring)
    made = policies(api)
    assert made
    assert (rec.principal, rec.target) == ("ringfence:perimeter", f"projects/{PROJECT}")
    d = rec.detail
    assert (d["project"], d["scope"]) == (PROJECT, "full")
    assert {p["policy"] for p in d["policies_created"]} == set(made) == {p["policy"] for p in d["policies_associated"]}
    assert listed(d["rules_added"]) == docs(made) and d["rules_removed"] == []
    assert d["counts"]["rules_added"] == sum(len(r) for r in made.values())

    # nothing to change: no record
    assert GcpReconcile(wiring, gcp_config(api), perimeter("10.255.0.0/24")).run().perimeter_writes == 0
    assert len(applied(wiring)) == 1

    # a changed admin range: one record of exactly the rules added and removed
    res = GcpReconcile(wiring, gcp_config(api), perimeter("10.253.0.0/24")).run()
    assert res.failed == {} and res.perimeter_writes
    now = policies(api)
    [_, rec] = applied(wiring)
    assert listed(rec.detail["rules_added"]) == docs(minus(now, made))
    assert listed(rec.detail["rules_removed"]) == docs(minus(made, now))
    assert {r["src_ranges"][0] for r in rec.detail["rules_added"]} == {"10.253.0.0/24"}
    assert rec.detail["policies_created"] == rec.detail["policies_associated"] == []

    verify(tmp_path)  # the chain, through the real CLI


def test_a_gcp_perimeter_change_whose_audit_write_fails_is_not_made(
    api: GcpApi, wiring: LocalWiring, tmp_path: Path
) -> None:
    """The store refuses the record (a trigger on its audit table, as a full or failing disk
    would): the project fails this run with no policy made, then the next run makes and audits it."""
    web_vm(api, "10.31.0.6")
    db = sqlite3.connect(tmp_path / "state" / "state.db")
    db.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'refused'); END")
    db.commit()
    res = GcpReconcile(wiring, gcp_config(api), perimeter("10.255.0.0/24")).run()
    assert "perimeter audit record not written" in res.failed[PROJECT] and res.perimeter_writes == 0
    assert policies(api) == {} and applied(wiring) == []

    db.execute("DROP TRIGGER refuse")
    db.commit()
    db.close()
    assert GcpReconcile(wiring, gcp_config(api), perimeter("10.255.0.0/24")).run().failed == {}
    [rec] = applied(wiring)
    assert listed(rec.detail["rules_added"]) == docs(policies(api))
