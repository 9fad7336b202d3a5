"""A policy file of the active version rewritten (or removed) in the bundle bucket fails every
caller that loads that version (compute never compiles it): the operator's repair is to provision a
known-good version, which must not fail on the same read. Against the real admin and compute
functions over the moto server, and the real ``ringfence audit verify``."""

from __future__ import annotations

import pytest

from tests.aws.conftest import Env
from tests.aws.test_audit_chain import cli
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_pipeline import boot
from tests.aws.test_policy_integrity import OPEN_DB
from tests.aws.test_serve import policy_files

SPEC = "dynamodb:rf-inventory,rf-state,rf-audit"


@pytest.mark.parametrize("how", ["rewritten", "removed"])
def test_attack_a_tampered_active_policy_does_not_block_provisioning_a_good_one(
    env: Env, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """Whoever may write the bucket rewrites (or deletes) ordering.yaml of the active version:
    compute refuses it (c88ed2b), and so did provision, which read the active policy to compare
    fail-safes and idle workloads before activating anything; compute stayed stuck until someone
    restored the object by hand. Now the good version is activated over the active number, its
    record says it replaced an unverifiable version (and why), SafeguardsLowered counts it, and
    compute enforces it."""
    est = boot(env)
    db = est["ids"]["db"][0]
    before = env.bundle(db)
    assert before.policy_version == 1
    key = "policies/v000001/ordering.yaml"
    if how == "rewritten":
        text = env.s3.get_object(Bucket=env.bucket, Key=key)["Body"].read().decode()
        env.s3.put_object(Bucket=env.bucket, Key=key, Body=text.replace("    rules:\n", "    rules:\n" + OPEN_DB, 1))
    else:
        env.s3.delete_object(Bucket=env.bucket, Key=key)
    env.load_functions()  # cold containers: no policy cached
    capsys.readouterr()
    status, _, body = env.rest("admin", "POST", "/admin/policies", {"files": policy_files(), "reason": "repair"})
    assert status == 201, body
    active = env.store.active_policy()
    assert active.number == body["version"] == 2
    (rec,) = [r for r in env.store.audit_log() if r.action == "policy.provision" and r.target == "policy/v2"]
    assert rec.id == body["audit_id"] and rec.after == active.digest
    replaced = rec.detail["replaces_unverifiable"]
    assert replaced["version"] == 1
    assert ("do not match its digest" if how == "rewritten" else "gone from the bucket") in replaced["why"]
    assert "widens_failsafes" not in rec.detail and "newly_idle" not in rec.detail  # no base to compare
    assert emitted(capsys.readouterr().out).get("SafeguardsLowered") == 1
    results = env.drain("compute", "compute")
    assert not any(r.get("batchItemFailures") for r in results), results
    after = env.bundle(db)
    assert after.policy_version == 2 and after.version > before.version, "compute enforces the new version"
    out = cli("audit", "verify", "--store", SPEC)
    actions = [r.action for r in env.store.audit_log()]
    assert out.returncode == 0 and f"ok: {len(actions)} record(s) chained" in out.stdout, (
        out.stdout,
        out.stderr,
        actions,
    )
    assert actions.count("policy.provision") == 2, actions
