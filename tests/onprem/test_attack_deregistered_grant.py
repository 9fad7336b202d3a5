"""On premise (ringfence serve's SQLite): a deregistered host's grant must not outlive the
deregistration in its record's label_writes, where a later binding of another dimension brought
it back (role=jumpbox, never bound in the host's new life)."""

from __future__ import annotations

from pathlib import Path

from ringfence.clouds.onprem import OnPremAdmin
from ringfence.control.governance import bind_labels
from ringfence.control.wiring import Config
from ringfence.local.wiring import LocalWiring
from tests.onprem.conftest import policy_files, signing_key_file

ALICE = "arn:aws:iam::123456789012:user/alice"
HOST = {
    "id": "bastion-1",
    "ips": ["10.20.0.5"],
    "tags": {"ringfence:role": "jumpbox", "ringfence:app": "admin", "ringfence:env": "prod"},
}


def test_attack_a_deregistered_hosts_grant_does_not_come_back(tmp_path: Path) -> None:
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path), cfg=Config())
    adm = OnPremAdmin(w)
    assert adm.provision("alice", policy_files(), "initial").status == 201
    # registered by a policy author: role=jumpbox and app=admin are bound (grants)
    r = adm.register_workload(ALICE, HOST, "bastion", may_bind=True)
    assert r.status in (200, 201), r.body
    # later: an incident-time binding of app only (writes label_writes)
    bind_labels(w, "bastion-1", {"app": "admin"}, ALICE, "CHG-1")
    assert w.store.get("bastion-1").labels.get("role") == "jumpbox"
    # deregistered; the same id registered again by someone who may not bind: grants start from none
    assert adm.deregister_workload(ALICE, "bastion-1", "decommissioned").status in (200, 204)
    r = adm.register_workload("arn:aws:iam::123456789012:user/ops", HOST, "re-used name", may_bind=False)
    assert r.status in (200, 201), r.body
    rec = w.store.get("bastion-1")
    assert rec.labels.get("role") != "jumpbox"
    # a policy author binds app=admin only
    bind_labels(w, "bastion-1", {"app": "admin"}, ALICE, "CHG-2 app only")
    rec = w.store.get("bastion-1")
    w.close()
    assert rec.labels.get("role") != "jumpbox", "role=jumpbox came back from the host's earlier life, never bound now"
