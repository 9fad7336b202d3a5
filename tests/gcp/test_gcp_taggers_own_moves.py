"""GCP labels as the label source: an allowed tagger's ``setLabels`` that changed a privileged
value approves it, whatever else Cloud Logging lists about the VM since its last sighting: the
VM's creation by someone else (the sighting shows what it set), failed calls, calls that write no
label (start, stop, setMetadata) however many. And a value it re-sent, held, is audited so the
hold is never silent. Real ingest, GCP REST stand-in, SQLite."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ringfence.clouds.gcp import ingest as ingest_module
from ringfence.clouds.gcp.ingest import CLOCK_SKEW, GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry, logged
from ringfence.local.gcp_project import PROJECT, TAGGER, ZONE, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver, set_labels
from tests.gcp.test_attack_gcp_label_writes import JUMP, MALLORY, WEB, _vm, audits

CI = "ci-deployer@shop-prod.iam.gserviceaccount.com"  # creates VMs; not a tagger
OPS = "ops-agent@shop-prod.iam.gserviceaccount.com"  # routine compute calls; not a tagger


def _approved(wiring: LocalWiring, inst: dict[str, Any]) -> None:
    """The tagger's move is in force, audited as its approval, and not as unconfirmed."""
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") == "jumpbox", f"the tagger's own move held: {rec.labels}"
    assert rec.workload.held_labels is None, rec.workload.held_labels
    assert [a.principal for a in audits(wiring, "label.approve", inst["id"])] == [TAGGER]
    assert not audits(wiring, "label.unconfirmed", inst["id"])


@pytest.mark.parametrize("how", ["template-insert", "split-insert"])
def test_gcp_tagger_moves_a_vm_created_by_a_non_tagger(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """CI (not a tagger) creates the VM with role=web (from a template: no labels in the request;
    or a long insert whose first entry has them); the tagging automation sets role=jumpbox before
    the next scheduled pass. The insert is listed since the VM's last sighting, but that sighting
    (at web) follows the creation: the tagger's call changed the value, and approves it."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(
        PROJECT, ZONE, vm_name(), ["10.20.43.1" if how == "template-insert" else "10.20.43.2"], labels=WEB
    )
    if how == "template-insert":
        request = {"name": inst["name"], "sourceInstanceTemplate": "global/instanceTemplates/web"}
        deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst, principal=CI, request=request))
    else:
        op = "operation-insert-" + inst["id"]
        request = {"name": inst["name"], "labels": WEB}
        first = audit_entry(
            "v1.compute.instances.insert", inst, principal=CI, operation=op, first=True, last=False, request=request
        )
        deliver(gcp, ingest, first)
        time.sleep(CLOCK_SKEW + 1)  # an insert takes seconds: its first entry is older than the sighting's skew
        deliver(
            gcp,
            ingest,
            audit_entry("v1.compute.instances.insert", inst, principal=CI, operation=op, first=False, last=True),
        )
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") == "web", rec.labels
    deliver(gcp, ingest, set_labels(gcp, inst, JUMP, principal=TAGGER))
    _approved(wiring, inst)


@pytest.mark.parametrize("kind", ["failed-update", "failed-set-labels-60", "stop-start-60", "set-metadata-60"])
def test_gcp_tagger_moves_a_vm_after_other_calls_on_it(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Since the VM's last sighting (web), calls on it that set no label: Mallory's
    instances.update, denied (severity ERROR, status 7); 60 of her denied setLabels calls (more
    than one page of label writes, were failed calls listed); or 60 routine stop/start or
    setMetadata calls (more than one page of Cloud Logging's listing); then the tagger moves
    web -> jumpbox. None of them is a later call, nor a write the tagger re-sent: approved."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    addr = {"failed-update": "10.20.43.3", "stop-start-60": "10.20.43.4", "failed-set-labels-60": "10.20.43.7"}
    inst = _vm(gcp, ingest, addr.get(kind, "10.20.43.5"))
    if kind.startswith("failed-"):
        for i in range(1 if kind == "failed-update" else 60):
            e = audit_entry(
                "v1.compute.instances.update" if kind == "failed-update" else "v1.compute.instances.setLabels",
                inst,
                principal=MALLORY,
                severity="ERROR",
                request={"labels": {"ringfence-role": "jumpbox"}}
                if kind == "failed-update"
                else {"labels": [{"key": "ringfence-role", "value": f"jumpbox{i}"}]},
            )
            e["protoPayload"]["status"] = {"code": 7, "message": "PERMISSION_DENIED"}
            logged(gcp, e)
    else:
        methods = ["v1.compute.instances.stop", "v1.compute.instances.start"] if kind == "stop-start-60" else None
        for i in range(60):
            method = methods[i % 2] if methods else "v1.compute.instances.setMetadata"
            logged(gcp, audit_entry(method, inst, principal=OPS))
    time.sleep(2)  # all of it more than Cloud Logging's 1 s window before the tagger's call
    deliver(gcp, ingest, set_labels(gcp, inst, JUMP, principal=TAGGER))
    _approved(wiring, inst)


def test_gcp_tagger_resend_of_a_held_move_is_audited(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory (not a tagger) sets role=jumpbox, her entry never delivered; the tagger's
    read-modify-write re-sends it. Held, not approved, and audited ``label.unconfirmed`` (by
    ``ringfence:governance``, the tagger claimed, the reason naming the re-sent value)."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = _vm(gcp, ingest, "10.20.43.6")
    logged(gcp, set_labels(gcp, inst, JUMP, principal=MALLORY))
    time.sleep(0.05)
    deliver(gcp, ingest, set_labels(gcp, inst, {**JUMP, "team": "payments"}, principal=TAGGER))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox", f"laundered by the tagger's re-send: {rec.labels}"
    assert not audits(wiring, "label.approve", inst["id"])
    held = audits(wiring, "label.unconfirmed", inst["id"])
    assert len(held) == 1, "the tagger's re-send was held silently"
    assert held[0].detail["claimed_principal"] == TAGGER and "re-sent" in str(held[0].reason), held[0]
    assert "'ringfence:role': 'jumpbox'" in str(held[0].reason), held[0].reason
