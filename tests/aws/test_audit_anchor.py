"""The audit chain's head anchored on a schedule (``functions/anchor``) in an Object Lock bucket,
and ``ringfence audit verify --anchor s3://…`` (the real CLI, in a subprocess) reading it back, over
the moto server.

moto (5.2) applies the bucket's default retention to each put and refuses deleting a locked
version; it does not refuse shortening a COMPLIANCE retention (``PutObjectRetention`` overwrites
it), so that part of Object Lock is AWS's to enforce and is not tested here.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from ringfence.audit import AuditHead, AuditRecord, record_hash, seal, verify
from ringfence.clouds.aws.anchor import AnchorRefused, anchor_key
from ringfence.local.lambdas import load_functions
from tests.aws.conftest import REGION, Env, LambdaContext
from tests.aws.test_audit_chain import cli
from tests.aws.test_function_iam import (
    SAM,
    WRITES,
    Recorder,
    Statement,
    allowed,
    granted,
    refusals,
    sam_statements,
    terraform_statements,
)
from tests.aws.test_pipeline import _scheduled
from tests.aws.test_static import hcl, template

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "rf-audit-anchors"
SPEC = "dynamodb:rf-inventory,rf-state,rf-audit"


@pytest.fixture
def anchored(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """The stack with template.yaml's AuditAnchorBucket (Object Lock, a COMPLIANCE default
    retention) and the anchor function loaded against it."""
    env.s3.create_bucket(
        Bucket=BUCKET, ObjectLockEnabledForBucket=True, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    env.s3.put_object_lock_configuration(
        Bucket=BUCKET,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}},
        },
    )
    monkeypatch.setenv("RINGFENCE_ANCHOR_BUCKET", BUCKET)
    env.fn.update(load_functions(["anchor"], ROOT / "functions", keep_clients=True))
    yield env


def run_anchor(env: Env) -> dict[str, Any]:
    out: dict[str, Any] = env.fn["anchor"].handler(_scheduled(), LambdaContext())
    return out


def append(env: Env, n: int, who: str = "alice") -> list[AuditRecord]:
    return [env.store.audit(AuditRecord(principal=who, action="workload.mode", target=f"w{i}")) for i in range(n)]


def versions(env: Env) -> list[dict[str, Any]]:
    return list(env.s3.list_object_versions(Bucket=BUCKET, Prefix="anchors/").get("Versions", []))


def rewrite_chain_and_head(records: list[AuditRecord]) -> AuditHead:
    """What a principal with PutItem on the audit table (six functions' roles) can do: every
    record re-sealed with another principal, the head set to match (as in
    test_what_the_chain_does_not_prove_a_rewritten_chain_and_head)."""
    table = boto3.resource("dynamodb").Table("rf-audit")
    head = AuditHead()
    for r in records:
        f = seal(r.model_copy(update={"principal": "mallory"}), head)
        table.put_item(Item={"pk": "chain", "sk": f"{f.seq:012d}", "doc": f.model_dump_json()})
        head = AuditHead(seq=f.seq, hash=f.hash)
    table.put_item(Item={"pk": "head", "sk": "head", "seq": head.seq, "hash": head.hash})
    return head


def test_the_scheduled_anchor_writes_the_head_when_it_moved_and_the_object_is_locked(anchored: Env) -> None:
    env = anchored
    assert run_anchor(env) == {"seq": 0, "key": None}, "an empty chain: nothing to anchor"
    recs = append(env, 2)
    head = AuditHead(seq=2, hash=recs[-1].hash)
    assert run_anchor(env) == {"seq": 2, "key": anchor_key(head)}
    obj = env.s3.get_object(Bucket=BUCKET, Key=anchor_key(head))
    body = json.loads(obj["Body"].read())
    assert (body["seq"], body["hash"]) == (2, recs[-1].hash) and body["time"] > 0
    assert obj["ObjectLockMode"] == "COMPLIANCE" and obj["ObjectLockRetainUntilDate"] > dt.datetime.now(dt.UTC)
    with pytest.raises(ClientError) as refused:  # the locked version outlives a delete
        env.s3.delete_object(Bucket=BUCKET, Key=anchor_key(head), VersionId=obj["VersionId"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"

    assert run_anchor(env)["key"] is None and len(versions(env)) == 1, "the head did not move: nothing written"
    later = append(env, 1)
    assert run_anchor(env)["key"] == anchor_key(AuditHead(seq=3, hash=later[-1].hash))
    assert [v["Key"] for v in versions(env)] == [anchor_key(head), anchor_key(AuditHead(seq=3, hash=later[-1].hash))]


def test_a_genuine_chain_passes_every_anchor_the_schedule_wrote(anchored: Env) -> None:
    env = anchored
    for n in (2, 3, 1):
        append(env, n)
        run_anchor(env)
    # a cold container finds the head anchored already (the bucket's last key): nothing written
    env.fn.update(load_functions(["anchor"], ROOT / "functions", keep_clients=True))
    assert run_anchor(env)["key"] is None and len(versions(env)) == 3
    append(env, 2)  # written since the last anchor: the chain is ahead of every anchor
    out = cli("audit", "verify", "--store", SPEC, "--anchor", f"s3://{BUCKET}/anchors/")
    assert out.returncode == 0 and "ok: 8 record(s) chained" in out.stdout, out.stderr
    assert "3 anchored head(s) held, the newest at seq 6" in out.stdout
    # a cold container after more records checks them from the last anchor and anchors the head
    env.fn.update(load_functions(["anchor"], ROOT / "functions", keep_clients=True))
    assert run_anchor(env)["seq"] == 8 and len(versions(env)) == 4
    # no anchor there: a wrong prefix is an error, never a pass
    wrong = cli("audit", "verify", "--store", SPEC, "--anchor", f"s3://{BUCKET}/elsewhere/")
    assert wrong.returncode == 1 and "no anchor under" in wrong.stderr, wrong.stderr


@pytest.mark.slow
def test_attack_a_rewritten_chain_and_head_is_caught_by_the_scheduled_anchor(anchored: Env) -> None:
    env = anchored
    append(env, 3)
    run_anchor(env)  # seq 3 anchored
    recs = [*env.store.audit_log(), *append(env, 2)]
    rewrite_chain_and_head(recs)
    assert verify(env.store.audit_log(), env.store.audit_head()).ok, "self-consistent: the chain alone passes it"
    assert cli("audit", "verify", "--store", SPEC).returncode == 0
    # the next scheduled run refuses the forged head (it does not extend the anchored one): the
    # function fails, so its alarm fires, and nothing is anchored
    with pytest.raises(AnchorRefused, match="does not follow seq 3"):
        run_anchor(env)
    assert len(versions(env)) == 1
    out = cli("audit", "verify", "--store", SPEC, "--anchor", f"s3://{BUCKET}/anchors/")
    assert out.returncode == 1 and "BROKEN at seq 3" in out.stderr and "rewritten" in out.stderr, out.stderr
    assert f"anchored by s3://{BUCKET}/anchors/000000000003-" in out.stderr, "the anchor it rests on is named"
    as_json = json.loads(cli("audit", "verify", "--store", SPEC, "--anchor", f"s3://{BUCKET}", "--json").stdout)
    assert as_json["ok"] is False and as_json["first_bad_seq"] == 3


def _put_head(head: AuditHead) -> None:
    boto3.resource("dynamodb").Table("rf-audit").put_item(
        Item={"pk": "head", "sk": "head", "seq": head.seq, "hash": head.hash}
    )


@pytest.mark.parametrize(
    "fake",
    [
        pytest.param(lambda real: AuditHead(seq=1, hash="e" * 64), id="back-to-a-made-up-seq-1"),
        pytest.param(lambda real: AuditHead(seq=real.seq + 40, hash="e" * 64), id="a-made-up-seq-ahead"),
        pytest.param(lambda real: AuditHead(seq=real.seq, hash="e" * 64), id="the-same-seq-another-hash"),
        pytest.param(lambda real: AuditHead(seq=0, hash="nonsense"), id="malformed"),
    ],
)
def test_attack_a_made_up_head_put_for_one_schedule_is_never_anchored(anchored: Env, fake: Any) -> None:
    """Whoever may write the audit table (six functions' roles) puts a made-up head, waits for
    the schedule and puts the real one back: anchored (locked for years), it would make every later
    verify of the genuine chain fail, alike to a rewritten one. The function anchors only a head
    the chain holds after the last anchor."""
    env = anchored
    append(env, 3)
    run_anchor(env)
    real = env.store.audit_head()
    assert real is not None
    append(env, 1)
    _put_head(fake(real))
    with pytest.raises(AnchorRefused):
        run_anchor(env)
    assert [v["Key"] for v in versions(env)] == [anchor_key(real)], "nothing anchored"
    # a cold container, which reads the last anchor from the bucket, refuses it too
    env.fn.update(load_functions(["anchor"], ROOT / "functions", keep_clients=True))
    with pytest.raises(AnchorRefused):
        run_anchor(env)
    log = env.store.audit_log()
    _put_head(AuditHead(seq=log[-1].seq, hash=log[-1].hash))  # the real head back
    assert run_anchor(env)["seq"] == 4
    out = cli("audit", "verify", "--store", SPEC, "--anchor", f"s3://{BUCKET}/anchors/")
    assert out.returncode == 0 and "2 anchored head(s) held, the newest at seq 4" in out.stdout, out.stderr


def test_attack_a_first_anchor_of_a_made_up_head_is_refused(anchored: Env) -> None:
    """No anchor yet: the head's own record must be in the chain, hashing to it."""
    env = anchored
    append(env, 2)
    _put_head(AuditHead(seq=2, hash="e" * 64))
    with pytest.raises(AnchorRefused, match="does not hold the head"):
        run_anchor(env)
    assert versions(env) == []


def test_attack_a_forged_record_and_head_far_ahead_are_never_the_first_anchor(anchored: Env) -> None:
    """No anchor yet, and whoever may write the audit table puts a record sealed over a made-up
    head at seq 1,000,000 and a head naming it: self-consistent, it was anchored (locked for
    years), the genuine chain then verified BROKEN against it and every later run was refused.
    With no anchor, the whole chain from genesis must lead to the head."""
    env = anchored
    recs = append(env, 3)
    table = boto3.resource("dynamodb").Table("rf-audit")
    forged = seal(
        AuditRecord(principal="mallory", action="workload.mode", target="x"), AuditHead(seq=999_999, hash="a" * 64)
    )
    table.put_item(Item={"pk": "chain", "sk": f"{forged.seq:012d}", "doc": forged.model_dump_json()})
    _put_head(AuditHead(seq=forged.seq, hash=forged.hash))
    with pytest.raises(AnchorRefused, match="seq 1000000 where seq 4 was expected"):
        run_anchor(env)
    assert versions(env) == [], "nothing anchored"
    # the forger puts the real head back: the genuine chain anchors and verifies
    table.delete_item(Key={"pk": "chain", "sk": f"{forged.seq:012d}"})
    _put_head(AuditHead(seq=3, hash=recs[-1].hash))
    append(env, 1)
    assert run_anchor(env)["seq"] == 4
    out = cli("audit", "verify", "--store", SPEC, "--anchor", f"s3://{BUCKET}/anchors/")
    assert out.returncode == 0 and "1 anchored head(s) held, the newest at seq 4" in out.stdout, out.stderr


def test_a_first_anchor_checks_the_chain_from_genesis(anchored: Env) -> None:
    """A chain whose first record does not follow genesis (replaced, before any anchor) is never
    anchored, though every later record links and the head is its last."""
    env = anchored
    recs = append(env, 3)
    table = boto3.resource("dynamodb").Table("rf-audit")
    first = recs[0].model_copy(update={"prev": "b" * 64, "hash": ""})
    first.hash = record_hash(first)
    table.put_item(Item={"pk": "chain", "sk": f"{1:012d}", "doc": first.model_dump_json()})
    with pytest.raises(AnchorRefused, match="record at seq 1 does not follow seq 0"):
        run_anchor(env)
    assert versions(env) == []


def test_a_later_put_to_an_anchors_key_hides_nothing(anchored: Env) -> None:
    """Every version counts: a forged body put over an anchor's key (by whoever could) leaves the
    locked version in place, and verify reads it too."""
    env = anchored
    recs = append(env, 2)
    run_anchor(env)
    key = anchor_key(AuditHead(seq=2, hash=recs[-1].hash))
    forged = rewrite_chain_and_head(recs)
    env.s3.put_object(Bucket=BUCKET, Key=key, Body=forged.model_dump_json().encode(), ChecksumAlgorithm="SHA256")
    env.s3.delete_object(Bucket=BUCKET, Key=key)  # a delete marker on top, too
    out = cli("audit", "verify", "--store", SPEC, "--anchor", f"s3://{BUCKET}/anchors/")
    assert out.returncode == 1 and "BROKEN at seq 2" in out.stderr, out.stderr


# --- the deployments ---------------------------------------------------------------------------------

# what would let a role add, replace, hide or unlock an anchor (or the bucket's lock and policy)
S3_WRITES = [
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:DeleteObjectVersion",
    "s3:PutObjectRetention",
    "s3:PutObjectLegalHold",
    "s3:BypassGovernanceRetention",
    "s3:PutBucketObjectLockConfiguration",
    "s3:PutBucketPolicy",
    "s3:PutBucketVersioning",
    "s3:PutLifecycleConfiguration",
    "s3:DeleteBucket",
]


def _covers_anchors(resource: str) -> bool:
    """A statement resource that includes the anchor bucket or its objects: the bucket itself, or a
    wildcard no narrower than every bucket."""
    if resource == "*" or resource.startswith(("anchors:", "anchorsbucket")):
        return True
    return resource.startswith("other:") and ("AuditAnchorBucket" in resource or ":s3:::*" in resource)


def anchor_writers(statements_of: Any, fns: list[str]) -> dict[str, list[Statement]]:
    out: dict[str, list[Statement]] = {}
    for fn in fns:
        for st in statements_of(fn):
            actions, resources, _ = st
            writes = any(fnmatch.fnmatchcase(w, a) for a in actions for w in S3_WRITES)
            if writes and any(_covers_anchors(r) for r in resources):
                out.setdefault(fn, []).append(st)
    return out


def test_the_anchor_bucket_locks_in_compliance_mode_and_only_the_anchor_function_writes_it() -> None:
    res = template()["Resources"]
    bucket = res["AuditAnchorBucket"]
    props = bucket["Properties"]
    assert props["ObjectLockEnabled"] is True and props["VersioningConfiguration"] == {"Status": "Enabled"}
    lock = props["ObjectLockConfiguration"]
    assert lock["ObjectLockEnabled"] == "Enabled"
    assert lock["Rule"]["DefaultRetention"] == {"Mode": "COMPLIANCE", "Days": {"Ref": "AuditAnchorRetentionDays"}}
    assert all(props["PublicAccessBlockConfiguration"].values()) and bucket["DeletionPolicy"] == "Retain"
    assert props["BucketEncryption"] == res["BundleBucket"]["Properties"]["BucketEncryption"]
    tls, writers = res["AuditAnchorBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert tls["Effect"] == "Deny" and tls["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    # nobody but the anchor function's role adds, or re-locks, an object: not even an admin
    assert (writers["Effect"], writers["Principal"]) == ("Deny", "*")
    assert {"s3:PutObject", "s3:PutObjectRetention", "s3:PutObjectLegalHold"} <= set(writers["Action"])
    assert writers["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": {"GetAtt": "AnchorFunctionRole.Arn"}}}
    fn = res["AnchorFunction"]["Properties"]
    assert fn["Events"]["Schedule"]["Properties"]["ScheduleExpression"] == {"Ref": "AuditAnchorSchedule"}
    assert fn["Environment"]["Variables"]["RINGFENCE_ANCHOR_BUCKET"] == {"Ref": "AuditAnchorBucket"}
    assert template()["Outputs"]["AuditAnchorBucket"]["Value"] == {"Ref": "AuditAnchorBucket"}
    alarm = res["AuditAnchorErrorsAlarm"]["Properties"]  # a failing anchor is seen, not silent
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": "AnchorFunction"}}]
    assert alarm["MetricName"] == "Errors" and alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]
    # a schedule that stopped fails nothing: no invocation for 3 hours is an alarm too
    stopped = res["AuditAnchorStoppedAlarm"]["Properties"]
    assert (stopped["MetricName"], stopped["ComparisonOperator"], stopped["Threshold"]) == (
        "Invocations",
        "LessThanThreshold",
        1,
    )
    assert stopped["TreatMissingData"] == "breaching" and stopped["Dimensions"] == alarm["Dimensions"]
    alarms = hcl(ROOT / "infra/modules/ringfence/alarms.tf")
    (tf_stopped_alarm,) = [
        v for b in alarms["resource"] for named in b.values() for n, v in named.items() if n == "anchor_stopped"
    ]
    assert (tf_stopped_alarm["metric_name"], tf_stopped_alarm["treat_missing_data"]) == ("Invocations", "breaching")
    assert tf_stopped_alarm["comparison_operator"] == "LessThanThreshold" and tf_stopped_alarm["threshold"] == 1
    tf_alarm = next(b for b in alarms["locals"] if "alarms" in b)["alarms"]["anchor-errors"]
    assert (tf_alarm["metric"], tf_alarm["dims"]) == (
        "Errors",
        {"FunctionName": '${aws_lambda_function.fn["anchor"].function_name}'},
    )

    main = hcl(ROOT / "infra/modules/ringfence/main.tf")
    resources: dict[str, dict[str, Any]] = {}
    for block in main["resource"]:
        for kind, named in block.items():
            resources.update({f"{kind}.{n}": v for n, v in named.items()})
    assert resources["aws_s3_bucket.anchors"]["object_lock_enabled"] is True
    assert resources["aws_s3_bucket_versioning.anchors"]["versioning_configuration"][0]["status"] == "Enabled"
    (rule,) = resources["aws_s3_bucket_object_lock_configuration.anchors"]["rule"]
    retention = rule["default_retention"][0]
    assert (retention["mode"], retention["days"]) == ("COMPLIANCE", "${var.audit_anchor_retention_days}")
    block = resources["aws_s3_bucket_public_access_block.anchors"]
    assert all(block[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls"))
    assert block["restrict_public_buckets"] is True
    assert "aws_s3_bucket_server_side_encryption_configuration.anchors" in resources
    assert "aws_s3_bucket_policy.anchors" in resources
    docs = {n: v for block in main["data"] for named in block.values() for n, v in named.items()}
    (tf_writers,) = [st for st in docs["anchors_tls"]["statement"] if st.get("sid") == "OnlyTheAnchorFunctionWrites"]
    assert (tf_writers["effect"], tf_writers["resources"]) == ("Deny", ["${aws_s3_bucket.anchors.arn}/*"])
    assert {"s3:PutObject", "s3:PutObjectRetention", "s3:PutObjectLegalHold"} <= set(tf_writers["actions"])
    (cond,) = tf_writers["condition"]
    assert (cond["test"], cond["variable"], cond["values"]) == (
        "ArnNotEquals",
        "aws:PrincipalArn",
        ['${aws_iam_role.fn["anchor"].arn}'],
    )
    tf_fns = hcl(ROOT / "infra/modules/ringfence/lambda.tf")
    loc: dict[str, Any] = {}
    for block in tf_fns["locals"]:
        loc.update(block)
    assert loc["functions"]["anchor"]["env"] == {"RINGFENCE_ANCHOR_BUCKET": "${aws_s3_bucket.anchors.id}"}
    outputs = hcl(ROOT / "infra/modules/ringfence/outputs.tf")
    assert any(
        o.get("audit_anchor_bucket", {}).get("value") == "${aws_s3_bucket.anchors.id}" for o in outputs["output"]
    )

    # every function of each deployment is judged, and only the anchor function may write the bucket
    sam_fns = {n for n, r in res.items() if r["Type"] == "AWS::Serverless::Function"}
    assert set(SAM.values()) == sam_fns, sam_fns ^ set(SAM.values())
    assert anchor_writers(sam_statements, list(SAM)).keys() == {"anchor"}
    assert anchor_writers(terraform_statements, list(loc["statements"])).keys() == {"anchor"}


def test_the_anchor_function_reads_the_head_and_the_records_since_and_writes_nothing_in_the_audit_table(
    anchored: Env,
) -> None:
    """Its calls as made over moto are granted in both deployments; any write to the audit table,
    or a read of anything there but the head and the chain's records, is not."""
    env = anchored
    rec = Recorder(env, anchors=BUCKET)
    append(env, 2)
    run_anchor(env)
    assert [(a, t) for a, t, _ in rec.calls["anchor"]] == [("GetItem", "audit"), ("Query", "audit")]
    assert [a for a, _ in rec.other["anchor"]] == ["s3:ListBucket", "s3:PutObject"]
    assert not refusals(rec, ["anchor"])
    for where, statements_of in (("template.yaml", sam_statements), ("infra/", terraform_statements)):
        statements = statements_of("anchor")
        for action in sorted(WRITES):
            for key in ("head", "chain", "id#x"):
                attack = (action, "audit", {"dynamodb:LeadingKeys": [key], "dynamodb:Attributes": ["pk", "sk"]})
                assert not allowed(statements, attack), (where, attack)
        record = ("GetItem", "audit", {"dynamodb:LeadingKeys": ["chain"], "dynamodb:Attributes": ["pk", "sk"]})
        assert not allowed(statements, record), where
        for other in ("state", "inventory", "idempotency"):
            assert not allowed(statements, ("GetItem", other, {"dynamodb:LeadingKeys": ["x"]})), (where, other)
        assert not granted(statements, "s3:PutObject", "s3:bundles/i-1/1.json"), where
        assert not granted(statements, "s3:PutObject", "anchors:elsewhere/x.json"), where
        assert not granted(statements, "s3:DeleteObject", "anchors:anchors/x.json"), where
        assert not granted(statements, "s3:PutObjectRetention", "anchors:anchors/x.json"), where
