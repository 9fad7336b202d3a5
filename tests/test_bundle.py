"""The bundle contract: golden files, canonical bytes, signatures, acceptance rules."""

from __future__ import annotations

import json

import pytest

from ringfence import bundle
from tests.conftest import GOLDEN
from tests.golden import regen


def test_engine_still_emits_the_golden_files() -> None:
    for name, text in regen.build().items():
        assert (GOLDEN / name).read_text() == text, f"{name} changed: run tests/golden/regen.py and review"


def test_golden_bundles_verify_with_the_test_key() -> None:
    verifier = bundle.Verifier.from_file(GOLDEN / "test-key.pub.pem")
    for path in GOLDEN.glob("bundle-*.json"):
        verifier.verify(bundle.load_bundle(path.read_text()))
    for path in GOLDEN.glob("delta-*.json"):
        verifier.verify(bundle.load_delta(path.read_text()))


def test_tampered_bundle_is_refused() -> None:
    verifier = bundle.Verifier.from_file(GOLDEN / "test-key.pub.pem")
    doc = json.loads((GOLDEN / "bundle-ord-prod-db-1.json").read_text())
    doc["inbound"][0]["action"] = "allow"
    with pytest.raises(bundle.BundleError, match="does not verify"):
        verifier.verify(bundle.load_bundle(json.dumps(doc)))


def test_bundle_signed_by_another_key_is_refused() -> None:
    verifier = bundle.Verifier.from_file(GOLDEN / "test-key.pub.pem")
    doc = bundle.load_bundle((GOLDEN / "bundle-ord-prod-db-1.json").read_text())
    forged = bundle.sign(doc, bundle.SigningKey.generate())
    with pytest.raises(bundle.BundleError, match="not a pinned key"):
        verifier.verify(forged)


def test_delta_cannot_pass_as_bundle_signature() -> None:
    # domain separation: the format prefix is part of the signed message
    key = bundle.SigningKey.generate()
    d = bundle.sign(bundle.SetDelta(set="rf_x", from_version=1, to_version=2), key)
    assert bundle.canonical_bytes(d).startswith(b"ringfence.delta/v2\n")


def test_unsigned_bundle_is_refused() -> None:
    verifier = bundle.Verifier.from_file(GOLDEN / "test-key.pub.pem")
    doc = bundle.load_bundle((GOLDEN / "bundle-ord-prod-db-1.json").read_text())
    with pytest.raises(bundle.BundleError, match="not signed"):
        verifier.verify(doc.model_copy(update={"signature": None}))


def test_acceptance_rules() -> None:
    doc = bundle.load_bundle((GOLDEN / "bundle-ord-prod-db-1.json").read_text())
    bundle.check_acceptable(doc, "ord-prod-db-1", None)
    with pytest.raises(bundle.BundleError, match="this agent is 'other'"):
        bundle.check_acceptable(doc, "other", None)
    with pytest.raises(bundle.BundleError, match="rollback refused"):
        bundle.check_acceptable(doc, "ord-prod-db-1", doc.version + 1)


def test_malformed_bundle_names_the_field() -> None:
    with pytest.raises(bundle.BundleError, match="workload_id"):
        bundle.load_bundle('{"format": "ringfence.bundle/v2", "version": 1}')


def test_equal_version_with_other_content_is_a_replay() -> None:
    applied = bundle.load_bundle((GOLDEN / "bundle-ord-prod-proc-1.json").read_text())
    bundle.check_acceptable(applied, "ord-prod-proc-1", applied.version, applied)  # idempotent re-delivery
    wider = applied.model_copy(update={"inbound": [*applied.inbound, applied.inbound[0]]})
    with pytest.raises(bundle.BundleError, match="replay refused"):
        bundle.check_acceptable(wider, "ord-prod-proc-1", applied.version, applied)


def test_loose_encodings_are_refused() -> None:
    doc = json.loads((GOLDEN / "bundle-ord-prod-db-1.json").read_text())
    doc["version"] = str(doc["version"])
    with pytest.raises(bundle.BundleError, match="version"):
        bundle.load_bundle(json.dumps(doc))


def _group(*members: dict[str, object], **extra: object) -> str:
    doc = json.loads((GOLDEN / "bundle-ord-prod-db-1.json").read_text())
    doc["inbound"] = [{"id": "g", "action": "allow", "set": None, "services": [], "members": list(members), **extra}]
    doc["sets"] = {}
    return json.dumps(doc)


def _member(mid: str, *services: tuple[str, list[int] | None, int | None]) -> dict[str, object]:
    return {"id": mid, "set": None, "services": [{"proto": p, "ports": r, "icmp_type": t} for p, r, t in services]}


def test_grouped_rule_contract() -> None:
    dns = _member("dns", ("udp", [53, 53], None), ("tcp", [53, 53], None))
    mon = _member("mon", ("tcp", [9100, 9100], None), ("icmp", None, 8))
    doc = bundle.load_bundle(_group(dns, mon))
    assert [m.id for m in doc.inbound[0].parts()] == ["dns", "mon"]
    # members round-trip; a plain rule's encoding has no "members" key at all
    assert json.loads(bundle.dumps(doc))["inbound"][0]["members"][1]["id"] == "mon"
    golden = bundle.load_bundle((GOLDEN / "bundle-ord-prod-db-1.json").read_text())
    assert all("members" not in r for r in json.loads(bundle.dumps(golden))["outbound"] if r["set"] is not None)
    assert b'"members":null' not in bundle.canonical_bytes(golden)
    # identical services are fine (the agent unites the members' addresses per service)
    bundle.load_bundle(_group(dns, _member("dns2", ("udp", [53, 53], None))))
    refused = {
        "a group is an allow": _group(dns, mon, action="deny"),
        "no set of its own": _group(dns, mon, set="rf_x"),
        "no services of its own": _group(dns, mon, services=[{"proto": "any", "ports": None, "icmp_type": None}]),
        "at least two members": _group(dns),
        "partial port overlap": _group(dns, _member("wide", ("tcp", [1, 1024], None))),
        "partial overlap beside all ports": _group(dns, _member("wide", ("tcp", None, None), ("tcp", [50, 53], None))),
        "unknown member field": _group(dns, {**mon, "action": "deny"}),
    }
    for why, text in refused.items():
        with pytest.raises(bundle.BundleError):
            bundle.load_bundle(text)
            pytest.fail(why)
    bundle.load_bundle(_group(_member("a", ("any", None, None)), _member("b", ("any", None, None))))
    # a whole protocol and 'any' live in sets of their own at the agent: they mix with anything
    bundle.load_bundle(_group(mon, _member("ping", ("icmp", None, None))))
    bundle.load_bundle(_group(dns, _member("all", ("any", None, None)), _member("scan", ("tcp", None, None))))


def test_grouped_member_set_must_be_defined() -> None:
    doc = bundle.load_bundle(_group(_member("dns", ("udp", [53, 53], None)), {**_member("x"), "set": "rf_missing"}))
    with pytest.raises(bundle.BundleError, match="rule x references undefined set rf_missing"):
        bundle.check_acceptable(doc, doc.workload_id, None)
