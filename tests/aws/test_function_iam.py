"""Every function's DynamoDB permissions, in template.yaml and in infra/ alike, judged against what
the real functions do over moto: each call a function makes while the estate boots, scales out,
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest

from tests.aws.conftest import Env, LambdaContext
from tests.aws.test_agent_api import give_instance_profile, sts_request
from tests.aws.test_lifecycle_gate import heartbeat, launch
from tests.aws.test_pipeline import _scheduled, enroll_instance
from tests.aws.test_static import template, unquote

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
}
# what an expression names that is not an attribute
_WORDS = {"SET", "REMOVE", "ADD", "DELETE", "AND", "OR", "NOT", "BETWEEN", "IN"}
_FUNCTIONS = {"attribute_exists", "attribute_not_exists", "attribute_type", "begins_with", "contains", "size"}
_FUNCTIONS |= {"if_not_exists", "list_append"}

Statement = tuple[set[str], set[str], list[tuple[str, str, list[str]]]]  # actions, tables, conditions
Request = tuple[str, str, dict[str, list[str]]]  # action, table, condition context


# --- the deployed statements ---------------------------------------------------------------------


def sam_statements(fn: str = "agentapi") -> list[Statement]:
    res = template()["Resources"]
    out: list[Statement] = []
    for policy in res[SAM[fn]]["Properties"].get("Policies", []):
        for st in policy.get("Statement", []) if isinstance(policy, dict) else []:
            if not isinstance(st, dict) or st.get("Effect") != "Allow":
                continue  # an !If (SIEM) names no table
            targets = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            tables = {
                t["GetAtt"].removesuffix("Table.Arn").lower() for t in targets if isinstance(t, dict) and "GetAtt" in t
            }
            conds = [
                (op, key, v if isinstance(v, list) else [v])
                for op, kv in st.get("Condition", {}).items()
                for key, v in kv.items()
            ]
            out.append((set(st["Action"]), tables, conds))
    return out


_TF_STATEMENT = re.compile(r"\{actions = (\[[^\]]*\]), resources = (\[[^\]]*\])(?:, conditions = (\[.*?\]))?\}")
_TF_CONDITION = re.compile(r'test = "([^"]+)", variable = "([^"]+)", values = (\[[^\]]*\])')


def terraform_statements(fn: str = "agentapi") -> list[Statement]:
    lam = unquote(hcl2.loads((ROOT / "infra/modules/ringfence/lambda.tf").read_text()))
    loc: dict[str, Any] = {}
    for block in lam.get("locals", []):
        loc.update(block)
    out: list[Statement] = []
    listed = loc["statements"][fn]
    if isinstance(listed, str):  # concat([...], ...): python-hcl2 keeps the expression's text
        for actions, resources, conditions in _TF_STATEMENT.findall(listed):
            conds = [(t, v, json.loads(vals)) for t, v, vals in _TF_CONDITION.findall(conditions or "")]
            tables = set(re.findall(r"aws_dynamodb_table\.(\w+)\.arn", resources))
            out.append((set(json.loads(actions)), tables, conds))
        assert out, f"no statement read from {fn}'s concat"
        return out
    for st in listed:
        if not isinstance(st, dict):
            continue  # a shared local (describe, assume, kms)
        tables = {m for r in st["resources"] for m in re.findall(r"aws_dynamodb_table\.(\w+)\.arn", str(r))}
        given = [loc[c[2:-1].removeprefix("local.")] if isinstance(c, str) else c for c in st.get("conditions", [])]
        conds = [(c["test"], c["variable"], list(c["values"])) for c in given]
        out.append((set(st["actions"]), tables, conds))
    return out


def allowed(statements: list[Statement], request: Request) -> bool:
    action, table, context = request
    for actions, tables, conds in statements:
        if f"dynamodb:{action}" not in actions or table not in tables:
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

    def __init__(self, env: Env) -> None:
        self.current: str | None = None
        self.calls: dict[str, list[Request]] = {}
        env.hook("before-parameter-build.dynamodb", self._seen)
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
        if self.current is not None:
            self.calls.setdefault(self.current, []).extend(requests_of(model.name, params))

    @property
    def writes(self) -> list[Request]:
        return [c for c in self.calls.get("agentapi", []) if c[0] in WRITES]


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
    ):
        assert expected in kinds, (expected, sorted(kinds))
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
    with pytest.raises(AssertionError, match="not evaluated"):
        allowed(
            [({"dynamodb:BatchWriteItem"}, {"state"}, [("StringEqualsIfExists", "dynamodb:Select", ["x"])])], batch[0]
        )


def test_every_dynamodb_call_every_function_makes_is_granted_in_both_deployments(agent_stack: Env) -> None:
    """The estate boots, scales out behind the agent launch gate, agents enroll and report, an
    administrator acts, reconcile runs, an instance terminates: every DynamoDB call each function
    made is one its role is granted, in template.yaml and in infra/ alike."""
    env = agent_stack
    rec = Recorder(env)
    new = launch(env)  # boot: the estate's events through ingest, perimeter, compute and publish
    token = enroll_instance(env, new)  # before its launch is ingested (the agent often is first)
    env.pump()
    ptr = env.store.bundle_pointer(new)
    assert ptr is not None
    heartbeat(env, new, token, ptr.version)
    env.pump()  # compute completes the launch
    auth = {"Authorization": f"Bearer {token}"}
    assert env.rest("agentapi", "GET", f"/v1/agents/{new}/deltas", headers=auth, query={"after": "0"})[0] in (200, 409)
    connect = {
        "requestContext": {"routeKey": "$connect", "connectionId": "c-1", "eventType": "CONNECT", "stage": "v1"},
        "queryStringParameters": None,
        "headers": {"Authorization": f"Bearer {token}"},
        "isBase64Encoded": False,
    }
    assert env.fn["wsconnect"].handler(connect, LambdaContext())["statusCode"] == 200
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
    assert "offline" in env.fn["reconcile"].handler(_scheduled(), LambdaContext())
    env.ec2.terminate_instances(InstanceIds=[new])
    env.put(env.state_event(new, "terminated"))
    env.pump()

    judged = {"template.yaml": sam_statements, "infra/": terraform_statements}
    refused: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for fn in ("ingest", "compute", "publish", "lifecycle", "perimeter", "agentapi", "admin", "wsconnect", "reconcile"):
        assert rec.calls.get(fn), f"{fn} made no DynamoDB call: the scenario misses it"
        for where, statements_of in judged.items():
            statements = statements_of(fn)
            denied = sorted({(a, t) for a, t, c in rec.calls[fn] if not allowed(statements, (a, t, c))})
            if denied:
                refused[(where, fn)] = denied
    assert not refused, refused
