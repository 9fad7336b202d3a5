"""Every change the perimeter makes is audited: one ``perimeter.apply`` record per account/Region
and run that changes something (groups created and deleted, rules added and removed, groups
attached and detached), written before the first change, principal ``ringfence:perimeter``. The
real perimeter function over moto; what each record lists is compared with what EC2 holds before
and after the run, and ``ringfence audit verify`` (the real CLI) checks the chain over the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from ringfence.audit import AuditRecord
from ringfence.clouds.aws import sg as sgmod
from ringfence.clouds.aws.sg import AUDIT_INSTANCES, DEFAULT_EGRESS, TAG, rule_doc
from ringfence.perimeter import PerimeterConfig
from tests.aws.conftest import ACCOUNT, REGION, Env
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_perimeter import CONFIG, NO_CHANGE, schedule
from tests.aws.test_perimeter_ownership import groups_of, records
from tests.aws.test_pipeline import boot

PLACE = f"{ACCOUNT}/{REGION}"


@pytest.fixture
def configured(env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.setenv("RINGFENCE_PERIMETER_CONFIG", PerimeterConfig.model_validate(CONFIG).model_dump_json())
    return env


def applied(env: Env) -> list[AuditRecord]:
    return [a for a in env.store.audit_log() if a.action == "perimeter.apply"]


def ours(env: Env) -> dict[str, dict[str, Any]]:
    """Group id → the group, for every group Ringfence recorded as its own."""
    ids = [k for k in records(env) if k.startswith("sg-")]
    return {g["GroupId"]: g for g in env.ec2.describe_security_groups(GroupIds=ids)["SecurityGroups"]} if ids else {}


def rules_now(env: Env) -> dict[tuple[str, str, str], set[Any]]:
    """(group id, name, VPC) → its rules as the perimeter reads them (our groups named)."""
    groups = ours(env)
    names = {gid: g["GroupName"] for gid, g in groups.items()}
    return {(gid, g["GroupName"], g["VpcId"]): sgmod._rules_of(g, names) for gid, g in groups.items()}


def docs(changes: dict[tuple[str, str, str], set[Any]], new: bool = False) -> list[str]:
    """Rule changes as the record lists them, canonical (to compare whatever their order)."""
    return sorted(
        json.dumps({"group": "(new)" if new else gid, "name": name, "vpc": vpc} | rule_doc(r), sort_keys=True)
        for (gid, name, vpc), rules in changes.items()
        for r in rules
    )


def canon(items: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(i, sort_keys=True) for i in items)


def new_vpc(env: Env, cidr: str = "10.9.0.0/16") -> tuple[str, str]:
    vpc = env.ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    sub = env.ec2.create_subnet(VpcId=vpc, CidrBlock=cidr.replace("0.0/16", "1.0/24"), AvailabilityZone=f"{REGION}a")
    return vpc, sub["Subnet"]["SubnetId"]


def ingested(env: Env, ids: list[str]) -> None:
    """The instances' state-change events through ingest (the inventory knows them), and the
    perimeter queue emptied of what ingest sent it: each test sends the perimeter its own message."""
    for iid in ids:
        env.put(env.state_event(iid, "running"))
    env.drain("ingest", "ingest")
    while env.receive("perimeter"):
        pass


def perimeter(env: Env, ids: list[str]) -> dict[str, Any]:
    env.sqs.send_message(QueueUrl=env.queues["perimeter"], MessageBody=json.dumps({"ids": ids}))
    [out] = env.drain("perimeter", "perimeter")
    return out  # type: ignore[no-any-return]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringfence.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


@pytest.mark.slow
def test_a_run_that_changes_the_perimeter_writes_one_record_of_exactly_its_changes(
    configured: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launch in a new VPC: the event path creates that VPC's groups, writes their rules and
    attaches them, and one record lists exactly that; a changed admin range: the full run's one
    record lists exactly the rules it revoked and authorized; a run with nothing to change writes
    none. The chain still verifies (the real CLI over the DynamoDB store), and every call the
    perimeter made is granted to its role in both deployments."""
    from tests.aws.test_function_iam import Recorder, refusals

    env = configured
    rec_calls = Recorder(env)
    est = boot(env)
    assert applied(env), "booting the estate created and attached groups: audited"
    assert all(a.principal == "ringfence:perimeter" and a.target == PLACE for a in applied(env))
    booted = len(applied(env))

    vpc, sub = new_vpc(env)
    (iid,) = est["run"]("web", sub, 1)
    ingested(env, [iid])
    before = rules_now(env)
    assert not perimeter(env, [iid])["batchItemFailures"]
    [rec] = applied(env)[booted:]
    made = {k: v for k, v in rules_now(env).items() if k not in before}
    assert {k[2] for k in made} == {vpc} and made, "the new VPC's groups were made"
    assert (rec.principal, rec.action, rec.target) == ("ringfence:perimeter", "perimeter.apply", PLACE)
    d = rec.detail
    assert (d["account"], d["region"], d["scope"]) == (ACCOUNT, REGION, "workloads")
    assert canon(d["groups_created"]) == canon([{"name": name, "vpc": vpc} for _gid, name, _vpc in made])
    # a new group starts with EC2's "all outbound": what it has now but that was added, what it
    # lacks of that default removed
    assert docs({k: v - {DEFAULT_EGRESS} for k, v in made.items()}, new=True) == sorted(
        json.dumps(r, sort_keys=True) for r in d["rules_added"]
    )
    assert docs({k: {DEFAULT_EGRESS} - v for k, v in made.items()}, new=True) == sorted(
        json.dumps(r, sort_keys=True) for r in d["rules_removed"]
    )
    assert set(groups_of(env, iid)) >= {gid for gid, _n, _v in made}
    assert canon(d["attached"]) == canon(
        [{"group": "(new)", "name": name, "vpc": vpc, "instances": [iid], "count": 1} for _gid, name, _v in made]
    )
    assert d["detached"] == d["groups_deleted"] == []
    assert d["counts"] == {
        "groups_created": len(made),
        "groups_deleted": 0,
        "rules_added": len(d["rules_added"]),
        "rules_removed": len(d["rules_removed"]),
        "attached": len(made),
        "detached": 0,
        "instances_attached": 1,
        "instances_detached": 0,
    }

    # the full run converges: whatever it changed, audited once; then nothing to change, no record
    schedule(env)
    settled = len(applied(env))
    assert schedule(env)[0]["plan"] == NO_CHANGE and len(applied(env)) == settled

    # a changed admin range: the full run revokes the old and authorizes the new, in every VPC
    before = rules_now(env)
    changed = PerimeterConfig.model_validate(dict(CONFIG, admin_cidrs=["10.98.0.0/24"]))
    monkeypatch.setenv("RINGFENCE_PERIMETER_CONFIG", changed.model_dump_json())
    [res] = schedule(env)
    after = rules_now(env)
    [rec] = applied(env)[settled:]
    d = rec.detail
    assert d["scope"] == "full" and rec.target == PLACE
    assert docs({k: after[k] - before[k] for k in after}) == sorted(
        json.dumps(r, sort_keys=True) for r in d["rules_added"]
    )
    assert docs({k: before[k] - after[k] for k in after}) == sorted(
        json.dumps(r, sort_keys=True) for r in d["rules_removed"]
    )
    assert {r["cidr"] for r in d["rules_added"]} == {"10.98.0.0/24"} and len(d["rules_added"]) == res["plan"][
        "authorize"
    ]
    assert {r["cidr"] for r in d["rules_removed"]} == {"10.99.0.0/24"}
    assert d["groups_created"] == d["attached"] == d["detached"] == d["groups_deleted"] == []
    assert schedule(env)[0]["plan"] == NO_CHANGE and len(applied(env)) == settled + 1, "nothing changed: no record"

    out = cli("audit", "verify", "--store", "dynamodb:rf-inventory,rf-state,rf-audit")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not refusals(rec_calls, ["perimeter"])


def test_a_perimeter_change_whose_audit_write_fails_is_not_made(
    configured: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """The audit table refuses the record (throttled): nothing is created or attached, the place
    fails (``PerimeterPlacesFailed``) and its message is handed back; retried once the table takes
    writes, the change is made and audited once."""
    from botocore.exceptions import ClientError

    env = configured
    est = boot(env)
    vpc, sub = new_vpc(env)
    (iid,) = est["run"]("web", sub, 1)
    ingested(env, [iid])
    booted = len(applied(env))
    env.load_functions()  # a cold container, whose clients carry the hook below
    refusing = [True]

    def refuse(params: dict[str, Any], **_: Any) -> None:
        tables = {next(iter(i.values()))["TableName"] for i in params.get("TransactItems", [])}
        if "rf-audit" in tables and refusing[0]:
            raise ClientError({"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "x"}}, "Tx")

    env.hook("before-parameter-build.dynamodb.TransactWriteItems", refuse)
    capsys.readouterr()
    assert perimeter(env, [iid])["batchItemFailures"], "the message naming only the failed place is handed back"
    assert emitted(capsys.readouterr().out).get("PerimeterPlacesFailed") == 1
    mine = env.ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["SecurityGroups"]
    assert not [g for g in mine if any(t["Key"] == TAG for t in g.get("Tags", []))], "a group made unaudited"
    assert not {g for g in groups_of(env, iid) if g in records(env)}, "a group attached unaudited"
    assert not [k for k in records(env) if k.startswith("pending#")], "not even an intent to create"
    assert len(applied(env)) == booted

    refusing[0] = False
    [out] = env.drain("perimeter", "perimeter")  # SQS delivers the handed-back message again
    assert not out["batchItemFailures"]
    [rec] = applied(env)[booted:]
    assert {g["name"] for g in rec.detail["groups_created"]} >= {"rf-prod-boundary", "rf-prod-mgmt"}
    assert [a["instances"] for a in rec.detail["attached"]] == [[iid]] * len(rec.detail["attached"])
    assert {g for g in groups_of(env, iid) if g in records(env)}


def test_a_dry_run_writes_no_audit_record(configured: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dry run changes nothing and writes nothing to the chain: its plan is logged and returned
    (a scheduled dry run plans the same changes every 30 minutes, which would fill the chain with
    records of nothing done)."""
    env = configured
    monkeypatch.setenv("RINGFENCE_PERIMETER_DRY_RUN", "true")
    boot(env)
    [res] = schedule(env)
    assert res["plan"]["create"] and res["applied"] is False
    assert not applied(env) and not ours(env)


def test_a_scale_out_is_one_record_its_instances_capped_with_their_count(configured: Env) -> None:
    """25 instances launched at once into a new VPC, in one perimeter message: one record, each
    group naming its first instances (``AUDIT_INSTANCES``) and how many it was attached to."""
    env = configured
    est = boot(env)
    booted = len(applied(env))
    _vpc, sub = new_vpc(env)
    ids = est["run"]("web", sub, AUDIT_INSTANCES + 5)
    ingested(env, ids)
    assert not perimeter(env, ids)["batchItemFailures"]
    [rec] = applied(env)[booted:]
    assert rec.detail["counts"]["instances_attached"] == len(ids)
    for a in rec.detail["attached"]:
        assert a["count"] == len(ids) and len(a["instances"]) == AUDIT_INSTANCES and set(a["instances"]) < set(ids)


def test_the_perimeter_sends_its_records_to_the_siem(configured: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """``RINGFENCE_SIEM`` in the perimeter function: each perimeter.apply record goes to the
    stack's EventBridge bus as OCSF API Activity (Update), as the other functions' records."""
    from tests.aws.test_siem_lambda import siem_sink
    from tests.siem.test_siem import validate

    env = configured
    sqs, q = siem_sink(env, monkeypatch)
    boot(env)
    got: list[dict[str, Any]] = []
    deadline = time.time() + 20
    recs = {a.hash: a for a in applied(env)}
    while len([e for e in got if e["detail"]["api"]["operation"] == "perimeter.apply"]) < len(recs):
        assert time.time() < deadline, got
        got += [json.loads(m["Body"]) for m in sqs.receive_message(QueueUrl=q, WaitTimeSeconds=1).get("Messages", [])]
    sent = [e["detail"] for e in got if e["detail"]["api"]["operation"] == "perimeter.apply"]
    assert recs and {e["unmapped"]["audit"]["hash"] for e in sent} == set(recs)
    for e in sent:
        validate(e)
        assert e["activity_id"] == 3 and e["actor"]["user"]["name"] == "ringfence:perimeter"
        assert e["resources"][0]["uid"] == PLACE
