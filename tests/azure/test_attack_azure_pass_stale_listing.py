"""Azure: a subscription pass must not put a VM's old tags back over a tag write stored by the
write's event while the pass ran (between its listing and its write): the pass's copy is dated
when its listing began, so the store keeps the event's newer record. Through the Event Grid
handler, the local ARM server and the real store."""

from __future__ import annotations

from typing import Any

import pytest

import ringfence.clouds.azure.inventory as inv
from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.inventory import observe_subscription
from ringfence.clouds.azure.wiring import Azure
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, retag, seed_vm, vm_id
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.conftest import PROD_WEB, arm, azure, wiring  # noqa: F401 (fixtures)
from tests.azure.test_azure_hand_off import handle

G = "6a000000-0000-4000-8000-0000000cd001"


def test_attack_azure_pass_stale_listing_puts_no_old_tags_back(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The VM's env moves prod → dev just after the pass listed the VMs (as it reads the NICs),
    and its tag-write event is stored then: after the pass the record says dev, as ARM does,
    not the listing's prod (which would keep the VM in prod's sets until the next pass)."""
    seed_vm(arm, "stale", G, "10.20.6.14", PROD_WEB)
    observe_subscription(wiring, azure.arm(SUB))
    rec = wiring.store.get(G)
    assert rec is not None and rec.labels.get("env") == "prod"
    events = AzureEvents(wiring, azure)
    real = inv.nics_by_id
    moved: list[int] = []

    def mid_pass(raw: Any) -> Any:
        out = real(raw)
        if not moved:  # the pass has listed the VMs: the owner moves the VM out of prod
            moved.append(1)
            retag(arm, vm_id("stale"), {"ringfence:env": "dev"})
            assert handle(events, arm_event(WRITE, vm_id("stale"), "Microsoft.Resources/tags/write")) == 200
            during = wiring.store.get(G)
            assert during is not None and during.labels.get("env") == "dev"
        return out

    monkeypatch.setattr(inv, "nics_by_id", mid_pass)
    observe_subscription(wiring, azure.arm(SUB))
    assert moved
    rec = wiring.store.get(G)
    assert rec is not None
    assert arm.get(vm_id("stale"))["tags"]["ringfence:env"] == "dev"
    assert rec.workload.tags.get("ringfence:env") == "dev", "the pass put the listing's old tags back"
    assert rec.labels.get("env") == "dev"
    # and the next pass, which lists dev, agrees
    monkeypatch.setattr(inv, "nics_by_id", real)
    observe_subscription(wiring, azure.arm(SUB))
    again = wiring.store.get(G)
    assert again is not None and again.labels.get("env") == "dev"
