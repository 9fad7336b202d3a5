"""GCP: a sync that takes a while still names who made the privileged move it saw. Its records
are dated when its listing began (so an event's write stored during the sync wins over the
listing's old copy), but what it saw was so only by the time the listing returned: a non-tagger's
setLabels made more than CLOCK_SKEW after the listing began, before the listing reached her VM,
is taken for what her call set (not re-sent), and she is named (label.held). Through the local
compute API, the audit-entry delivery and the real store."""

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

LISTING_TAKES = CLOCK_SKEW + 3  # a project of many VMs and zones: the aggregated list's pages take a while


def test_attack_gcp_privileged_move_during_a_long_sync_still_names_its_caller(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = _vm(gcp, ingest, "10.20.7.91")
    real = ingest.instances.listing
    entry: list[dict[str, Any]] = []

    def slow_listing(project: str) -> Any:
        time.sleep(LISTING_TAKES)  # the earlier pages
        entry.append(set_labels(gcp, inst, JUMP, principal=MALLORY))  # before her VM's page is read
        return real(project)

    monkeypatch.setattr(ingest.instances, "listing", slow_listing)
    began = time.time()
    ingest.sync(PROJECT)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.workload.held_labels is not None, rec.labels
    dated, read = rec.observed_at, rec.workload.observed_at
    monkeypatch.setattr(ingest.instances, "listing", real)
    deliver(gcp, ingest, entry[0])
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox"
    named = [a.principal for a in audits(wiring, "label.held", inst["id"])]
    assert MALLORY in named, f"nobody named for her move: {named}"
    # the sync's record stayed dated when the listing began (the store's order); what it showed,
    # when the listing had returned
    assert dated <= began + 1 and read >= began + LISTING_TAKES
