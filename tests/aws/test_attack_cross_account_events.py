"""An event of one member account naming another account's instance: ingest describes the id in
the event's account, does not find it there, and wrote a tombstone over the other account's
running workload (the inventory is keyed by the instance id alone), taking it out of peers' sets
and retiring its token until its next event or reconcile. Now an event whose resource ARN names
another account is skipped, and neither store writes an observation of one account over a
workload stored under another. The real ingest handler over moto."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import uuid
from typing import Any

import pytest

from tests.aws.conftest import ACCOUNT, REGION, Env, fixture
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_pipeline import _ctx, boot

MEMBER = "210987654321"
READ_ONLY = f"arn:aws:iam::{MEMBER}:role/ringfence-member-readonly"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def member_event(shape: str, victim: str) -> dict[str, Any]:
    """An event as member account MEMBER's rule forwards it (EventBridge keeps its account) that
    names ``victim``, an instance of the control account."""
    if shape.startswith("tag-change"):
        ev = copy.deepcopy(fixture("tag-change.json"))
        arn_account = ACCOUNT if shape == "tag-change-arn-of-the-other-account" else MEMBER
        ev["resources"] = [f"arn:aws:ec2:{REGION}:{arn_account}:instance/{victim}"]
    else:  # a CloudTrail DeleteTags: its resourcesSet names ids, no account
        ev = copy.deepcopy(fixture("cloudtrail-create-tags.json"))
        ev["detail"].update(
            {
                "eventName": "DeleteTags",
                "awsRegion": REGION,
                "recipientAccountId": MEMBER,
                "requestParameters": {
                    "resourcesSet": {"items": [{"resourceId": victim}]},
                    "tagSet": {"items": [{"key": "x"}]},
                },
            }
        )
        ev["detail"]["userIdentity"]["arn"] = f"arn:aws:iam::{MEMBER}:user/admin"
    ev.update({"id": str(uuid.uuid4()), "region": REGION, "account": MEMBER, "time": _now()})
    return ev


@pytest.mark.parametrize(
    "shape", ["tag-change-arn-of-the-other-account", "tag-change-own-arn-other-accounts-id", "cloudtrail-deletetags"]
)
def test_attack_an_event_from_one_account_does_not_overwrite_another_accounts_workload(
    env: Env,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    shape: str,
) -> None:
    monkeypatch.setenv("RINGFENCE_ACCOUNT_ROLES", json.dumps({MEMBER: READ_ONLY}))
    est = boot(env)
    env.load_functions()
    victim = est["ids"]["db"][0]
    before = env.store.get(victim)
    assert before is not None and before.state == "running" and before.workload.account == ACCOUNT
    token = hashlib.sha256(b"the victim's agent token").hexdigest()
    env.store.put_token(token, victim, 3600)
    capsys.readouterr()

    env.sqs.send_message(QueueUrl=env.queues["ingest"], MessageBody=json.dumps(member_event(shape, victim)))
    with caplog.at_level(logging.WARNING):
        out = env.fn["ingest"].handler(env.sqs_event(env.receive("ingest")), _ctx())
    assert out == {"batchItemFailures": []}, "refused, not retried: no retry would change it"

    after = env.store.get(victim)
    assert after is not None and after.state == "running" and after.workload.account == ACCOUNT, (
        f"{victim} overwritten by {MEMBER}'s event: account {after and after.workload.account}, "
        f"state {after and after.state}"
    )
    assert after.observed_at == before.observed_at and after.workload == before.workload
    assert env.store.token_workload(token) == victim, "the victim's token was retired"
    metrics = emitted(capsys.readouterr().out)
    logged = " ".join(r.getMessage() for r in caplog.records)
    if shape == "tag-change-arn-of-the-other-account":
        # skipped at once: the ARN names another account than the event's
        assert metrics.get("EventsIgnored") == 1 and "ObservationsOtherAccount" not in metrics, metrics
        assert f"of account {MEMBER} names arn:aws:ec2:{REGION}:{ACCOUNT}:instance/{victim} of account {ACCOUNT}" in (
            logged
        ), logged
    else:
        # described in MEMBER, not found there: its tombstone is refused by the store
        assert metrics.get("ObservationsOtherAccount") == 1 and not metrics.get("InventoryChanges"), metrics
        assert f"a tombstone of account {MEMBER} refused: the workload is stored under account {ACCOUNT}" in (logged), (
            logged
        )

    # the victim's own account still ends it
    env.put(env.state_event(victim, "terminated"))
    env.ec2.terminate_instances(InstanceIds=[victim])
    env.drain("ingest", "ingest")
    gone = env.store.get(victim)
    assert gone is not None and gone.state == "terminated" and gone.workload.account == ACCOUNT
    assert env.store.token_workload(token) is None
