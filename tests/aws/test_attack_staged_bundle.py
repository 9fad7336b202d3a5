"""Whoever may write the bundle bucket cannot have a staged bundle of theirs signed.

A bundle too big for a publish message travels as ``staging/<id>/<hash>.json`` in the bundle
bucket, compute's put to the publish worker's get (queue age; a failed job's copy stays until a
DLQ redrive). The job carries the SHA-256 of the bytes compute staged and the worker signs those
bytes only: a replaced copy is refused (counted, logged, the job failed), the workload keeps its
previous good bundle, and compute's re-render (what the agent API asks for once the pending mark
is stale) publishes the real one. A job queued before the hash existed is refused alike. The
real compute and publish handlers over moto; the bucket policy that keeps other principals from
writing ``staging/`` at all is IAM, which moto does not evaluate (template.yaml,
infra/modules/ringfence/main.tf)."""

from __future__ import annotations

import json
from typing import Any

from ringfence.local.lambdas import deliver_batch

from .conftest import REGION, Env, LambdaContext
from .test_fanout import _message
from .test_pipeline import boot


def _signed(env: Env, wid: str) -> dict[str, dict[str, Any]]:
    """Every signed bundle document stored for ``wid``, by key."""
    got = env.s3.list_objects_v2(Bucket=env.bucket, Prefix=f"bundles/{wid}/").get("Contents", [])
    return {o["Key"]: json.loads(env.s3.get_object(Bucket=env.bucket, Key=o["Key"])["Body"].read()) for o in got}


def _stage_quarantine(env: Env, monkeypatch: Any) -> tuple[str, str, dict[str, Any], Any]:
    """The estate booted and its bundles published; then the web server quarantined, its new
    bundle staged by compute (every bundle "too big", as a large estate's are). The workload, the
    staged key, the staged body and the pointer before it."""
    from ringfence.control import compute as compute_mod

    est = boot(env)
    web = est["ids"]["web"][0]
    before = env.store.bundle_pointer(web)
    assert before is not None and not env.bundle(web).quarantined
    monkeypatch.setattr(compute_mod, "MESSAGE_BUDGET", 100)
    env.store.set_operator(web, quarantined=True)  # incident response quarantines the web server
    env.fn["compute"].handler(env.sqs_event([_message({"ids": [web]})]), LambdaContext())
    staged = env.s3.list_objects_v2(Bucket=env.bucket, Prefix="staging/")["Contents"]
    assert len(staged) == 1
    key = staged[0]["Key"]
    doc = json.loads(env.s3.get_object(Bucket=env.bucket, Key=key)["Body"].read())
    assert doc["quarantined"] is True and doc["mode"] == "enforce"
    return web, key, doc, before


def _publish(env: Env) -> Any:
    return deliver_batch(
        env.sqs, env.queues["publish"], env.aws.queue_arn("publish"), env.fn["publish"].handler, region=REGION
    )


def test_attack_a_staged_bundle_replaced_in_the_bucket_is_never_signed(env: Env, monkeypatch: Any, caplog: Any) -> None:
    web, key, doc, before = _stage_quarantine(env, monkeypatch)
    signed_before = _signed(env, web)
    # the attacker, with s3:PutObject on the bucket (not the compute role), swaps the body: the
    # quarantined host released and idle, at the version and rules digest compute gave the job
    forged = dict(doc, quarantined=False, mode="idle")
    env.s3.put_object(Bucket=env.bucket, Key=key, Body=json.dumps(forged).encode())

    deliveries = [_publish(env) for _ in range(3)]  # the job's retries (then the publish DLQ)
    # nothing signed carries the forged body: no bundle document was stored for the workload at all
    assert _signed(env, web) == signed_before
    assert all(not (b["mode"] == "idle" and b["quarantined"] is False) for b in _signed(env, web).values())
    # the agent keeps its previous good bundle (the pointer did not move), no forged one
    after = env.store.bundle_pointer(web)
    assert after is not None and (after.version, after.key) == (before.version, before.key)
    got = env.bundle(web)
    assert got.version == before.version and got.mode.value == "enforce" and not got.quarantined
    # the replaced copy stays (evidence: the bucket's access log names who wrote it)
    assert env.s3.list_objects_v2(Bucket=env.bucket, Prefix="staging/").get("KeyCount", 0) == 1
    # refused every time: the job fails (retried, then the publish DLQ), the log names key and workload
    assert all(d is not None and d.error is None and d.failed for d in deliveries)
    assert any(r.levelname == "ERROR" and key in r.getMessage() and web in r.getMessage() for r in caplog.records)

    # the stale pending mark has the agent API ask compute to render the workload again: the
    # real bundle, restaged as compute rendered it, is what gets signed
    env.fn["compute"].handler(env.sqs_event([_message({"ids": [], "publish": [web]})]), LambdaContext())
    env._drain("publish", "publish")
    got = env.bundle(web)
    assert got.quarantined and got.mode.value == "enforce" and got.version > before.version
    assert all(not (b["mode"] == "idle" and b["quarantined"] is False) for b in _signed(env, web).values())


def test_attack_a_staged_job_without_its_hash_is_never_signed(env: Env, monkeypatch: Any) -> None:
    """A job queued before the worker checked staged hashes (an upgrade with jobs in flight) is
    refused, not signed blindly: its copy could have been replaced and nothing says so."""
    web, key, doc, before = _stage_quarantine(env, monkeypatch)
    forged = dict(doc, quarantined=False, mode="idle")
    env.s3.put_object(Bucket=env.bucket, Key=key, Body=json.dumps(forged).encode())
    jobs = [json.loads(m["Body"]) for m in env.receive("publish")]
    old = [j for j in jobs if j["bundles"]]
    assert len(old) == 1 and old[0]["bundles"][0]["staged"] == key
    old[0]["bundles"][0].pop("staged_sha256", None)  # the job as the previous release wrote it
    out = env.fn["publish"].handler(env.sqs_event([_message(old[0])], env.aws.queue_arn("publish")), LambdaContext())
    assert len(out["batchItemFailures"]) == 1
    after = env.store.bundle_pointer(web)
    assert after is not None and (after.version, after.key) == (before.version, before.key)
    assert all(not (b["mode"] == "idle" and b["quarantined"] is False) for b in _signed(env, web).values())
    assert not env.bundle(web).quarantined and env.bundle(web).version == before.version
