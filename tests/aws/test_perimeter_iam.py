"""Issue 10, control plane: the perimeter role may touch only Ringfence's own security groups,
and interfaces and groups of the VPCs it manages — the same in SAM and Terraform.

moto does not evaluate IAM conditions, so these tests evaluate the role's own statements (as
written in template.yaml and infra/) for the requests an attacker holding the perimeter role's
credentials would make, and for the requests the perimeter code makes
(``ringfence.clouds.aws.sg``; its behaviour against moto is tests/aws/test_perimeter.py)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from ringfence.clouds.aws.sg import TAG
from tests.aws.test_static import ROOT, cfn_conditions, hcl, template, tf_conditions

ACCOUNT, REGION = "123456789012", "ca-central-1"
MANAGED = f"arn:aws:ec2:{REGION}:{ACCOUNT}:vpc/vpc-managed"
OTHER_VPC = f"arn:aws:ec2:{REGION}:{ACCOUNT}:vpc/vpc-payments"
SG = f"arn:aws:ec2:{REGION}:{ACCOUNT}:security-group/sg-1"
ENI = f"arn:aws:ec2:{REGION}:{ACCOUNT}:network-interface/eni-1"
WRITES = re.compile(r"^ec2:(Create|Delete|Authorize|Revoke|Modify)")


@dataclass
class Statement:
    actions: list[str]
    resources: list[str]
    conditions: list[tuple[str, str, list[str]]] = field(default_factory=list)


def _cond_holds(op: str, key: str, want: list[str], ctx: dict[str, Any]) -> bool:
    got = ctx.get(key)
    if op == "Null":
        return (got is None) == (want[0] == "true")
    if op == "StringEquals":
        return got is not None and got in want
    if op == "ArnLike":
        return got is not None and any(fnmatch.fnmatchcase(got, w) for w in want)
    if op == "ForAllValues:StringEquals":
        return all(k in want for k in (got or []))
    raise AssertionError(f"operator {op} not modelled")


def allowed(statements: list[Statement], action: str, resource: str, ctx: dict[str, Any]) -> bool:
    """Is ``action`` on ``resource`` allowed by some statement (the role has no Deny)?"""
    return any(
        action in st.actions
        and any(fnmatch.fnmatchcase(resource, r) for r in st.resources)
        and all(_cond_holds(op, k, v, ctx) for op, k, v in st.conditions)
        for st in statements
    )


# --- the role as each template writes it -------------------------------------------------------------


def _sub(text: str) -> str:
    return (
        text.replace("${AWS::Partition}", "aws").replace("${AWS::Region}", REGION).replace("${AWS::AccountId}", ACCOUNT)
    )


def _cfn_value(v: Any) -> list[str]:
    if isinstance(v, dict) and "Sub" in v:
        return [_sub(v["Sub"])]
    if isinstance(v, dict) and v == {"Ref": "PerimeterVpcArns"}:
        return [MANAGED]  # the parameter narrowed to the managed VPC, as docs/deploy-aws.md says
    if isinstance(v, list):
        return [x for item in v for x in _cfn_value(item)]
    return [str(v)]


def sam_role() -> list[Statement]:
    fn = template()["Resources"]["PerimeterFunction"]["Properties"]
    out = []
    for st in fn["Policies"][0]["Statement"]:
        if "If" in st:  # a statement under a condition (the SIEM target's): as deployed with it
            st = st["If"][1]
        conds = [
            (op, key, _cfn_value(vals)) for op, clauses in cfn_conditions(st).items() for key, vals in clauses.items()
        ]
        out.append(Statement(_cfn_value(st["Action"]), _cfn_value(st["Resource"]), conds))
    return out


def terraform_role() -> list[Statement]:
    doc = hcl(ROOT / "infra/modules/ringfence/lambda.tf")
    loc: dict[str, Any] = {}
    for block in doc["locals"]:
        loc.update(block)

    def resolve(v: Any) -> Any:
        if isinstance(v, str) and v.startswith("${local.") and v.endswith("}"):
            name = v[len("${local.") : -1]
            if name == "in_vpcs.values":
                return [MANAGED]
            return resolve(loc[name])
        if isinstance(v, str):
            v = v.replace("${local.partition}", "aws").replace("${local.region}", REGION)
            return v.replace("${local.account}", ACCOUNT)
        if isinstance(v, list):
            return [resolve(x) for x in v]
        if isinstance(v, dict):
            if v.get("variable") == "ec2:Vpc":  # values: coalesce(var.perimeter_vpc_arns, …) narrowed
                return {**v, "values": [MANAGED]}
            return {k: resolve(x) for k, x in v.items()}
        return v

    out = []
    for st in loc["statements"]["perimeter"]:
        st = resolve(st)
        resources = st["resources"] if isinstance(st["resources"], list) else [st["resources"]]
        conds = [(c["test"], c["variable"], c["values"]) for c in tf_conditions(st)]
        out.append(Statement(st["actions"], resources, conds))
    return out


ROLES = {"SAM": sam_role, "Terraform": terraform_role}


def test_every_write_of_the_perimeter_role_is_conditioned() -> None:
    for name, role in ROLES.items():
        for st in role():
            writes = [a for a in st.actions if WRITES.match(a)]
            scoped_by_resource = st.actions == ["ec2:CreateSecurityGroup"] and st.resources == [MANAGED]
            assert not writes or st.conditions or scoped_by_resource, (name, st)


def test_attack_perimeter_role_cannot_open_change_or_delete_a_foreign_group() -> None:
    for name, role in ROLES.items():
        st = role()
        foreign = {"ec2:Vpc": MANAGED}  # a group in the managed VPC, not ours: no ringfence tag
        for action in (
            "ec2:AuthorizeSecurityGroupIngress",
            "ec2:RevokeSecurityGroupEgress",
            "ec2:DeleteSecurityGroup",
        ):
            assert not allowed(st, action, SG, foreign), (name, action)
        # nor make a foreign group ours by tagging it afterwards
        assert not allowed(st, "ec2:CreateTags", SG, {"aws:TagKeys": [TAG]}), name
        # nor create groups untagged, or carrying label keys (a group tagged ringfence:role=…)
        assert not allowed(st, "ec2:CreateSecurityGroup", SG, {"aws:TagKeys": ["Name"]}), name
        bad_keys = {"aws:RequestTag/" + TAG: "prod", "aws:TagKeys": [TAG, "ringfence:role"]}
        assert not allowed(st, "ec2:CreateSecurityGroup", SG, bad_keys), name
        # nor touch interfaces, groups or VPCs outside the managed VPCs
        assert not allowed(st, "ec2:ModifyNetworkInterfaceAttribute", ENI, {"ec2:Vpc": OTHER_VPC}), name
        ours_elsewhere = {"aws:ResourceTag/" + TAG: "prod", "ec2:Vpc": OTHER_VPC}
        assert not allowed(st, "ec2:AuthorizeSecurityGroupIngress", SG, ours_elsewhere), name
        assert not allowed(st, "ec2:CreateSecurityGroup", OTHER_VPC, {}), name


def test_the_perimeter_code_s_own_requests_stay_allowed() -> None:
    for name, role in ROLES.items():
        st = role()
        ours = {"aws:ResourceTag/" + TAG: "prod", "ec2:Vpc": MANAGED}
        create = {"aws:RequestTag/" + TAG: "prod", "aws:TagKeys": [TAG, "Name"]}
        assert allowed(st, "ec2:CreateSecurityGroup", MANAGED, {}), name
        assert allowed(st, "ec2:CreateSecurityGroup", SG, create), name
        assert allowed(
            st, "ec2:CreateTags", SG, {"ec2:CreateAction": "CreateSecurityGroup", "aws:TagKeys": [TAG, "Name"]}
        )
        for action in (
            "ec2:AuthorizeSecurityGroupIngress",
            "ec2:RevokeSecurityGroupIngress",
            "ec2:DeleteSecurityGroup",
        ):
            assert allowed(st, action, SG, ours), (name, action)
        assert allowed(st, "ec2:ModifyNetworkInterfaceAttribute", ENI, {"ec2:Vpc": MANAGED}), name
        assert allowed(st, "ec2:ModifyNetworkInterfaceAttribute", SG, {"ec2:Vpc": MANAGED}), name
