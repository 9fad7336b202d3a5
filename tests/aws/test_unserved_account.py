"""An AWS account the control plane has no role in (not in ``AccountRoles``, not its own) is never
read with the control account's own credentials: those describe the control account instead, so
its instances would be recorded under the other account's name and the member's own taken for
gone. Ingest dead-letters such an event naming the account, reconcile refuses such a target
(and a target without its own role reads through the account's member role), and an enrollment
from such an account is refused. The real functions over moto."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ringfence.local.estate import lab_image
from ringfence.model import Workload
from ringfence.store.base import InventoryRecord
from tests.aws.conftest import ACCOUNT, REGION, Env
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_pipeline import _ctx, _scheduled, enroll_iid, iid_document

UNLISTED = "222233334444"
MEMBER = "210987654321"
READ_ONLY = f"arn:aws:iam::{MEMBER}:role/ringfence-member-readonly"


def run_here(env: Env) -> str:
    """One instance in the control account (moto's), as a member's instance id would look."""
    ami = lab_image(env.ec2)
    return str(env.ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"])


def test_an_event_from_an_unlisted_account_is_dead_lettered_not_read_as_this_account(env: Env) -> None:
    iid = run_here(env)
    ev = env.state_event(iid, "running")
    ev["account"] = UNLISTED
    ev["resources"] = [f"arn:aws:ec2:{REGION}:{UNLISTED}:instance/{iid}"]
    # as a member account's rule forwards it (EventBridge keeps its account): moto's PutEvents
    # would stamp its own, so the event goes on the queue as the rule's target delivers it
    env.sqs.send_message(QueueUrl=env.queues["ingest"], MessageBody=json.dumps(ev))
    msgs = env.receive("ingest")
    assert len(msgs) == 1
    out = env.fn["ingest"].handler(env.sqs_event(msgs), _ctx())
    assert out == {"batchItemFailures": []}
    assert env.store.get(iid) is None, "the control account's instance is not recorded as the other account's"
    [dead] = env.receive("dlq")
    reason = dead["MessageAttributes"]["reason"]["StringValue"]
    assert f"account {UNLISTED} is not served" in reason and "AccountRoles" in reason, reason
    assert json.loads(dead["Body"])["account"] == UNLISTED, "kept whole for a redrive"

    # the same event from this account is ingested as ever
    env.put(env.state_event(iid, "running"))
    env.drain("ingest", "ingest")
    rec = env.store.get(iid)
    assert rec is not None and rec.workload.account == ACCOUNT and rec.state == "running"


def test_reconcile_reads_a_target_through_its_member_role_and_refuses_an_unlisted_one(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Targets without a role of their own: the listed member's is read through its member role;
    an unlisted account's is refused (its stored workloads are not taken for gone, the control
    account's instances not recorded under its name) while this account's target still runs."""
    iid = run_here(env)
    member_wl = "i-0feedfacefeedface"
    w = Workload(id=member_wl, ips=["10.9.0.5"], cloud="aws", account=UNLISTED, region=REGION)
    env.store.observe(InventoryRecord(id=member_wl, workload=w, state="running", observed_at=1.0))
    targets = [{"account": UNLISTED, "region": REGION}, {"account": ACCOUNT, "region": REGION}]
    monkeypatch.setenv("RINGFENCE_RECONCILE_TARGETS", json.dumps(targets))
    env.load_functions()
    out = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert out["refused"] == [f"{UNLISTED}/{REGION}"]
    assert member_wl not in out["gone"] and env.store.get(member_wl).state == "running"  # type: ignore[union-attr]
    rec = env.store.get(iid)
    assert rec is not None and rec.workload.account == ACCOUNT, "this account's target still reconciled"

    # listed with a member role: the target without one of its own reads through it
    monkeypatch.setenv("RINGFENCE_ACCOUNT_ROLES", json.dumps({MEMBER: READ_ONLY}))
    monkeypatch.setenv("RINGFENCE_RECONCILE_TARGETS", json.dumps([{"account": MEMBER, "region": REGION}]))
    env.load_functions()
    assumed: list[str] = []
    env.hook("before-parameter-build.sts.AssumeRole", lambda params, **_: assumed.append(params["RoleArn"]))
    out = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert out["refused"] == [] and assumed == [READ_ONLY], assumed


def test_an_enrollment_from_an_unlisted_account_is_refused_naming_it(env: Env) -> None:
    """An identity document (signed as AWS signs every account's) of an account that is not
    served: the agent API does not look the instance up in the control account instead."""
    iid = run_here(env)
    doc = json.loads(iid_document(env, iid))
    status, body = enroll_iid(env, iid, document=json.dumps({**doc, "accountId": UNLISTED}))
    assert status == 401 and f"account {UNLISTED} is not served" in json.dumps(body), (status, body)
    assert enroll_iid(env, iid)[0] == 200, "this account's own document enrolls"


def _denied(operation: str) -> Any:
    def deny(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "not authorized"}}, operation)

    return deny


def test_a_target_that_cannot_be_read_fails_alone_and_the_others_still_reach_compute(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A member role that cannot be assumed (a trust policy broken in one account): that target is
    reported and counted, its stored workloads are not taken for gone, and every other target is
    still reconciled and its changes handed to compute (before, the run stopped at the first such
    target: later targets were never read, and earlier targets' changes were written to the
    store without reaching compute, so the next run saw no drift and their bundles stayed stale)."""
    iid = run_here(env)
    member_wl = "i-0feedfacefeedface"
    w = Workload(id=member_wl, ips=["10.9.0.5"], cloud="aws", account=MEMBER, region=REGION)
    env.store.observe(InventoryRecord(id=member_wl, workload=w, state="running", observed_at=1.0))
    monkeypatch.setenv("RINGFENCE_ACCOUNT_ROLES", json.dumps({MEMBER: READ_ONLY}))
    targets = [{"account": MEMBER, "region": REGION}, {"account": ACCOUNT, "region": REGION}]
    monkeypatch.setenv("RINGFENCE_RECONCILE_TARGETS", json.dumps(targets))
    env.load_functions()
    env.hook("before-call.sts.AssumeRole", _denied("AssumeRole"))
    capsys.readouterr()
    out = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert out["failed"] == [f"{MEMBER}/{REGION}"], out
    assert emitted(capsys.readouterr().out).get("ReconcileTargetsFailed") == 1
    assert member_wl not in out["gone"] and env.store.get(member_wl).state == "running"  # type: ignore[union-attr]
    rec = env.store.get(iid)
    assert rec is not None and rec.state == "running", "the next target was still reconciled"
    sent = [json.loads(m["Body"]) for m in env.receive("compute")]
    assert any(iid in json.dumps(body) for body in sent), ("its change reached compute", sent)


def test_this_accounts_identity_unknown_fails_only_the_targets_that_need_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STS GetCallerIdentity failing (throttled, an outage) leaves only the targets that need this
    account's identity unread; a target with its own role is still reconciled."""
    monkeypatch.setenv(
        "RINGFENCE_RECONCILE_TARGETS",
        json.dumps(
            [
                {"account": ACCOUNT, "region": REGION},
                {"account": MEMBER, "region": REGION, "role_arn": READ_ONLY},
            ]
        ),
    )
    env.load_functions()
    env.hook("before-call.sts.GetCallerIdentity", _denied("GetCallerIdentity"))
    assumed: list[str] = []
    env.hook("before-parameter-build.sts.AssumeRole", lambda params, **_: assumed.append(params["RoleArn"]))
    out = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert out["failed"] == [f"{ACCOUNT}/{REGION}"] and assumed == [READ_ONLY], (out, assumed)


def test_a_target_failing_halfway_through_its_writes_still_hands_them_to_compute(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two instances new to the store; the inventory write of the second fails (DynamoDB
    throttled past its retries): the first one, written already, still reaches compute (else the
    next run would see no drift for it and its peers' bundles would stay without it)."""
    first, second = run_here(env), run_here(env)
    monkeypatch.setenv("RINGFENCE_RECONCILE_TARGETS", json.dumps([{"account": ACCOUNT, "region": REGION}]))
    env.load_functions()
    inventory = os.environ["RINGFENCE_INVENTORY_TABLE"]
    writes: list[str] = []

    def second_write_throttled(params: dict[str, Any], **_: Any) -> None:
        if params.get("TableName") == inventory:
            writes.append(params["Key"]["id"])
            if len(writes) == 2:
                raise ClientError({"Error": {"Code": "ProvisionedThroughputExceededException"}}, "UpdateItem")

    env.hook("before-parameter-build.dynamodb.UpdateItem", second_write_throttled)
    out = env.fn["reconcile"].handler(_scheduled(), _ctx())
    assert out["failed"] == [f"{ACCOUNT}/{REGION}"]
    written = next(i for i in (first, second) if env.store.get(i) is not None)
    sent = json.dumps([json.loads(m["Body"]) for m in env.receive("compute")])
    assert written in sent, ("the written instance reached compute", sent)
