"""``azure-attested`` enrollment: the IMDS attested document for the server's nonce, its PKCS7
signature chained to the configured root, bound to the agent's own key — and the attacks on it
(a replayed document with another key, a document for another nonce, a foreign signer, an expired
document, a subscription not governed). Over the agent API service and, once, over ``serve``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from ringfence import agentapi, serve
from ringfence.clouds.azure.attested import imds_nonce
from ringfence.clouds.azure.ingest import SECRET_HEADER
from ringfence.clouds.azure.wiring import Azure, attach
from ringfence.control.agents import AgentApi
from ringfence.local.azure_arm import ArmServer
from ringfence.local.azure_estate import SUB, seed_vm, vm_id
from ringfence.local.azure_imds import AttestedCa
from ringfence.local.wiring import LocalWiring
from tests.aws.test_pipeline import AgentKey

from .conftest import OTHER_SUB, PROD_WEB, SECRET

VM = "7b000000-0000-4000-8000-00000000c001"


@pytest.fixture(scope="module")
def ca() -> AttestedCa:
    return AttestedCa.make()


@pytest.fixture
def api(arm: ArmServer, azure: Azure, wiring: LocalWiring, ca: AttestedCa) -> Iterator[AgentApi]:
    azure.cfg.attested_roots_pem = ca.root_pem
    attach(wiring, azure)  # again: the roots are read when the enroller is made
    seed_vm(arm, "web-1", VM, "10.20.1.4", PROD_WEB)
    yield AgentApi(wiring)


def nonce(api: AgentApi) -> str:
    return str(api.nonce().body["nonce"])


def enroll(api: AgentApi, document: str, n: str, key: AgentKey, wid: str = VM) -> tuple[int, dict[str, object]]:
    req = agentapi.EnrollRequest(
        method="azure-attested",
        nonce=n,
        document=document,
        agent_key=key.pem,
        agent_signature=key.prove("enroll", wid, n),
    )
    r = api.enroll(req)
    return r.status, r.body


def test_an_attested_vm_enrolls_with_its_key(api: AgentApi, ca: AttestedCa, wiring: LocalWiring) -> None:
    n = nonce(api)
    key = AgentKey()
    status, body = enroll(api, ca.document(VM, SUB, imds_nonce(n)), n, key)
    assert status == 200, body
    assert body["workload_id"] == VM
    assert wiring.store.agent_key(VM) == key.pem
    rec = wiring.store.get(VM)  # not seen before: the subscription was read to find it
    assert rec is not None and rec.enrolled and rec.labels["role"] == "web"


def test_attack_replayed_document_with_another_key_is_refused(api: AgentApi, ca: AttestedCa) -> None:
    n = nonce(api)
    doc = ca.document(VM, SUB, imds_nonce(n))
    assert enroll(api, doc, n, AgentKey())[0] == 200
    # the captured document again, for a fresh nonce it was not made for, with the thief's key
    n2 = nonce(api)
    status, body = enroll(api, doc, n2, AgentKey())
    assert status == 401 and "not made for this nonce" in str(body["detail"])
    # a fresh document (the thief on the VM asks IMDS for it) with another key: the binding holds
    n3 = nonce(api)
    status, body = enroll(api, ca.document(VM, SUB, imds_nonce(n3)), n3, AgentKey())
    assert status == 401 and "another agent key" in str(body["detail"])


def test_attack_document_for_another_nonce_is_refused(api: AgentApi, ca: AttestedCa) -> None:
    n = nonce(api)
    status, body = enroll(api, ca.document(VM, SUB, imds_nonce("someone-elses-nonce")), n, AgentKey())
    assert status == 401 and "nonce" in str(body["detail"])
    # the raw server nonce (not its IMDS form) is not accepted either
    n = nonce(api)
    status, _ = enroll(api, ca.document(VM, SUB, n), n, AgentKey())
    assert status == 401


def test_attack_foreign_signer_is_refused(api: AgentApi) -> None:
    """A document signed by another CA's metadata.azure.com, and one by the right CA's other name."""
    n = nonce(api)
    status, body = enroll(api, AttestedCa.make("Evil Root").document(VM, SUB, imds_nonce(n)), n, AgentKey())
    assert status == 401 and "does not chain to a configured root" in str(body["detail"])


def test_attack_signer_with_another_name_is_refused(api: AgentApi, wiring: LocalWiring, azure: Azure) -> None:
    other = AttestedCa.make(signer_name="evil.example.com")
    azure.cfg.attested_roots_pem = other.root_pem
    attach(wiring, azure)
    n = nonce(api)
    status, body = enroll(api, other.document(VM, SUB, imds_nonce(n)), n, AgentKey())
    assert status == 401 and "not metadata.azure.com" in str(body["detail"])


def test_attack_tampered_expired_or_foreign_subscription_documents_are_refused(api: AgentApi, ca: AttestedCa) -> None:
    import base64

    n = nonce(api)
    der = bytearray(base64.b64decode(ca.document(VM, SUB, imds_nonce(n))))
    at = der.find(b'"vmId": "') + 9
    der[at] = ord("8")  # another VM's id in the signed content
    status, body = enroll(api, base64.b64encode(bytes(der)).decode(), n, AgentKey())
    assert status == 401 and "signed digest" in str(body["detail"])
    n = nonce(api)
    status, body = enroll(api, ca.document(VM, SUB, imds_nonce(n), expires_in=-60), n, AgentKey())
    assert status == 401 and "expired" in str(body["detail"])
    n = nonce(api)
    status, body = enroll(api, ca.document(VM, OTHER_SUB, imds_nonce(n)), n, AgentKey())
    assert status == 401 and "not enrolled with this control plane" in str(body["detail"])
    n = nonce(api)
    status, body = enroll(api, "not-base64!", n, AgentKey())
    assert status == 401 and "PKCS7" in str(body["detail"])


def test_attack_deleted_vm_cannot_enroll(api: AgentApi, ca: AttestedCa, arm: ArmServer) -> None:
    arm.delete(vm_id("web-1"))
    n = nonce(api)
    status, body = enroll(api, ca.document(VM, SUB, imds_nonce(n)), n, AgentKey())
    assert status == 401 and "not a running VM" in str(body["detail"])


def test_serve_enrolls_and_takes_event_grid_deliveries_over_http(
    arm: ArmServer, azure: Azure, wiring: LocalWiring, ca: AttestedCa
) -> None:
    """``ringfence serve``'s routes: POST /azure/events (handshake, a write) and the enrollment."""
    azure.cfg.attested_roots_pem = ca.root_pem
    seed_vm(arm, "web-1", VM, "10.20.1.4", PROD_WEB)
    with serve.serving(serve.ServeApp.over(wiring, None, azure=azure)) as running:
        client = httpx.Client(base_url=running.url)
        hs = [
            {
                "id": "v",
                "subject": "",
                "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                "eventTime": "2026-12-02T14:00:00Z",
                "data": {"validationCode": "abc"},
                "dataVersion": "2",
                "metadataVersion": "1",
            }
        ]
        h = {SECRET_HEADER: SECRET, "aeg-event-type": "SubscriptionValidation"}
        r = client.post("/azure/events", content=json.dumps(hs), headers=h)
        assert r.status_code == 200 and r.json() == {"validationResponse": "abc"}
        assert client.post("/azure/events", content=json.dumps(hs)).status_code == 401
        assert client.post("/nope/events", content=b"[]").status_code == 404
        write = [
            {
                "id": "w",
                "subject": vm_id("web-1"),
                "eventType": "Microsoft.Resources.ResourceWriteSuccess",
                "eventTime": "2026-12-02T14:00:00Z",
                "data": {
                    "operationName": "Microsoft.Compute/virtualMachines/write",
                    "resourceUri": vm_id("web-1"),
                    "subscriptionId": SUB,
                },
            }
        ]
        r = client.post("/azure/events", content=json.dumps(write), headers={SECRET_HEADER: SECRET})
        assert r.status_code == 200 and r.json()["changed"] == [VM]
        n = client.get("/v1/nonce").json()["nonce"]
        key = AgentKey()
        body = {
            "method": "azure-attested",
            "nonce": n,
            "document": ca.document(VM, SUB, imds_nonce(n)),
            "agent_key": key.pem,
            "agent_signature": key.prove("enroll", VM, n),
        }
        r = client.post("/v1/enroll", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["workload_id"] == VM


def test_the_agents_prover_enrolls_through_the_local_imds(api: AgentApi, ca: AttestedCa, wiring: LocalWiring) -> None:
    """The agent's own ``azure-attested`` prover (IMDS with the derived nonce) against the control
    plane's enroller: each side's real code."""
    from ringfence.local.azure_imds import AzureImds
    from ringfence_agent import enroll as agent_enroll

    key = AgentKey()
    with AzureImds(ca, lambda address: (VM, SUB) if address == "127.0.0.1" else None) as imds:
        prove = agent_enroll.azure_attested(imds.url, timeout=5)
        n = nonce(api)
        wire = prove(n)
    req = agentapi.EnrollRequest.model_validate(wire.to_json())
    req = req.model_copy(update={"agent_key": key.pem, "agent_signature": key.prove("enroll", VM, n)})
    r = api.enroll(req)
    assert r.status == 200 and r.body["workload_id"] == VM
    with pytest.raises(agent_enroll.ProofError, match="unavailable"):
        agent_enroll.azure_attested("http://127.0.0.1:9", timeout=1)(n)


def test_without_arm_reads_an_unseen_vm_waits_for_its_event(
    api: AgentApi, ca: AttestedCa, arm: ArmServer, azure: Azure, wiring: LocalWiring
) -> None:
    """As the AWS agent API enrolls (no Azure credentials there): a VM not in the inventory is
    refused without any ARM call, and enrolls once its event has been taken."""
    from ringfence.clouds.azure.events import WRITE
    from ringfence.clouds.azure.ingest import AzureEvents
    from ringfence.local.eventgrid import arm_event

    attach(wiring, azure, read_unseen=False)
    n = nonce(api)
    with arm.recording() as calls:
        status, body = enroll(api, ca.document(VM, SUB, imds_nonce(n)), n, AgentKey())
    assert status == 401 and "not a running VM" in str(body["detail"]) and calls == []
    assert wiring.store.get(VM) is None and wiring.store.agent_key(VM) is None
    headers = {SECRET_HEADER: SECRET, "aeg-event-type": "Notification"}
    write = arm_event(WRITE, vm_id("web-1"), "Microsoft.Compute/virtualMachines/write")
    assert AzureEvents(wiring, azure).handle(headers, json.dumps([write]).encode()).status == 200
    n = nonce(api)
    key = AgentKey()
    status, body = enroll(api, ca.document(VM, SUB, imds_nonce(n)), n, key)
    assert status == 200 and body["workload_id"] == VM and wiring.store.agent_key(VM) == key.pem
