"""Deployment artifacts: Terraform parses (python-hcl2), and the event rules in template.yaml and
infra/ match the library's patterns. (cfn-lint and checkov run in `make static-aws`.)"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

from ringfence.clouds.aws.patterns import INGEST_RULES, lifecycle_rules
from ringfence.local.aws import EmbeddedAws

ROOT = Path(__file__).resolve().parents[2]


class _CfnLoader(yaml.SafeLoader):
    pass


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node)}
    return {suffix: loader.construct_mapping(node)}  # type: ignore[arg-type]


_CfnLoader.add_multi_constructor("!", _tag)


def unquote(v: Any) -> Any:
    """python-hcl2 ≥ 7 keeps the quotes of string literals and quoted keys."""
    if isinstance(v, str):
        return v[1:-1] if len(v) >= 2 and v[0] == v[-1] == '"' else v
    if isinstance(v, list):
        return [unquote(x) for x in v]
    if isinstance(v, dict):
        return {unquote(k): unquote(x) for k, x in v.items()}
    return v


# parsed once per text (a parse takes ~0.3 s and the IAM tests read the deployments hundreds of
# times); callers get their own copy
@functools.cache
def _parsed_template(text: str) -> dict[str, Any]:
    return yaml.load(text, Loader=_CfnLoader)


@functools.cache
def _parsed_hcl(text: str) -> dict[str, Any]:
    return unquote(hcl2.loads(text))


def template() -> dict[str, Any]:
    return copy.deepcopy(_parsed_template((ROOT / "template.yaml").read_text()))


def hcl(path: Path) -> dict[str, Any]:
    """A Terraform file parsed (python-hcl2), string literals unquoted."""
    return copy.deepcopy(_parsed_hcl(path.read_text()))


def cfn_conditions(statement: dict[str, Any]) -> dict[str, Any]:
    """A statement's Condition; one given only when a parameter is set (!If [cond, then,
    AWS::NoValue]) as deployed with it set, the stricter form."""
    cond = statement.get("Condition", {})
    return dict(cond["If"][1]) if isinstance(cond, dict) and "If" in cond else dict(cond)


def tf_conditions(statement: dict[str, Any]) -> list[Any]:
    """A Terraform statement's conditions; a conditional expression (python-hcl2 keeps its text)
    is the optional org condition, checked on its own (test_member_roles_...): none here."""
    conds = statement.get("conditions", [])
    return conds if isinstance(conds, list) else []


def test_terraform_parses() -> None:
    files = sorted((ROOT / "infra").rglob("*.tf"))
    assert len(files) >= 6
    resources: set[str] = set()
    for f in files:
        doc = hcl(f)
        for block in doc.get("resource", []):
            resources.update(block)
    for kind in (
        "aws_lambda_function",
        "aws_dynamodb_table",
        "aws_s3_bucket",
        "aws_sqs_queue",
        "aws_cloudwatch_event_rule",
        "aws_api_gateway_rest_api",
        "aws_apigatewayv2_api",
        "aws_cloudwatch_metric_alarm",
    ):
        assert kind in resources, kind


# where the lifecycle rule's pattern takes the deployment's hook names: the parameter (SAM), the
# variable (Terraform); the library's pattern is given a stand-in list for them
SAM_HOOK_NAMES = {"Ref": "LifecycleHookNames"}
TF_HOOK_NAMES = "${var.lifecycle_hook_names}"
HOOK_NAMES = ["<LifecycleHookNames>"]


def hook_names_as_stand_in(pattern: Any, deployed: Any) -> Any:
    """``pattern`` with the deployment's hook names (``deployed``) as the stand-in list."""
    if pattern == deployed:
        return HOOK_NAMES
    if isinstance(pattern, dict):
        return {k: hook_names_as_stand_in(v, deployed) for k, v in pattern.items()}
    return pattern


def test_template_rules_match_library_patterns() -> None:
    res = template()["Resources"]
    for name, pattern in {**INGEST_RULES, **lifecycle_rules(HOOK_NAMES)}.items():
        deployed = hook_names_as_stand_in(res[f"{name}Rule"]["Properties"]["EventPattern"], SAM_HOOK_NAMES)
        assert deployed == pattern, name


def test_terraform_rules_match_library_patterns() -> None:
    main = hcl(ROOT / "infra/modules/ringfence/main.tf")
    loc: dict[str, Any] = {}
    for block in main.get("locals", []):
        loc.update(block)
    tf = {**loc["ingest_rules"], **loc["lifecycle_rules"]}
    lib = list(INGEST_RULES.values()) + list(lifecycle_rules(HOOK_NAMES).values())
    assert sorted(repr(hook_names_as_stand_in(p, TF_HOOK_NAMES)) for p in tf.values()) == sorted(map(repr, lib))


def test_template_has_the_required_pieces() -> None:
    res = template()["Resources"]
    types = {r["Type"] for r in res.values()}
    for t in (
        "AWS::Serverless::Function",
        "AWS::Serverless::LayerVersion",
        "AWS::Serverless::Api",
        "AWS::ApiGatewayV2::Api",
        "AWS::DynamoDB::Table",
        "AWS::S3::Bucket",
        "AWS::SQS::Queue",
        "AWS::Events::Rule",
        "AWS::CloudWatch::Alarm",
    ):
        assert t in types, t
    for name in ("InventoryTable", "StateTable", "AuditTable", "IdempotencyTable"):
        assert res[name]["Properties"]["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    bucket = res["BundleBucket"]["Properties"]
    assert bucket["VersioningConfiguration"]["Status"] == "Enabled"
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    fns = [n for n, r in res.items() if r["Type"] == "AWS::Serverless::Function"]
    for fn in fns:
        assert (ROOT / res[fn]["Properties"]["CodeUri"] / "app.py").exists(), fn
    assert res["ComputeFunction"]["Properties"]["ReservedConcurrentExecutions"] == 1
    sqs_fns = [fn for fn in fns if any(e["Type"] == "SQS" for e in res[fn]["Properties"].get("Events", {}).values())]
    assert "PerimeterFunction" in sqs_fns, "the perimeter reacts to the event path"
    for fn in sqs_fns:
        for e in res[fn]["Properties"]["Events"].values():
            if e["Type"] == "SQS":  # the perimeter also has its schedule
                assert e["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


@pytest.mark.slow
def test_storm_benchmark_script_runs_small(embedded: EmbeddedAws) -> None:
    """The storm benchmark (make bench-aws) on 3 instances, so the script cannot rot: over the
    session's moto (reset) rather than a moto process of its own, as the other tests run."""
    from tests.aws.bench_storm import run

    out = run(3, baseline=0, aws=embedded)
    assert out["estate_after"] == 9  # 5 + 3 + the one more afterwards
    incr = out["incremental"]
    # one delta per set a compute invocation touched, however many instances it took in
    assert incr["bundles_published"] == 3 and incr["deltas_published"] == incr["sets_touched"] >= 1
    assert out["one_more_instance_afterwards"]["bundles_published"] == 1


def _keys(block: dict[str, Any]) -> set[str]:
    """A block's attribute names, without python-hcl2's own (``__comments__``, ``__is_block__``)."""
    return {k for k in block if not k.startswith("__")}


def _variables(directory: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(directory.glob("*.tf")):
        for block in hcl(f).get("variable", []):
            out.update({k: v for k, v in block.items() if not k.startswith("__")})
    return out


def test_basic_example_inputs_line_up() -> None:
    """The example's tfvars sets only declared variables and every required one; the example passes
    the module only arguments the module declares, and every argument the module requires."""
    example = ROOT / "infra/examples/basic"
    declared = _variables(example)
    tfvars = hcl(example / "terraform.tfvars.example")
    assert _keys(tfvars) <= set(declared), _keys(tfvars) - set(declared)
    required = {name for name, v in declared.items() if "default" not in v}
    assert required <= _keys(tfvars), required - _keys(tfvars)
    # the signing key defaults to a KMS key the module creates; who may call the admin API has no default
    assert required == {"control_account", "admin_roles"}
    assert declared["signing_key_source"]["default"] == "kms"
    assert tfvars["control_account"] != "" and len(tfvars["control_account"]) == 12
    main = hcl(example / "main.tf")
    (call,) = [m["ringfence"] for m in main["module"]]
    module_vars = _variables(ROOT / "infra/modules/ringfence")
    passed = _keys(call) - {"source"}
    assert passed <= set(module_vars), passed - set(module_vars)
    assert {n for n, v in module_vars.items() if "default" not in v} <= passed
    readme = (example / "README.md").read_text()
    for step in (
        "regions-certs",
        "iid_certificate",
        "RINGFENCE_IID_CERT",
        "terraform.tfvars.example",
        "build-layer.sh",
    ):
        assert step in readme, step


def test_every_sam_function_logs_to_a_kept_encrypted_group() -> None:
    res = template()["Resources"]
    fns = [n for n, r in res.items() if r["Type"] == "AWS::Serverless::Function"]
    assert len(fns) >= 8
    for fn in fns:
        group = res[fn]["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
        props = res[group]["Properties"]
        assert res[group]["Type"] == "AWS::Logs::LogGroup", fn
        assert props["RetentionInDays"] == {"Ref": "LogRetentionDays"} and props["KmsKeyId"] == {"GetAtt": "Key.Arn"}, (
            fn
        )


def test_compute_failures_and_a_stuck_compute_queue_are_alarmed() -> None:
    """compute and publish hand failed batches back instead of failing (Lambda Errors cannot see
    that), nor reconcile a target it could not read: both stacks alarm on their failure metrics,
    their queues' oldest message and the publish DLQ."""
    res = template()["Resources"]
    alarms = [r["Properties"] for r in res.values() if r["Type"] == "AWS::CloudWatch::Alarm"]
    for metric in ("ComputeFailures", "PublishFailures", "ReconcileTargetsFailed", "ReconcileTargetsRefused"):
        assert any(a["Namespace"] == "Ringfence" and a["MetricName"] == metric for a in alarms), metric
    ages = [a for a in alarms if a["MetricName"] == "ApproximateAgeOfOldestMessage"]
    assert sorted(str(a["Dimensions"][0]["Value"]) for a in ages) == [
        str({"GetAtt": "ComputePriorityQueue.QueueName"}),
        str({"GetAtt": "ComputeQueue.QueueName"}),
        str({"GetAtt": "PublishQueue.QueueName"}),
    ]
    assert any(a["Dimensions"] == [{"Name": "QueueName", "Value": {"GetAtt": "PublishDLQ.QueueName"}}] for a in alarms)
    tf = hcl(ROOT / "infra/modules/ringfence/alarms.tf")
    loc: dict[str, Any] = {}
    for block in tf.get("locals", []):
        loc.update(block)
    assert loc["alarms"]["compute-failures"]["metric"] == "ComputeFailures"
    assert loc["alarms"]["publish-failures"]["metric"] == "PublishFailures"
    assert loc["alarms"]["reconcile-failed"]["metric"] == "ReconcileTargetsFailed"
    assert loc["alarms"]["reconcile-refused"]["metric"] == "ReconcileTargetsRefused"
    assert "aws_sqs_queue.publish_dlq.name" in str(loc["alarms"]["publish-dlq"]["dims"])
    resources: dict[str, dict[str, Any]] = {}
    for block in tf["resource"]:
        for kind, named in block.items():
            resources.setdefault(kind, {}).update(named)
    queue_age = resources["aws_cloudwatch_metric_alarm"]["compute_queue_age"]
    assert queue_age["metric_name"] == "ApproximateAgeOfOldestMessage"
    assert "aws_sqs_queue.compute.name" in str(queue_age["dimensions"])
    publish_age = resources["aws_cloudwatch_metric_alarm"]["publish_queue_age"]
    assert "aws_sqs_queue.publish.name" in str(publish_age["dimensions"])


def test_a_refused_staged_bundle_is_alarmed_on_its_own_in_both_deployments() -> None:
    """StagedBundlesRefused (a staged copy that is not the bytes compute hashed: possible
    tampering with the staging bucket) alarms at once in both stacks, not only through the
    publish DLQ after the retries; one alarm each, the same metric, dimension and description."""
    res = template()["Resources"]
    sam = [
        r["Properties"]
        for r in res.values()
        if r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"]["MetricName"] == "StagedBundlesRefused"
    ]
    assert len(sam) == 1
    assert sam[0]["Namespace"] == "Ringfence" and sam[0]["Statistic"] == "Sum"
    assert sam[0]["Dimensions"] == [{"Name": "service", "Value": "ringfence"}]
    assert sam[0]["Threshold"] == 0 and sam[0]["AlarmActions"] == [{"Ref": "AlarmTopic"}]
    assert "tampering" in sam[0]["AlarmDescription"] and "per attempt" in sam[0]["AlarmDescription"]
    tf = hcl(ROOT / "infra/modules/ringfence/alarms.tf")
    loc: dict[str, Any] = {}
    for block in tf.get("locals", []):
        loc.update(block)
    found = [a for a in loc["alarms"].values() if a["metric"] == "StagedBundlesRefused"]
    assert len(found) == 1
    assert found[0]["ns"] == "Ringfence" and found[0]["stat"] == "Sum" and found[0]["dims"] == {"service": "ringfence"}
    assert found[0]["what"] == sam[0]["AlarmDescription"]


def test_perimeter_failures_look_alikes_and_failed_scheduled_runs_are_alarmed_alike_in_both_deployments() -> None:
    """A perimeter account/Region that failed, a look-alike perimeter group and the async DLQ
    (failed scheduled runs) alarm in SAM and Terraform alike: the same metric, dimensions and
    description."""
    res = template()["Resources"]
    sam = {
        r["Properties"]["MetricName"]: r["Properties"]
        for r in res.values()
        if r["Type"] == "AWS::CloudWatch::Alarm"
        and r["Properties"]["MetricName"] in ("PerimeterPlacesFailed", "PerimeterGroupsRefused")
    }
    tf = hcl(ROOT / "infra/modules/ringfence/alarms.tf")
    loc: dict[str, Any] = {}
    for block in tf.get("locals", []):
        loc.update(block)
    for metric in ("PerimeterPlacesFailed", "PerimeterGroupsRefused"):
        [found] = [a for a in loc["alarms"].values() if a["metric"] == metric]
        assert sam[metric]["Namespace"] == found["ns"] == "Ringfence", metric
        assert sam[metric]["Statistic"] == found["stat"] == "Sum"
        assert sam[metric]["Dimensions"] == [{"Name": "service", "Value": "ringfence"}] and found["dims"] == {
            "service": "ringfence"
        }
        assert sam[metric]["AlarmDescription"] == found["what"], metric
    dlq = [
        r["Properties"]
        for r in res.values()
        if r["Type"] == "AWS::CloudWatch::Alarm"
        and r["Properties"]["Dimensions"] == [{"Name": "QueueName", "Value": {"GetAtt": "AsyncDLQ.QueueName"}}]
    ]
    assert len(dlq) == 1 and dlq[0]["MetricName"] == "ApproximateNumberOfMessagesVisible"
    tf_dlq = loc["alarms"]["async-dlq"]
    assert "aws_sqs_queue.async_dlq.name" in str(tf_dlq["dims"])
    assert (tf_dlq["metric"], tf_dlq["stat"], tf_dlq["what"]) == (
        dlq[0]["MetricName"],
        dlq[0]["Statistic"],
        dlq[0]["AlarmDescription"],
    )


def test_perimeter_iam_changes_and_deletes_only_tagged_groups_in_both_deployments() -> None:
    """The perimeter may delete and change rules only of groups carrying its tag, and create only
    groups tagged at birth: in template.yaml and in infra/ alike."""
    tag_cond = ("Null", "aws:ResourceTag/ringfence:perimeter", "false")
    birth_cond = ("Null", "aws:RequestTag/ringfence:perimeter", "false")
    guarded = {
        "ec2:DeleteSecurityGroup": tag_cond,
        "ec2:RevokeSecurityGroupIngress": tag_cond,
        "ec2:AuthorizeSecurityGroupIngress": tag_cond,
    }
    res = template()["Resources"]
    stmts = res["PerimeterFunction"]["Properties"]["Policies"][0]["Statement"]
    cfn: dict[str, list[tuple[str, str, str] | None]] = {}
    for st in stmts:
        st = st["If"][1] if "If" in st else st  # a statement under a condition (the SIEM target's)
        conds = [(t, k, v) for t, kv in cfn_conditions(st).items() for k, v in kv.items()] or [None]
        for a in st["Action"]:
            cfn.setdefault(a, []).extend(conds)
    for action, cond in guarded.items():
        assert cond in cfn[action], action  # with the VPC scope: tests/aws/test_perimeter_iam.py
    assert birth_cond in cfn["ec2:CreateSecurityGroup"]
    env = res["PerimeterFunction"]["Properties"]["Events"]
    assert env["Queue"]["Properties"]["Queue"] == {"GetAtt": "PerimeterQueue.Arn"}

    lam = hcl(ROOT / "infra/modules/ringfence/lambda.tf")
    loc: dict[str, Any] = {}
    for block in lam.get("locals", []):
        loc.update(block)
    tf: dict[str, list[tuple[str, str, str] | None]] = {}
    for st in loc["statements"]["perimeter"]:
        if not isinstance(st, dict):
            continue  # a shared local (assume, kms)
        conds = [
            (c["test"], c["variable"], c["values"][0]) for c in st.get("conditions", []) if isinstance(c, dict)
        ] or [None]
        for a in st["actions"]:
            tf.setdefault(a, []).extend(conds)
    for action, cond in guarded.items():
        assert cond in tf[action], action
    assert birth_cond in tf["ec2:CreateSecurityGroup"]
    assert "RINGFENCE_PERIMETER_QUEUE_URL" in loc["common_env"]


def test_every_function_that_audits_may_read_the_chain_head_and_the_lifecycle_one_audits() -> None:
    """An audit record is written after the chain head is read (GetItem, then PutItem): a role
    with PutItem alone fails at its first record in AWS (moto does not check IAM, so only this
    test can say). The lifecycle function audits a refused terminate and retires the credentials
    of an instance it sees terminated: both deployments let it. (The anchor function reads the
    head and writes no record: tests/aws/test_audit_anchor.py.)"""
    res = template()["Resources"]
    cfn: dict[str, dict[str, set[str]]] = {}
    for name, r in res.items():
        if r.get("Type") != "AWS::Serverless::Function":
            continue
        for st in r["Properties"].get("Policies", [{}])[0].get("Statement", []):
            res_ = st.get("Resource", [])  # a statement with NotResource names no table
            targets = res_ if isinstance(res_, list) else [res_]
            for t in targets:
                if isinstance(t, dict) and "GetAtt" in t:
                    cfn.setdefault(name, {}).setdefault(t["GetAtt"], set()).update(st["Action"])
    auditing = {n: a["AuditTable.Arn"] for n, a in cfn.items() if "dynamodb:PutItem" in a.get("AuditTable.Arn", ())}
    assert auditing and all("dynamodb:GetItem" in a for a in auditing.values()), auditing
    assert "LifecycleFunction" in auditing
    assert "dynamodb:DeleteItem" in cfn["LifecycleFunction"]["StateTable.Arn"]
    # GET /admin/findings reads set heads with BatchGetItem (ringfence.control.findings)
    assert "dynamodb:BatchGetItem" in cfn["AdminFunction"]["StateTable.Arn"]

    tf = (ROOT / "infra/modules/ringfence/lambda.tf").read_text()
    audit_lines = [line for line in tf.splitlines() if "aws_dynamodb_table.audit.arn" in line and "PutItem" in line]
    assert audit_lines and all('"dynamodb:GetItem", "dynamodb:PutItem"' in line for line in audit_lines), audit_lines
    lifecycle = tf[tf.index("    lifecycle = [") : tf.index("    reconcile = [")]
    assert "aws_dynamodb_table.audit.arn" in lifecycle
    # the retirement's deletions, on those items only (tests/aws/test_function_iam.py judges them)
    assert "local.retire," in lifecycle
    assert 'retire        = { actions = ["dynamodb:DeleteItem"], resources = [aws_dynamodb_table.state.arn]' in tf
    admin_tf = tf[tf.index("    admin = [") :]
    admin_tf = admin_tf[: admin_tf.index("\n    ]")]
    assert '"dynamodb:BatchGetItem"], resources = [aws_dynamodb_table.state.arn]' in admin_tf


def test_both_deployments_refuse_gcp_secure_tags_trusted_under_any_parent() -> None:
    """Secure tags as a label source with no tag parents would trust a key of our name under any
    project: the function refuses to start (tests/gcp/test_attack_gcp_labels.py), and both
    deployments refuse it before that, with the same form of parent the function accepts."""
    import re

    from ringfence.clouds.gcp.config import _TAG_PARENT

    doc = template()
    rule = doc["Rules"]["GcpTagParentsWithSecureTags"]
    assert rule["Assertions"][0]["Assert"] == {"Not": [{"Equals": [{"Ref": "GcpTagParents"}, ""]}]}
    pattern = re.compile(doc["Parameters"]["GcpTagParents"]["AllowedPattern"])
    for ok in ("", "organizations/123", "organizations/1,projects/22", "organizations/1, organizations/2"):
        assert pattern.fullmatch(ok), ok
    for bad in ("organizations/1,", ",organizations/1", "organizations/1 projects/2"):
        assert not pattern.fullmatch(bad), bad
    for one in ("organizations/1", "projects/22", "folders/1", "projects/my-project", "organizations/abc"):
        assert bool(pattern.fullmatch(one)) == bool(_TAG_PARENT.fullmatch(one)), one
    tf = (ROOT / "infra/modules/ringfence/variables.tf").read_text()
    gcp = tf[tf.index('variable "gcp"') : tf.index('variable "azure"')]
    assert 'var.gcp.label_source == "labels" && var.gcp.tag_parents == ""' in gcp and "validation" in gcp
    form = "(organizations|projects)/[0-9]+(, ?(organizations|projects)/[0-9]+)*"
    assert form in pattern.pattern and form in gcp, "both deployments check the same form"


def test_no_function_may_put_delete_or_query_inventory_records_or_scan_the_state_table() -> None:
    """The store updates inventory records in place, reads and lists them, and never scans the
    state table: a grant beyond that is privilege nobody uses (a role that may PutItem an
    inventory record may write one whole, labels and all). Checked against the store's code, so a
    store that starts to need one fails here first."""
    src = (ROOT / "layers/core/ringfence/store/dynamodb.py").read_text()
    for call in ("self.inventory.put_item", "self.inventory.delete_item", "self.inventory.query", "self.state.scan"):
        assert call not in src, call
    assert "self.inventory.update_item" in src and "self.inventory.scan" in src
    unused = {
        "InventoryTable": {"dynamodb:PutItem", "dynamodb:DeleteItem", "dynamodb:Query"},
        "StateTable": {"dynamodb:Scan"},
    }
    for name, r in template()["Resources"].items():
        if r.get("Type") != "AWS::Serverless::Function":
            continue
        for st in r["Properties"].get("Policies", [{}])[0].get("Statement", []):
            if not isinstance(st, dict) or "Action" not in st:
                continue
            targets = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            for t in targets:
                table = t.get("GetAtt", "").removesuffix(".Arn") if isinstance(t, dict) else ""
                assert not (set(st["Action"]) & unused.get(table, set())), (name, table, st["Action"])
    lam = hcl(ROOT / "infra/modules/ringfence/lambda.tf")
    loc: dict[str, Any] = {}
    for block in lam.get("locals", []):
        loc.update(block)
    tf_unused = {"inventory": unused["InventoryTable"], "state": unused["StateTable"]}
    for fn, statements in loc["statements"].items():
        for st in statements if isinstance(statements, list) else []:
            if not isinstance(st, dict):
                continue
            for r in st["resources"]:
                m = re.search(r"aws_dynamodb_table\.(\w+)\.arn", str(r))
                if m:
                    assert not (set(st["actions"]) & tf_unused.get(m.group(1), set())), (fn, m.group(1), st["actions"])


def test_member_roles_are_assumed_only_in_the_named_organization_in_both_deployments() -> None:
    """With the members' organization named, every function that may assume the member role may
    assume it only in that organization's accounts (aws:ResourceOrgID), in SAM and Terraform."""
    doc = template()
    assert re.fullmatch(doc["Parameters"]["MemberOrganizationId"]["AllowedPattern"], "o-abcdefghij12")
    assert not re.fullmatch(doc["Parameters"]["MemberOrganizationId"]["AllowedPattern"], "123456789012")
    assuming = 0
    for name, r in doc["Resources"].items():
        if r.get("Type") != "AWS::Serverless::Function":
            continue
        for st in r["Properties"].get("Policies", [{}])[0].get("Statement", []):
            if isinstance(st, dict) and st.get("Action") == ["sts:AssumeRole"]:
                assuming += 1
                cond = {"StringEquals": {"aws:ResourceOrgID": {"Ref": "MemberOrganizationId"}}}
                assert st.get("Condition") == {"If": ["WithMemberOrg", cond, {"Ref": "AWS::NoValue"}]}, name
    assert assuming == 6  # four read-only, one the perimeter's, one compute's (lifecycle)
    lam = hcl(ROOT / "infra/modules/ringfence/lambda.tf")
    loc: dict[str, Any] = {}
    for block in lam.get("locals", []):
        loc.update(block)
    for name in ("assume", "assume_perimeter", "assume_lifecycle"):
        assert loc[name]["actions"] == ["sts:AssumeRole"] and loc[name]["conditions"] == "${local.member_org}"
    assert "aws:ResourceOrgID" in str(loc["member_org"]) and "var.member_organization_id" in str(loc["member_org"])


def test_only_the_perimeter_may_assume_the_perimeter_role_and_no_read_only_one() -> None:
    """Security-group writes in member accounts live in a role of their own that only the
    perimeter function may assume, CompleteLifecycleAction in one only compute may assume; every
    other function (the internet-facing agent API among them) may assume only the read-only member
    role, in SAM and in Terraform."""
    assumed: dict[str, list[Any]] = {}
    for name, r in template()["Resources"].items():
        if r.get("Type") != "AWS::Serverless::Function":
            continue
        for st in r["Properties"].get("Policies", [{}])[0].get("Statement", []):
            if isinstance(st, dict) and "sts:AssumeRole" in st.get("Action", []):
                assumed.setdefault(name, []).append(st["Resource"])
    perimeter_role = {"Sub": "arn:${AWS::Partition}:iam::*:role/${MemberPerimeterRoleName}"}
    read_only = {"Sub": "arn:${AWS::Partition}:iam::*:role/${MemberRoleName}"}
    assert assumed.pop("PerimeterFunction") == [perimeter_role]
    lifecycle_role = {"Sub": "arn:${AWS::Partition}:iam::*:role/${MemberLifecycleRoleName}"}
    assert assumed.pop("ComputeFunction") == [lifecycle_role]
    assert sorted(assumed) == ["AgentApiFunction", "IngestFunction", "LifecycleFunction", "ReconcileFunction"]
    assert all(resources == [read_only] for resources in assumed.values()), assumed
    env = template()["Resources"]["PerimeterFunction"]["Properties"]["Environment"]["Variables"]
    assert env["RINGFENCE_PERIMETER_ACCOUNT_ROLES"] == {"Ref": "PerimeterAccountRoles"}

    lam = hcl(ROOT / "infra/modules/ringfence/lambda.tf")
    loc: dict[str, Any] = {}
    for block in lam.get("locals", []):
        loc.update(block)
    assert loc["assume"]["resources"] == ["${local.member_roles}"]
    assert loc["assume_perimeter"]["resources"] == ["${local.perimeter_roles}"]
    assert "var.member_perimeter_role_name" in loc["perimeter_roles"]
    assert loc["assume_lifecycle"]["resources"] == ["${local.lifecycle_roles}"]
    assert "var.member_lifecycle_role_name" in loc["lifecycle_roles"]
    assumes = ("${local.assume}", "${local.assume_perimeter}", "${local.assume_lifecycle}")
    uses = {
        fn: {x for x in statements if x in assumes}
        for fn, statements in loc["statements"].items()
        if isinstance(statements, list)
    }
    assert uses.pop("perimeter") == {"${local.assume_perimeter}"}
    # (compute's statements are a concat(...) expression: hcl2 gives it as one string)
    compute = str(loc["statements"]["compute"])
    assert "local.assume_lifecycle" in compute and not re.search(r"local\.assume(?!_lifecycle)\b", compute)
    assert not [fn for fn, stmts in loc["statements"].items() if fn != "compute" and "assume_lifecycle" in str(stmts)]
    assert {fn for fn, u in uses.items() if u} == {"ingest", "lifecycle", "reconcile", "agentapi"}
    assert all(u <= {"${local.assume}"} for u in uses.values()), uses
    assert "RINGFENCE_PERIMETER_ACCOUNT_ROLES" in loc["functions"]["perimeter"]["env"]


def _cfn_value(expr: Any, params: dict[str, str], conditions: dict[str, Any]) -> Any:
    """The value of a template expression under ``params``: the intrinsics the signing-key wiring
    uses (Ref to a parameter, Equals, Not, And, Or, Condition, If); anything else as written."""
    if not (isinstance(expr, dict) and len(expr) == 1):
        return expr
    ((fn, arg),) = expr.items()
    value = lambda e: _cfn_value(e, params, conditions)  # noqa: E731
    if fn == "Ref" and arg in params:
        return params[arg]
    if fn == "Equals":
        return value(arg[0]) == value(arg[1])
    if fn == "Not":
        return not value(arg[0])
    if fn in ("And", "Or"):
        return (all if fn == "And" else any)(value(a) for a in arg)
    if fn == "Condition":
        return value(conditions[arg])
    if fn == "If":
        return value(arg[1] if value(conditions[arg[0]]) else arg[2])
    return expr


def test_the_signing_key_rotates_through_two_slots_in_both_deployments() -> None:
    """docs/bundle.md's rotation on the stack's own KMS key: every choice of slots and active slot
    the template accepts has compute and publish sign with a key that exists under it, the same one
    the ActiveSigningKey output names; a choice dropping the active slot is refused by a rule. The
    Terraform module keeps its existing key as slot a and checks the same."""
    doc = template()
    conditions, res = doc["Conditions"], doc["Resources"]
    slots = {"A": "SigningKey", "B": "SigningKeyB"}
    rule = doc["Rules"]["ActiveSigningKmsKeyKept"]
    defaults = {name: p.get("Default", "") for name, p in doc["Parameters"].items()}
    assert (defaults["SigningKmsKeys"], defaults["ActiveSigningKmsKey"]) == ("A", "A")
    accepted = []
    for keys in doc["Parameters"]["SigningKmsKeys"]["AllowedValues"]:
        for active in doc["Parameters"]["ActiveSigningKmsKey"]["AllowedValues"]:
            params = {**defaults, "SigningKeySource": "kms", "SigningKmsKeys": keys, "ActiveSigningKmsKey": active}
            assert _cfn_value(rule["RuleCondition"], params, conditions) is True
            if not _cfn_value(rule["Assertions"][0]["Assert"], params, conditions):
                assert active not in keys.split("+"), (keys, active)
                continue
            accepted.append((keys, active))
            present = {
                s for s, r in slots.items() if _cfn_value({"Condition": res[r]["Condition"]}, params, conditions)
            }
            assert present == set(keys.split("+")), (keys, present)
            signs_with = {
                _cfn_value(
                    res[fn]["Properties"]["Environment"]["Variables"]["RINGFENCE_SIGNING_KEY"], params, conditions
                )["Sub"]
                for fn in ("ComputeFunction", "PublishFunction")
            }
            assert signs_with == {f"kms-sign:${{{slots[active]}.Arn}}"}, (keys, active, signs_with)
            output = _cfn_value(doc["Outputs"]["ActiveSigningKey"]["Value"], params, conditions)
            assert output == {"Sub": f"kms-sign:${{{slots[active]}.Arn}}"}
    assert accepted == [("A", "A"), ("A+B", "A"), ("A+B", "B"), ("B", "B")]
    # with the key in Secrets Manager, no KMS key is made
    params = {**defaults, "SigningKeySource": "secret", "SigningKmsKeys": "A+B"}
    assert not any(_cfn_value({"Condition": res[r]["Condition"]}, params, conditions) for r in slots.values())

    signing = (ROOT / "infra/modules/ringfence/signing.tf").read_text()
    tf = unquote(hcl2.loads(signing))
    (key,) = [b["aws_kms_key"]["signing"] for b in tf["resource"] if "aws_kms_key" in b]
    assert "var.signing_kms_keys" in key["for_each"]
    assert [(m["from"], m["to"]) for m in tf["moved"]] == [("${aws_kms_key.signing[0]}", '${aws_kms_key.signing["a"]}')]
    assert "aws_kms_key.signing[var.active_signing_kms_key].arn" in signing
    assert "condition     = contains(var.signing_kms_keys, var.active_signing_kms_key)" in signing
    declared = _variables(ROOT / "infra/modules/ringfence")
    assert declared["signing_kms_keys"]["default"] == ["a"] and declared["active_signing_kms_key"]["default"] == "a"


def test_both_deployments_say_whose_flow_logs_the_flows_function_reads() -> None:
    """FLOW_LOG_ACCOUNTS (functions/flows): a SAM parameter and a Terraform variable, checked alike;
    unset, the function reads its own account's logs only."""
    doc = template()
    flows = doc["Resources"]["FlowsFunction"]["Properties"]
    assert flows["Environment"]["Variables"]["FLOW_LOG_ACCOUNTS"] == {"Ref": "FlowLogAccounts"}
    param = doc["Parameters"]["FlowLogAccounts"]
    assert param["Default"] == ""
    pattern = re.compile(param["AllowedPattern"])
    for ok in ("", "*", "123456789012", "123456789012,210987654321"):
        assert pattern.fullmatch(ok), ok
    for bad in ("123", "123456789012,", "*,123456789012", "123456789012 210987654321"):
        assert not pattern.fullmatch(bad), bad
    lam = (ROOT / "infra/modules/ringfence/lambda.tf").read_text()
    assert 'FLOW_LOG_ACCOUNTS = join(",", var.flow_log_accounts)' in lam
    tf = (ROOT / "infra/modules/ringfence/variables.tf").read_text()
    var = tf[tf.index('variable "flow_log_accounts"') :]
    var = var[: var.index("\n}\n")]
    assert "default     = []" in var and 'regex("^([0-9]{12}|\\\\*)$", a)' in var


def test_both_deployments_output_the_role_arns_the_member_roles_trust() -> None:
    """docs/deploy-aws.md has the member lifecycle role trust the compute function's role, the
    member perimeter role and the label guard's PerimeterPrincipalArns the perimeter function's:
    both deployments output those two ARNs, under the same names."""
    outputs = template()["Outputs"]
    assert outputs["ComputeRoleArn"]["Value"] == {"GetAtt": "ComputeFunctionRole.Arn"}
    assert outputs["PerimeterRoleArn"]["Value"] == {"GetAtt": "PerimeterFunctionRole.Arn"}
    for directory, value in (
        ("modules/ringfence", 'aws_iam_role.fn["{}"].arn'),
        ("examples/basic", "module.ringfence.{}_role_arn"),
    ):
        doc = hcl(ROOT / "infra" / directory / "outputs.tf")
        tf = {name: body["value"] for block in doc["output"] for name, body in block.items()}
        for fn in ("compute", "perimeter"):
            assert tf[f"{fn}_role_arn"] == "${" + value.format(fn) + "}", (directory, fn)
    # the names the docs give
    doc_text = (ROOT / "docs" / "deploy-aws.md").read_text()
    assert all(n in doc_text for n in ("ComputeRoleArn", "PerimeterRoleArn", "compute_role_arn", "perimeter_role_arn"))


def test_both_deployments_rate_limit_the_agent_apis_unauthenticated_routes_per_address_alike() -> None:
    """GET /v1/nonce, POST /v1/enroll and the token route take no bearer token: both deployments
    put the same web ACL on the agent API's stage, whose rate-based rule blocks one address past a
    limit (a parameter / variable, the same default and bounds) on exactly those paths' ends,
    leaving out a renewal by token (labelled by the rule before it). What it answers:
    tests/aws/test_attack_waf_shared_address.py."""
    from tests.aws.webacl import cfn_web_acl, tf_web_acl

    t = template()
    res = t["Resources"]
    acl, tf_acl = cfn_web_acl(), tf_web_acl()
    assert acl["Scope"] == tf_acl["Scope"] == "REGIONAL"
    assert acl["DefaultAction"] == tf_acl["DefaultAction"] == {"Allow": {}}
    rules = {r["Name"]: r for r in acl["Rules"]}
    tf_rules = {r["Name"]: r for r in tf_acl["Rules"]}
    rate = rules["unauthenticated-routes-per-ip"]["Statement"]["RateBasedStatement"]
    tf_rate = tf_rules["unauthenticated-routes-per-ip"]["Statement"]["RateBasedStatement"]
    assert rate["Limit"] == {"Ref": "AgentApiUnauthenticatedRequestsPerIp"} and rate["AggregateKeyType"] == "IP"
    assert tf_rate["Limit"] == "${var.agent_api_unauthenticated_requests_per_ip}"
    rate["Limit"] = tf_rate["Limit"] = "the limit"
    assert tf_rules == rules, "the Terraform web ACL's rules are the template's, statement for statement"
    assoc = res["AgentApiWebAclAssociation"]["Properties"]
    assert assoc["WebACLArn"] == {"GetAtt": "AgentApiWebAcl.Arn"}
    assert assoc["ResourceArn"]["Sub"][1] == {"Api": {"Ref": "AgentApi"}, "Stage": {"Ref": "AgentApi.Stage"}}

    api = unquote(hcl2.loads((ROOT / "infra/modules/ringfence/api.tf").read_text()))
    resources = {
        (kind, name): body for block in api["resource"] for kind, v in block.items() for name, body in v.items()
    }
    tf_assoc = resources[("aws_wafv2_web_acl_association", "agent")]
    assert tf_assoc["resource_arn"] == '${aws_api_gateway_stage.this["agent"].arn}'
    assert tf_assoc["web_acl_arn"] == "${aws_wafv2_web_acl.agent.arn}"
    param = t["Parameters"]["AgentApiUnauthenticatedRequestsPerIp"]
    var = _variables(ROOT / "infra/modules/ringfence")["agent_api_unauthenticated_requests_per_ip"]
    assert var["default"] == param["Default"] == 2000
    cond = var["validation"][0]["condition"]
    assert f">= {param['MinValue']}" in cond and f"<= {param['MaxValue']}" in cond

    # the paths it counts: the three routes without a bearer token, under any stage or base path
    (paths,) = [s for s in rate["ScopeDownStatement"]["AndStatement"]["Statements"] if "RegexMatchStatement" in s]
    assert paths["RegexMatchStatement"]["FieldToMatch"] == {"UriPath": {}}
    pattern = re.compile(paths["RegexMatchStatement"]["RegexString"])
    for counted in ("/v1/v1/nonce", "/v1/enroll", "/v1/v1/agents/i-0abc/token", "/v1/nonce/"):
        assert pattern.search(counted), counted
    for spared in ("/v1/v1/agents/i-0abc/bundle", "/v1/agents/i-0abc/wait", "/v1/agents/i-0abc/heartbeat"):
        assert not pattern.search(spared), spared


def test_compute_not_queued_and_shared_addresses_are_alarmed_alike_in_both_deployments() -> None:
    """An admin change stored whose compute message failed (``ComputeNotQueued``, the admin
    function's), a failed hand-off whose owed mark could not be written either
    (``ComputeOwedNotMarked``: no scheduled run hands it on), owed marks naming no workload that a
    drain deleted (``OwedMarksMalformed``: a writer role gone wrong or in someone else's hands)
    and an address two active workloads hold (``AddressesShared``, compute's) alarm in SAM and
    Terraform alike: one alarm each, the same metric, dimensions, statistic, period, threshold and
    description."""
    res = template()["Resources"]
    tf = hcl(ROOT / "infra/modules/ringfence/alarms.tf")
    loc: dict[str, Any] = {}
    for block in tf.get("locals", []):
        loc.update(block)
    [period] = [
        r["aws_cloudwatch_metric_alarm"]["this"]["period"]
        for r in tf["resource"]
        if "this" in r.get("aws_cloudwatch_metric_alarm", {})
    ]
    for metric in ("ComputeNotQueued", "ComputeOwedNotMarked", "OwedMarksMalformed", "AddressesShared"):
        [sam] = [
            r["Properties"]
            for r in res.values()
            if r["Type"] == "AWS::CloudWatch::Alarm" and r["Properties"]["MetricName"] == metric
        ]
        [found] = [a for a in loc["alarms"].values() if a["metric"] == metric]
        assert sam["Namespace"] == found["ns"] == "Ringfence", metric
        assert sam["Statistic"] == found["stat"] == "Sum", metric
        assert sam["Dimensions"] == [{"Name": "service", "Value": "ringfence"}], metric
        assert found["dims"] == {"service": "ringfence"}, metric
        assert sam["AlarmDescription"] == found["what"], metric
        assert (sam["Period"], sam["Threshold"], sam["ComparisonOperator"]) == (period, 0, "GreaterThanThreshold")
        assert sam["AlarmActions"] == [{"Ref": "AlarmTopic"}], metric


def _tf_resources(name: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for block in hcl(ROOT / "infra/modules/ringfence" / name).get("resource", []):
        for kind, named in block.items():
            out.setdefault(kind, {}).update(named)
    return out


def test_compute_has_a_priority_lane_read_by_the_same_single_function_in_both_deployments() -> None:
    """An administrator's change (a quarantine) never waits behind a storm's backlog: a second
    FIFO queue, ComputePriorityQueue, as ComputeQueue is (the same DLQ, visibility, retention,
    key), read by the one compute function (reserved concurrency 1: still the single writer)
    through an event source mapping of its own; its URL goes to the administrator's function
    and to the three that find AWS instances leaving their peers' sets (ingest, lifecycle,
    reconcile), no other (not the agent API, wsconnect, flows, the perimeter, the other clouds'
    events), in SAM and Terraform alike."""
    res = template()["Resources"]
    q, p = res["ComputeQueue"]["Properties"], res["ComputePriorityQueue"]["Properties"]
    assert p == q, "the priority queue differs from the compute queue"
    fn = res["ComputeFunction"]["Properties"]
    assert fn["ReservedConcurrentExecutions"] == 1
    sources = {e["Properties"]["Queue"]["GetAtt"]: e["Properties"] for e in fn["Events"].values() if e["Type"] == "SQS"}
    assert set(sources) == {"ComputeQueue.Arn", "ComputePriorityQueue.Arn"}
    assert sources["ComputeQueue.Arn"] == {
        **sources["ComputePriorityQueue.Arn"],
        "Queue": {"GetAtt": "ComputeQueue.Arn"},
    }
    given = {
        n
        for n, r in res.items()
        if r["Type"] == "AWS::Serverless::Function"
        and "RINGFENCE_COMPUTE_PRIORITY_QUEUE_URL" in str(r["Properties"].get("Environment"))
    }
    assert given == {"AdminFunction", "IngestFunction", "LifecycleFunction", "ReconcileFunction"}
    assert "COMPUTE_PRIORITY" not in str(template()["Globals"])
    main, lam = _tf_resources("main.tf"), _tf_resources("lambda.tf")
    tq, tp = main["aws_sqs_queue"]["compute"], main["aws_sqs_queue"]["compute_priority"]
    assert {k: v for k, v in tp.items() if k != "name"} == {k: v for k, v in tq.items() if k != "name"}
    assert tp["name"].endswith("-compute-priority.fifo")
    esm = lam["aws_lambda_event_source_mapping"]["sqs"]
    assert "aws_sqs_queue.compute_priority.arn" in str(esm["for_each"]["compute_priority"])
    # the priority mapping invokes the compute function, batched as the compute queue's
    assert '"compute_priority" ? "compute"' in esm["function_name"]
    assert 'startswith(each.key, "compute")' in esm["maximum_batching_window_in_seconds"]
    lam_text = (ROOT / "infra/modules/ringfence/lambda.tf").read_text()
    tf_given = set(re.findall(r"^\s*(\w+)\s*=\s*\{.*RINGFENCE_COMPUTE_PRIORITY_QUEUE_URL", lam_text, re.M))
    assert tf_given == {"admin", "ingest", "lifecycle", "reconcile"}
    assert lam_text.count("RINGFENCE_COMPUTE_PRIORITY_QUEUE_URL") == len(tf_given)
    assert "COMPUTE_PRIORITY" not in str(hcl(ROOT / "infra/modules/ringfence/lambda.tf")["locals"][0]["common_env"])


def test_a_compute_backlog_and_a_late_priority_lane_are_alarmed_alike_in_both_deployments() -> None:
    """A storm's backlog is seen before the 10-minute age alarm: the compute queue's depth (over
    500 visible messages for 3 minutes) and the priority lane's age (over 60 s) alarm in SAM and
    Terraform alike, each description naming a storm as a possible cause."""
    res = template()["Resources"]
    depth = res["ComputeQueueDepthAlarm"]["Properties"]
    prio = res["ComputePriorityQueueAgeAlarm"]["Properties"]
    assert depth["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert depth["Dimensions"] == [{"Name": "QueueName", "Value": {"GetAtt": "ComputeQueue.QueueName"}}]
    assert depth["Period"] * depth["EvaluationPeriods"] >= 120 and depth["Threshold"] == 500
    assert prio["MetricName"] == "ApproximateAgeOfOldestMessage" and prio["Threshold"] == 60
    assert prio["Dimensions"] == [{"Name": "QueueName", "Value": {"GetAtt": "ComputePriorityQueue.QueueName"}}]
    alarms = _tf_resources("alarms.tf")["aws_cloudwatch_metric_alarm"]
    for sam, tf, queue in (
        (depth, alarms["compute_queue_depth"], "compute"),
        (prio, alarms["compute_priority_queue_age"], "compute_priority"),
    ):
        assert "storm" in sam["AlarmDescription"] and sam["AlarmDescription"] == tf["alarm_description"]
        assert tf["metric_name"] == sam["MetricName"] and tf["threshold"] == sam["Threshold"]
        assert tf["period"] == sam["Period"] and tf["evaluation_periods"] == sam["EvaluationPeriods"]
        assert tf["statistic"] == sam["Statistic"] == "Maximum"
        assert str(tf["dimensions"]) == str({"QueueName": f"${{aws_sqs_queue.{queue}.name}}"})
        assert sam["AlarmActions"] == [{"Ref": "AlarmTopic"}]
