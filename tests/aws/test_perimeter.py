"""Perimeter: desired state → quota check → smallest diff, against moto EC2."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from ringfence.perimeter import Member, PerimeterConfig, check_quotas, desired_state
from tests.aws.conftest import Env
from tests.aws.test_pipeline import _ctx, _scheduled, boot

CONFIG = {
    "admin_cidrs": ["10.99.0.0/24"],
    "control_plane_cidrs": ["10.200.0.0/24"],
    "published": [{"name": "web", "match": {"role": "web"}, "ports": ["tcp/443"]}],
}


def run(env: Env, config: dict[str, Any]) -> dict[str, Any]:
    os.environ["RINGFENCE_PERIMETER_CONFIG"] = json.dumps(config)
    try:
        return env.fn["perimeter"].handler(_scheduled(), _ctx())  # type: ignore[no-any-return]
    finally:
        del os.environ["RINGFENCE_PERIMETER_CONFIG"]


def rf_groups(env: Env) -> dict[str, dict[str, Any]]:
    sgs = env.ec2.describe_security_groups(Filters=[{"Name": "tag-key", "Values": ["ringfence:perimeter"]}])
    return {g["GroupName"]: g for g in sgs["SecurityGroups"]}


def test_perimeter_creates_groups_attaches_and_is_then_a_no_op(env: Env) -> None:
    est = boot(env)
    out = run(env, CONFIG)["results"]
    assert out[0]["applied"] and out[0]["plan"]["create"] == 3
    groups = rf_groups(env)
    assert set(groups) == {"rf-prod-boundary", "rf-prod-mgmt", "rf-prod-published"}
    pub = groups["rf-prod-published"]["IpPermissions"]
    assert {(p["FromPort"], r["CidrIp"]) for p in pub for r in p.get("IpRanges", [])} == {(443, "0.0.0.0/0")}
    web = est["ids"]["web"][0]
    eni = env.ec2.describe_instances(InstanceIds=[web])["Reservations"][0]["Instances"][0]["NetworkInterfaces"][0]
    attached = {g["GroupName"] for g in eni["Groups"]}
    assert {"rf-prod-boundary", "rf-prod-mgmt", "rf-prod-published"} <= attached
    db = est["ids"]["db"][0]
    eni = env.ec2.describe_instances(InstanceIds=[db])["Reservations"][0]["Instances"][0]["NetworkInterfaces"][0]
    assert "rf-prod-published" not in {g["GroupName"] for g in eni["Groups"]}, (
        "internet ingress only to published services"
    )
    again = run(env, CONFIG)["results"][0]
    assert again["applied"] is False and again["plan"] == {"create": 0, "authorize": 0, "revoke": 0, "attach": 0}
    # a changed admin range: the smallest diff (one revoke + one authorize per admin port)
    changed = dict(CONFIG, admin_cidrs=["10.98.0.0/24"])
    third = run(env, changed)["results"][0]
    assert third["plan"] == {"create": 0, "authorize": 2, "revoke": 2, "attach": 0}


def test_perimeter_over_quota_changes_nothing(env: Env) -> None:
    boot(env)
    before = env.ec2.describe_security_groups()["SecurityGroups"]
    too_many = dict(CONFIG, admin_cidrs=[f"10.98.{i}.0/24" for i in range(31)])  # 31 ranges x 2 ports = 62
    out = run(env, too_many)["results"][0]
    assert out["applied"] is False
    assert any("rf-prod-mgmt" in v and "62 inbound ipv4 rules > 60" in v for v in out["violations"])
    assert env.ec2.describe_security_groups()["SecurityGroups"] == before


def test_prefix_list_costs_its_max_entries_and_eni_limit() -> None:
    cfg = PerimeterConfig.model_validate(
        {"control_plane_prefix_list": {"id": "pl-1", "max_entries": 61}, "admin_cidrs": ["10.0.0.0/8"]}
    )
    ds = desired_state(cfg, [Member("i-1", "vpc-1", {"env": "prod"})])
    v = check_quotas(ds, cfg, {"i-1": 4})
    assert any("61 outbound ipv4 rules > 60" in x for x in v)
    assert any("i-1: 6 security groups > 5" in x for x in v)


@pytest.mark.parametrize("n,ok", [(30, True), (31, False)])
def test_quota_boundary(n: int, ok: bool) -> None:
    cfg = PerimeterConfig.model_validate({"admin_cidrs": [f"10.{i}.0.0/16" for i in range(n)]})
    ds = desired_state(cfg, [Member("i-1", "vpc-1", {"env": "prod"})])
    assert (check_quotas(ds, cfg) == []) is ok
