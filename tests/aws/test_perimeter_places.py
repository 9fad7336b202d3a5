"""The perimeter reconciles each account/Region (a place) on its own: one whose perimeter role
cannot be assumed (a broken trust policy, an SCP, a disabled Region) or whose API fails is reported
failed and counted (PerimeterPlacesFailed, alarmed), and the others are reconciled and their
launches handed on, on the schedule and on the event path alike. The real perimeter function over
moto; the member account's AssumeRole is refused as STS refuses it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ringfence.model import Workload
from ringfence.store.base import InventoryRecord
from tests.aws.conftest import REGION, Env
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_lifecycle_gate import launch
from tests.aws.test_pipeline import _ctx, _scheduled
from tests.aws.test_unserved_account import _denied

MEMBER = "000011112222"  # sorts before the control account: it is reconciled first
PERIMETER_ROLE = f"arn:aws:iam::{MEMBER}:role/ringfence-member-perimeter"
MEMBER_WL = "i-0feedfacefeedface"
WORLD_SSH = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}


def _unreachable_member(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member account's prod workload in the inventory, its perimeter role not assumable."""
    w = Workload(id=MEMBER_WL, ips=["10.9.0.5"], cloud="aws", account=MEMBER, region=REGION, labels={"env": "prod"})
    env.store.observe(InventoryRecord(id=MEMBER_WL, workload=w, state="running", observed_at=1.0))
    monkeypatch.setenv("RINGFENCE_PERIMETER_ACCOUNT_ROLES", json.dumps({MEMBER: PERIMETER_ROLE}))
    monkeypatch.setenv("RINGFENCE_ACCOUNT_ROLES", json.dumps({MEMBER: f"arn:aws:iam::{MEMBER}:role/ro"}))
    env.load_functions()
    env.hook("before-call.sts.AssumeRole", _denied("AssumeRole"))


def _mgmt(env: Env) -> str:
    f = [{"Name": "group-name", "Values": ["rf-prod-mgmt"]}]
    return str(env.ec2.describe_security_groups(Filters=f)["SecurityGroups"][0]["GroupId"])


def _world_ssh(env: Env, gid: str) -> bool:
    perms = env.ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]["IpPermissions"]
    return any(p.get("FromPort") == 22 and {"CidrIp": "0.0.0.0/0"} in p.get("IpRanges", []) for p in perms)


def test_the_scheduled_run_reconciles_every_other_place_and_reports_the_one_that_failed(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, the run stopped at the first place that raised: a hand-added 0.0.0.0/0 tcp/22 on the
    control account's rf-prod-mgmt stayed, as every place after the member account's did."""
    launch(env)
    env.pump()
    mgmt = _mgmt(env)
    env.ec2.authorize_security_group_ingress(GroupId=mgmt, IpPermissions=[WORLD_SSH])
    _unreachable_member(env, monkeypatch)
    capsys.readouterr()
    results = env.fn["perimeter"].handler(_scheduled(), _ctx())["results"]
    assert not _world_ssh(env, mgmt), "the control account's drift was revoked"
    [member] = [r for r in results if r["account"] == MEMBER]
    assert "AccessDenied" in member["failed"] and member["workloads"] == [MEMBER_WL], member
    assert any(r["account"] != MEMBER and r["applied"] for r in results), results
    assert emitted(capsys.readouterr().out).get("PerimeterPlacesFailed") == 1


def _batch(env: Env) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while batch := env.receive("perimeter"):
        out += batch
    return out


def test_on_the_event_path_only_the_failed_places_part_waits(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One batch: the control account's launch, a message naming only the member's workload and
    one naming both. The launch is handed on (and completed), the mixed message is done for the
    control account's workload and its member part is sent again on its own, and only the
    member-only message goes back to SQS for a retry (then the DLQ). Before, the whole batch
    failed: the launch waited with it, three times, then its hook's ABANDON."""
    new = launch(env)
    env.drain("lifecycle", "lifecycle")
    env.drain("ingest", "ingest")
    _unreachable_member(env, monkeypatch)
    q = env.queues["perimeter"]
    env.sqs.send_message(QueueUrl=q, MessageBody=json.dumps({"ids": [MEMBER_WL]}))
    env.sqs.send_message(QueueUrl=q, MessageBody=json.dumps({"ids": [MEMBER_WL, new]}))
    messages = _batch(env)
    bodies = {m["MessageId"]: json.loads(m["Body"]) for m in messages}
    assert any(b.get("lifecycles") for b in bodies.values()), "the launch's action travels on the perimeter queue"
    capsys.readouterr()
    out = env.fn["perimeter"].handler(env.sqs_event(messages, env.aws.queue_arn("perimeter")), _ctx())
    retried = [f["itemIdentifier"] for f in out["batchItemFailures"]]
    assert [bodies[m] for m in retried] == [{"ids": [MEMBER_WL]}], "only the member-only message is retried"
    assert emitted(capsys.readouterr().out).get("PerimeterPlacesFailed") == 1
    [again] = [json.loads(m["Body"]) for m in _batch(env)]
    assert again == {"ids": [MEMBER_WL], "lifecycles": []}, "the member's part alone, sent again"
    handed = [lc["instance_id"] for m in env.receive("compute") for lc in json.loads(m["Body"]).get("lifecycles", [])]
    assert handed == [new], "the control account's launch was handed on"
    assert {g for eni in _groups_of(env, new) for g in eni} >= {"rf-prod-boundary", "rf-prod-mgmt"}


def _groups_of(env: Env, iid: str) -> list[set[str]]:
    inst = env.ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    return [{g["GroupName"] for g in n["Groups"]} for n in inst["NetworkInterfaces"]]


def test_a_launch_of_a_failed_place_waits_for_the_retry(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A message of the failed place alone, with its launch action, is handed back as a whole: the
    action is neither handed on without its groups nor given up (not counted as left to time out)."""
    _unreachable_member(env, monkeypatch)
    lc = {
        "instance_id": MEMBER_WL,
        "transition": "autoscaling:EC2_INSTANCE_LAUNCHING",
        "hook_name": "h",
        "group_name": "g",
    }
    env.sqs.send_message(
        QueueUrl=env.queues["perimeter"], MessageBody=json.dumps({"ids": [MEMBER_WL], "lifecycles": [lc]})
    )
    [msg] = _batch(env)
    capsys.readouterr()
    out = env.fn["perimeter"].handler(env.sqs_event([msg], env.aws.queue_arn("perimeter")), _ctx())
    assert out["batchItemFailures"] == [{"itemIdentifier": msg["MessageId"]}]
    assert env.receive("compute") == [] and _batch(env) == []
    metrics = emitted(capsys.readouterr().out)
    assert metrics.get("PerimeterPlacesFailed") == 1 and not metrics.get("LifecycleLeftToTimeout")
