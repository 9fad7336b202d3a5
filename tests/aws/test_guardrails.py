"""The label guard (infra/guardrails, infra/modules/label-guard): the SAM/CloudFormation template and
the Terraform module deny the same label-key writes to everyone but the tagging principals, over
the keys the policy reserves. (cfn-lint and checkov run on both in `make static-aws`; IAM's own
evaluation of the statements is not emulated here.)"""

from __future__ import annotations

from typing import Any

import hcl2

from ringfence.model import DEFAULT_KEY_PREFIX, LabelsConfig
from tests.aws.test_static import ROOT, _CfnLoader, unquote

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
        assert roles["Effect"] == "Deny" and roles["Resource"] == {"Ref": "TaggerPrincipalArns"}
        assert roles["Condition"] == {"ArnNotLike": {"aws:PrincipalArn": {"Ref": "TaggerRoleAdminArns"}}}
        assert set(roles["Action"]) >= ROLE_CHANGES, name
        for st in tag_statements:
            assert st["Effect"] == "Deny" and st["Resource"] == "*"
            cond = st["Condition"]
            assert cond["ForAnyValue:StringLike"]["aws:TagKeys"] == {"Sub": "${LabelKeyPrefix}*"}
            assert cond["ArnNotLike"]["aws:PrincipalArn"] == {"Ref": "TaggerPrincipalArns"}
            actions |= set(st["Action"])
        assert actions >= TAG_WRITES and "autoscaling:CreateOrUpdateTags" in actions, name
    assert doc["Resources"]["LabelGuardScp"]["Properties"]["Type"] == "SERVICE_CONTROL_POLICY"


def test_terraform_module_denies_the_same_actions() -> None:
    doc = unquote(hcl2.loads((ROOT / "infra" / "modules" / "label-guard" / "main.tf").read_text()))
    [local] = doc["locals"]
    tf_actions = set(local["ec2_actions"]) | set(local["asg_actions"])
    cfn_actions = set(cfn()["Resources"]["LabelGuardPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]["Action"])
    assert tf_actions == cfn_actions
    [data] = doc["data"]
    statement, roles = data["aws_iam_policy_document"]["guard"]["statement"]
    tests = {c["test"]: c["variable"] for c in statement["condition"]}
    assert tests == {"ForAnyValue:StringLike": "aws:TagKeys", "ArnNotLike": "aws:PrincipalArn"}
    assert statement["effect"] == "Deny"
    cfn_roles = cfn()["Resources"]["LabelGuardPolicy"]["Properties"]["PolicyDocument"]["Statement"][1]
    assert roles["effect"] == "Deny" and set(local["role_actions"]) == set(cfn_roles["Action"]) >= ROLE_CHANGES
    assert roles["resources"] == "${var.tagger_principal_arns}"
    [cond] = roles["condition"]
    assert (cond["test"], cond["variable"], cond["values"]) == (
        "ArnNotLike",
        "aws:PrincipalArn",
        "${var.tagger_role_admin_arns}",
    )
