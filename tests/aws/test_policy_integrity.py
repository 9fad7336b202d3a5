"""A policy version's files are loaded only as provisioned: their digest must be the one the
version (and its audit record) names. Against the real compute function over the moto server."""

from __future__ import annotations

import pytest

from ringfence.control.wiring import PolicyTampered
from tests.aws.conftest import Env
from tests.aws.test_pipeline import boot

OPEN_DB = """
      - name: internet-to-database
        from: {ip_list: internet}
        to: role in {@data-tier}
        services: [postgres]
"""


def test_attack_a_policy_file_rewritten_in_the_bucket_is_never_compiled(env: Env) -> None:
    """Whoever may write the bundle bucket rewrites the active version's ordering.yaml (a rule
    opening the database to the internet): a cold compute compiled and published it, though the
    version's digest, and its audit record, name other texts. Now compute fails (its batch is
    retried, then alarmed) and every bundle stays as it was."""
    est = boot(env)
    db = est["ids"]["db"][0]
    before = env.bundle(db)
    key = "policies/v000001/ordering.yaml"
    text = env.s3.get_object(Bucket=env.bucket, Key=key)["Body"].read().decode()
    tampered = text.replace("    rules:\n", "    rules:\n" + OPEN_DB.lstrip("\n"), 1)
    assert tampered != text
    env.s3.put_object(Bucket=env.bucket, Key=key, Body=tampered.encode())
    env.load_functions()  # cold containers: no policy cached
    assert env.rest("admin", "PUT", f"/admin/workloads/{db}/mode", {"mode": "observe"})[0] == 200
    results = env.drain("compute", "compute")
    assert any(r.get("batchItemFailures") for r in results), "compute fails on the tampered version"
    after = env.bundle(db)
    assert after.version == before.version and after == before, "nothing compiled from the rewritten file"
    with pytest.raises(PolicyTampered, match="do not match its digest"):
        env.fn["compute"].service().w.active_policy()
