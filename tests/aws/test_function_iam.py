"""Every function's permissions, in template.yaml and in infra/ alike, judged against what the real
functions do over moto: each call a function makes while the estate boots, scales out,
enrolls agents, takes admin actions and reconciles is granted to its role; and the agent API's
writes are narrow enough that it cannot steer policy (a bundle pointer, the active policy, the
engine head, a workload's labels, mode or quarantine).

moto checks no IAM (a missing grant showed only in AWS, as AccessDenied), so calls are recorded
from the real handlers and judged against the deployed statements by :func:`allowed`, which
evaluates only what these statements use (Allow, actions, table resources,
``ForAllValues:StringLike`` / ``StringEquals`` on ``dynamodb:LeadingKeys`` and
``dynamodb:Attributes``) and refuses any other condition rather than guess. No maintained library
evaluates DynamoDB condition keys offline (moto's IAM ignores conditions), hence this one.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence.local.lambdas import load_functions
from tests.aws.conftest import Env, LambdaContext, ip_of
from tests.aws.test_agent_api import enroll_pairing, give_instance_profile, register_onprem, sts_request
from tests.aws.test_attack_token_renewal import renew
from tests.aws.test_governance import DEVELOPER, ESCALATION, retag
from tests.aws.test_lifecycle_gate import heartbeat, launch
from tests.aws.test_pipeline import AgentKey, _scheduled, agent_key, boot, enroll_iid, enroll_instance, iid_document
from tests.aws.test_static import cfn_conditions, hcl, template, tf_conditions
from tests.tokenage import age

ROOT = Path(__file__).resolve().parents[2]
TABLES = {f"rf-{t}": t for t in ("state", "inventory", "audit", "idempotency")}
PARTITION_KEY = {"state": "pk", "inventory": "id", "audit": "pk", "idempotency": "id"}
WRITES = {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"}
# the test estate's function → its SAM resource (the Terraform statements are keyed by the former)
SAM = {
    "ingest": "IngestFunction",
    "compute": "ComputeFunction",
    "publish": "PublishFunction",
    "lifecycle": "LifecycleFunction",
    "reconcile": "ReconcileFunction",
    "agentapi": "AgentApiFunction",
    "admin": "AdminFunction",
    "wsconnect": "NudgeConnectFunction",
    "perimeter": "PerimeterFunction",
    "flows": "FlowsFunction",
    "gcpevents": "GcpEventsFunction",
    "azureevents": "AzureEventsFunction",
    "cloudreconcile": "CloudReconcileFunction",
    "anchor": "AnchorFunction",
}
# what an expression names that is not an attribute
_WORDS = {"SET", "REMOVE", "ADD", "DELETE", "AND", "OR", "NOT", "BETWEEN", "IN"}
_FUNCTIONS = {"attribute_exists", "attribute_not_exists", "attribute_type", "begins_with", "contains", "size"}
_FUNCTIONS |= {"if_not_exists", "list_append"}

# action patterns, resources ("*", "table:<name>", "s3:<key pattern>", "s3bucket", "flowlogs:<key
# pattern>", "anchors:<key pattern>" and "anchorsbucket" (the audit anchor bucket), other), conditions
Statement = tuple[set[str], set[str], list[tuple[str, str, list[str]]]]
Request = tuple[str, str, dict[str, list[str]]]  # action, table, condition context


# --- the deployed statements ---------------------------------------------------------------------


def _sam_resource(t: Any) -> str:
    if t == "*":
        return "*"
    if isinstance(t, dict) and "If" in t:  # a resource only under a condition: its Then branch
        t = t["If"][1]
    att = t.get("GetAtt") if isinstance(t, dict) else None
    if isinstance(att, str) and att.endswith("Table.Arn"):
        return "table:" + att.removesuffix("Table.Arn").lower()
    sub = t.get("Sub") if isinstance(t, dict) else None
    if isinstance(sub, str) and "${FlowLogBucketName}/" in sub:
        return "flowlogs:" + sub.split("${FlowLogBucketName}/", 1)[1]
    if isinstance(sub, str) and sub.startswith("${BundleBucket.Arn}"):
        key = sub.removeprefix("${BundleBucket.Arn}")
        return "s3:" + key.removeprefix("/") if key else "s3bucket"
    if isinstance(sub, str) and sub.startswith("${AuditAnchorBucket.Arn}"):
        key = sub.removeprefix("${AuditAnchorBucket.Arn}")
        return "anchors:" + key.removeprefix("/") if key else "anchorsbucket"
    if att == "AuditAnchorBucket.Arn":
        return "anchorsbucket"
    return f"other:{t}"


def sam_statements(fn: str = "agentapi") -> list[Statement]:
    """Every Allow statement of the function's role (an !If's Then branch: as deployed with its
    parameter set)."""
    out: list[Statement] = []
    for policy in template()["Resources"][SAM[fn]]["Properties"].get("Policies", []):
        for st in policy.get("Statement", []) if isinstance(policy, dict) else []:
            if isinstance(st, dict) and "If" in st:
                st = st["If"][1]
            if not isinstance(st, dict) or st.get("Effect") != "Allow":
                continue
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            targets = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            conds = [
                (op, key, v if isinstance(v, list) else [v])
                for op, kv in cfn_conditions(st).items()
                for key, v in kv.items()
            ]
            out.append((set(actions), {_sam_resource(t) for t in targets}, conds))
    return out


_TF_STATEMENT = re.compile(
    # conditions: a list of {…} whose values are lists (several conditions read, not the first)
    r"\{actions = (\[[^\]]*\]), resources = (\[[^\]]*\]|local\.\w+)(?:, conditions = (\[(?:[^\[\]]|\[[^\]]*\])*\]))?\}"
)
_TF_CONDITION = re.compile(r'test = "([^"]+)", variable = "([^"]+)", values = (\[[^\]]*\])')


def _tf_resource(r: str) -> str:
    r = r.strip().strip('"')
    if r == "*":
        return "*"
    table = re.search(r"aws_dynamodb_table\.(\w+)\.arn", r)
    if table:
        return "table:" + table[1]
    if "${var.flow_log_bucket_name}/" in r:
        return "flowlogs:" + r.split("${var.flow_log_bucket_name}/", 1)[1]
    m = re.fullmatch(r"\$?\{?aws_s3_bucket\.bundles\.arn\}?(/.*)?", r)
    if m:
        return "s3:" + m[1][1:] if m[1] else "s3bucket"
    m = re.fullmatch(r"\$?\{?aws_s3_bucket\.anchors\.arn\}?(/.*)?", r)
    if m:
        return "anchors:" + m[1][1:] if m[1] else "anchorsbucket"
    return f"other:{r}"


def terraform_statements(fn: str = "agentapi") -> list[Statement]:
    """Every statement of the function's role in infra/ (shared locals resolved)."""
    lam = hcl(ROOT / "infra/modules/ringfence/lambda.tf")
    loc: dict[str, Any] = {}
    for block in lam.get("locals", []):
        loc.update(block)

    def local(ref: Any) -> Any:
        return loc[ref[2:-1].removeprefix("local.")] if isinstance(ref, str) and ref.startswith("${local.") else ref

    listed = loc["statements"][fn]
    out: list[Statement] = []
    blocks: list[dict[str, Any]] = []
    if isinstance(listed, str):  # concat([...], ...): python-hcl2 keeps the expression's text
        for actions, resources, conditions in _TF_STATEMENT.findall(listed):
            conds = [(t, v, json.loads(vals)) for t, v, vals in _TF_CONDITION.findall(conditions or "")]
            items = re.findall(r'"[^"]*"|[\w.${}/*-]+', resources[1:-1]) if resources.startswith("[") else []
            out.append((set(json.loads(actions)), {_tf_resource(r) for r in items}, conds))
        assert out, f"no statement read from {fn}'s concat"
        blocks = [loc[name] for name in re.findall(r"local\.(\w+)", listed) if isinstance(loc.get(name), dict)]
    else:
        blocks = [b for b in map(local, listed) if isinstance(b, dict)]
    for b in blocks:
        res = b["resources"]  # a list, or a concat(...) expression's text: its quoted ARNs
        items = res if isinstance(res, list) else re.findall(r'"([^"]*)"', res)
        conds = [(c["test"], c["variable"], list(c["values"])) for c in map(local, tf_conditions(b))]
        out.append((set(b["actions"]), {_tf_resource(str(r)) for r in items}, conds))
    return out


# AWS answers these for any caller, whatever its policies say ("No permissions are required to
# perform this operation": the STS API reference, GetCallerIdentity)
NEEDS_NO_PERMISSION = {"sts:GetCallerIdentity"}


def granted(statements: list[Statement], action: str, resource: str | None) -> bool:
    """Some statement grants the action (patterns as IAM matches them) on the resource; None: the
    resource is not judged here (queues, instances, keys: their ARNs are the deployment's)."""
    if action in NEEDS_NO_PERMISSION:
        return True
    for actions, resources, _ in statements:
        if not any(fnmatch.fnmatchcase(action, a) for a in actions):
            continue
        if resource is None or "*" in resources or any(fnmatch.fnmatchcase(resource, r) for r in resources):
            return True
    return False


# the API operation → the IAM action it needs, where the names differ
_ACTION = {
    ("s3", "HeadObject"): "s3:GetObject",
    ("s3", "ListObjectsV2"): "s3:ListBucket",
    ("s3", "ListObjects"): "s3:ListBucket",
    ("sqs", "SendMessageBatch"): "sqs:SendMessage",
    ("sqs", "DeleteMessageBatch"): "sqs:DeleteMessage",
    ("sqs", "ChangeMessageVisibilityBatch"): "sqs:ChangeMessageVisibility",
    ("execute-api", "PostToConnection"): "execute-api:ManageConnections",
    ("execute-api", "GetConnection"): "execute-api:ManageConnections",
    ("execute-api", "DeleteConnection"): "execute-api:ManageConnections",
}


def action_of(
    service: str, op: str, params: dict[str, Any], bucket: str, flow_logs: Iterable[str] = (), anchors: str = ""
) -> tuple[str, str | None]:
    action = _ACTION.get((service, op), f"{service}:{op}")
    if service == "s3":
        if params.get("Bucket") in flow_logs:
            return action, "flowlogs:" + str(params.get("Key", ""))
        if anchors and params.get("Bucket") == anchors:
            return action, ("anchorsbucket" if action == "s3:ListBucket" else "anchors:" + str(params.get("Key", "")))
        if params.get("Bucket") != bucket:
            return action, f"other-bucket:{params.get('Bucket')}"
        return action, ("s3bucket" if action == "s3:ListBucket" else "s3:" + str(params.get("Key", "")))
    return action, None


def allowed(statements: list[Statement], request: Request) -> bool:
    """A DynamoDB request is granted on its table, its conditions holding for its context."""
    action, table, context = request
    for actions, resources, conds in statements:
        if f"dynamodb:{action}" not in actions or f"table:{table}" not in resources:
            continue
        if all(_holds(op, key, values, context) for op, key, values in conds):
            return True
    return False


def _holds(op: str, key: str, values: list[str], context: dict[str, list[str]]) -> bool:
    given = context.get(key, [])
    if op == "ForAllValues:StringLike":
        return all(any(fnmatch.fnmatchcase(g, v) for v in values) for g in given)
    if op == "ForAllValues:StringEquals":
        return all(g in values for g in given)
    raise AssertionError(f"condition {op} on {key}: not evaluated here, so not judged")


# --- requests, as DynamoDB sees them -------------------------------------------------------------


def _plain(v: Any) -> str:
    """A key value as the condition key holds it (typed {'S': ...} or plain, by handler order)."""
    if isinstance(v, dict) and len(v) == 1:
        return str(next(iter(v.values())))
    return str(v)


def _names(expr: str | None, aliases: dict[str, str]) -> set[str]:
    out = set()
    for tok in re.findall(r"[#:]?[A-Za-z_][A-Za-z0-9_]*", expr or ""):
        if tok.startswith(":") or tok.upper() in _WORDS or tok in _FUNCTIONS:
            continue
        out.add(aliases.get(tok, tok))
    return out


def requests_of(op: str, params: dict[str, Any]) -> list[Request]:
    """The (action, table, context) of one call: per item for batches and transactions."""
    if op == "BatchWriteItem":
        out: list[Request] = []
        for name, reqs in params["RequestItems"].items():
            for r in reqs:
                if "PutRequest" in r:
                    out += requests_of("PutItem", {"TableName": name, "Item": r["PutRequest"]["Item"]})
                else:
                    out += requests_of("DeleteItem", {"TableName": name, "Key": r["DeleteRequest"]["Key"]})
        return [("BatchWriteItem", t, c) for _, t, c in out]
    if op == "TransactWriteItems":
        out = []
        for item in params["TransactItems"]:
            (kind, body), *_ = item.items()
            action = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem"}.get(kind, "ConditionCheckItem")
            out += requests_of(action, body)
        return out
    if op in ("BatchGetItem", "TransactGetItems"):
        names = (
            params["RequestItems"] if op == "BatchGetItem" else [i["Get"]["TableName"] for i in params["TransactItems"]]
        )
        return [(op, TABLES.get(n, n), {}) for n in names]
    table = TABLES.get(params["TableName"], params["TableName"])
    if op in ("Query", "Scan", "DescribeTable"):
        return [(op, table, {})]  # reads: no statement here conditions them
    key = params.get("Item") if op == "PutItem" else params.get("Key", {})
    assert key is not None
    aliases = params.get("ExpressionAttributeNames", {})
    attrs = (
        set(key) | _names(params.get("UpdateExpression"), aliases) | _names(params.get("ConditionExpression"), aliases)
    )
    pk = PARTITION_KEY.get(table, "pk")
    return [(op, table, {"dynamodb:LeadingKeys": [_plain(key[pk])], "dynamodb:Attributes": sorted(attrs)})]


class Recorder:
    """Every DynamoDB call made while a function handles an event, by function."""

    def __init__(self, env: Env, flow_logs: Iterable[str] = (), anchors: str = "") -> None:
        self.flow_logs = tuple(flow_logs)  # buckets where VPC Flow Logs are delivered
        self.anchors = anchors  # the audit anchor bucket
        self.current: str | None = None
        self.calls: dict[str, list[Request]] = {}
        self.other: dict[str, list[tuple[str, str | None]]] = {}  # every other service's calls
        self.bucket = env.bucket
        env.hook("before-parameter-build", self._seen)
        for name, fn in env.fn.items():
            fn.handler = self._recorded(name, fn.handler)

    def _recorded(self, name: str, handler: Any) -> Any:
        def recorded(event: Any, context: Any) -> Any:
            self.current = name
            try:
                return handler(event, context)
            finally:
                self.current = None

        return recorded

    def _seen(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        if self.current is None:
            return
        service = model.service_model.signing_name
        if service == "dynamodb":
            self.calls.setdefault(self.current, []).extend(requests_of(model.name, params))
        else:
            call = action_of(service, model.name, params, self.bucket, self.flow_logs, self.anchors)
            self.other.setdefault(self.current, []).append(call)

    @property
    def writes(self) -> list[Request]:
        return [c for c in self.calls.get("agentapi", []) if c[0] in WRITES]


def refusals(rec: Recorder, fns: Iterable[str]) -> dict[tuple[str, str], list[Any]]:
    """What each function called that its role is not granted, per deployment (empty: all granted)."""
    out: dict[tuple[str, str], list[Any]] = {}
    for fn in fns:
        for where, statements_of in (("template.yaml", sam_statements), ("infra/", terraform_statements)):
            statements = statements_of(fn)
            denied: set[Any] = {(a, t) for a, t, c in rec.calls.get(fn, []) if not allowed(statements, (a, t, c))}
            denied |= {(a, r) for a, r in rec.other.get(fn, []) if not granted(statements, a, r)}
            if denied:
                out[(where, fn)] = sorted(denied, key=str)
    return out


@pytest.fixture
def agent_stack(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """Launch gate "agent" and aws-sts on, so the launch hold and both enrollments are written."""
    monkeypatch.setenv("RINGFENCE_LIFECYCLE_GATE", "agent")
    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,aws-sts")
    monkeypatch.setenv("RINGFENCE_STS_ENDPOINTS", env.url)
    env.load_functions()
    yield env
    os.environ.pop("RINGFENCE_LIFECYCLE_GATE", None)


def test_every_write_the_agent_api_makes_is_allowed_and_steering_writes_are_not(agent_stack: Env) -> None:
    env = agent_stack
    new = launch(env)
    env.pump()
    rec = Recorder(env)
    token = enroll_instance(env, new)  # nonce, enroll, key binding, token, audit
    heartbeat(env, new, token, None)
    ptr = env.store.bundle_pointer(new)
    assert ptr is not None
    heartbeat(env, new, token, ptr.version)  # enforces: the launch hold records it
    auth = {"Authorization": f"Bearer {token}"}
    body = {"applied_version": ptr.version, "mode": "enforce", "kernel_digest": "0" * 64}
    assert env.rest("agentapi", "POST", f"/v1/agents/{new}/heartbeat", body, headers=auth)[0] == 200
    assert env.rest("agentapi", "GET", f"/v1/agents/{new}/bundle", headers=auth)[0] == 200
    assert env.rest("agentapi", "POST", f"/v1/agents/{new}/reports", {"flows": [], "drops": []}, headers=auth)[0] == 202
    env.store.set_liveness(new, offline=True)
    heartbeat(env, new, token, ptr.version)  # back online
    age(env.store, new, token)  # renewable by token (half its lifetime gone; the test's own write)
    assert renew(env, new, agent_key(new), token)[0] == 200  # a renewal without a nonce: its once-claim
    running = env.ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["running"]}])
    web = next(i["InstanceId"] for r in running["Reservations"] for i in r["Instances"] if i["InstanceId"] != new)
    give_instance_profile(env, web)
    _, _, n = env.rest("agentapi", "GET", "/v1/nonce")
    status, _, answer = env.rest("agentapi", "POST", "/v1/enroll", sts_request(env, web, n["nonce"]))
    assert status == 200, answer

    kinds = {(a, t, c["dynamodb:LeadingKeys"][0].split("#")[0]) for a, t, c in rec.writes}
    for expected in (
        ("PutItem", "state", "nonce"),
        ("DeleteItem", "state", "nonce"),
        ("PutItem", "state", "token"),
        ("PutItem", "state", "agentkey"),
        ("UpdateItem", "state", "enforcing"),
        ("PutItem", "state", "enforcement"),
        ("UpdateItem", "inventory", new),
        ("PutItem", "state", "once"),  # the nonce-free renewal's claim
        ("UpdateItem", "state", "rquota"),  # the report quota's count
    ):
        assert expected in kinds, (expected, sorted(k for k in kinds if not k[2].startswith("i-")))
    deployments = {"template.yaml": sam_statements(), "infra/": terraform_statements()}
    for where, statements in deployments.items():
        refused = [w for w in rec.writes if w[1] != "audit" and not allowed(statements, w)]
        assert not refused, (where, refused)
        for attack in (
            ("UpdateItem", "inventory", {"dynamodb:LeadingKeys": [new], "dynamodb:Attributes": ["id", "op_mode"]}),
            (
                "UpdateItem",
                "inventory",
                {"dynamodb:LeadingKeys": [new], "dynamodb:Attributes": ["id", "op_quarantined"]},
            ),
            ("UpdateItem", "inventory", {"dynamodb:LeadingKeys": [new], "dynamodb:Attributes": ["id", "doc"]}),
            ("PutItem", "inventory", {"dynamodb:LeadingKeys": [new], "dynamodb:Attributes": ["id"]}),
            ("DeleteItem", "inventory", {"dynamodb:LeadingKeys": [new], "dynamodb:Attributes": ["id"]}),
            ("PutItem", "state", {"dynamodb:LeadingKeys": ["policy"], "dynamodb:Attributes": ["pk", "sk", "doc"]}),
            ("PutItem", "state", {"dynamodb:LeadingKeys": [f"bundle#{new}"], "dynamodb:Attributes": ["pk", "sk"]}),
            ("UpdateItem", "state", {"dynamodb:LeadingKeys": ["engine"], "dynamodb:Attributes": ["pk", "sk"]}),
            ("DeleteItem", "state", {"dynamodb:LeadingKeys": [f"sethead#{new}"], "dynamodb:Attributes": ["pk", "sk"]}),
            ("PutItem", "state", {"dynamodb:LeadingKeys": ["once#announced#x"], "dynamodb:Attributes": ["pk", "sk"]}),
            # compute's half of a launch hold: a written released_at would leave the launch to ABANDON
            ("UpdateItem", "state", {"dynamodb:LeadingKeys": [f"launch#{new}"], "dynamodb:Attributes": ["pk", "sk"]}),
            # the report quota's items: their count and TTL only, never replaced or deleted
            (
                "UpdateItem",
                "state",
                {"dynamodb:LeadingKeys": [f"rquota#{new}"], "dynamodb:Attributes": ["pk", "sk", "doc"]},
            ),
            ("PutItem", "state", {"dynamodb:LeadingKeys": [f"rquota#{new}"], "dynamodb:Attributes": ["pk", "sk"]}),
            ("DeleteItem", "state", {"dynamodb:LeadingKeys": [f"rquota#{new}"], "dynamodb:Attributes": ["pk", "sk"]}),
        ):
            assert not allowed(statements, attack), (where, attack)


def test_the_evaluator_reads_the_keys_of_each_kind_of_write() -> None:
    """The context :func:`requests_of` builds is what IAM is given: the partition key's value and
    every top-level attribute named (aliases resolved, values and functions left out)."""
    got = requests_of(
        "UpdateItem",
        {
            "TableName": "rf-inventory",
            "Key": {"id": {"S": "i-1"}},
            "UpdateExpression": "SET enrolled = :e, #offline = :o",
            "ConditionExpression": "attribute_exists(id)",
            "ExpressionAttributeNames": {"#offline": "offline"},
        },
    )
    assert got == [
        (
            "UpdateItem",
            "inventory",
            {"dynamodb:LeadingKeys": ["i-1"], "dynamodb:Attributes": ["enrolled", "id", "offline"]},
        )
    ]
    batch = requests_of(
        "BatchWriteItem", {"RequestItems": {"rf-state": [{"PutRequest": {"Item": {"pk": "a#1", "sk": "x"}}}]}}
    )
    assert batch == [
        ("BatchWriteItem", "state", {"dynamodb:LeadingKeys": ["a#1"], "dynamodb:Attributes": ["pk", "sk"]})
    ]
    # grants by action and the bucket's prefix: the agent API reads the key, never writes a bundle
    for statements_of in (sam_statements, terraform_statements):
        api = statements_of("agentapi")
        assert granted(api, "s3:GetObject", "s3:keys/bundle-signing.pub.pem")
        assert granted(api, "s3:PutObject", "s3:reports/i-1/x.json")
        assert not granted(api, "s3:PutObject", "s3:bundles/i-1/1.json")
        assert not granted(api, "kms:Sign", None) and not granted(api, "autoscaling:CompleteLifecycleAction", None)
        assert granted(statements_of("compute"), "autoscaling:CompleteLifecycleAction", None)
    assert action_of("s3", "HeadObject", {"Bucket": "b", "Key": "k"}, "b") == ("s3:GetObject", "s3:k")
    assert action_of("s3", "GetObject", {"Bucket": "logs", "Key": "k"}, "b")[1] == "other-bucket:logs"
    with pytest.raises(AssertionError, match="not evaluated"):
        allowed(
            [({"dynamodb:BatchWriteItem"}, {"table:state"}, [("StringEqualsIfExists", "dynamodb:Select", ["x"])])],
            batch[0],
        )


def _launched_enrolled_connected(env: Env) -> tuple[str, str]:
    """An instance launched through the pipeline (ingest, perimeter, compute, publish), its agent
    enrolled before the launch is ingested (the agent often is first), its first heartbeat (compute
    completes the launch) and its WebSocket $connect: (its id, its token)."""
    new = launch(env)
    token = enroll_instance(env, new)
    env.pump()
    ptr = env.store.bundle_pointer(new)
    assert ptr is not None
    heartbeat(env, new, token, ptr.version)
    env.pump()
    connect = {
        "requestContext": {"routeKey": "$connect", "connectionId": "c-1", "eventType": "CONNECT", "stage": "v1"},
        "queryStringParameters": None,
        "headers": {"Authorization": f"Bearer {token}"},
        "isBase64Encoded": False,
    }
    assert env.fn["wsconnect"].handler(connect, LambdaContext())["statusCode"] == 200
    return new, token


def test_every_call_every_function_makes_is_granted_in_both_deployments(agent_stack: Env) -> None:
    """The estate boots, scales out behind the agent launch gate, agents enroll and report, an
    administrator acts, reconcile runs, an instance terminates: every AWS call each function made
    is one its role is granted, in template.yaml and in infra/ alike (DynamoDB by table and
    condition keys, S3 by the bucket's prefix, the rest by action)."""
    env = agent_stack
    rec = Recorder(env)
    new, token = _launched_enrolled_connected(env)
    auth = {"Authorization": f"Bearer {token}"}
    assert env.rest("agentapi", "GET", f"/v1/agents/{new}/deltas", headers=auth, query={"after": "0"})[0] in (200, 409)
    for method, path, body in (
        ("PUT", f"/admin/workloads/{new}/mode", {"mode": "observe"}),
        ("POST", f"/admin/workloads/{new}/quarantine", {"reason": "ir-1"}),
        ("DELETE", f"/admin/workloads/{new}/quarantine", {"reason": "ir-1 closed"}),
        ("POST", "/admin/pairing-keys", {"workload_id": new, "uses": 1, "ttl": 600}),
        ("DELETE", f"/admin/workloads/{new}/agent-key", {"reason": "rotated"}),
        ("GET", "/admin/findings", None),
        ("GET", "/admin/map", None),
    ):
        status, _, answer = env.rest("admin", method, path, body)
        assert status in (200, 201, 409), (path, status, answer)
    env.pump()
    # a developer tags the instance into a privileged value: held, a finding (its audit record,
    # its once#counted# claim: governance's, made by every function whose events name a principal)
    retag(env, new, ESCALATION, DEVELOPER)
    assert any(a.action == "label.held" and a.target == new for a in env.store.audit_log())
    counted = [c for c in rec.calls.get("ingest", []) if _names_counted(c)]
    assert counted, "the finding made no counted claim: the scenario misses it"
    assert "offline" in env.fn["reconcile"].handler(_scheduled(), LambdaContext())
    env.ec2.terminate_instances(InstanceIds=[new])
    env.put(env.state_event(new, "terminated"))
    env.pump()

    fns = ("ingest", "compute", "publish", "lifecycle", "perimeter", "agentapi", "admin", "wsconnect", "reconcile")
    for fn in fns:
        assert rec.calls.get(fn), f"{fn} made no DynamoDB call: the scenario misses it"
    seen = {a.split(":")[0] for calls in rec.other.values() for a, _ in calls}
    assert {"s3", "sqs", "ec2", "autoscaling"} <= seen, seen
    assert not refusals(rec, fns)
    # the other clouds' event functions raise the same finding with the same claim (tests/gcp,
    # tests/azure record their calls over moto without one)
    for fn in FINDS:
        for where, statements_of in (("template.yaml", sam_statements), ("infra/", terraform_statements)):
            assert all(allowed(statements_of(fn), c) for c in counted), (where, fn, counted)


def _names_counted(request: Request) -> bool:
    action, table, context = request
    return (
        action == "PutItem"
        and table == "state"
        and any(k.startswith("once#counted#") for k in context.get("dynamodb:LeadingKeys", []))
    )


def test_a_pairing_enrollment_is_granted_in_both_deployments(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pairing spends its use, checks that the key's workload index item exists (a key that no
    revocation finds enrolls nothing) and binds the agent key in one transaction: each item is
    granted to the agent API, the index check on ``pairingof#`` items only."""
    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,pairing")
    env.load_functions()
    register_onprem(env, "dc1-db-1", "192.168.10.5")
    status, _, key = env.rest("admin", "POST", "/admin/pairing-keys", {"workload_id": "dc1-db-1", "uses": 1, "ttl": 60})
    assert status == 201, key
    rec = Recorder(env)
    status, body = enroll_pairing(env, "dc1-db-1", key["pairing_key"])
    assert status == 200, body
    checks = [c for c in rec.calls.get("agentapi", []) if c[0] == "ConditionCheckItem"]
    assert [c["dynamodb:LeadingKeys"][0].split("#")[0] for _, _, c in checks] == ["pairingof"], checks
    assert not refusals(rec, ("agentapi",))
    for statements_of in (sam_statements, terraform_statements):
        check = ("ConditionCheckItem", "state", {"dynamodb:LeadingKeys": ["policy"], "dynamodb:Attributes": ["pk"]})
        assert not allowed(statements_of("agentapi"), check), "the check is granted on the index only"


# --- the functions an outsider can reach or feed ---------------------------------------------------
# wsconnect: the WebSocket $connect route (no authorizer); gcpevents / azureevents: POST
# /gcp|azure/events on the agent API; flows: agents' report objects; ingest, lifecycle: cloud
# events; reconcile, cloudreconcile, perimeter: what the clouds' APIs answer; anchor: the audit
# chain. Code running in any of them must not steer what compute signs (the agent API, which
# enrolls and so writes tokens and keys, has its own test above).
ATTACKER_FED = (
    "ingest",
    "lifecycle",
    "reconcile",
    "perimeter",
    "flows",
    "wsconnect",
    "gcpevents",
    "azureevents",
    "cloudreconcile",
    "anchor",
)
# the state items a retirement removes (control/credentials.py retire: tokens and the connection,
# never the agent key binding or a reset's named next key): the only deletions there
# the functions whose events name a call's principal, and so raise privileged-label findings
# (control/governance.py); the scheduled passes (reconcile, cloudreconcile) pass no principal
FINDS = ("ingest", "gcpevents", "azureevents")
RETIRES = {"ingest", "lifecycle", "reconcile", "gcpevents", "azureevents", "cloudreconcile"}


def _steering(fn: str) -> Iterator[Request]:
    """Writes that would steer signing or impersonate an agent: the active policy (its item and
    counter), a bundle pointer, an agent token and a key binding, in every write form."""
    wid = "i-0123456789abcdef0"
    for action in ("PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem"):
        for pk, attrs in (
            ("policy", ["pk", "sk", "doc", "number"]),
            (f"bundle#{wid}", ["pk", "sk", "version", "doc"]),
            ("engine", ["pk", "sk", "policy_version"]),
            (f"token#{'0' * 64}", ["pk", "sk", "workload_id", "agent_key", "ttl"]),
            (f"tokenof#{wid}", ["pk", "sk", "hash", "ttl"]),
            (f"agentkey#{wid}", ["pk", "sk", "public_key"]),
            (f"nextkey#{wid}", ["pk", "sk", "key_id"]),
        ):
            if action == "DeleteItem" and fn in RETIRES and pk.split("#")[0] in ("token", "tokenof"):
                continue  # a retirement revokes tokens; it writes none, and never unbinds a key
            yield (action, "state", {"dynamodb:LeadingKeys": [pk], "dynamodb:Attributes": attrs})


@pytest.mark.parametrize("fn", ATTACKER_FED)
def test_attack_an_internet_fed_role_cannot_write_the_active_policy_a_bundle_pointer_a_token_or_a_key(fn: str) -> None:
    """In template.yaml and in infra/ alike: each such role's state-table writes are conditioned on
    the partition keys its code writes, so none of the steering writes is granted (before: wsconnect,
    gcpevents, azureevents and cloudreconcile held unconditional PutItem, flows UpdateItem; the
    retiring roles could delete any workload's ``agentkey#`` and ``nextkey#``, so that a copied
    identity document bound another key to a running workload). Nor may any of them set a
    workload's operator mode (``op_mode``) on its inventory record (before: unconditioned UpdateItem)."""
    mode = ("UpdateItem", "inventory", {"dynamodb:LeadingKeys": ["i-1"], "dynamodb:Attributes": ["id", "op_mode"]})
    for where, statements_of in (("template.yaml", sam_statements), ("infra/", terraform_statements)):
        statements = statements_of(fn)
        granted_ = [w for w in _steering(fn) if allowed(statements, w)]
        assert not granted_, (where, fn, granted_)
        assert not allowed(statements, mode), (where, fn, "op_mode")


def test_attack_a_retire_path_cannot_unbind_an_agent_key_so_a_copied_identity_document_binds_no_other_key(
    env: Env,
) -> None:
    """Real handlers over moto. A departed instance's retirement (ingest, lifecycle, reconcile)
    revokes its token and drops its connection, all granted, and deletes no ``agentkey#`` or
    ``nextkey#`` item: its key binding stays. A running workload retired by code in a retiring role
    (credentials.retire, as a forged deletion event would drive it) keeps its key, and the
    deletions that would unbind it are refused to every retiring role in both deployments. So an
    enrollment with a copy of the instance's identity document (they never expire) and another
    key is refused, while the genuine agent re-enrolls with its own key (before: the retire path
    deleted both items and was granted to do so for any workload; the copy then bound the holder's
    key to the running workload)."""
    from ringfence.clouds.aws.wiring import Wiring
    from ringfence.control import credentials
    from ringfence.control.wiring import Config

    rec = Recorder(env)  # before the first call: the functions keep the clients they made
    est = boot(env)
    gone, running = est["ids"]["web"][0], est["ids"]["db"][0]
    copies = {}
    for wid in (gone, running):
        enroll_instance(env, wid)
        copies[wid] = iid_document(env, wid)  # a copy of the document: a log, a backup
    keys = {wid: env.store.agent_key(wid) for wid in (gone, running)}
    assert all(keys.values())
    env.ec2.terminate_instances(InstanceIds=[gone])
    env.put(env.state_event(gone, "terminated"))
    env.pump()
    env.fn["reconcile"].handler(_scheduled(), LambdaContext())
    assert env.store.get(gone).state == "terminated"
    assert env.ddb.Table("rf-state").get_item(Key={"pk": f"tokenof#{gone}", "sk": "token"}).get("Item") is None
    assert env.store.agent_key(gone) == keys[gone]  # the binding stays: the id is never reused
    deleted = {
        c["dynamodb:LeadingKeys"][0].split("#")[0]
        for fn in RETIRES
        for a, t, c in rec.calls.get(fn, [])
        if a == "DeleteItem" and t == "state"
    }
    assert "tokenof" in deleted and not deleted & {"agentkey", "nextkey"}, deleted
    assert not refusals(rec, ("ingest", "lifecycle", "reconcile"))

    # the running workload, retired as code in such a role could: its token goes, its key stays
    credentials.retire(Wiring(Config.from_env()), running, "forged deletion")
    assert env.store.agent_key(running) == keys[running]
    for fn in sorted(RETIRES):
        for statements_of in (sam_statements, terraform_statements):
            for pk in (f"agentkey#{running}", f"nextkey#{running}"):
                req = ("DeleteItem", "state", {"dynamodb:LeadingKeys": [pk], "dynamodb:Attributes": ["pk", "sk"]})
                assert not allowed(statements_of(fn), req), (fn, pk)
    for wid in (gone, running):
        status, body = enroll_iid(env, wid, document=copies[wid], key=AgentKey())
        assert status != 200, (wid, body)
        assert env.store.agent_key(wid) == keys[wid]
    status, body = enroll_iid(env, running, document=copies[running])  # the genuine agent's key
    assert status == 200, body


def test_attack_a_policy_item_forged_in_the_wsconnect_and_flows_roles_is_refused_and_their_own_writes_are_not(
    agent_stack: Env,
) -> None:
    """The real handlers over moto, recorded: an agent's $connect (wsconnect), its report object
    (flows), its instance terminated (ingest revokes its token) and reconcile each make
    writes that their roles grant, in both deployments. The forged active-policy item the review
    wrote with the wsconnect role (PutItem ``policy/active`` with inline files and a matching
    digest), and the same written by flows as an update, are calls those roles are refused."""
    env = agent_stack
    env.fn["flows"] = load_functions(["flows"], ROOT / "functions")["flows"]
    rec = Recorder(env)  # before the first call: the functions keep the clients they made
    new, _ = _launched_enrolled_connected(env)
    now = int(time.time())
    batch = {"flows": [{"start": now, "end": now + 5, "src": ip_of(env, new), "dst": "10.0.0.2", "proto": "tcp",
                        "dport": 443, "packets": 1, "bytes": 60, "direction": "outbound"}]}  # fmt: skip
    key = f"reports/{new}/2026/12/06/a.json"
    env.s3.put_object(Bucket=env.bucket, Key=key, Body=json.dumps(batch).encode())
    detail = {"bucket": {"name": env.bucket}, "object": {"key": key}}
    env.fn["flows"].handler({"source": "aws.s3", "detail-type": "Object Created", "detail": detail}, LambdaContext())
    env.ec2.terminate_instances(InstanceIds=[new])
    env.put(env.state_event(new, "terminated"))
    env.pump()
    env.fn["reconcile"].handler(_scheduled(), LambdaContext())

    kinds = {
        (fn, a, c["dynamodb:LeadingKeys"][0].split("#")[0])
        for fn, calls in rec.calls.items()
        for a, t, c in calls
        if a in WRITES
    }
    for expected in (
        ("wsconnect", "PutItem", "conn"),
        ("flows", "UpdateItem", "flows"),
        ("ingest", "DeleteItem", "tokenof"),
        ("ingest", "DeleteItem", "conn"),
    ):
        assert expected in kinds, (expected, sorted(k for k in kinds if not k[2].startswith("i-")))
    unbinds = {k for k in kinds if k[0] in RETIRES and k[1] == "DeleteItem" and k[2] in ("agentkey", "nextkey")}
    assert not unbinds, unbinds
    fns = ("wsconnect", "flows", "ingest", "lifecycle", "reconcile")
    assert not refusals(rec, fns)

    # code running in those functions: the review's forged item, judged as DynamoDB would be
    # given it by that role (and, in moto, accepted: moto checks no IAM)
    active = env.store.active_policy()
    assert active is not None
    forged = {"pk": "policy", "sk": "active", "doc": active.model_dump_json(), "number": active.number + 1}
    put = {"TableName": "rf-state", "Item": forged}
    update = {
        "TableName": "rf-state",
        "Key": {"pk": "policy", "sk": "active"},
        "UpdateExpression": "SET doc = :d, #n = :n",
        "ExpressionAttributeNames": {"#n": "number"},
        "ExpressionAttributeValues": {":d": forged["doc"], ":n": forged["number"]},
    }
    env.ddb.meta.client.put_item(**put)
    env.ddb.meta.client.update_item(**update)
    for fn in ("wsconnect", "flows"):
        rec.calls[fn] += requests_of("PutItem", put) + requests_of("UpdateItem", update)
    refused = refusals(rec, ("wsconnect", "flows"))
    for where in ("template.yaml", "infra/"):
        for fn in ("wsconnect", "flows"):
            assert refused.get((where, fn)) == [("PutItem", "state"), ("UpdateItem", "state")], (where, fn, refused)


# --- the SIEM copy ---------------------------------------------------------------------------------


def _audit_writers(statements_of: Any) -> set[str]:
    """The functions whose role may write an audit record (PutItem on the audit table)."""
    return {fn for fn in SAM if allowed(statements_of(fn), ("PutItem", "audit", {}))}


def _sam_siem(fn: str) -> set[str]:
    """The SIEM targets the function's SAM role may send to (both given their SiemTarget)."""
    out = set()
    for policy in template()["Resources"][SAM[fn]]["Properties"].get("Policies", []):
        for st in policy.get("Statement", []) if isinstance(policy, dict) else []:
            if not (isinstance(st, dict) and "If" in st and st["If"][0] in ("SiemToEventBridge", "SiemToCloudWatch")):
                continue
            then = st["If"][1]
            actions = set(then["Action"])
            target = json.dumps(then["Resource"])
            if "events:PutEvents" in actions and "SiemBus" in target:
                out.add("eventbridge")
            if {"logs:CreateLogStream", "logs:PutLogEvents"} <= actions and "SiemLogGroup" in target:
                out.add("cloudwatch")
    return out


def _tf_siem_writers() -> set[str]:
    siem = hcl(ROOT / "infra/modules/ringfence/siem.tf")
    writers = next(b["siem_writers"] for b in siem["locals"] if "siem_writers" in b)
    lam = (ROOT / "infra/modules/ringfence/lambda.tf").read_text()
    # the role's Siem statements are given to exactly these (eventbridge and cloudwatch alike)
    assert lam.count("contains(local.siem_writers, each.key)") == 2
    return set(writers)


def test_every_function_that_writes_audit_records_may_send_them_to_the_siem() -> None:
    """RINGFENCE_SIEM is in every function's environment and each audit record is also sent to
    the SIEM target; a role without the grant has its records refused there (AccessDenied, only
    logged). The audit writers are read from the roles (PutItem on the audit table, as the
    recorded calls in the tests above show them), not listed here: before, lifecycle and
    azureevents wrote records that never reached the SIEM."""
    sam, tf = _audit_writers(sam_statements), _audit_writers(terraform_statements)
    assert sam == tf and {"ingest", "lifecycle", "azureevents", "admin", "wsconnect"} <= sam, (sam, tf)
    missing = {fn: _sam_siem(fn) for fn in sam if _sam_siem(fn) != {"eventbridge", "cloudwatch"}}
    assert not missing, ("template.yaml", missing)
    assert sam <= _tf_siem_writers(), ("infra/", sam - _tf_siem_writers())


def test_address_claims_are_granted_to_the_administrators_role_alone(env: Env) -> None:
    """The on-premise one-owner claims (state ``addrowner#<ip>``/``owner``, DynamoStore's
    observe_addressed): a role that could put or delete one could block an address or release a
    workload's claim so that a racing registration lands a second owner. Their writes, recorded
    from the real registration path over moto (register, race lost, re-address, deregister), are
    granted in template.yaml and infra/ alike to the admin function's role alone (its on-premise
    routes register hosts); to none other, compute's (whose writes are held to its partitions,
    tests/aws/test_sg_record_writers.py) and the flows function's ``addr#*`` (address history)
    among them."""
    from ringfence.clouds.aws.wiring import Wiring
    from ringfence.clouds.onprem import OnPremAdmin
    from ringfence.control.wiring import Config

    rec = Recorder(env)
    admin = OnPremAdmin(Wiring(Config.from_env()))
    rec.current = "admin"
    try:
        assert admin.register_workload("alice", {"id": "dc9-a", "ips": ["10.90.0.1"]}).status == 201
        assert admin.register_workload("alice", {"id": "dc9-b", "ips": ["10.90.0.1"]}).status == 409
        assert admin.register_workload("alice", {"id": "dc9-a", "ips": ["10.90.0.2"]}).status == 200
        assert admin.deregister_workload("alice", "dc9-a").status == 200
    finally:
        rec.current = None
    claims = [
        c for c in rec.calls["admin"] if c[0] in WRITES and c[2]["dynamodb:LeadingKeys"][0].startswith("addrowner#")
    ]
    assert {a for a, _, _ in claims} == {"PutItem", "DeleteItem"}, claims
    for where, statements_of in (("template.yaml", sam_statements), ("infra/", terraform_statements)):
        statements = {fn: statements_of(fn) for fn in SAM}
        writers = {fn for fn in SAM if any(allowed(statements[fn], c) for c in claims)}
        assert writers == {"admin"}, (where, writers)
        assert all(allowed(statements["admin"], c) for c in claims), where


def test_attack_only_the_perimeter_role_may_record_a_security_group_as_ringfences(env: Env) -> None:
    """A group is Ringfence's only if its id is recorded (``sg#<account>#<region>`` state items,
    clouds/aws/sg.py GroupRecords). Their writes, recorded from the real perimeter function over
    moto (groups created, then one deleted once without purpose), are granted in template.yaml and
    infra/ alike to the perimeter's role alone: none of the roles fed by events, agents or the
    internet could record a look-alike group as ours, nor admin's or compute's (their writes held
    to their own partitions since, tests/aws/test_sg_record_writers.py)."""
    rec = Recorder(env)
    est = boot(env)
    # the web tier retagged to dev: rf-dev-* created, and the schedule deletes what lost its purpose
    for iid in est["ids"]["web"]:
        env.ec2.create_tags(Resources=[iid], Tags=[{"Key": "ringfence:env", "Value": "dev"}])
        env.put(env.state_event(iid, "running"))
    env.pump()
    for iid in est["ids"]["web"]:
        env.ec2.create_tags(Resources=[iid], Tags=[{"Key": "ringfence:env", "Value": "prod"}])
        env.put(env.state_event(iid, "running"))
    env.pump()
    env.fn["perimeter"].handler(_scheduled(), LambdaContext())
    writes = [c for c in rec.calls["perimeter"] if c[0] in WRITES and c[2]["dynamodb:LeadingKeys"][0].startswith("sg#")]
    assert {a for a, _, _ in writes} == {"PutItem", "DeleteItem"}, writes
    assert not refusals(rec, ["perimeter"])
    for where, statements_of in (("template.yaml", sam_statements), ("infra/", terraform_statements)):
        statements = {fn: statements_of(fn) for fn in SAM}
        writers = {fn for fn in SAM if any(allowed(statements[fn], w) for w in writes)}
        assert writers == {"perimeter"}, (where, writers)
