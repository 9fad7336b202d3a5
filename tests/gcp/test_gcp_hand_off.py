"""GCP: a change stored by a push (or a sync) whose later step then fails still reaches compute.
The push's redelivery (Pub/Sub retries whatever is not answered 2xx) finds the VM stored as
observed, stores nothing and would hand nothing on: what was stored is handed on when the step
fails. Through the /gcp/events route, the local Google API and the real store."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest

from ringfence.clouds.gcp import ingest as ingest_module
from ringfence.clouds.gcp.enroll import METHOD, GcpEnroller
from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.control.agents import AgentApi
from ringfence.control.api import secret_hash
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry, logged, push_body, push_token
from ringfence.local.gcp_project import PROJECT, ZONE, gcp_config, tagged_vm, vm_name
from ringfence.local.wiring import LocalWiring
from tests.aws.test_pipeline import AgentKey
from tests.gcp.conftest import deliver, post, set_labels
from tests.gcp.test_attack_gcp_enroll import enroll, token
from tests.storerace import computed, fail_once

PROD_WEB = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}


def push(gcp: GcpApi, ingest: GcpIngest, entry: dict[str, Any]) -> int:
    """Pub/Sub's push of a logged entry: the status it is answered (not 2xx: pushed again; an
    error the route does not answer is the host's 5xx)."""
    try:
        return post(ingest, push_body(entry), push_token(gcp))[0]
    except RuntimeError:
        return 500


def test_a_label_change_stored_before_its_entrys_claim_fails_reaches_compute(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A setLabels moving nothing privileged is stored, then its entry is spent (a one-time claim
    in the store): that claim fails, the push is answered 5xx and pushed again. The redelivery
    stores nothing (the VM is stored as it is) and hands nothing on: compute must hear of the
    move when the claim fails, or the VM keeps its old app's peers until a rebuild."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.7.1"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    ids = computed(monkeypatch, wiring)
    failed = fail_once(monkeypatch, wiring.store, "claim_once")
    entry = set_labels(gcp, inst, {**PROD_WEB, "ringfence-app": "payroll"}, principal="dev@example.com")
    logged(gcp, entry)
    assert push(gcp, ingest, entry) != 200
    assert failed and wiring.store.get(inst["id"]).labels["app"] == "payroll"  # type: ignore[union-attr]
    assert push(gcp, ingest, entry) == 200  # the redelivery
    assert inst["id"] in ids, "the move was stored but compute never heard of it"


def test_a_change_a_sync_stored_before_its_tombstone_pass_fails_reaches_compute(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync stores the listed VMs (one moved to another app), then its pass over the stored VMs
    not listed fails. The next sync finds the moved VM stored as it is and hands nothing on for it."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.7.2"], labels=PROD_WEB)
    ingest.sync(PROJECT)
    gcp.set_labels(PROJECT, ZONE, inst["name"], {**PROD_WEB, "ringfence-app": "payroll"})
    ids = computed(monkeypatch, wiring)
    failed = fail_once(monkeypatch, wiring.store, "all_records")
    with pytest.raises(RuntimeError):
        ingest.sync(PROJECT)
    assert failed and wiring.store.get(inst["id"]).labels["app"] == "payroll"  # type: ignore[union-attr]
    ingest.sync(PROJECT)  # the next pass
    assert inst["id"] in ids, "the move was stored but compute never heard of it"


def test_a_delete_stored_before_its_token_revocation_fails_reaches_compute_and_is_revoked_again(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete is stored (tombstoned), then revoking the VM's agent token fails. The redelivery
    finds it stored deleted: the VM must still leave its peers' sets (compute), and the token
    must still stop authorizing (revoked by the redelivery)."""
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.7.3"], labels=PROD_WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    token = secrets.token_hex(16)
    wiring.store.put_token(token, inst["id"], 3600)
    assert wiring.store.token_workload(token) == inst["id"]
    ids = computed(monkeypatch, wiring)
    failed = fail_once(monkeypatch, wiring.store, "revoke_tokens")
    gcp.delete_instance(PROJECT, ZONE, inst["name"])
    entry = audit_entry("v1.compute.instances.delete", inst)
    logged(gcp, entry)
    assert push(gcp, ingest, entry) != 200
    assert failed and wiring.store.get(inst["id"]).state == "terminated"  # type: ignore[union-attr]
    assert push(gcp, ingest, entry) == 200  # the redelivery
    assert inst["id"] in ids, "the delete was stored but compute never heard of it"
    assert wiring.store.token_workload(token) is None, "the deleted VM's token still authorizes"


def test_attack_a_vm_failed_closed_whose_token_revocation_failed_has_its_token_revoked_by_the_next_sync(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root on a VM copies its agent token; the VM is deleted in a zone that cannot be read (its
    delete entry lost). Past the bound the sync fails it closed (recorded deleted), and revoking
    its token fails. The next sync must revoke the token: every pass skips a VM stored deleted,
    so a tombstone written before the revocation left the token authorizing for good."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    zone = "europe-west1-c"
    inst = tagged_vm(gcp, ["10.20.7.4"], PROD_WEB, zone=zone)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    api = AgentApi(wiring, {METHOD: GcpEnroller(wiring, gcp_config(gcp))})
    status, body = enroll(api, inst["id"], token(gcp, inst), AgentKey())
    assert status == 200, body
    stolen = f"Bearer {body['token']}"
    assert api.authorize(stolen, inst["id"]) is None
    gcp.unreachable(zone, lookups=True)
    try:
        gcp.delete_instance(PROJECT, zone, inst["name"])
        # a day later (UNCONFIRMED_MAX), still unreachable: it fails closed
        monkeypatch.setattr(ingest_module, "now", lambda: time.time() + 25 * 3600)
        failed = fail_once(monkeypatch, wiring.store, "revoke_tokens")
        with pytest.raises(RuntimeError):
            ingest.sync(PROJECT)
        assert failed
        ingest.sync(PROJECT)  # the next pass
    finally:
        gcp.unreachable()
    assert wiring.store.get(inst["id"]).state == "terminated"  # type: ignore[union-attr]
    assert wiring.store.token_workload(secret_hash(body["token"])) is None, "the deleted VM's token still authorizes"
    refused = api.authorize(stolen, inst["id"])
    assert refused is not None and refused.status == 401
