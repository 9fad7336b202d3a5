"""Reconcile: a terminated instance's agent token is revoked although its revocation failed in
the run that found the instance terminated or gone. A later run finds the record stored
terminated and passes it by: a tombstone written before a revocation that then failed left the
token authorizing for good. Against the moto server, through the real reconcile handler and the
agent API."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ringfence.control.api import secret_hash
from ringfence.store.dynamodb import DynamoStore
from tests.aws.conftest import Env
from tests.aws.test_attack_enroll import bundle_status
from tests.aws.test_pipeline import _ctx, _scheduled, boot, enroll_instance
from tests.storerace import fail_once


def unlisted(env: Env, iid: str) -> None:
    """From now on EC2's listing (DescribeInstances) leaves ``iid`` out, as it does a while after
    the instance terminated, in freshly loaded functions."""

    def drop(parsed: dict[str, Any], **_: Any) -> None:
        for res in parsed.get("Reservations", []):
            res["Instances"] = [i for i in res.get("Instances", []) if i["InstanceId"] != iid]

    env.load_functions()  # a cold container, whose clients carry the hook
    env.hook("after-call.ec2.DescribeInstances", drop)


@pytest.mark.parametrize("listed", [True, False], ids=["listed-terminated", "gone-from-the-listing"])
def test_attack_a_terminated_instances_token_is_revoked_by_reconcile_though_its_revocation_failed_once(
    env: Env, monkeypatch: pytest.MonkeyPatch, listed: bool
) -> None:
    """Root on an instance copies its agent token; the instance terminates with no event reaching
    ingest. Reconcile finds it (listed terminated, or no longer listed) and revoking its token
    fails: the run fails that target. The next run must revoke the token: the record is stored
    terminated by then only if the token was revoked first."""
    est = boot(env)
    proc = est["ids"]["proc"][0]
    token = enroll_instance(env, proc)  # what the thief holds
    assert bundle_status(env, proc, token) == 200
    env.ec2.terminate_instances(InstanceIds=[proc])  # its event lost
    if not listed:
        unlisted(env, proc)
    # the revocation is one transaction with its record (credentials.retire): that write fails
    failed = fail_once(monkeypatch, DynamoStore, "audit_with")
    first = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert failed and first["failed"], "the failed revocation fails the target, for the next run"
    second = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert not second["failed"]
    env.pump()
    assert env.store.get(proc).state == "terminated"
    assert env.store.token_workload(secret_hash(token)) is None, "the terminated instance's token still authorizes"
    assert bundle_status(env, proc, token) == 401


def test_an_instance_stored_by_its_event_after_the_listing_began_keeps_its_token(env: Env) -> None:
    """An instance the listing missed (EC2's listing is eventually consistent) whose own event
    stores it after the listing began: its tombstone, dated at the listing, does not land, and
    its token is not revoked before it either."""
    est = boot(env)
    proc = est["ids"]["proc"][0]
    token = enroll_instance(env, proc)

    def missed_then_stored(parsed: dict[str, Any], **_: Any) -> None:
        for res in parsed.get("Reservations", []):
            res["Instances"] = [i for i in res.get("Instances", []) if i["InstanceId"] != proc]
        rec = env.store.get(proc)  # its event, ingested meanwhile
        env.store.observe(rec.model_copy(update={"observed_at": time.time() + 1}))
        assert env.store.get(proc).observed_at > rec.observed_at

    env.load_functions()
    env.hook("after-call.ec2.DescribeInstances", missed_then_stored)
    out = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert proc not in out["gone"] and not out["failed"]
    assert env.store.get(proc).state == "running"
    assert bundle_status(env, proc, token) == 200, "a running instance's token was revoked"
