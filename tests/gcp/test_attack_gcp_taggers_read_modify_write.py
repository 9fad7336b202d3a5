"""GCP labels as the label source: an allowed tagger's ``setLabels`` sends the VM's whole label set,
so a read-modify-write changing an unrelated label re-sends every value on the VM, a privileged
value someone else set and Ringfence holds included. The tagger's call approves only the
privileged values it changed; a held value it merely re-sent stays held (an administrator's
binding grants it). ``held_labels`` set: a move is held, the VM governed with the labels it
kept."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from ringfence.clouds.gcp import ingest as ingest_module
from ringfence.clouds.gcp.ingest import CLOCK_SKEW, GcpIngest
from ringfence.clouds.gcp.instances import LabelSource
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_events import audit_entry, logged, push_body, push_token
from ringfence.local.gcp_project import PROJECT, TAGGER, ZONE, gcp_config
from ringfence.local.wiring import LocalWiring
from tests.gcp.conftest import deliver, post, set_labels
from tests.gcp.test_attack_gcp_label_writes import JUMP, MALLORY, WEB, _vm, audits


def test_attack_gcp_taggers_read_modify_write_does_not_approve_a_held_move(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory (not a tagger) sets role=jumpbox; a sync reads the VM with it (held). More than
    CLOCK_SKEW later a tagger's automation adds a cost label, re-sending role=jumpbox as it stands:
    its entry, processed first, must not put her value in force, and hers then names her."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = _vm(gcp, ingest, "10.20.9.93")
    real = ingest.instances.listing
    entry: dict[str, Any] = {}

    def listing(project: str) -> Any:
        entry["mallory"] = set_labels(gcp, inst, JUMP, principal=MALLORY)
        page = list(real(project))  # the page holding her VM
        time.sleep(CLOCK_SKEW + 3)  # later pages: the read is older than the tagger's call
        entry["tagger"] = set_labels(gcp, inst, {**JUMP, "team": "payments"}, principal=TAGGER)
        return page

    monkeypatch.setattr(ingest.instances, "listing", listing)
    ingest.sync(PROJECT)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.workload.held_labels is not None, rec.labels
    assert rec.labels.get("role") != "jumpbox", rec.labels
    monkeypatch.setattr(ingest.instances, "listing", real)

    deliver(gcp, ingest, entry["tagger"])
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox", f"laundered by the tagger's call: {rec.labels}"
    assert rec.workload.held_labels is not None and rec.workload.tags.get("ringfence:role") == "jumpbox", rec.workload

    deliver(gcp, ingest, entry["mallory"])
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox", rec.labels
    assert rec.workload.held_labels is not None and rec.workload.tags.get("ringfence:role") == "jumpbox", rec.workload
    named = [a.principal for a in audits(wiring, "label.held", inst["id"])]
    assert MALLORY in named and TAGGER not in named, named


def _resent_held(wiring: LocalWiring, inst: dict[str, Any]) -> None:
    """Mallory's jumpbox, re-sent by the tagger's call, is still held and hers: not in force, no
    approval recorded, she named and the tagger not."""
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox", f"laundered by the tagger's call: {rec.labels}"
    assert rec.workload.held_labels is not None and rec.workload.tags.get("ringfence:role") == "jumpbox", rec.workload
    assert not audits(wiring, "label.approve", inst["id"]), "the tagger's re-send was audited as an approval"
    named = [a.principal for a in audits(wiring, "label.held", inst["id"])]
    assert MALLORY in named and TAGGER not in named, named


def test_attack_gcp_taggers_resend_seen_within_the_skew_does_not_approve_a_held_move(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory (not a tagger) sets role=jumpbox; her entry's read sees the VM with it (held, she is
    named). Within CLOCK_SKEW of that read a tagger's automation adds a cost label, re-sending
    role=jumpbox: the observation is too recent to say what the call changed (it may show the
    call's own values), but the last known write of role is her held call, made before the
    tagger's, of the same value. The tagger's call re-sent it: held, she stays named."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = _vm(gcp, ingest, "10.20.9.94")
    deliver(gcp, ingest, set_labels(gcp, inst, JUMP, principal=MALLORY))
    seen = wiring.store.get(inst["id"])
    assert seen is not None and seen.workload.held_labels is not None, seen.labels
    tagger = set_labels(gcp, inst, {**JUMP, "team": "payments"}, principal=TAGGER)
    # the VM's last sighting is within CLOCK_SKEW before the tagger's call: it decides nothing
    assert time.time() - max(seen.observed_at, seen.workload.observed_at) < CLOCK_SKEW
    deliver(gcp, ingest, tagger)
    _resent_held(wiring, inst)


def test_attack_gcp_taggers_resend_read_after_the_call_does_not_approve_a_held_move(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mallory (not a tagger) sets role=jumpbox (held, she is named). A tagger's automation adds a
    cost label, re-sending role=jumpbox, and the scheduled pass reads the VM after that call and
    stores it before the tagger's entry is processed: the stored observation may show the call's
    own values, so it cannot say what the call changed, but the last known write of role is her
    held call, made before the tagger's, of the same value. The tagger's call re-sent it: held,
    she stays named."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = _vm(gcp, ingest, "10.20.9.95")
    deliver(gcp, ingest, set_labels(gcp, inst, JUMP, principal=MALLORY))
    tagger = set_labels(gcp, inst, {**JUMP, "team": "payments"}, principal=TAGGER)
    ingest.sync(PROJECT)  # a read after the tagger's call, stored before its entry
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.workload.tags.get("team") == "payments", rec.workload.tags
    assert rec.workload.held_labels is not None, rec.labels
    deliver(gcp, ingest, tagger)
    _resent_held(wiring, inst)


def _push(gcp: GcpApi, ingest: GcpIngest, entry: dict[str, Any]) -> None:
    status, body = post(ingest, push_body(entry), push_token(gcp))
    assert status == 200, body


@pytest.mark.parametrize("seen_long_before", [False, True], ids=["seen-just-before", "seen-long-before"])
def test_attack_gcp_taggers_resend_delivered_before_the_held_call_it_resent_approves_nothing(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch, seen_long_before: bool
) -> None:
    """Mallory (not a tagger) sets role=jumpbox; her entry is delivered late (Pub/Sub does not
    order). A tagger's automation then adds a cost label, re-sending role=jumpbox, and its entry
    is processed first: the VM as stored shows web (seen before both calls, just before or long
    before), and no write of role is known, so neither says the tagger re-sent it. Cloud Logging
    does: read from the VM's last sighting at web, it lists her call setting jumpbox before the
    tagger's. Held, the tagger not named; her entry, arriving later, names her. A control VM: the
    value moved back to web by her before the tagger's call, the tagger's call changed it, and
    approves."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = _vm(gcp, ingest, "10.20.9.96" if seen_long_before else "10.20.9.97")
    control = _vm(gcp, ingest, "10.20.9.98" if seen_long_before else "10.20.9.99")
    if seen_long_before:
        time.sleep(CLOCK_SKEW + 1)  # the VMs last seen (at web) more than CLOCK_SKEW before the calls
    mallory = logged(gcp, set_labels(gcp, inst, JUMP, principal=MALLORY))  # in Cloud Logging; push delayed
    logged(gcp, set_labels(gcp, control, JUMP, principal=MALLORY))
    time.sleep(0.05)
    logged(gcp, set_labels(gcp, control, WEB, principal=MALLORY))
    time.sleep(0.05)
    tagger = logged(gcp, set_labels(gcp, inst, {**JUMP, "team": "payments"}, principal=TAGGER))
    _push(gcp, ingest, tagger)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox", f"laundered by the tagger's re-send: {rec.labels}"
    assert rec.workload.held_labels is not None and rec.workload.tags.get("ringfence:role") == "jumpbox", rec.workload
    assert not audits(wiring, "label.approve", inst["id"]), "the tagger's re-send was audited as an approval"
    _push(gcp, ingest, mallory)
    _resent_held(wiring, inst)

    deliver(gcp, ingest, set_labels(gcp, control, {**JUMP, "team": "payments"}, principal=TAGGER))
    rec = wiring.store.get(control["id"])
    assert rec is not None and rec.labels.get("role") == "jumpbox", f"the tagger's own move held: {rec.labels}"
    assert [a.principal for a in audits(wiring, "label.approve", control["id"])] == [TAGGER]


@pytest.mark.parametrize("in_logging", [True, False], ids=["update-listed", "update-not-listed"])
@pytest.mark.parametrize("how", ["read-after-the-call", "seen-within-the-skew"])
def test_attack_gcp_taggers_resend_of_an_unattributed_held_value_approves_nothing(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch, how: str, in_logging: bool
) -> None:
    """Mallory's role=jumpbox reaches the VM by a call no entry Ringfence acts on attributes
    (``instances.update``, pushed here and ignored): the scheduled pass sees it, held, an
    ``unseen`` write first seen then. A tagger's automation re-sends it with an unrelated edit,
    and either the scheduled pass reads the VM after that call before its entry is processed (the
    sighting may show the call's own values), or the call follows the sighting within CLOCK_SKEW.
    The value was seen before the call: the tagger's call re-sent it, and it stays held, whether
    or not Cloud Logging lists Mallory's call (not listed: the sighting alone decides)."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    inst = _vm(gcp, ingest, f"10.20.9.{100 + 2 * (how == 'seen-within-the-skew') + in_logging}")
    gcp.set_labels(PROJECT, ZONE, inst["name"], JUMP)
    update = audit_entry(
        "v1.compute.instances.update", inst, principal=MALLORY, request={"labels": {"ringfence-role": "jumpbox"}}
    )
    _push(gcp, ingest, logged(gcp, update) if in_logging else update)
    time.sleep(2)  # the update's entry is not within Cloud Logging's one-second window of the tagger's call
    ingest.sync(PROJECT)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.workload.held_labels is not None and rec.labels.get("role") != "jumpbox", rec
    if how == "read-after-the-call":
        time.sleep(CLOCK_SKEW + 1)  # the first sighting is well before the tagger's call
    tagger = set_labels(gcp, inst, {**JUMP, "team": "payments"}, principal=TAGGER)
    if how == "read-after-the-call":
        ingest.sync(PROJECT)  # the scheduled pass reads the VM after the call, before its entry
    else:
        assert time.time() - rec.workload.observed_at < CLOCK_SKEW
    deliver(gcp, ingest, tagger)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox", f"laundered by the tagger's re-send: {rec.labels}"
    assert rec.workload.held_labels is not None and rec.workload.tags.get("ringfence:role") == "jumpbox", rec.workload
    assert not audits(wiring, "label.approve", inst["id"]), "the tagger's re-send was audited as an approval"


def test_attack_gcp_taggers_resend_of_a_move_older_than_an_hour_approves_nothing(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VM last seen (at web) 3 h ago (the scheduled pass down); Mallory (not a tagger) set
    role=jumpbox 2 h ago, her entry not delivered yet; now a tagger's automation re-sends it. A
    read reaching an hour back does not list her call, so whether the tagger's call set the value
    cannot be told: it approves nothing (``label.unconfirmed``), and her entry, delivered late,
    leaves the move held."""
    monkeypatch.setattr(ingest_module, "LOGGING_LAG", 0.0)
    ingest = GcpIngest(wiring, gcp_config(gcp, LabelSource.LABELS))
    real_now = ingest_module.now
    monkeypatch.setattr(ingest_module, "now", lambda: real_now() - 3 * 3600)  # the sighting, 3 h ago
    inst = _vm(gcp, ingest, "10.20.9.90")
    monkeypatch.setattr(ingest_module, "now", real_now)
    mallory = set_labels(gcp, inst, JUMP, principal=MALLORY)
    ago = datetime.fromtimestamp(time.time() - 2 * 3600, UTC)
    mallory["timestamp"] = ago.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # as Cloud Logging has it
    logged(gcp, mallory)
    deliver(gcp, ingest, set_labels(gcp, inst, {**JUMP, "team": "payments"}, principal=TAGGER))
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox", f"laundered by the tagger's re-send: {rec.labels}"
    assert not audits(wiring, "label.approve", inst["id"]), "the tagger's re-send was audited as an approval"
    why = [str(a.reason) for a in audits(wiring, "label.unconfirmed", inst["id"])]
    assert any("not seen without" in r for r in why), why
    _push(gcp, ingest, mallory)
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.labels.get("role") != "jumpbox", rec.labels
