"""Issue 10, control plane: every SQS queue refuses every sender but its producers, in
template.yaml and in the Terraform module.

moto does not enforce queue policies, so these tests read the policy documents themselves: each
queue is covered, its Deny names exactly the rules that target it (event queues) or the roles the
stack's IAM lets send to it (hand-off queues, DLQs), and a small evaluator of the documents' own
statements shows a forged sender refused and the real producers let through. The consumers do
not trust a message anyway (tests/aws/test_terminate_trust.py)."""

from __future__ import annotations

import re
from typing import Any

from tests.aws.test_static import ROOT, hcl, template, unquote

ATTACKER = "arn:aws:iam::123456789012:role/developer-with-sqs-star"


# --- the documents' own semantics (only the operators the stack uses) --------------------------


def _values(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def _condition_holds(cond: dict[str, Any], ctx: dict[str, str | None]) -> bool:
    for op, clauses in cond.items():
        for key, expected in clauses.items():
            actual = ctx.get(key)
            want = _values(expected)
            if op == "ArnEquals":
                ok = actual is not None and actual in want
            elif op == "ArnNotEquals":
                ok = actual is None or actual not in want  # a missing key does not equal anything
            elif op == "Null":
                ok = (actual is None) == (str(want[0]).lower() == "true")
            else:
                raise AssertionError(f"operator {op} not modelled")
            if not ok:
                return False
    return True


def _principal_matches(principal: Any, ctx: dict[str, str | None]) -> bool:
    if principal == "*" or principal == {"AWS": "*"}:
        return True
    services = _values(principal.get("Service", []))
    return ctx.get("service") in services


def may_send(statements: list[dict[str, Any]], ctx: dict[str, str | None]) -> bool:
    """Would the queue policy let this SendMessage through (identity policies assumed to allow)?
    An explicit Deny wins; otherwise the caller's own IAM decides, which we take to allow."""
    for st in statements:
        if "sqs:SendMessage" not in _values(st["Action"]) or not _principal_matches(st["Principal"], ctx):
            continue
        if st["Effect"] == "Deny" and _condition_holds(st.get("Condition", {}), ctx):
            return False
    return True


# --- template.yaml --------------------------------------------------------------------------------


def _ref(x: Any) -> str:
    """A !Ref / !GetAtt as a symbol: "IngestQueue", "IngestFunctionRole.Arn"."""
    if isinstance(x, dict) and "Ref" in x:
        return str(x["Ref"])
    if isinstance(x, dict) and "GetAtt" in x:
        return str(x["GetAtt"])
    return str(x)


def _symbolic(v: Any) -> Any:
    if isinstance(v, dict) and ("Ref" in v or "GetAtt" in v):
        return _ref(v)
    if isinstance(v, dict) and "If" in v:
        return _symbolic(v["If"][1])  # the stack with the option on (a conditional GCP producer)
    if isinstance(v, dict):
        return {k: _symbolic(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_symbolic(x) for x in v]
    return v


def cfn_queue_policies() -> dict[str, list[dict[str, Any]]]:
    res = template()["Resources"]
    out: dict[str, list[dict[str, Any]]] = {}
    for r in res.values():
        if r["Type"] == "AWS::SQS::QueuePolicy":
            for q in r["Properties"]["Queues"]:
                out.setdefault(_ref(q), []).extend(_symbolic(r["Properties"]["PolicyDocument"]["Statement"]))
    return out


def cfn_senders() -> dict[str, set[str]]:
    """Queue → the function roles the template lets send to it (SendMessage grants and Lambda's
    async DLQ, which Lambda writes with the function's role)."""
    res = template()["Resources"]
    out: dict[str, set[str]] = {}
    for name, r in res.items():
        if r["Type"] != "AWS::Serverless::Function":
            continue
        role = f"{name}Role.Arn"
        for pol in r["Properties"].get("Policies", []):
            for st in pol.get("Statement", []):
                # (a statement under a condition, Fn::If, grants no SendMessage in this stack)
                if "sqs:SendMessage" in _values(st.get("Action", [])):
                    for q in _values(st["Resource"]):
                        out.setdefault(_ref(q).removesuffix(".Arn"), set()).add(role)
        dlq = r["Properties"].get("DeadLetterQueue")
        if dlq:
            out.setdefault(_ref(dlq["TargetArn"]).removesuffix(".Arn"), set()).add(role)
    return out


def cfn_rule_targets() -> dict[str, set[str]]:
    res = template()["Resources"]
    out: dict[str, set[str]] = {}
    for name, r in res.items():
        if r["Type"] == "AWS::Events::Rule":
            for t in r["Properties"].get("Targets", []):
                out.setdefault(_ref(t["Arn"]).removesuffix(".Arn"), set()).add(f"{name}.Arn")
    return out


def test_every_template_queue_has_a_policy_naming_exactly_its_producers() -> None:
    res = template()["Resources"]
    queues = {n for n, r in res.items() if r["Type"] == "AWS::SQS::Queue"}
    policies = cfn_queue_policies()
    senders, rules = cfn_senders(), cfn_rule_targets()
    assert queues <= set(policies), f"queues without a policy: {sorted(queues - set(policies))}"
    for q in sorted(queues):
        denies = [st for st in policies[q] if st["Effect"] == "Deny" and st["Principal"] == "*"]
        assert denies, f"{q}: no Deny for other senders"
        named = {
            v
            for st in denies
            for op, clauses in st.get("Condition", {}).items()
            if op != "Null"
            for key, vals in clauses.items()
            if key in ("aws:SourceArn", "aws:PrincipalArn")
            for v in _values(vals)
        }
        expected = rules.get(q, set()) | senders.get(q, set())
        assert named == expected, f"{q}: the policy names {sorted(named)}, the stack's producers are {sorted(expected)}"


def test_attack_forged_sender_is_refused_by_every_template_queue() -> None:
    policies = cfn_queue_policies()
    senders, rules = cfn_senders(), cfn_rule_targets()
    for q, statements in sorted(policies.items()):
        # an IAM principal of the account whose identity policy grants sqs:* (the attack)
        assert not may_send(statements, {"aws:PrincipalArn": ATTACKER}), q
        # another account's EventBridge rule, or ours targeting some other queue
        assert not may_send(
            statements, {"service": "events.amazonaws.com", "aws:SourceArn": "arn:aws:events:::rule/foreign"}
        ), q
        for role in senders.get(q, set()):
            assert may_send(statements, {"aws:PrincipalArn": role}), (q, role)
        for rule in rules.get(q, set()):
            assert may_send(statements, {"service": "events.amazonaws.com", "aws:SourceArn": rule}), (q, rule)
        if not rules.get(q):
            # SQS's own redrive into a DLQ carries neither a principal nor a source
            assert may_send(statements, {}), q
    # the lifecycle queue in particular: the forged terminate action of the issue
    assert not may_send(policies["LifecycleQueue"], {"aws:PrincipalArn": "IngestFunctionRole.Arn"})


# --- Terraform --------------------------------------------------------------------------------------


def _tf(name: str) -> dict[str, Any]:
    return dict(hcl(ROOT / "infra/modules/ringfence" / name))


def _locals(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for block in doc.get("locals", []):
        out.update(block)
    return out


def _queue(ref: str) -> str:
    m = re.search(r"aws_sqs_queue\.(\w+)", ref)
    assert m, ref
    return m.group(1)


def _tf_statements(statements: Any, shared: dict[str, Any]) -> list[dict[str, Any]]:
    """A function's statement list: literal statements and ``local.x`` references; a conditional
    list (``concat([...], cond ? [] : [...])``) comes from hcl2 as one expression string, read for
    its literal statements and the shared ones it names."""
    if isinstance(statements, list):
        return [
            shared[st.removeprefix("${local.").removesuffix("}")] if isinstance(st, str) else st for st in statements
        ]
    found: list[dict[str, Any]] = [
        {"actions": re.findall(r'"([^"]+)"', m.group(1)), "resources": [r.strip() for r in m.group(2).split(",")]}
        for m in re.finditer(r"\{actions = \[([^\]]*)\], resources = \[([^\]]*)\]", statements)
    ]
    return found + [shared[n] for n in re.findall(r"local\.(\w+)", statements) if n in shared]


def test_every_terraform_queue_has_a_policy_naming_exactly_its_producers() -> None:
    main, lam = _tf("main.tf"), _tf("lambda.tf")
    queues = {n for block in main["resource"] if "aws_sqs_queue" in block for n in block["aws_sqs_queue"]}
    loc, lam_loc = _locals(main), _locals(lam)
    # who the IAM lets send where
    shared = {k: v for k, v in lam_loc.items() if isinstance(v, dict) and "actions" in v}
    iam: dict[str, set[str]] = {}
    for fn, statements in lam_loc["statements"].items():
        for st in _tf_statements(statements, shared):
            if "sqs:SendMessage" in [unquote(a) for a in st["actions"]]:
                for r in st["resources"]:
                    iam.setdefault(_queue(r), set()).add(fn)
    # every function has the async DLQ as its dead_letter_config
    iam.setdefault("async_dlq", set()).update(lam_loc["functions"])
    covered: dict[str, set[str]] = {}
    for q, spec in loc["queue_senders"].items():
        roles = set(re.findall(r'fn_role\["(\w+)"\]', str(spec["roles"])))
        covered[_queue(spec["queue"])] = roles
        assert roles == iam.get(_queue(spec["queue"]), set()), (q, sorted(roles), sorted(iam.get(q, set())))
    for q in loc["redrive_only_dlqs"].values():
        assert _queue(q) not in iam, f"{q}: a function sends to it, so it is not redrive-only"
        covered[_queue(q)] = set()
    # the event queues: one policy each, the Deny keyed on the rules that target them
    (doc,) = [
        b["aws_iam_policy_document"]["event_queues"]
        for b in main["data"]
        if "aws_iam_policy_document" in b and "event_queues" in b["aws_iam_policy_document"]
    ]
    for spec in doc["for_each"].values():
        covered[_queue(spec["queue"])] = {"rules"}
    deny = [s for s in doc["statement"] if s.get("effect") == "Deny"]
    assert deny and deny[0]["condition"][0]["test"] == "ArnNotEquals"
    assert deny[0]["condition"][0]["variable"] == "aws:SourceArn"
    assert deny[0]["principals"][0]["identifiers"] == ["*"]
    assert queues == set(covered), f"queues without a policy: {sorted(queues - set(covered))}"
    for name in ("handoff_queues", "redrive_only"):
        (d,) = [
            b["aws_iam_policy_document"][name] for b in main["data"] if name in b.get("aws_iam_policy_document", {})
        ]
        for st in d["statement"]:
            assert st["effect"] == "Deny" and st["principals"][0]["identifiers"] == ["*"], name
        assert {c["variable"] for st in d["statement"] for c in st["condition"]} == {
            "aws:PrincipalArn",
            "aws:SourceArn",
        }, name


def test_the_priority_lane_takes_the_administrator_and_aws_removals_alone_in_both_deployments() -> None:
    """Compute's priority lane: the administrator's function and the three that find AWS
    instances leaving their peers' sets (at most one message per instance state change); not
    the agent API, wsconnect, flows, the perimeter, or the internet-fed events functions of the
    other clouds, whose removals wait in the compute queue (docs/threat-model.md)."""
    expected = {"AdminFunction", "IngestFunction", "LifecycleFunction", "ReconcileFunction"}
    assert cfn_senders()["ComputePriorityQueue"] == {f"{f}Role.Arn" for f in expected}
    loc = _locals(_tf("main.tf"))
    roles = set(re.findall(r'fn_role\["(\w+)"\]', str(loc["queue_senders"]["compute_priority"]["roles"])))
    assert roles == {"admin", "ingest", "lifecycle", "reconcile"}
