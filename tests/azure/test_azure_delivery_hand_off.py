"""Azure: a delivery whose own closing hand-off to compute fails is logged, counted
ComputeNotQueued and failed (as is the subscription pass an enrollment runs), and Event Grid's redelivery (``aeg-delivery-count`` above 0) hands on
the VMs its events name though it finds nothing more to store. A first delivery that stores
nothing hands nothing on (the non-label tag storm stays out of compute). Through the Event Grid
handler, the local ARM server and the real store."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ringfence.clouds.azure.attested import imds_nonce
from ringfence.clouds.azure.events import WRITE
from ringfence.clouds.azure.ingest import AzureEvents
from ringfence.clouds.azure.wiring import Azure
from ringfence.control.agents import AgentApi
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, seed_vm, vm_id
from ringfence.local.azure_imds import AttestedCa
from ringfence.local.eventgrid import arm_event
from ringfence.local.wiring import LocalWiring
from tests.aws.test_pipeline import AgentKey
from tests.azure.conftest import PROD_WEB, arm, azure, wiring  # noqa: F401 (fixtures)
from tests.azure.test_attack_azure_enroll import VM, api, ca, enroll, nonce  # noqa: F401 (fixtures)
from tests.azure.test_azure_events import HEADERS
from tests.storerace import lanes

GUID = "6a000000-0000-4000-8000-0000000cf0e2"


def deliver(events: AzureEvents, ev: dict[str, Any], attempt: int = 0) -> int:
    """Event Grid's delivery ``attempt`` (its ``aeg-delivery-count``): the status it is answered
    (an error the handler does not answer is the host's 5xx)."""
    try:
        return events.handle({**HEADERS, "aeg-delivery-count": str(attempt)}, json.dumps([ev]).encode()).status
    except RuntimeError:
        return 500


def refuse_compute(monkeypatch: pytest.MonkeyPatch, wiring: LocalWiring) -> None:  # noqa: F811
    def refused(*a: object, **kw: object) -> None:
        raise RuntimeError("the compute queue is unavailable")

    monkeypatch.setattr(wiring, "enqueue_compute", refused)


def test_a_role_change_whose_hand_off_failed_is_counted_and_computed_on_redelivery(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """web → db stored, the delivery's hand-off refused: counted, failed; the redelivery stores
    nothing and still hands the VM on (else its peers keep the allow web had)."""
    metrics: list[str] = []
    events = AzureEvents(wiring, azure, lambda name, value: metrics.append(name))
    seed_vm(arm, "dh-1", GUID, "10.20.1.96", PROD_WEB)
    assert deliver(events, arm_event(WRITE, vm_id("dh-1"), "Microsoft.Compute/virtualMachines/write")) == 200
    arm.get(vm_id("dh-1"))["tags"]["ringfence:role"] = "db"  # type: ignore[index]
    ev = arm_event(WRITE, vm_id("dh-1"), "Microsoft.Compute/virtualMachines/write")
    with monkeypatch.context() as m:
        refuse_compute(m, wiring)
        assert deliver(events, ev) != 200
    rec = wiring.store.get(GUID)
    assert rec is not None and rec.labels.get("role") != "web", "stored: no longer web"
    assert "ComputeNotQueued" in metrics, f"stored, compute never queued, not counted: {metrics}"
    sent = lanes(monkeypatch, wiring)
    assert deliver(events, ev, attempt=1) == 200  # Event Grid delivers it again
    assert any(GUID in ids for _, ids in sent), "the role change was stored and never computed"


def test_a_first_delivery_that_stores_nothing_hands_nothing_on(
    arm: ArmServer,  # noqa: F811
    azure: Azure,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same write delivered first time again (another call changing nothing): nothing to
    compute; only Event Grid's retry of a delivery that failed hands the VM on again."""
    events = AzureEvents(wiring, azure)
    seed_vm(arm, "dh-2", GUID, "10.20.1.97", PROD_WEB)
    assert deliver(events, arm_event(WRITE, vm_id("dh-2"), "Microsoft.Compute/virtualMachines/write")) == 200
    sent = lanes(monkeypatch, wiring)
    assert deliver(events, arm_event(WRITE, vm_id("dh-2"), "Microsoft.Compute/virtualMachines/write")) == 200
    assert not any(GUID in ids for _, ids in sent)


def test_an_enrollments_subscription_pass_counts_its_failed_hand_off(
    api: AgentApi,  # noqa: F811
    ca: AttestedCa,  # noqa: F811
    wiring: LocalWiring,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unseen VM enrolling has its subscription read: the pass stores the VM, its hand-off is
    refused, and that is counted with what the wiring counts."""
    counted: list[str] = []
    monkeypatch.setattr(wiring, "metric", lambda name, value: counted.append(name))
    refuse_compute(monkeypatch, wiring)
    n = nonce(api)
    with pytest.raises(RuntimeError):
        enroll(api, ca.document(VM, SUB, imds_nonce(n)), n, AgentKey())
    assert wiring.store.get(VM) is not None, "the pass stored the VM"
    assert "ComputeNotQueued" in counted, f"stored, compute never queued, not counted: {counted}"
