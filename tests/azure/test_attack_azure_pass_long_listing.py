"""Azure: a subscription pass that takes a while still names who made the privileged move it
saw. Its records are dated when its listing began (so an event's write stored during the pass
wins over the listing's old copy), but what it saw was so only by the time the listing returned:
a non-tagger's tag write made more than SKEW after the listing began, before the listing reached
her VM, is one her event's call made, and it is named (label.held, quarantine). Through the
local ARM server, the Event Grid route and the real store."""

from __future__ import annotations

import time
from typing import Any

from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.inventory import observe_subscription
from ringfence.clouds.azure.wiring import Azure
from ringfence.governance import SKEW
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.test_attack_azure_blame import (  # noqa: F401 (fixture)
    MALLORY,
    TAGS_WRITE,
    WEB,
    _web_vm,
    findings,
    post,
    quarantines,
    quarantining,
)

LISTING_TAKES = SKEW + 3  # a subscription of many VMs: ARM's earlier pages take a while


def test_attack_azure_privileged_move_during_a_long_pass_still_names_its_caller(
    arm: ArmServer,
    azure: Azure,
    quarantining: LocalWiring,  # noqa: F811
) -> None:
    w = quarantining
    _web_vm(arm, azure, w, "web-long-pass")
    client = azure.arm(SUB)
    real_vms = client.vms
    ev: list[dict[str, Any]] = []

    def slow_listing() -> Any:
        time.sleep(LISTING_TAKES)  # the earlier pages
        # Mallory's Tags API write lands before the page holding her VM is read
        arm.get(vm_id("web-long-pass"))["tags"]["ringfence:role"] = "jumpbox"
        ev.append(arm_event(WRITE, vm_id("web-long-pass"), TAGS_WRITE, oid=MALLORY))
        return real_vms()

    client.vms = slow_listing  # type: ignore[method-assign]
    began = time.time()
    observe_subscription(w, client, scheduled=True)
    rec = w.store.get(WEB)
    assert rec is not None and rec.workload.held_labels is not None, "the pass saw the move and held it"
    assert rec.labels["role"] == "web"
    dated, seen = rec.observed_at, rec.label_writes["role"].seen if rec.label_writes else None
    post(w, azure, ev[0])  # her event, delivered after the pass
    rec = w.store.get(WEB)
    assert rec is not None
    assert findings(w) == [MALLORY], f"nobody named for her move: {findings(w)}"
    assert rec.op_quarantined and quarantines(w) == 1
    assert rec.labels["role"] == "web"
    # the pass's record stayed dated when the listing began (the store's order); the move it saw,
    # when the listing had returned
    assert dated <= began + 1
    assert seen is not None and seen >= began + LISTING_TAKES
