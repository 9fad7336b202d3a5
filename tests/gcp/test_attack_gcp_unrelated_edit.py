"""GCP: the tagger approved ``role=jumpbox``; later a non-tagger adds an unrelated label. Her
``setLabels`` re-sends the whole set, ``role=jumpbox`` included: that value is the tagger's last
write, made before her call, so it is not her move. Her edit keeps the approval and names nobody,
also where a read of the VM made after her call is stored before her entry is processed, or her
call comes within :data:`~ringfence.clouds.gcp.ingest.CLOCK_SKEW` of the last observation.
Through the real ingest against the local Google APIs."""

from __future__ import annotations

import time

import pytest

from ringfence.clouds.gcp import ingest as ingest_module
from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry
from ringfence.local.gcp_project import PROJECT, ZONE, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver, set_labels

MALLORY = "mallory@shop-prod.iam.gserviceaccount.com"  # may set labels on her VMs; not a tagger
WEB = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
JUMP = {**WEB, "ringfence-role": "jumpbox"}


@pytest.mark.parametrize(
    ("ip", "wait", "read_after_her_call"),
    [("10.20.9.20", 6.0, False), ("10.20.9.21", 6.0, True), ("10.20.9.22", 0.0, False)],
    ids=["no-read-since", "a-read-after-her-call", "a-quick-second-edit"],
)
def test_attack_gcp_an_unrelated_label_edit_keeps_the_taggers_approval_and_names_nobody(
    gcp: GcpApi,
    wiring: LocalWiring,
    monkeypatch: pytest.MonkeyPatch,
    ip: str,
    wait: float,
    read_after_her_call: bool,
) -> None:
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), [ip], labels=WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    deliver(gcp, ingest, set_labels(gcp, inst, JUMP))  # the tagger
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
    time.sleep(wait)  # > CLOCK_SKEW: her edit comes well after the approval was observed
    n = len(wiring.store.audit_log())
    entry = set_labels(gcp, inst, {**JUMP, "owner": "mallory"}, principal=MALLORY)
    if read_after_her_call:
        ingest.sync(PROJECT)  # the scheduled pass (or another event on the VM) reads it before her entry
    deliver(gcp, ingest, entry)
    rec = wiring.store.get(inst["id"])
    assert rec is not None
    held = [(a.principal, a.detail) for a in wiring.store.audit_log()[n:] if a.action == "label.held"]
    assert rec.labels.get("role") == "jumpbox", f"her unrelated edit took the approval back: {rec.labels}"
    assert rec.workload.held_labels is None
    assert not held, held
