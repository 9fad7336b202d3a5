"""GCP: a privileged value is in force only while the last known write of its dimension (by the
audit entry's ``timestamp``, the call's own time) was an allowed tagger's call or an admin grant
that still stands (``ringfence.governance.govern_writes``). Against the local Google APIs, through
the real ingest (push → Cloud Logging read-back → instances.get → store)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from ringfence.clouds.gcp import ingest as ingest_module
from ringfence.clouds.gcp.ingest import GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry, logged, push_body, push_token
from ringfence.local.gcp_project import PROJECT, TAGGER, ZONE, gcp_config, vm_name
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver, post, set_labels

MALLORY = "mallory@shop-prod.iam.gserviceaccount.com"  # may set labels on her VMs; not a tagger
WEB = {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "prod"}
JUMP = {**WEB, "ringfence-role": "jumpbox"}


def audits(w: LocalWiring, action: str, target: str) -> list[Any]:
    return [a for a in w.store.audit_log() if a.action == action and a.target == target]


def _vm(gcp: GcpApi, ingest: GcpIngest, ip: str) -> dict[str, Any]:
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), [ip], labels=WEB)
    deliver(gcp, ingest, audit_entry("v1.compute.instances.insert", inst))
    return inst


def _push(gcp: GcpApi, ingest: GcpIngest, entry: dict[str, Any]) -> None:
    status, body = post(ingest, push_body(entry), push_token(gcp))
    assert status == 200, body


def _held_and_named(wiring: LocalWiring, inst: dict[str, Any]) -> None:
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox", f"jumpbox in force: {rec.labels if rec else None}"
    assert rec.workload.held_labels is not None
    assert MALLORY in [a.principal for a in audits(wiring, "label.held", inst["id"])]


@pytest.mark.parametrize("revoker", [MALLORY, TAGGER], ids=["revoked-by-her", "revoked-by-the-tagger"])
@pytest.mark.parametrize("seen_long_before", [False, True], ids=["seen-just-before", "seen-long-before"])
def test_attack_gcp_revocation_coalesced_with_a_reescalation_is_held_and_names_her(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch, seen_long_before: bool, revoker: str
) -> None:
    """The tagger set ``role=jumpbox`` (approved). Mallory (or the tagger: ``revoker``) moves the
    VM to web and Mallory back to jumpbox before either entry is processed: every read shows
    jumpbox, no observation sees the value change. The calls, after the approval, take it back:
    held, and she is named, also where
    the VM was last seen (with jumpbox) well before her calls (``seen_long_before``: her
    ``setLabels`` re-sending jumpbox is still her move, the value having been written over)."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    if seen_long_before:
        monkeypatch.setattr(ingest_module, "CLOCK_SKEW", -60.0)  # as if each read were a minute older
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = _vm(gcp, ingest, f"10.20.{8 if revoker == TAGGER else 7}.{12 if seen_long_before else 10}")
    deliver(gcp, ingest, set_labels(gcp, inst, JUMP))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
    revoke = logged(gcp, set_labels(gcp, inst, WEB, principal=revoker))
    again = logged(gcp, set_labels(gcp, inst, JUMP, principal=MALLORY))
    for entry in (revoke, again):
        _push(gcp, ingest, entry)
    _held_and_named(wiring, inst)


def test_attack_gcp_a_taggers_late_entry_older_than_a_revocation_approves_nothing(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tagger sets ``role=jumpbox`` (its entry delivered late); Mallory moves the VM back to
    web (an entry Cloud Logging does not list yet: its own lag, so the tagger's read-back finds
    no later call that set another role) and sets jumpbox again (held, she is named). The
    tagger's genuine entry, older than her call, approves nothing: a write is placed by the
    call's time, not by when its entry happened to be processed. Nor does the tagger's later call
    re-sending jumpbox: her held call is the last known write of role, of that same value, so the
    tagger's call did not change it (a re-send is not a move; she stays named). The tagger moving
    the VM to web and back to jumpbox is a move of its own, and approves."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = _vm(gcp, ingest, "10.20.7.11")
    late = logged(gcp, set_labels(gcp, inst, JUMP))  # the tagger; its delivery is delayed
    undo = set_labels(gcp, inst, WEB, principal=MALLORY)  # not listed by Cloud Logging yet
    mallory = logged(gcp, set_labels(gcp, inst, JUMP, principal=MALLORY))
    for entry in (undo, mallory):
        _push(gcp, ingest, entry)
    _held_and_named(wiring, inst)
    _push(gcp, ingest, late)
    _held_and_named(wiring, inst)
    assert not audits(wiring, "label.approve", inst["id"])
    # the tagger's call after hers re-sends her held jumpbox: still held, approving nothing
    deliver(gcp, ingest, set_labels(gcp, inst, JUMP))
    _held_and_named(wiring, inst)
    assert not audits(wiring, "label.approve", inst["id"])
    # the tagger changing the value (to web, then jumpbox) is what puts jumpbox in force
    deliver(gcp, ingest, set_labels(gcp, inst, WEB))
    deliver(gcp, ingest, set_labels(gcp, inst, JUMP))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None
    assert audits(wiring, "label.approve", inst["id"])


def test_attack_gcp_reconcile_listing_does_not_restore_a_revoked_privilege(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduled pass lists the project while the tagger's jumpbox is approved; before it
    writes, Mallory moves the VM to web (her entry stored). The pass's listing, stale by then, is
    decided against the record as stored when it writes: jumpbox is not put back in force."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = _vm(gcp, ingest, "10.20.7.13")
    deliver(gcp, ingest, set_labels(gcp, inst, JUMP))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox"
    real = ingest.instances.listing

    def listed_then_revoked(project: str) -> tuple[list[dict[str, Any]], set[str] | None]:
        listing = real(project)
        deliver(gcp, ingest, set_labels(gcp, inst, WEB, principal=MALLORY))
        now = wiring.store.get(inst["id"])
        assert now is not None and now.labels["role"] == "web"
        return listing

    monkeypatch.setattr(ingest.instances, "listing", listed_then_revoked)
    ingest.sync(PROJECT)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox", rec.labels


def test_a_taggers_long_running_call_is_placed_at_its_end_not_its_start(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A split call (first entry when requested, last when done): a read made while it ran, still
    without its value, is no later write than the call. The tagger's setLabels, requested 20 s
    before a scheduled pass saw the VM at web and done after it, approves jumpbox."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.20.7.14"], labels=WEB)
    deliver(gcp, ingest, _before(audit_entry("v1.compute.instances.insert", inst), 60))
    request = {"labels": [{"key": k, "value": v} for k, v in JUMP.items()]}
    method = "v1.compute.instances.setLabels"
    first = _before(audit_entry(method, inst, request=request, operation="op-long-1", last=False), 20)
    ingest.sync(PROJECT)  # the VM seen at web while the call runs
    gcp.set_labels(PROJECT, ZONE, inst["name"], JUMP)
    last = audit_entry(method, inst, operation="op-long-1", first=False)
    deliver(gcp, ingest, first)
    deliver(gcp, ingest, last)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels["role"] == "jumpbox" and rec.workload.held_labels is None


def _before(entry: dict[str, Any], seconds: float) -> dict[str, Any]:
    """``entry`` logged ``seconds`` earlier than now."""
    at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")) - timedelta(seconds=seconds)
    entry["timestamp"] = at.isoformat().replace("+00:00", "Z")
    return entry
