"""Every write the Azure perimeter makes is audited: one ``perimeter.apply`` record per subscription
and run that writes something (ASGs and NSGs created and deleted, rules written and deleted, NICs'
ASGs and NSG), before the first write, principal ``ringfence:perimeter``. The scheduled reconcile
with the real azure-mgmt-network client against the local ARM server, the local wiring (SQLite) as
the control plane; each record is compared with the writes ARM received and what it holds after,
and ``ringfence audit verify`` (the real CLI) checks the chain."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ringfence.audit import AuditRecord
from ringfence.clouds.azure.reconcile import AzureReconcile
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, nic_id, seed_vm
from ringfence.local.wiring import LocalWiring
from ringfence.perimeter import PerimeterConfig

from .conftest import PROD_WEB

WEB = "ab000000-0000-4000-8000-00000000e001"


def config(admin: str) -> PerimeterConfig:
    return PerimeterConfig(admin_cidrs=[admin], control_plane_cidrs=["10.9.0.0/24"])


def applied(w: LocalWiring) -> list[AuditRecord]:
    return [a for a in w.store.audit_log() if a.action == "perimeter.apply"]


def written(calls: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """The writes ARM received, by kind: (method, name) — a rule as NSG/rule."""
    out: dict[str, list[tuple[str, str]]] = {}
    for method, target in calls:
        if method == "GET":
            continue
        names = unquote(target.split("?")[0]).split("/providers/Microsoft.Network/")[1].split("/")
        kind = names[-2] if len(names) == 2 else "securityRules"
        name = names[-1] if len(names) == 2 else f"{names[1]}/{names[3]}"
        out.setdefault(kind, []).append((method, name))
    return out


def rule_at(arm: ArmServer, nsg: str, rule: str) -> dict[str, Any]:
    res = arm.get(
        f"/subscriptions/{SUB}/resourceGroups/ordering-prod/providers/Microsoft.Network/"
        f"networkSecurityGroups/{nsg}/securityRules/{rule}"
    )
    assert res is not None
    return res["properties"]  # type: ignore[no-any-return]


def says(doc: dict[str, Any], props: dict[str, Any]) -> bool:
    """The record's rule says what ARM holds (ASGs by name)."""
    for k, v in doc.items():
        if k in ("kind", "nsg", "resource_group", "rule"):
            continue
        held = props.get(k)
        if k.endswith("ApplicationSecurityGroups"):
            held = [a["id"].rsplit("/", 1)[-1] for a in held or []]
        if held != v:
            return False
    return True


def verify(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ringfence.cli",
            "audit",
            "verify",
            "--store",
            f"sqlite:{tmp_path / 'state' / 'state.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_azure_perimeter_run_that_writes_something_is_one_record_of_exactly_its_writes(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, tmp_path: Path
) -> None:
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    before = len(applied(wiring))
    with arm.recording() as calls:
        assert AzureReconcile(wiring, azure, config("10.250.0.0/24")).run().failed == {}
    w = written(calls)
    [rec] = applied(wiring)[before:]
    assert (rec.principal, rec.target) == ("ringfence:perimeter", f"subscriptions/{SUB}")
    d = rec.detail
    assert (d["subscription"], d["scope"]) == (SUB, "full")
    assert sorted(a["name"] for a in d["asgs_created"]) == sorted(n for m, n in w["applicationSecurityGroups"])
    assert sorted(a["name"] for a in d["nsgs_created"]) == sorted(n for m, n in w["networkSecurityGroups"])
    assert sorted(f"{r['nsg']}/{r['rule']}" for r in d["rules_written"]) == sorted(n for m, n in w["securityRules"])
    assert all(says(r, rule_at(arm, r["nsg"], r["rule"])) for r in d["rules_written"])
    assert d["rules_deleted"] == d["asgs_deleted"] == []
    [nic] = d["nics"]
    assert [("PUT", nic["nic"])] == w["networkInterfaces"] and nic["vm"] == WEB and nic["nsg"] == "rf-prod-nsg"
    held = arm.get(nic_id("web-1-nic"))
    assert held is not None
    on = held["properties"]["ipConfigurations"][0]["properties"]["applicationSecurityGroups"]
    assert nic["asgs_added"] == sorted(a["id"].rsplit("/", 1)[-1] for a in on) and nic["asgs_removed"] == []
    assert d["counts"]["rules_written"] == len(w["securityRules"])

    # nothing to write: no record
    with arm.recording() as calls:
        assert AzureReconcile(wiring, azure, config("10.250.0.0/24")).run().perimeter_writes == 0
    assert not written(calls) and len(applied(wiring)) == before + 1

    # a changed admin range: the rules written and deleted, exactly
    gone = {
        r["rule"]: rule_at(arm, r["nsg"], r["rule"])
        for r in d["rules_written"]
        if "10.250.0.0/24" in str(r.get("sourceAddressPrefix"))
    }
    with arm.recording() as calls:
        assert AzureReconcile(wiring, azure, config("10.251.0.0/24")).run().failed == {}
    w = written(calls)
    [rec] = applied(wiring)[before + 1 :]
    d = rec.detail
    assert sorted(f"{r['nsg']}/{r['rule']}" for r in d["rules_written"]) == sorted(
        n for m, n in w["securityRules"] if m == "PUT"
    )
    assert sorted(f"{r['nsg']}/{r['rule']}" for r in d["rules_deleted"]) == sorted(
        n for m, n in w["securityRules"] if m == "DELETE"
    )
    assert {r["sourceAddressPrefix"] for r in d["rules_written"]} == {"10.251.0.0/24"}
    assert gone and {r["rule"] for r in d["rules_deleted"]} == set(gone)
    assert all(says(r, gone[r["rule"]]) for r in d["rules_deleted"])
    assert all(says(r, rule_at(arm, r["nsg"], r["rule"])) for r in d["rules_written"])
    assert d["nics"] == d["asgs_created"] == d["nsgs_created"] == []
    verify(tmp_path)


def test_an_azure_perimeter_write_whose_audit_write_fails_is_not_made(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, tmp_path: Path
) -> None:
    """The store refuses the record (a trigger on its audit table, as a full or failing disk
    would): ARM receives no write, the subscription fails this run; the next run writes and
    audits it."""
    seed_vm(arm, "web-1", WEB, "10.20.1.4", PROD_WEB)
    db = sqlite3.connect(tmp_path / "state" / "state.db")
    db.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'refused'); END")
    db.commit()
    before = len(applied(wiring))
    with arm.recording() as calls:
        res = AzureReconcile(wiring, azure, config("10.250.0.0/24")).run()
    assert "perimeter audit record not written" in res.failed[SUB]
    assert not written(calls), "ARM received a write that is not audited"
    assert len(applied(wiring)) == before

    db.execute("DROP TRIGGER refuse")
    db.commit()
    db.close()
    with arm.recording() as calls:
        assert AzureReconcile(wiring, azure, config("10.250.0.0/24")).run().failed == {}
    [rec] = applied(wiring)[before:]
    assert written(calls) and rec.detail["counts"]["rules_written"] == len(written(calls)["securityRules"])
    verify(tmp_path)
