"""The coarse GCP perimeter: network firewall policies from the neutral plan, limits checked first,
smallest diff — applied through the real compute client to the local Google API stand-in."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ringfence.clouds.gcp.clients import Endpoints
from ringfence.clouds.gcp.firewall import (
    FirewallPolicyPerimeter,
    FwRule,
    GcpLimits,
    GcpPerimeterConfig,
    diff,
    policy_name,
    read_rules,
)
from ringfence.local.gcp_api import GcpApi
from ringfence.perimeter import Member, PerimeterConfig, PlanRefused, PublishedService, QuotaExceeded, Scope

PROJECT = "shop-net"
ENV_TAGS = {"prod": "tagValues/101", "dev": "tagValues/102", "shared": "tagValues/103"}
CONFIG = PerimeterConfig(
    admin_cidrs=["10.255.0.0/24"],
    control_plane_cidrs=["10.254.0.0/24"],
    reachable_from={"shared": ["prod", "dev"]},
    published=[PublishedService(name="shop", match={"role": "lb"}, ports=["tcp/443"], sources=["0.0.0.0/0"])],
)
MEMBERS = [
    Member("1", "vpc-a", {"env": "prod", "role": "web"}),
    Member("2", "vpc-a", {"env": "prod", "role": "lb"}),
    Member("3", "vpc-a", {"env": "shared", "role": "dns"}),
    Member("4", "vpc-a", {"env": "dev", "role": "web"}),
]


@pytest.fixture(scope="module")
def gcp() -> Iterator[GcpApi]:
    with GcpApi() as api:
        api.add_project(PROJECT, 5150)
        yield api


def perimeter(gcp: GcpApi) -> FirewallPolicyPerimeter:
    return FirewallPolicyPerimeter(Endpoints(compute=gcp.url, anonymous=True), PROJECT)


def gcfg(**kw: object) -> GcpPerimeterConfig:
    return GcpPerimeterConfig(env_tags=ENV_TAGS, published_tags={"shop": "tagValues/200"}, **kw)  # type: ignore[arg-type]


def rules_of(gcp: GcpApi, network: str) -> dict[int, FwRule]:
    policy = gcp.firewall_policies[PROJECT][policy_name(network)]
    return read_rules(policy["rules"])


def test_the_plan_becomes_one_policy_per_network_with_env_boundaries_and_a_final_deny(gcp: GcpApi) -> None:
    plans = perimeter(gcp).reconcile(CONFIG, gcfg(), MEMBERS)
    assert [p.policy for p in plans] == ["rf-vpc-a"] and plans[0].create
    policy = gcp.firewall_policies[PROJECT]["rf-vpc-a"]
    assert policy["associations"][0]["attachmentTarget"] == f"projects/{PROJECT}/global/networks/vpc-a"
    rules = rules_of(gcp, "vpc-a")
    allows = {r for r in rules.values() if r.action == "allow"}
    # prod admits prod; shared admits prod and dev; nothing admits dev into prod
    assert (
        FwRule(
            "INGRESS",
            "allow",
            "all",
            (),
            src_tags=("tagValues/101",),
            target_tags=("tagValues/101",),
            group="rf-prod-boundary",
        )
        in allows
    )
    shared_src = {r.src_tags for r in allows if r.target_tags == ("tagValues/103",) and r.src_tags}
    assert shared_src == {("tagValues/101",), ("tagValues/102",), ("tagValues/103",)}
    assert not any(r.src_tags == ("tagValues/102",) and r.target_tags == ("tagValues/101",) for r in allows)
    # admin ports from the admin range, the published service on its own tag, HTTPS out to the control plane
    assert (
        FwRule(
            "INGRESS",
            "allow",
            "tcp",
            ("22",),
            src_ranges=("10.255.0.0/24",),
            target_tags=("tagValues/101",),
            group="rf-prod-mgmt",
        )
        in allows
    )
    assert any(r.target_tags == ("tagValues/200",) and r.ports == ("443",) for r in allows)
    assert any(r.direction == "EGRESS" and r.dest_ranges == ("10.254.0.0/24",) for r in allows)
    denies = {p: r for p, r in rules.items() if r.action == "deny"}
    assert (
        denies and all(p >= 60000 for p in denies) and all(p < 60000 for p, r in rules.items() if r.action == "allow")
    )
    # the second run changes nothing
    again = perimeter(gcp).reconcile(CONFIG, gcfg(), MEMBERS)
    assert all(p.empty for p in again)


def test_smallest_diff_keeps_priorities_and_removes_only_in_a_full_run(gcp: GcpApi) -> None:
    members = [Member("10", "vpc-b", {"env": "prod"}), Member("11", "vpc-b", {"env": "dev"})]
    perimeter(gcp).reconcile(CONFIG, gcfg(), members)
    before = rules_of(gcp, "vpc-b")
    calls = len(gcp.calls)
    # dev leaves the network: the event path only adds (nothing to add), the full run removes dev's rules
    plans = perimeter(gcp).reconcile(CONFIG, gcfg(), members[:1], Scope.WORKLOADS)
    assert all(p.empty for p in plans) and rules_of(gcp, "vpc-b") == before
    plans = perimeter(gcp).reconcile(CONFIG, gcfg(), members[:1], Scope.FULL)
    removed = {prio for prio, _ in plans[0].remove}
    assert removed and all("tagValues/102" in r.target_tags for _, r in plans[0].remove) and not plans[0].add
    after = rules_of(gcp, "vpc-b")
    assert after == {p: r for p, r in before.items() if p not in removed}  # the rest kept their priorities
    writes = [p for m, p in gcp.calls[calls:] if m == "POST"]
    assert len(writes) == len(removed)


def test_diff_fills_the_lowest_free_priority_of_the_band() -> None:
    a = FwRule("INGRESS", "allow", "tcp", ("22",), src_ranges=("10.0.0.0/8",), group="g")
    b = FwRule("INGRESS", "allow", "tcp", ("80",), src_ranges=("10.0.0.0/8",), group="g")
    d = FwRule("INGRESS", "deny", "all", (), src_ranges=("0.0.0.0/0",), group="g")
    p = diff("n", {a, b, d}, {1000: a, 1002: FwRule("INGRESS", "allow", "udp", (), group="old")})
    assert p.add == [(1001, b), (60000, d)] and [prio for prio, _ in p.remove] == [1002]


def test_a_plan_over_a_limit_changes_nothing(gcp: GcpApi) -> None:
    members = [Member("20", "vpc-c", {"env": "prod"})]
    calls = len(gcp.calls)
    with pytest.raises(QuotaExceeded, match="rules per firewall policy"):
        perimeter(gcp).reconcile(CONFIG, gcfg(limits=GcpLimits(rules_per_policy=3)), members)
    assert "rf-vpc-c" not in gcp.firewall_policies[PROJECT]
    assert not [p for m, p in gcp.calls[calls:] if m != "GET"]
    many = CONFIG.model_copy(update={"admin_cidrs": [f"10.{i}.0.0/16" for i in range(40)]})
    with pytest.raises(QuotaExceeded, match="rule attributes"):
        perimeter(gcp).reconcile(many, gcfg(limits=GcpLimits(rule_attributes_per_policy=50)), members)


def test_a_throttled_firewall_api_is_retried(gcp: GcpApi) -> None:
    members = [Member("30", "vpc-t", {"env": "prod", "role": "web"})]
    calls = len(gcp.calls)
    gcp.throttle(2, retry_after=1)
    plans = perimeter(gcp).reconcile(CONFIG, gcfg(), members, Scope.WORKLOADS)
    assert [p.policy for p in plans] == ["rf-vpc-t"]
    assert "rf-vpc-t" in gcp.firewall_policies[PROJECT]
    made = gcp.calls[calls:]
    assert made[0] == made[1] == made[2], "the throttled request was retried as it was"


def test_an_env_without_a_secure_tag_is_refused_by_name(gcp: GcpApi) -> None:
    with pytest.raises(PlanRefused, match="env 'qa' has no secure tag value"):
        perimeter(gcp).reconcile(CONFIG, gcfg(), [Member("30", "vpc-d", {"env": "qa"})])
    assert "rf-vpc-d" not in gcp.firewall_policies[PROJECT]


def test_members_are_the_projects_live_vms_by_network() -> None:
    from ringfence.clouds.gcp.firewall import members
    from ringfence.model import Workload
    from ringfence.store.base import InventoryRecord

    def rec(wid: str, project: str, state: str = "running", cloud: str = "gcp") -> InventoryRecord:
        w = Workload(id=wid, cloud=cloud, account=project, vpc="vpc-a")  # type: ignore[arg-type]
        return InventoryRecord(id=wid, workload=w, state=state, labels={"env": "prod"})

    recs = [rec("1", PROJECT), rec("2", PROJECT, "terminated"), rec("3", "other"), rec("4", PROJECT, cloud="aws")]
    assert members(recs, PROJECT) == [Member("1", "vpc-a", {"env": "prod"})]
