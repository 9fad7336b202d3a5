"""A terminated instance's token revocation and its ``token.revoke`` audit record are both written
or neither (credentials.retire: one TransactWriteItems with the record's chain items), through the
real ingest function over the moto server.

Before, the token's items were deleted first and the record appended after, only when a token was
active. The audit table refusing that append (throttled), or the Lambda killed in between, left the
token revoked with no record, and the event's redelivery, finding no active token, wrote none."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ringfence.control.api import secret_hash
from tests.aws.conftest import Env
from tests.aws.test_attack_enroll import audits, bundle_status
from tests.aws.test_pipeline import boot, enroll_instance


def test_attack_a_terminated_instances_revocation_whose_record_is_refused_is_recorded_by_the_redelivery(
    env: Env,
) -> None:
    """The audit table refuses the transaction holding the ``token.revoke`` record once. The
    failed delivery leaves the token authorizing and no record; SQS's redelivery revokes it and
    writes exactly one record; a further delivery of the event adds none."""
    from ringfence.clouds.aws import clients

    est = boot(env)
    iid = est["ids"]["proc"][0]
    token = enroll_instance(env, iid)
    assert bundle_status(env, iid, token) == 200
    refused: list[str] = []

    def refuse(params: dict[str, Any], **_: Any) -> None:
        if not refused and "token.revoke" in json.dumps(params.get("TransactItems", []), default=str):
            refused.append("token.revoke")
            raise ClientError(
                {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "throttled"}},
                "TransactWriteItems",
            )

    env.load_functions()  # a cold container, whose clients carry the hook
    env.hook("before-parameter-build.dynamodb.TransactWriteItems", refuse)
    try:
        env.ec2.terminate_instances(InstanceIds=[iid])
        terminated = env.state_event(iid, "terminated")
        env.put(terminated)
        with pytest.raises(AssertionError, match="ingest raised"):  # the batch failed: SQS delivers it again
            env.drain("ingest", "ingest")
        assert refused
        assert audits(env, "token.revoke", iid) == []
        assert env.store.token_workload(secret_hash(token)) == iid, "the token was revoked with no record of it"
        env.pump()  # the redelivery (visible again at once), then the rest
        assert env.store.get(iid).state == "terminated"
        assert env.store.token_workload(secret_hash(token)) is None, "the terminated instance's token still authorizes"
        assert bundle_status(env, iid, token) == 401
        assert len(audits(env, "token.revoke", iid)) == 1, "the revocation in force has no audit record"
        env.put(terminated)  # at least once: the event delivered yet again
        env.pump()
        assert len(audits(env, "token.revoke", iid)) == 1
    finally:
        clients.session().events.unregister("before-parameter-build.dynamodb.TransactWriteItems", refuse)


def test_attack_a_copied_agent_key_renewing_during_every_revocation_does_not_keep_a_terminated_instance_running(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root on an instance copies its agent key; the instance is terminated, its event lost, and
    reconcile finds it. The thief renews by nonce through the real token route between each of
    retire's reads of the current token and its transaction. The revocation must not depend on the
    token read: conditioned on it, every attempt was refused, retire gave up, reconcile left the
    record running, run after run, and the thief's newest token fetched bundles. Now the first run
    revokes whichever token is current (the renewed one too), with one ``token.revoke`` record,
    and stores the instance terminated."""
    from ringfence.store.dynamodb import DynamoStore
    from tests.aws.test_attack_enroll import refresh
    from tests.aws.test_pipeline import _ctx, _scheduled, agent_key

    est = boot(env)
    proc = est["ids"]["proc"][0]
    key = agent_key(proc)  # the thief's copy
    held = [enroll_instance(env, proc)]
    env.ec2.terminate_instances(InstanceIds=[proc])  # its event lost: reconcile finds it
    real = DynamoStore.active_token
    renewals: list[int] = []

    def racing(self: DynamoStore, wid: str) -> str | None:
        current = real(self, wid)
        if wid == proc and current is not None:  # retire's read: the thief renews right after it
            status, body = refresh(env, proc, key)
            renewals.append(status)
            if status == 200:
                held.append(body["token"])
        return current

    monkeypatch.setattr(DynamoStore, "active_token", racing)
    out = env.fn["reconcile"].handler(_scheduled(), _ctx())
    monkeypatch.undo()
    assert renewals and renewals[0] == 200, "the thief's renewal did not land"
    assert not out.get("failed"), f"reconcile failed: {out}"
    rec = env.store.get(proc)
    assert rec is not None and rec.state == "terminated", "the terminated instance was left running"
    for token in held:
        assert env.store.token_workload(secret_hash(token)) is None, "a token of the thief still authorizes"
        assert bundle_status(env, proc, token) == 401
    assert len(audits(env, "token.revoke", proc)) == 1
