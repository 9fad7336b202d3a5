"""Attacks on the signing chain, performed against the real agent (its CLI and its core, dry-run
backend: these checks happen before any firewall is touched): forged and replayed deltas, a
captured bundle replayed after it expired, keys the agent does not pin or has revoked.
The documents come from the real engine and signer (golden files, test-only keys)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ringfence import bundle
from ringfence import bundlewire as wire
from ringfence_agent.cli import main
from ringfence_agent.core import Agent, Rejected
from ringfence_agent.plan import LocalFailsafes
from ringfence_agent.state import StateDir
from tests.agent.bundles import GOLDEN, PUBLIC_KEY, forge, key, write

PROC = GOLDEN / "bundle-ord-prod-proc-1.json"
PROC2 = GOLDEN / "bundle-ord-prod-proc-1-after-scale-out.json"
DELTA = GOLDEN / "delta-ord-prod-proc-1-scale-out.json"


def agent_cli(tmp: Path, command: str, doc: Path, *extra: str, keys: Path = PUBLIC_KEY) -> int:
    flag = "--bundle" if command == "apply" else "--delta"
    args = [command, flag, str(doc), "--backend", "dry-run", "--state-dir", str(tmp / "state")]
    return main([*args, "--public-key", str(keys), *extra])


def status(tmp: Path) -> dict[str, object]:
    return dict(json.loads((tmp / "state" / "status.json").read_text()))


def test_attack_forged_delta_is_refused_by_the_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_cli(tmp_path, "apply", PROC) == 0
    delta = bundle.load_delta(DELTA.read_text())
    # a control-plane attacker without the key adds its own address to the set the bundle allows
    forged = write(forge(delta, add=[*delta.add, "203.0.113.66/32"]), tmp_path / "forged.json")
    assert agent_cli(tmp_path, "apply-delta", forged) != 0
    assert "signature does not verify" in capsys.readouterr().err
    # or signs it with a key of its own
    own = write(bundle.sign(delta.model_copy(update={"signature": None}), bundle.SigningKey.generate()), tmp_path / "o")
    assert agent_cli(tmp_path, "apply-delta", own) != 0
    assert "not a pinned key" in capsys.readouterr().err
    # or strips the signature
    bare = write(delta.model_copy(update={"signature": None}), tmp_path / "bare.json")
    assert agent_cli(tmp_path, "apply-delta", bare) != 0
    assert "is not signed" in capsys.readouterr().err
    # the genuine delta still applies: nothing of the forgeries stuck
    assert agent_cli(tmp_path, "apply-delta", DELTA) == 0
    assert status(tmp_path)["applied_version"] == delta.to_version


def test_attack_replayed_delta_is_refused_by_the_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    delta = bundle.load_delta(DELTA.read_text())
    # a genuine signed delta moved onto another chain position: from/to are in the signed manifest
    for moved in ({"from_version": delta.from_version + 1, "to_version": delta.to_version + 1}, {"set": "rf_other"}):
        assert agent_cli(tmp_path, "apply", PROC) == 0
        path = write(forge(delta, **moved), tmp_path / "moved.json")
        assert agent_cli(tmp_path, "apply-delta", path) != 0
        assert "signature does not verify" in capsys.readouterr().err
    # the same captured delta replayed onto an agent already past it: refused, nothing changes
    assert agent_cli(tmp_path, "apply", PROC2) == 0
    capsys.readouterr()
    before = status(tmp_path)["applied_version"]
    rc = agent_cli(tmp_path, "apply-delta", DELTA)
    out = capsys.readouterr()
    assert rc != 0 or "already" in out.out, out
    assert status(tmp_path)["applied_version"] == before


def test_attack_expired_captured_bundle_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = bundle.load_bundle(PROC.read_text())
    # a bundle the control plane really signed, captured and replayed after its expiry (to a
    # reinstalled agent with an empty state directory: no rollback check could catch it)
    captured = write(bundle.sign(doc, key(), expires_at=int(time.time()) - 60), tmp_path / "old.json")
    assert agent_cli(tmp_path, "apply", captured) != 0
    assert "expired" in capsys.readouterr().err
    assert "applied_version" not in status(tmp_path)
    # and a bundle whose expiry was pushed out without the key: the expiry is signed
    stretched = write(forge(bundle.load_bundle(captured.read_text()), expires_at=4102444800), tmp_path / "s.json")
    assert agent_cli(tmp_path, "apply", stretched) != 0
    assert "signature does not verify" in capsys.readouterr().err
    # one without any expiry is no better
    undated = bundle.sign(doc, key())
    raw = json.loads(bundle.dumps(undated))
    raw["expires_at"] = None
    (tmp_path / "undated.json").write_text(json.dumps(raw))
    assert agent_cli(tmp_path, "apply", tmp_path / "undated.json") != 0
    assert agent_cli(tmp_path, "apply", write(undated, tmp_path / "fresh.json")) == 0


def test_attack_unknown_and_revoked_keys_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rotation as docs/bundle.md describes it: the new key joins the pinned set, compute
    switches, the old key id is revoked; a key outside the set never verifies."""
    old, new, stranger = key(), bundle.SigningKey.generate(), bundle.SigningKey.generate()
    keyset = tmp_path / "keys.pem"
    keyset.write_bytes(old.public_pem() + new.public_pem())
    doc = bundle.load_bundle(PROC.read_text())

    def signed(k: bundle.SigningKey, version: int) -> Path:
        return write(bundle.sign(doc.model_copy(update={"version": version}), k), tmp_path / f"{version}.json")

    assert agent_cli(tmp_path, "apply", signed(stranger, 10), keys=keyset) != 0
    assert f"signed by key {stranger.key_id}, not a pinned key" in capsys.readouterr().err
    assert agent_cli(tmp_path, "apply", signed(old, 11), keys=keyset) == 0
    assert agent_cli(tmp_path, "apply", signed(new, 12), keys=keyset) == 0  # compute switched
    revoke = ("--revoked-key", old.key_id)
    assert agent_cli(tmp_path, "apply", signed(old, 13), *revoke, keys=keyset) != 0
    assert f"signed by key {old.key_id}, which is revoked" in capsys.readouterr().err
    assert agent_cli(tmp_path, "apply", signed(new, 14), *revoke, keys=keyset) == 0
    # a key id in the signature that names a pinned key does not help a stranger's signature
    lying = bundle.sign(doc.model_copy(update={"version": 15}), stranger)
    assert lying.signature is not None
    lying = lying.model_copy(update={"signature": lying.signature.model_copy(update={"key_id": new.key_id})})
    assert agent_cli(tmp_path, "apply", write(lying, tmp_path / "15.json"), *revoke, keys=keyset) != 0
    assert "signature does not verify" in capsys.readouterr().err
    # every key revoked: the agent still starts (exiting would leave the host open) and refuses all
    everything = wire.Verifier.from_file(keyset, [old.key_id, new.key_id])
    with pytest.raises(wire.BundleError, match="revoked"):
        everything.verify(wire.load_bundle(signed(new, 16).read_bytes()))


def test_an_expired_enforced_bundle_stays_enforced_and_is_reported_stale(tmp_path: Path) -> None:
    from tests.agent.test_agent_unit import FakeBackend

    doc = wire.load_bundle(PROC.read_bytes())
    soon = wire.sign(doc, key(), expires_at=int(time.time()) + 3600)
    state = StateDir(tmp_path / "state")
    state.ensure()
    agent = Agent(None, wire.Verifier.from_file(PUBLIC_KEY), FakeBackend(), state, LocalFailsafes(), log=lambda s: None)  # type: ignore[arg-type]
    assert agent.apply_bundle(soon).changed
    later = time.time() + 7200
    assert agent.stale(later) and not agent.stale()
    # the same bundle fetched again after its expiry is refused, and nothing is taken down
    with pytest.raises(Rejected, match="expired"):
        agent.apply_bundle(soon, now=later)
    assert agent.bundle == soon and agent.revision == soon.version
    # compute's refresh (same version and firewall, later expiry) is kept: no longer stale
    refreshed = wire.sign(doc, key(), expires_at=int(later) + 86400)
    result = agent.apply_bundle(refreshed, now=later)
    assert not result.changed and "refreshed" in result.lines[0]
    assert agent.bundle is not None and agent.bundle.expires_at == refreshed.expires_at
    assert not agent.stale(later)
    assert state.load_bundle() == refreshed  # the refreshed bundle is the last known good
