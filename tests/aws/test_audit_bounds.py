"""An audited change never goes without its record: a provision's record is written before the
version becomes active and is bounded in size (DynamoDB refuses an item over 400 KB, and a
provision with thousands of warnings made one), and no record any store seals is larger than
:data:`ringfence.audit.MAX_RECORD_BYTES`.

Against the real admin function over the moto server, and the real ``ringfence audit verify``."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ringfence.audit import MAX_RECORD_BYTES, AuditRecord, canonical, verify
from ringfence.control.admin import LISTED
from tests.aws.conftest import LABEL_TESTS, POLICY_DIR, Env
from tests.aws.test_audit_chain import cli

SPEC = "dynamodb:rf-inventory,rf-state,rf-audit"


def noisy_policy(rules: int) -> dict[str, str]:
    """The example policy and a ruleset of ``rules`` rules that each draw warnings (a selector no
    running workload matches): thousands of warnings, which never refuse a version."""
    files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
    files["tests.yaml"] = LABEL_TESTS
    body = "\n".join(
        f"      - {{name: r{i}, from: role == lb && app == payroll && env == dev, "
        f"to: role == database && app == payroll && env == dev, services: [postgres]}}"
        for i in range(rules)
    )
    files["many.yaml"] = f"rulesets:\n  - name: many\n    scope: app == payroll\n    rules:\n{body}\n"
    return files


@pytest.mark.slow
def test_attack_thousands_of_policy_warnings_never_activate_a_version_without_its_record(env: Env) -> None:
    """A policy author provisions a version with ~6,000 warnings: its record held them all (over
    400 KB), DynamoDB refused it after the version was active, and `audit verify` said ok over a
    chain without it. Now the record names the first ones, their number and the digest of them all."""
    assert env.provision_example_policy() == 1
    status, _, body = env.rest("admin", "POST", "/admin/policies", {"files": noisy_policy(3000), "reason": "bulk"})
    assert status == 201, body
    found = body["warnings"]
    assert len(found) > 5000, "the attack needs a record the uncapped warnings made too large"
    active = env.store.active_policy()
    assert active.number == 2
    (rec,) = [r for r in env.store.audit_log() if r.action == "policy.provision" and r.target == "policy/v2"]
    assert rec.id == body["audit_id"] and rec.after == active.digest
    assert rec.detail["warning_count"] == len(found)
    assert rec.detail["warnings"] == found[:LISTED]
    assert rec.detail["warnings_sha256"] == hashlib.sha256(canonical(found)).hexdigest()
    assert len(canonical(rec.model_dump(mode="json"))) <= MAX_RECORD_BYTES
    out = cli("audit", "verify", "--store", SPEC)
    assert out.returncode == 0 and "ok: 2 record(s) chained" in out.stdout, (out.stdout, out.stderr)


def test_attack_a_provision_whose_audit_write_fails_activates_nothing(env: Env) -> None:
    """The audit table refuses the write (throttled, an item it will not take): the version was
    active before the write was tried. Now the record comes first: no record, no activation, and
    the version's files are removed."""
    assert env.provision_example_policy() == 1
    refused = env.refuse_audit_writes()
    with pytest.raises(ClientError, match="throttled"):  # the function fails: its error alarm
        env.rest("admin", "POST", "/admin/policies", {"files": noisy_policy(1), "reason": "unaudited?"})
    assert refused
    store = env.store
    assert store.active_policy().number == 1, "nothing activated without its record"
    history = env.ddb.Table("rf-state").get_item(Key={"pk": "policy", "sk": "v00000002"}).get("Item")
    assert history is None, "no version 2 in the store's history"
    assert [r.target for r in store.audit_log()] == ["policy/v1"]
    left = env.s3.list_objects_v2(Bucket=env.bucket, Prefix="policies/v000002/").get("KeyCount", 0)
    assert left == 0, "the version's files are removed"


def test_a_record_over_the_bound_keeps_its_small_fields_and_summarizes_the_large_ones(env: Env) -> None:
    """Any record, whichever action writes it (the store seals through the bound): the largest
    detail fields become {truncated, count, sha256} until it fits, and the chain verifies."""
    store = env.store
    ids = [f"w-{i:06d}-" + "x" * 100 for i in range(5000)]  # ~570 KB: over DynamoDB's item limit
    sealed = store.audit(
        AuditRecord(principal="alice", action="workload.import", target="cmdb.csv", detail={"n": 5000, "created": ids})
    )
    (rec,) = store.audit_log()
    assert rec == sealed and rec.detail["n"] == 5000
    assert MAX_RECORD_BYTES - 1024 < len(canonical(rec.model_dump(mode="json"))) <= MAX_RECORD_BYTES
    created = dict(rec.detail["created"])
    kept = created.pop("first")
    assert created == {"truncated": True, "count": 5000, "sha256": hashlib.sha256(canonical(ids)).hexdigest()}
    assert 300 < len(kept) < 5000 and kept == ids[: len(kept)], "the list keeps its first ids"
    assert verify(store.audit_log(), store.audit_head()).ok
    # a record past the bound in its text fields too: the detail whole, then the long texts cut
    huge = store.audit(AuditRecord(principal="p" * 200_000, action="x", target="t", detail={"a": "b" * 200_000}))
    assert len(canonical(huge.model_dump(mode="json"))) <= MAX_RECORD_BYTES
    assert huge.detail["truncated"] is True and huge.detail["truncated_fields"]["principal"]["count"] == 200_000
    assert verify(store.audit_log(), store.audit_head()).ok


def test_attack_a_long_failsafe_widening_is_kept_over_warnings_in_a_provision_record(env: Env) -> None:
    """A version widening the fail-safes by thousands of entries, with its 100 warnings: the
    bound summarised the largest field first, whatever it was, so the widening (what an auditor
    looks for) became a count and a digest while 100 warnings stayed. Now the security-relevant
    fields are shortened last, and a list keeps its first items (with the count and digest of
    the whole)."""
    store = env.store
    widened = [f"admin_cidrs: 10.{i // 256}.{i % 256}.0/24" for i in range(4000)]  # ~110 KB
    warned = [f"warning {i}: " + "w" * 300 for i in range(100)]  # ~31 KB
    detail: dict[str, Any] = {
        "digest": "d" * 64,
        "warnings": warned,
        "warning_count": 100,
        "warnings_sha256": hashlib.sha256(canonical(warned)).hexdigest(),
        "widens_failsafes": widened,
    }
    store.audit(
        AuditRecord(principal="alice", action="policy.provision", target="policy/v7", detail=detail, reason="wider")
    )
    (rec,) = store.audit_log()
    assert len(canonical(rec.model_dump(mode="json"))) <= MAX_RECORD_BYTES
    widening = rec.detail["widens_failsafes"]
    assert widening["count"] == 4000 and widening["sha256"] == hashlib.sha256(canonical(widened)).hexdigest()
    assert len(widening["first"]) > 1500 and widening["first"] == widened[: len(widening["first"])]
    assert rec.detail["warnings"]["count"] == 100 and "first" not in rec.detail["warnings"], "warnings go first"
    assert rec.detail["digest"] == "d" * 64 and rec.detail["warning_count"] == 100 and rec.reason == "wider"
    assert verify(store.audit_log(), store.audit_head()).ok
    out = cli("audit", "verify", "--store", SPEC)
    assert out.returncode == 0 and "ok: 1 record(s) chained" in out.stdout, (out.stdout, out.stderr)


def test_an_over_long_reason_is_cut_before_small_detail_fields_are_summarized(env: Env) -> None:
    """A record over the bound by its reason alone: the bound summarised every detail field
    (small ones too) and then the whole detail before it cut the reason. Now the reason is cut
    (to 1024 characters, its length and digest named) and the detail stays whole."""
    store = env.store
    reason = "because " * 9000  # 72,000 characters
    detail = {"mode": "idle", "quarantined": False, "widens_failsafes": ["admin_cidrs: 10.0.0.0/8"], "n": 3}
    store.audit(AuditRecord(principal="alice", action="workload.mode", target="w-1", detail=detail, reason=reason))
    (rec,) = store.audit_log()
    assert rec.reason == reason[:1024]
    cut = rec.detail.pop("truncated_fields")
    assert cut == {
        "reason": {"truncated": True, "count": len(reason), "sha256": hashlib.sha256(reason.encode()).hexdigest()}
    }
    assert rec.detail == detail
    assert verify(store.audit_log(), store.audit_head()).ok
