"""Azure: what a subscription pass saw of a VM is dated when the ARM page holding that VM returned,
not when the listing ended. A call made after that page was read, while the later pages of a big
subscription were still being listed, cannot have made what the pass saw, and is not named for it:
Bob's unrelated tag write is not blamed (nor the VM quarantined) for Mallory's privileged move,
which still names Mallory; nor for an allowed tagger's move, which names nobody. Through the local
ARM server, the Event Grid route and the real store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.inventory import observe_subscription
from ringfence.clouds.azure.wiring import Azure
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.wiring import Config
from ringfence.governance import SKEW
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, vm_id
from ringfence.local.eventgrid import OID, TENANT, arm_event
from ringfence.local.wiring import LocalWiring
from tests.azure.test_attack_azure_blame import (  # noqa: F401 (fixture)
    BOB,
    MALLORY,
    TAGS_WRITE,
    WEB,
    _web_vm,
    findings,
    post,
    quarantines,
    quarantining,
)
from tests.onprem.conftest import policy_files, signing_key_file

LATER_PAGES = SKEW + 3  # the pages after the one holding the VM: a big subscription's


@pytest.fixture
def quarantining_tagger(tmp_path: Path) -> Iterator[LocalWiring]:
    """``on_privileged_change: quarantine``, the local Event Grid's caller (``OID``) a tagger."""
    files = policy_files()
    labels = files["labels.yaml"].replace("on_privileged_change: hold", "on_privileged_change: quarantine")
    tagger = 'taggers: ["arn:aws:iam::123456789012:role/ringfence-tagging"'
    assert tagger in labels
    files["labels.yaml"] = labels.replace(tagger, f'{tagger}, "azure:{TENANT}/{OID}"')
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path), cfg=Config())
    assert OnPremAdmin(w).provision("alice", files, "quarantine on findings").status == 201
    yield w
    w.close()


def _pass_then_bob(arm: ArmServer, azure: Azure, w: LocalWiring, name: str, mover: str) -> dict[str, Any]:
    """``mover`` sets role=jumpbox just before the pass reads the VM's page; after that page, while
    the later ones are listed, Bob adds an unrelated tag (a PATCH: role stays). The events."""
    _web_vm(arm, azure, w, name)
    client = azure.arm(SUB)
    real_vms = client.vms
    ev: dict[str, Any] = {}

    def listing() -> Any:
        arm.get(vm_id(name))["tags"]["ringfence:role"] = "jumpbox"
        ev["mover"] = arm_event(WRITE, vm_id(name), TAGS_WRITE, oid=mover)
        pages = real_vms()  # the page holding the VM
        time.sleep(LATER_PAGES)
        arm.get(vm_id(name))["tags"]["owner"] = "bob"
        ev["bob"] = arm_event(WRITE, vm_id(name), TAGS_WRITE, oid=BOB)
        return pages

    client.vms = listing  # type: ignore[method-assign]
    observe_subscription(w, client, scheduled=True)
    rec = w.store.get(WEB)
    assert rec is not None and rec.workload.held_labels is not None, "the pass saw the move and held it"
    return ev


def test_attack_azure_call_after_the_vms_page_is_not_named_for_its_move(
    arm: ArmServer,
    azure: Azure,
    quarantining: LocalWiring,  # noqa: F811
) -> None:
    w = quarantining
    ev = _pass_then_bob(arm, azure, w, "web-page-time", MALLORY)
    post(w, azure, ev["bob"])  # Event Grid keeps no order: Bob's event comes first
    assert findings(w) == [], f"Bob, whose call came after the VM's page was read, named: {findings(w)}"
    post(w, azure, ev["mover"])
    assert findings(w) == [MALLORY], f"the mover escapes: {findings(w)}"
    rec = w.store.get(WEB)
    assert rec is not None and rec.op_quarantined and quarantines(w) == 1
    assert rec.labels["role"] == "web"


def test_attack_azure_call_after_the_vms_page_is_not_named_for_a_taggers_move(
    arm: ArmServer, azure: Azure, quarantining_tagger: LocalWiring
) -> None:
    w = quarantining_tagger
    ev = _pass_then_bob(arm, azure, w, "web-page-time-t", OID)
    post(w, azure, ev["mover"])
    post(w, azure, ev["bob"])
    rec = w.store.get(WEB)
    assert findings(w) == [] and quarantines(w) == 0, f"Bob blamed for the tagger's move: {findings(w)}"
    assert rec is not None and not rec.op_quarantined
