"""GCP: what a sync saw of a VM is dated when the aggregated list's page holding that VM returned,
not when the listing ended. A colleague's setLabels made after that page was read, while the later
pages were still being listed, re-sends a held value it did not set: it is not named for the
non-tagger's privileged move, which still names her. Through the local compute API, the
audit-entry delivery and the real store."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ringfence.clouds.gcp import ingest as ingest_module
from ringfence.clouds.gcp.ingest import CLOCK_SKEW, GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_project import PROJECT, gcp_config
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver, set_labels
from tests.gcp.test_attack_gcp_label_writes import JUMP, MALLORY, _vm, audits

LATER_PAGES = CLOCK_SKEW + 3  # the pages after the one holding the VM: a big project's
BOB = "bob@shop-prod.iam.gserviceaccount.com"  # not a tagger


def test_attack_gcp_call_after_the_vms_page_is_not_named_for_its_move(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = _vm(gcp, ingest, "10.20.9.92")
    real = ingest.instances.listing
    entry: dict[str, Any] = {}

    def listing(project: str) -> Any:
        entry["mallory"] = set_labels(gcp, inst, JUMP, principal=MALLORY)
        answer = real(project)  # the page holding her VM
        time.sleep(LATER_PAGES)
        # Bob adds a cost label, re-sending the labels as they stand (role=jumpbox)
        entry["bob"] = set_labels(gcp, inst, {**JUMP, "team": "payments"}, principal=BOB)
        return answer

    monkeypatch.setattr(ingest.instances, "listing", listing)
    ingest.sync(PROJECT)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.workload.held_labels is not None, "the sync saw the move and held it"
    monkeypatch.setattr(ingest.instances, "listing", real)
    deliver(gcp, ingest, entry["bob"])  # Bob's entry first
    named = [a.principal for a in audits(wiring, "label.held", inst["id"])]
    assert BOB not in named, f"Bob, whose call came after the VM's page was read, named: {named}"
    deliver(gcp, ingest, entry["mallory"])
    named = [a.principal for a in audits(wiring, "label.held", inst["id"])]
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox", rec.labels
    assert BOB not in named and MALLORY in named, named
