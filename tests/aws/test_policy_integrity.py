"""A policy version's files are loaded only as provisioned: their digest must be the one the
version (and its audit record) names. Against the real compute function over the moto server."""

from __future__ import annotations

import pytest

from ringfence.control.wiring import PolicyTampered
from ringfence.versions import PolicyVersion, digest_of
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


def test_attack_an_active_policy_item_with_inline_files_written_in_the_state_table_is_never_signed(env: Env) -> None:
    """Code in a role that may write the state table (the review's: wsconnect, the events
    functions, flows, before their writes were narrowed) puts ``policy/active`` with the active
    texts plus a rule opening the database to the internet, inline, its digest computed over them
    and a higher number. Compute compiled and signed it at its next run, with no audit record.
    Now no version with inline files is loaded from a store (the provision path publishes them to
    the bucket): compute fails, is retried and alarmed, and every bundle stays as it was."""
    est = boot(env)
    db = est["ids"]["db"][0]
    before = env.bundle(db)
    active = env.store.active_policy()
    assert active is not None and active.keys and not active.files
    bodies = {n: env.s3.get_object(Bucket=env.bucket, Key=k)["Body"].read().decode() for n, k in active.keys.items()}
    name = next(n for n, t in bodies.items() if "    rules:\n" in t)
    bodies[name] = bodies[name].replace("    rules:\n", "    rules:\n" + OPEN_DB.lstrip("\n"), 1)
    forged = PolicyVersion(
        number=active.number + 1, author="nobody", message="", digest=digest_of(bodies), files=bodies
    )
    env.ddb.Table("rf-state").put_item(
        Item={"pk": "policy", "sk": "active", "doc": forged.model_dump_json(), "number": forged.number}
    )
    env.load_functions()  # cold containers: no policy cached
    assert env.rest("admin", "PUT", f"/admin/workloads/{db}/mode", {"mode": "observe"})[0] == 200
    results = env.drain("compute", "compute")
    assert any(r.get("batchItemFailures") for r in results), "compute fails on the forged version"
    after = env.bundle(db)  # verified against the stack's signing key
    assert after.version == before.version and after == before, "nothing signed from the forged item"
    assert "internet-to-database" not in after.model_dump_json()
    with pytest.raises(PolicyTampered, match="inline"):
        env.fn["compute"].service().w.active_policy()
