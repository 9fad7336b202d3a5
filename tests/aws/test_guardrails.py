"""The label guard (infra/guardrails, infra/modules/label-guard): the SAM/CloudFormation template and
the Terraform module deny the same label-key writes to everyone but the tagging principals, over
the keys the policy reserves, and let the perimeter's roles tag only the groups they create. moto
evaluates no SCP or IAM condition: the statements are evaluated here, by the operators they use,
against the perimeter's real request captured over moto. (cfn-lint and checkov run on both in
`make static-aws`.)"""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest

from ringfence.clouds.aws.sg import TAG
from ringfence.model import DEFAULT_KEY_PREFIX, LabelsConfig
from tests.aws.test_static import ROOT, _CfnLoader, hcl

TAG_WRITES = {"ec2:CreateTags", "ec2:DeleteTags", "ec2:RunInstances"}
# a tagger pattern with * for the account trusts a role of that name in every account: making one,
# or changing who may assume it, must be as guarded as the label keys
ROLE_CHANGES = {
    "iam:CreateRole",
    "iam:UpdateAssumeRolePolicy",
    "iam:AttachRolePolicy",
    "iam:PutRolePolicy",
    "iam:PassRole",
}


def cfn() -> dict[str, Any]:
    import yaml

    return yaml.load((ROOT / "infra" / "guardrails" / "label-guard.yaml").read_text(), Loader=_CfnLoader)


def test_cloudformation_denies_label_key_writes_but_to_taggers() -> None:
    doc = cfn()
    assert doc["Parameters"]["LabelKeyPrefix"]["Default"] == DEFAULT_KEY_PREFIX == LabelsConfig().key_prefix
    for name in ("LabelGuardScp", "LabelGuardPolicy"):
        res = doc["Resources"][name]
        content = res["Properties"].get("Content") or res["Properties"]["PolicyDocument"]
        actions: set[str] = set()
        tag_statements = [st for st in content["Statement"] if st["Sid"] != "DenyTaggerRoleChanges"]
        (roles,) = [st for st in content["Statement"] if st["Sid"] == "DenyTaggerRoleChanges"]
        assert roles["Effect"] == "Deny"  # its resources: test_the_guarded_roles_are_the_taggers_and_the_perimeters
        assert roles["Condition"] == {"ArnNotLike": {"aws:PrincipalArn": {"Ref": "TaggerRoleAdminArns"}}}
        assert set(roles["Action"]) >= ROLE_CHANGES, name
        for st in tag_statements:
            assert st["Effect"] == "Deny" and st["Resource"] == "*"
            cond = st["Condition"]
            assert cond["ForAnyValue:StringLike"]["aws:TagKeys"] == {"Sub": "${LabelKeyPrefix}*"}
            if st["Sid"] != "DenyLabelTagCreation":  # the taggers and the perimeter's roles: below
                assert cond["ArnNotLike"]["aws:PrincipalArn"] == {"Ref": "TaggerPrincipalArns"}
            actions |= set(st["Action"] if isinstance(st["Action"], list) else [st["Action"]])
        assert actions >= TAG_WRITES and "autoscaling:CreateOrUpdateTags" in actions, name
    assert doc["Resources"]["LabelGuardScp"]["Properties"]["Type"] == "SERVICE_CONTROL_POLICY"


def test_terraform_module_denies_the_same_actions() -> None:
    doc = hcl(ROOT / "infra" / "modules" / "label-guard" / "main.tf")
    [local] = doc["locals"]
    tf_actions = set(local["ec2_actions"]) | set(local["asg_actions"])
    cfn_actions = set(cfn()["Resources"]["LabelGuardPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]["Action"])
    assert tf_actions == cfn_actions
    [data] = doc["data"]
    statement, *_, roles = data["aws_iam_policy_document"]["guard"]["statement"]
    tests = {c["test"]: c["variable"] for c in statement["condition"]}
    assert tests == {"ForAnyValue:StringLike": "aws:TagKeys", "ArnNotLike": "aws:PrincipalArn"}
    assert statement["effect"] == "Deny"
    (cfn_roles,) = [
        st
        for st in cfn()["Resources"]["LabelGuardPolicy"]["Properties"]["PolicyDocument"]["Statement"]
        if st["Sid"] == "DenyTaggerRoleChanges"
    ]
    assert roles["effect"] == "Deny" and set(local["role_actions"]) == set(cfn_roles["Action"]) >= ROLE_CHANGES
    assert roles["resources"] == "${concat(var.tagger_principal_arns, local.perimeter_principals)}"
    [cond] = roles["condition"]
    assert (cond["test"], cond["variable"], cond["values"]) == (
        "ArnNotLike",
        "aws:PrincipalArn",
        "${var.tagger_role_admin_arns}",
    )


# --- the perimeter's own tag-on-create (docs/deploy-aws.md, "Guard the label keys") ----------------

TAGGERS = ["arn:aws:iam::*:role/ringfence-tagging"]  # the docs' example
CONTROL_PERIMETER = "arn:aws:iam::123456789012:role/ringfence-PerimeterFunctionRole-ABC"
MEMBER_PERIMETER = "arn:aws:iam::210987654321:role/ringfence-member-perimeter"
OTHER = "arn:aws:iam::210987654321:role/team-network-admin"


def _cfn_resolve(v: Any, params: dict[str, Any]) -> Any:
    """The intrinsics the guard uses (Ref, Sub of a parameter, Join, Split, If of a condition),
    with ``params``."""
    if isinstance(v, dict) and "If" in v:
        name, then, otherwise = v["If"]
        return _cfn_resolve(then if _cfn_holds(cfn()["Conditions"][name], params) else otherwise, params)
    if isinstance(v, dict) and "Ref" in v:
        return params[v["Ref"]]
    if isinstance(v, dict) and "Sub" in v:
        return v["Sub"].replace("${LabelKeyPrefix}", params["LabelKeyPrefix"])
    if isinstance(v, dict) and "Join" in v:
        sep, items = v["Join"]
        items = _cfn_resolve(items, params)
        return sep.join(x for i in items for x in ([i] if isinstance(i, str) else i))
    if isinstance(v, dict) and "Split" in v:
        sep, text = v["Split"]
        return _cfn_resolve(text, params).split(sep)
    if isinstance(v, list):
        return [_cfn_resolve(x, params) for x in v]
    return v


def _cfn_holds(cond: Any, params: dict[str, Any]) -> bool:
    """A condition of the guard's (Not, Equals of resolved values)."""
    if "Not" in cond:
        return not _cfn_holds(cond["Not"][0], params)
    if "Equals" in cond:
        a, b = (_cfn_resolve(x, params) for x in cond["Equals"])
        return bool(a == b)
    raise AssertionError(f"condition {cond} not modelled")


def _list(v: Any) -> list[str]:
    return v if isinstance(v, list) else [v]


Guard = list[tuple[str, list[str], list[tuple[str, str, list[str]]], list[str]]]


def cfn_guard(doc_name: str, perimeter: list[str]) -> Guard:
    """(sid, actions, conditions, resources) of one of the template's documents, its parameters set as the docs say."""
    doc = cfn()
    params = {
        "LabelKeyPrefix": doc["Parameters"]["LabelKeyPrefix"]["Default"],
        "TaggerPrincipalArns": TAGGERS,
        "PerimeterPrincipalArns": perimeter,
        "TaggerRoleAdminArns": ["arn:aws:iam::*:role/AWSControlTowerExecution"],
    }
    props = doc["Resources"][doc_name]["Properties"]
    out = []
    for st in (props.get("Content") or props["PolicyDocument"])["Statement"]:
        assert st["Effect"] == "Deny"
        conds = [
            (op, key, _list(_cfn_resolve(v, params)))
            for op, kv in st.get("Condition", {}).items()
            for key, v in kv.items()
        ]
        out.append((st["Sid"], _list(st["Action"]), conds, _list(_cfn_resolve(st["Resource"], params))))
    return out


def tf_guard(perimeter: list[str]) -> Guard:
    doc = hcl(ROOT / "infra" / "modules" / "label-guard" / "main.tf")
    [local] = doc["locals"]
    var = {
        "local.condition.keys": [DEFAULT_KEY_PREFIX + "*"],
        "local.condition.principals": TAGGERS,
        "var.perimeter_principal_arns": perimeter,
        "var.tagger_principal_arns": TAGGERS,
        "var.tagger_role_admin_arns": ["arn:aws:iam::*:role/AWSControlTowerExecution"],
        "local.ec2_actions": local["ec2_actions"],
        "local.asg_actions": local["asg_actions"],
        "local.role_actions": local["role_actions"],
    }

    def value(v: Any) -> list[str]:
        if isinstance(v, list):
            return v
        expr = v.removeprefix("${").removesuffix("}")
        if expr.startswith("concat("):
            return [x for part in expr[len("concat(") : -1].split(", ") for x in value(part)]
        if expr.startswith("compact("):
            return [x for x in value(expr[len("compact(") : -1]) if x]
        return list(var[expr])

    var["local.perimeter_principals"] = value(local["perimeter_principals"])

    [data] = doc["data"]
    return [
        (
            st["sid"],
            value(st["actions"]),
            [(c["test"], c["variable"], value(c["values"])) for c in st.get("condition", [])],
            value(st.get("resources", ["*"])),
        )
        for st in data["aws_iam_policy_document"]["guard"]["statement"]
    ]


def _holds(op: str, got: str | list[str] | None, want: list[str]) -> bool:
    """IAM's condition operators the guard uses, a missing key as IAM takes it."""
    values = [got] if isinstance(got, str) else list(got or [])
    if op == "ForAnyValue:StringLike":
        return any(fnmatch.fnmatchcase(g, w) for g in values for w in want)
    if op == "ForAnyValue:StringNotEquals":
        return any(g not in want for g in values)
    if op == "ArnNotLike":
        return got is None or not any(fnmatch.fnmatchcase(g, w) for g in values for w in want)
    if op == "StringNotEquals":
        return got is None or all(g not in want for g in values)
    raise AssertionError(f"operator {op} not modelled")


def denied_by(guard: Guard, action: str, ctx: dict[str, Any], resource: str = "*") -> list[str]:
    """The Deny statements of the guard that refuse this request on ``resource`` (empty: the
    guard lets it through)."""
    return [
        sid
        for sid, actions, conds, resources in guard
        if action in actions
        and any(r == "*" or fnmatch.fnmatchcase(resource, r) for r in resources)
        and all(_holds(op, ctx.get(k), v) for op, k, v in conds)
    ]


@pytest.fixture(scope="module")
def perimeter_create_tags(embedded: Any) -> dict[str, Any]:
    """The request context EC2 authorizes the perimeter's tag-on-create with (ec2:CreateTags),
    from the real CreateSecurityGroup calls the perimeter function makes over moto as the estate boots."""
    from tests.aws.conftest import Env
    from tests.aws.test_pipeline import boot

    env = Env(embedded)
    env.build()
    seen: list[dict[str, Any]] = []
    env.hook("before-parameter-build.ec2.CreateSecurityGroup", lambda params, **_: seen.append(dict(params)))
    try:
        boot(env)
    finally:
        env.retire()
    assert seen, "the perimeter created its groups"
    keys = sorted({t["Key"] for p in seen for s in p["TagSpecifications"] for t in s["Tags"]})
    assert TAG in keys
    return {"aws:TagKeys": keys, "ec2:CreateAction": "CreateSecurityGroup"}


GUARDS = {
    "SCP": lambda perimeter: cfn_guard("LabelGuardScp", perimeter),
    "managed policy": lambda perimeter: cfn_guard("LabelGuardPolicy", perimeter),
    "Terraform": tf_guard,
}


@pytest.mark.parametrize("where", sorted(GUARDS))
def test_the_perimeter_may_tag_the_groups_it_creates_and_no_one_else_may(
    where: str, perimeter_create_tags: dict[str, Any]
) -> None:
    """The guard as shipped, with the perimeter's roles listed as docs/deploy-aws.md says, against
    the perimeter's real request: the control account's perimeter function and the member
    perimeter role may create a group tagged ringfence:perimeter; any other principal is refused
    that same request, and the perimeter's roles are refused the tag on an existing group (which
    would make someone else's group look like ours) and every other label key."""
    guard = GUARDS[where]([MEMBER_PERIMETER.replace("210987654321", "*"), CONTROL_PERIMETER])
    req = perimeter_create_tags
    for principal in (CONTROL_PERIMETER, MEMBER_PERIMETER):
        assert denied_by(guard, "ec2:CreateTags", req | {"aws:PrincipalArn": principal}) == [], (where, principal)
        later = {"aws:TagKeys": [TAG], "aws:PrincipalArn": principal}  # CreateTags on a group that exists
        assert denied_by(guard, "ec2:CreateTags", later), (where, principal)
        label = req | {"aws:TagKeys": [TAG, "ringfence:env"], "aws:PrincipalArn": principal}
        assert denied_by(guard, "ec2:CreateTags", label), (where, principal)
        run = {"aws:TagKeys": ["ringfence:env"], "aws:PrincipalArn": principal}
        assert denied_by(guard, "ec2:RunInstances", run), (where, principal)
    assert denied_by(guard, "ec2:CreateTags", req | {"aws:PrincipalArn": OTHER}), where
    # the taggers keep every label key
    tagger = {"aws:TagKeys": ["ringfence:env"], "aws:PrincipalArn": "arn:aws:iam::210987654321:role/ringfence-tagging"}
    assert denied_by(guard, "ec2:CreateTags", tagger) == [], where
    # by default only the member perimeter role is listed: the control account's is named by the deployment
    default = GUARDS[where]([MEMBER_PERIMETER.replace("210987654321", "*")])
    assert denied_by(default, "ec2:CreateTags", req | {"aws:PrincipalArn": CONTROL_PERIMETER}), where


def test_both_guards_default_to_the_member_perimeter_role() -> None:
    doc = hcl(ROOT / "infra" / "modules" / "label-guard" / "main.tf")
    tf_default = next(v for v in doc["variable"] if "perimeter_principal_arns" in v)["perimeter_principal_arns"][
        "default"
    ]
    cfn_default = cfn()["Parameters"]["PerimeterPrincipalArns"]["Default"].split(",")
    assert tf_default == cfn_default == ["arn:aws:iam::*:role/ringfence-member-perimeter"]


ADMIN = "arn:aws:iam::210987654321:role/AWSControlTowerExecution"


@pytest.mark.parametrize("where", sorted(GUARDS))
def test_the_guarded_roles_are_the_taggers_and_the_perimeters(where: str) -> None:
    """The guard trusts the perimeter's role names (default ringfence-member-perimeter in every
    account) with ringfence:perimeter on new groups: like the taggers' roles, no one but
    TaggerRoleAdminArns may create them, retrust, repermission or pass them. Before, only the
    taggers' were guarded: anyone with iam:CreateRole in a member account could make
    ringfence-member-perimeter there and tag look-alike groups."""
    guard = GUARDS[where]([MEMBER_PERIMETER.replace("210987654321", "*"), CONTROL_PERIMETER])
    roles = [
        "arn:aws:iam::444455556666:role/ringfence-member-perimeter",  # any account: the default pattern
        CONTROL_PERIMETER,
        "arn:aws:iam::444455556666:role/ringfence-tagging",
    ]
    for role in roles:
        for action in sorted(ROLE_CHANGES):
            assert denied_by(guard, action, {"aws:PrincipalArn": OTHER}, role) == ["DenyTaggerRoleChanges"], (
                where,
                role,
                action,
            )
            assert denied_by(guard, action, {"aws:PrincipalArn": ADMIN}, role) == [], (where, role, action)
    # a role of another name stays the account's own business
    assert denied_by(guard, "iam:CreateRole", {"aws:PrincipalArn": OTHER}, "arn:aws:iam::444455556666:role/app") == []


@pytest.mark.parametrize("where", sorted(GUARDS))
def test_an_empty_perimeter_principal_list_puts_no_empty_arn_in_the_guard(
    where: str, perimeter_create_tags: dict[str, Any]
) -> None:
    """PerimeterPrincipalArns "" (CloudFormation gives an empty CommaDelimitedList as one empty
    item; Terraform's perimeter_principal_arns = [""] alike) names no perimeter role. Before, the
    guard split the joined lists into one more, empty, item: an empty aws:PrincipalArn in
    DenyLabelTagCreation and an empty Resource in DenyTaggerRoleChanges (no ARN: IAM's policy
    grammar takes an ARN or * there). Now no statement carries an empty value; the guard trusts
    the taggers alone (the perimeter's roles are refused the tag like anyone) and still guards
    the taggers' roles."""
    guard = GUARDS[where]([""])
    for sid, _, conds, resources in guard:
        assert "" not in resources, (where, sid, resources)
        for op, key, values in conds:
            assert "" not in values, (where, sid, op, key, values)
    req = perimeter_create_tags
    assert denied_by(guard, "ec2:CreateTags", req | {"aws:PrincipalArn": MEMBER_PERIMETER}), where
    assert denied_by(guard, "ec2:CreateTags", req | {"aws:PrincipalArn": OTHER}), where
    tagger = {"aws:TagKeys": ["ringfence:env"], "aws:PrincipalArn": "arn:aws:iam::210987654321:role/ringfence-tagging"}
    assert denied_by(guard, "ec2:CreateTags", tagger) == [], where
    role = "arn:aws:iam::444455556666:role/ringfence-tagging"
    assert denied_by(guard, "iam:CreateRole", {"aws:PrincipalArn": OTHER}, role) == ["DenyTaggerRoleChanges"], where
