"""GCP: the scheduled sync stores its VMs one write each; where one write fails (the store
throttled) after others landed, what landed is handed to compute before the failure goes up:
the retry finds those stored already and would hand nothing on (before, a label change lost that
way never reached compute). Through the real reconcile and ingest, the local Google API, the real
store (SQLite) and the local compute worker, down to the peer's served bundle."""

from __future__ import annotations

from typing import Any

import pytest

from ringfence.clouds.gcp.instances import LabelSource
from ringfence.clouds.gcp.reconcile import GcpReconcile
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_project import PROJECT, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.test_gcp_hand_off import PROD_WEB
from tests.onprem.test_wiring import in_sets, served
from tests.storerace import lanes

PROD_PROC = {**PROD_WEB, "ringfence-role": "processing"}  # the tier that accepts web
ZONE = "northamerica-northeast1-a"


def test_attack_gcp_a_sync_write_failing_after_a_label_change_landed_still_hands_the_change_on(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two web VMs lose their role (their entries lost); the pass stores the first and the second
    write fails. The first must reach compute all the same, and the processing VM's bundle stop
    allowing its address."""
    web = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.12.1"], labels=PROD_WEB)
    web2 = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.12.3"], labels=PROD_WEB)
    proc = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.12.2"], labels=PROD_PROC)
    cfg = gcp_config(gcp, LabelSource.LABELS)
    GcpReconcile(wiring, cfg).run()
    assert wiring.settle(60)
    assert in_sets(served(wiring, proc["id"]), "10.20.12.1")
    unroled = {k: v for k, v in PROD_WEB.items() if k != "ringfence-role"}
    gcp.set_labels(PROJECT, ZONE, web["name"], unroled)
    gcp.set_labels(PROJECT, ZONE, web2["name"], unroled)
    real = wiring.store.observe
    writes = [0]

    def observe(rec: Any, *args: Any, **kw: Any) -> Any:
        if rec.id in (web["id"], web2["id"]):
            writes[0] += 1
            if writes[0] == 2:
                raise RuntimeError("throttled")
        return real(rec, *args, **kw)

    monkeypatch.setattr(wiring.store, "observe", observe)
    sent = lanes(monkeypatch, wiring)
    with pytest.raises(RuntimeError, match="throttled"):
        GcpReconcile(wiring, cfg).run()  # the pass fails, for its retry
    monkeypatch.setattr(wiring.store, "observe", real)
    GcpReconcile(wiring, cfg).run()  # a later pass stores the other one
    first = web["id"] if "role" not in wiring.store.get(web["id"]).labels else web2["id"]
    assert writes[0] >= 2 and "role" not in wiring.store.get(first).labels
    assert any(first in ids for _, ids in sent), "the change that landed never reached compute"
    assert wiring.settle(60)
    assert not in_sets(served(wiring, proc["id"]), "10.20.12.1"), "the VM that lost its role is still allowed"
    assert not in_sets(served(wiring, proc["id"]), "10.20.12.3")
