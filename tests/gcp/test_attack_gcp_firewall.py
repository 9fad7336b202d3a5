"""Attacks on the GCP coarse perimeter (``rf-<network>`` network firewall policies): the real
FirewallPolicyPerimeter, through the real compute client, against the local Google API stand-in.
Each test works in a project of its own (a full run reconciles every policy of its project)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ringfence.clouds.gcp.clients import Endpoints
from ringfence.clouds.gcp.firewall import (
    MAX_RULE_PRIORITY,
    ApplyFailed,
    FirewallPolicyPerimeter,
    GcpPerimeterConfig,
    changes_of,
    policy_name,
)
from ringfence.local.gcp_api import GcpApi
from ringfence.perimeter import Member, NameTaken, PerimeterConfig, PlanRefused, PublishedService, Scope

ENV_TAGS = {"prod": "tagValues/101", "dev": "tagValues/102"}
SHOP, SSH = "tagValues/200", "tagValues/300"
CONFIG = PerimeterConfig(
    admin_cidrs=["10.255.0.0/24"],
    control_plane_cidrs=["10.254.0.0/24"],
    published=[
        PublishedService(name="shop", match={"role": "lb"}, ports=["tcp/443"], sources=["0.0.0.0/0"]),
        PublishedService(name="ssh", match={"role": "jumpbox"}, ports=["tcp/22"], sources=["0.0.0.0/0"]),
    ],
)
GCFG = GcpPerimeterConfig(env_tags=ENV_TAGS, published_tags={"shop": SHOP, "ssh": SSH})
MEMBERS = [
    Member("1", "vpc-a", {"env": "prod", "role": "lb"}),
    Member("2", "vpc-a", {"env": "prod", "role": "jumpbox"}),
    Member("3", "vpc-a", {"env": "prod", "role": "db"}),
]


@pytest.fixture(scope="module")
def gcp() -> Iterator[GcpApi]:
    with GcpApi() as api:
        yield api


def project_of(gcp: GcpApi, name: str) -> str:
    gcp.add_project(name, 6000 + len(gcp.projects))
    return name


def perimeter(gcp: GcpApi, project: str) -> FirewallPolicyPerimeter:
    return FirewallPolicyPerimeter(Endpoints(compute=gcp.url, anonymous=True), project)


def rules(gcp: GcpApi, project: str, network: str = "vpc-a") -> list[dict[str, Any]]:
    """The policy's rules by priority, GCP's predefined goto_next rules (not Ringfence's) left out."""
    every = gcp.firewall_policies[project][policy_name(network)]["rules"]
    return sorted((r for r in every if r["priority"] <= MAX_RULE_PRIORITY), key=lambda r: r["priority"])


def internet_ingress(gcp: GcpApi, project: str, network: str = "vpc-a") -> dict[str, set[str]]:
    """Secure tag value → the tcp ports the internet may reach on it."""
    out: dict[str, set[str]] = {}
    for r in rules(gcp, project, network):
        if r["direction"] == "INGRESS" and r["action"] == "allow" and "0.0.0.0/0" in r["match"].get("srcIpRanges", []):
            for t in r.get("targetSecureTags", []):
                for l4 in r["match"]["layer4Configs"]:
                    out.setdefault(t["name"], set()).update(l4.get("ports", [l4["ipProtocol"]]))
    return out


def test_attack_gcp_two_published_services_each_open_only_their_own_tag(gcp: GcpApi) -> None:
    """Two published services in one env: the shop LBs' tag gets 443 from the internet, the
    jumpboxes' tag 22, neither the other's port (each used to get the last service's tag)."""
    project = project_of(gcp, "fw-published")
    perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS)
    assert internet_ingress(gcp, project) == {SHOP: {"443"}, SSH: {"22"}}
    # a service nobody matches opens nothing, and one matched without a tag value is refused whole
    perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS[:1])
    assert internet_ingress(gcp, project) == {SHOP: {"443"}}
    untagged = GcpPerimeterConfig(env_tags=ENV_TAGS, published_tags={"shop": SHOP})
    with pytest.raises(Exception, match="published service 'ssh' has no secure tag value"):
        perimeter(gcp, project).reconcile(CONFIG, untagged, MEMBERS)
    assert internet_ingress(gcp, project) == {SHOP: {"443"}}


def _disable_deny(r: dict[str, Any]) -> bool:
    if r["action"] == "deny":
        r["disabled"] = True
        return True
    return False


def _mgmt(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], bool]:
    def alter(r: dict[str, Any]) -> bool:
        if r["description"] == "rf-prod-mgmt" and r["direction"] == "INGRESS":
            change(r)
            return True
        return False

    return alter


ALTERATIONS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "boundary deny disabled": _disable_deny,
    "second layer4Config (all)": _mgmt(lambda r: r["match"]["layer4Configs"].append({"ipProtocol": "all"})),
    "srcFqdns added": _mgmt(lambda r: r["match"].update(srcFqdns=["evil.example.com"])),
    "srcRegionCodes added": _mgmt(lambda r: r["match"].update(srcRegionCodes=["KP"])),
    "srcAddressGroups added": _mgmt(
        lambda r: r["match"].update(srcAddressGroups=["projects/x/locations/global/addressGroups/all"])
    ),
    "srcSecureTags added": _mgmt(lambda r: r["match"].update(srcSecureTags=[{"name": "tagValues/102"}])),
    "targetServiceAccounts added": _mgmt(lambda r: r.update(targetServiceAccounts=["x@y.iam.gserviceaccount.com"])),
    "enableLogging": _mgmt(lambda r: r.update(enableLogging=True)),
    "securityProfileGroup": _mgmt(lambda r: r.update(securityProfileGroup="//networksecurity/x")),
}


@pytest.mark.parametrize("how", sorted(ALTERATIONS))
def test_attack_gcp_a_perimeter_rule_altered_by_hand_is_replaced_in_a_full_run(gcp: GcpApi, how: str) -> None:
    """A boundary deny disabled by hand, an admin allow widened by a second layer4Config or given a
    match or target field Ringfence does not write: the full run replaces each such rule with the
    rule as planned (it used to compare equal, read by its first layer4Config and a few fields)."""
    project = project_of(gcp, f"fw-altered-{sorted(ALTERATIONS).index(how)}")
    perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS)
    planned = [{k: v for k, v in copy.deepcopy(r).items() if k != "priority"} for r in rules(gcp, project)]
    altered = [r["priority"] for r in rules(gcp, project) if ALTERATIONS[how](r)]
    assert altered
    plans = perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS, Scope.FULL)
    assert sorted(p for p, _ in plans[0].remove) == altered
    now = rules(gcp, project)
    assert not set(altered) & {r["priority"] for r in now}
    assert sorted(map(repr, ({k: v for k, v in r.items() if k != "priority"} for r in now))) == sorted(
        map(repr, planned)
    )
    assert all(p.empty for p in perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS, Scope.FULL))


def test_attack_gcp_a_network_left_by_its_last_member_keeps_no_allow(gcp: GcpApi) -> None:
    """The last member leaves vpc-a: the full run empties rf-vpc-a of its allows (internet, admin,
    env) and keeps its boundary denies (a VM tagged into prod later is closed, not open), re-enabling
    one disabled by hand; a policy named rf-* that Ringfence did not make is not touched, and the
    event path (WORKLOADS) removes nothing."""
    project = project_of(gcp, "fw-orphan")
    perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS)
    denies = {
        (r["match"]["srcIpRanges"][0], r["targetSecureTags"][0]["name"])
        for r in rules(gcp, project)
        if r["action"] == "deny"
    }
    assert denies == {("0.0.0.0/0", "tagValues/101"), ("::/0", "tagValues/101")}
    foreign_rule = {
        "priority": 1000,
        "direction": "INGRESS",
        "action": "allow",
        "description": "team's own",
        "match": {"srcIpRanges": ["0.0.0.0/0"], "layer4Configs": [{"ipProtocol": "tcp", "ports": ["80"]}]},
    }
    gcp.firewall_policies[project]["rf-legacy"] = {
        "kind": "compute#firewallPolicy",
        "id": "1",
        "name": "rf-legacy",
        "description": "the web team's policy",
        "rules": [dict(foreign_rule)],
        "associations": [],
        "fingerprint": "x",
    }
    other = [Member("9", "vpc-b", {"env": "dev"})]
    assert not [
        p for p in perimeter(gcp, project).reconcile(CONFIG, GCFG, other, Scope.WORKLOADS) if p.network == "vpc-a"
    ]
    assert any(r["action"] == "allow" for r in rules(gcp, project))
    rules(gcp, project)[-1]["disabled"] = True  # the last word: a boundary deny, disabled by hand
    perimeter(gcp, project).reconcile(CONFIG, GCFG, other, Scope.FULL)
    left = rules(gcp, project)
    assert {r["action"] for r in left} == {"deny"} and not any(r.get("disabled") for r in left)
    assert {(r["match"]["srcIpRanges"][0], r["targetSecureTags"][0]["name"]) for r in left} == denies
    assert gcp.firewall_policies[project]["rf-legacy"]["rules"] == [foreign_rule]
    assert all(p.empty for p in perimeter(gcp, project).reconcile(CONFIG, GCFG, other, Scope.FULL))
    # a member coming back gets its allows again beside the kept denies
    perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS + other, Scope.FULL)
    assert internet_ingress(gcp, project) == {SHOP: {"443"}, SSH: {"22"}}


@pytest.fixture
def fail_once(gcp: GcpApi, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """fail_once("addRule"): the local API refuses the next firewall policy call with that verb (400)."""
    from ringfence.local import gcp_api

    pending: list[str] = []
    real = GcpApi._firewall

    def _firewall(self: GcpApi, method: str, project: str, rest: str, query: Any, body: Any) -> Any:
        if pending and rest.endswith("/" + pending[0]):
            pending.pop(0)
            raise gcp_api._HttpError(400, "simulated refusal", "invalid")
        return real(self, method, project, rest, query, body)

    monkeypatch.setattr(GcpApi, "_firewall", _firewall)
    return pending.append


def _policy(name: str, description: str, network: str | None, project: str) -> dict[str, Any]:
    return {
        "kind": "compute#firewallPolicy",
        "id": "77",
        "name": name,
        "description": description,
        "rules": [
            {
                "priority": 1000,
                "direction": "INGRESS",
                "action": "allow",
                "description": "team X partner feed",
                "match": {
                    "layer4Configs": [{"ipProtocol": "tcp", "ports": ["8443"]}],
                    "srcIpRanges": ["198.51.100.0/24"],
                },
            }
        ],
        "associations": []
        if network is None
        else [{"name": "x", "attachmentTarget": f"projects/{project}/global/networks/{network}"}],
        "fingerprint": "AA==",
    }


def test_attack_gcp_a_foreign_policy_named_rf_network_is_refused_not_taken_over(gcp: GcpApi) -> None:
    """Another team's policy named rf-vpc-a (its own description, associated with vpc-b): the run
    is refused naming it, and its rules and association are left as they are (it used to be read as
    Ringfence's: its rule removed, the perimeter written into a policy not on vpc-a)."""
    project = project_of(gcp, "fw-foreign-name")
    theirs = _policy("rf-vpc-a", "restricted firewall of team X", "vpc-b", project)
    gcp.firewall_policies[project]["rf-vpc-a"] = copy.deepcopy(theirs)
    for scope in (Scope.FULL, Scope.WORKLOADS):
        with pytest.raises(NameTaken, match=r"rf-vpc-a \(project fw-foreign-name\) is held by a firewall policy"):
            perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS, scope)
    assert gcp.firewall_policies[project]["rf-vpc-a"] == theirs


def test_attack_gcp_a_policy_left_unassociated_is_associated_or_refused_by_name(
    gcp: GcpApi, fail_once: Callable[[str], None]
) -> None:
    """addAssociation fails once after rf-vpc-a is made: the next run associates it (it used to add
    the rules, report converged and never associate it: a perimeter that enforces nothing). A network
    that already has another firewall policy (GCP allows one per network) is refused by name, with
    nothing written."""
    project = project_of(gcp, "fw-association")
    fail_once("addAssociation")
    with pytest.raises(Exception, match="simulated refusal"):
        perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS)
    assert gcp.firewall_policies[project]["rf-vpc-a"]["associations"] == []
    plans = perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS, Scope.WORKLOADS)
    assert [p.associate for p in plans] == [True]
    targets = [a["attachmentTarget"] for a in gcp.firewall_policies[project]["rf-vpc-a"]["associations"]]
    assert targets == [f"projects/{project}/global/networks/vpc-a"]
    assert all(p.empty for p in perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS))
    # the association removed by hand and the network given the team's policy: refused by name
    gcp.firewall_policies[project]["rf-vpc-a"]["associations"] = []
    gcp.firewall_policies[project]["team-fw"] = _policy("team-fw", "team X", "vpc-a", project)
    before = copy.deepcopy(gcp.firewall_policies[project])
    with pytest.raises(PlanRefused, match=r"network vpc-a .* has firewall policy 'team-fw' associated"):
        perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS, Scope.WORKLOADS)
    assert gcp.firewall_policies[project] == before
    # the same for a network that never had rf-<network>: nothing is created
    gcp.firewall_policies[project]["team-fw-b"] = _policy("team-fw-b", "team X", "vpc-b", project)
    del gcp.firewall_policies[project]["team-fw"]
    with pytest.raises(PlanRefused, match=r"network vpc-b .* has firewall policy 'team-fw-b' associated"):
        perimeter(gcp, project).reconcile(CONFIG, GCFG, [*MEMBERS, Member("4", "vpc-b", {"env": "dev"})])
    assert "rf-vpc-b" not in gcp.firewall_policies[project]


def test_attack_gcp_a_failed_add_leaves_the_replaced_deny_in_place(
    gcp: GcpApi, fail_once: Callable[[str], None]
) -> None:
    """A boundary deny altered by hand is replaced by a full run, and the add of its replacement
    fails: the altered deny is still there (the removal used to come first, leaving the network
    without its deny); the next run converges."""
    project = project_of(gcp, "fw-add-first")
    perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS)
    for r in rules(gcp, project):
        if r["action"] == "deny":
            r["enableLogging"] = True
    denies = [r["priority"] for r in rules(gcp, project) if r["action"] == "deny"]
    assert len(denies) == 2
    fail_once("addRule")
    with pytest.raises(Exception, match="simulated refusal"):
        perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS, Scope.FULL)
    assert set(denies) <= {r["priority"] for r in rules(gcp, project) if r["action"] == "deny"}
    perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS, Scope.FULL)
    now = [r for r in rules(gcp, project) if r["action"] == "deny"]
    assert len(now) == 2 and not any(r.get("enableLogging") for r in now)
    assert all(p.empty for p in perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS, Scope.FULL))


def test_attack_gcp_a_stale_allow_in_an_unassociated_policy_is_never_enforced(
    gcp: GcpApi, fail_once: Callable[[str], None]
) -> None:
    """rf-vpc-a lost its association while the config dropped the ssh service (tcp/22 from the
    internet): a run that finds it unassociated makes its rules what the plan says and associates
    it last. An add failing on the way leaves it unassociated, so the stale internet allow is
    enforced nowhere (it used to be associated first: that run enforced tcp/22 from anywhere)."""
    project = project_of(gcp, "fw-associate-last")
    perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS)
    assert internet_ingress(gcp, project) == {SHOP: {"443"}, SSH: {"22"}}
    policy = gcp.firewall_policies[project]["rf-vpc-a"]
    policy["associations"] = []
    moved_on = CONFIG.model_copy(update={"published": [CONFIG.published[0]], "admin_cidrs": ["10.255.1.0/24"]})
    fail_once("addRule")
    with pytest.raises(Exception, match="simulated refusal"):
        perimeter(gcp, project).reconcile(moved_on, GCFG, MEMBERS)
    assert policy["associations"] == [], "a policy holding a stale internet allow was associated"
    perimeter(gcp, project).reconcile(moved_on, GCFG, MEMBERS)
    assert [a["attachmentTarget"] for a in policy["associations"]] == [f"projects/{project}/global/networks/vpc-a"]
    assert internet_ingress(gcp, project) == {SHOP: {"443"}}
    assert all(p.empty for p in perimeter(gcp, project).reconcile(moved_on, GCFG, MEMBERS))


def internet_ports(gcp: GcpApi, project: str, network: str) -> set[str]:
    return {p for ports in internet_ingress(gcp, project, network).values() for p in ports}


def predefined(gcp: GcpApi, project: str, network: str) -> list[dict[str, Any]]:
    every = gcp.firewall_policies[project][policy_name(network)]["rules"]
    return sorted((r for r in every if r["priority"] > MAX_RULE_PRIORITY), key=lambda r: r["priority"])


def test_attack_gcp_predefined_rules_never_keep_a_later_networks_stale_internet_allow(gcp: GcpApi) -> None:
    """GCP adds four goto_next rules that cannot be modified or removed to every policy made
    through the API (priorities 2147483644-2147483647). The shop LB (vpc-b) and the jumpbox
    (vpc-c) are retired: the full run closes their networks and leaves GCP's rules alone. It used
    to plan removing them (audited as removals), failed on the first (400) and never reached
    vpc-b and vpc-c, whose internet allows (tcp/443, tcp/22) stayed open on every later run."""
    project = project_of(gcp, "fw-predefined")
    members = [
        Member("1", "vpc-a", {"env": "prod", "role": "db"}),
        Member("2", "vpc-b", {"env": "prod", "role": "lb"}),
        Member("3", "vpc-c", {"env": "prod", "role": "jumpbox"}),
    ]
    perimeter(gcp, project).reconcile(CONFIG, GCFG, members)
    assert (internet_ports(gcp, project, "vpc-b"), internet_ports(gcp, project, "vpc-c")) == ({"443"}, {"22"})
    made = {n: predefined(gcp, project, n) for n in ("vpc-a", "vpc-b", "vpc-c")}
    assert [r["priority"] for r in made["vpc-a"]] == [2147483644, 2147483645, 2147483646, 2147483647]
    audited: list[dict[str, Any]] = []
    perimeter(gcp, project).reconcile(CONFIG, GCFG, members[:1], applying=lambda p: audited.append(changes_of(p)))
    assert internet_ports(gcp, project, "vpc-b") == set() and internet_ports(gcp, project, "vpc-c") == set()
    [record] = audited
    assert {r["policy"] for r in record["rules_removed"]} == {"rf-vpc-b", "rf-vpc-c"}
    assert all(r["priority"] <= MAX_RULE_PRIORITY for r in record["rules_removed"] + record["rules_added"])
    assert {n: predefined(gcp, project, n) for n in made} == made
    # converged: the next full run (and its dry run) plans nothing, GCP's rules included
    assert all(p.empty for p in perimeter(gcp, project).reconcile(CONFIG, GCFG, members[:1], dry_run=True))
    assert all(p.empty for p in perimeter(gcp, project).reconcile(CONFIG, GCFG, members[:1]))


def test_attack_gcp_one_networks_failed_write_does_not_starve_the_next(
    gcp: GcpApi, fail_once: Callable[[str], None]
) -> None:
    """vpc-a's removal is refused: vpc-b (after it in name order) is still closed in the same run
    (its internet allow removed) and the error names vpc-a (one refused write used to abort the
    rest of the project's plans); the next run converges vpc-a."""
    project = project_of(gcp, "fw-per-network")
    members = [
        Member("1", "vpc-a", {"env": "prod", "role": "jumpbox"}),
        Member("2", "vpc-b", {"env": "prod", "role": "lb"}),
    ]
    perimeter(gcp, project).reconcile(CONFIG, GCFG, members)
    fail_once("removeRule")
    with pytest.raises(ApplyFailed, match=r"network vpc-a: .*simulated refusal") as err:
        perimeter(gcp, project).reconcile(CONFIG, GCFG, [])
    assert list(err.value.failures) == ["vpc-a"]
    assert internet_ports(gcp, project, "vpc-b") == set()
    assert internet_ports(gcp, project, "vpc-a") == {"22"}
    perimeter(gcp, project).reconcile(CONFIG, GCFG, [])
    assert internet_ports(gcp, project, "vpc-a") == set()
    assert all(p.empty for p in perimeter(gcp, project).reconcile(CONFIG, GCFG, []))


def test_gcp_predefined_rules_are_made_on_insert_and_refused_to_change(gcp: GcpApi) -> None:
    """The local API as GCP: a policy made through it has the four predefined goto_next rules,
    which removeRule and patchRule refuse, and no rule is added above priority 2147483547."""
    from google.api_core.exceptions import BadRequest
    from google.cloud import compute_v1

    project = project_of(gcp, "fw-predefined-api")
    perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS)
    client = perimeter(gcp, project).client
    kept = copy.deepcopy(predefined(gcp, project, "vpc-a"))
    assert [(r["priority"], r["direction"], r["action"]) for r in kept] == [
        (2147483644, "EGRESS", "goto_next"),
        (2147483645, "INGRESS", "goto_next"),
        (2147483646, "EGRESS", "goto_next"),
        (2147483647, "INGRESS", "goto_next"),
    ]
    at = {"project": project, "firewall_policy": "rf-vpc-a", "priority": 2147483647}
    rule = compute_v1.FirewallPolicyRule(priority=2147483647, action="deny", direction="INGRESS")
    with pytest.raises(BadRequest, match="predefined"):
        client.remove_rule(request=at)
    with pytest.raises(BadRequest, match="predefined"):
        client.patch_rule(request=at | {"firewall_policy_rule_resource": rule})
    rule.priority = MAX_RULE_PRIORITY + 1
    with pytest.raises(BadRequest, match="between 0 and 2147483547"):
        client.add_rule(project=project, firewall_policy="rf-vpc-a", firewall_policy_rule_resource=rule)
    assert predefined(gcp, project, "vpc-a") == kept


def test_attack_gcp_a_memberless_networks_tampered_boundary_deny_is_repaired(gcp: GcpApi) -> None:
    """vpc-a's last member left; by hand its IPv4 boundary deny is narrowed to one /32 and its IPv6
    deny removed. The full run restores both as Ringfence writes them (it used to rebuild the
    closed policy from the rules it read: the narrowed deny was kept, the removed one not restored,
    so a VM tagged prod on vpc-a later was open to the internet until the next pass)."""
    project = project_of(gcp, "fw-closed-tampered")
    perimeter(gcp, project).reconcile(CONFIG, GCFG, MEMBERS)
    other = [Member("9", "vpc-b", {"env": "dev"})]
    perimeter(gcp, project).reconcile(CONFIG, GCFG, other)
    whole = {
        (r["match"]["srcIpRanges"][0], r["targetSecureTags"][0]["name"], r["description"]) for r in rules(gcp, project)
    }
    assert whole == {("0.0.0.0/0", "tagValues/101", "rf-prod-boundary"), ("::/0", "tagValues/101", "rf-prod-boundary")}
    as_written = sorted(repr({k: v for k, v in r.items() if k != "priority"}) for r in rules(gcp, project))
    policy = gcp.firewall_policies[project]["rf-vpc-a"]
    v4 = next(r for r in policy["rules"] if r["action"] == "deny" and r["match"]["srcIpRanges"] == ["0.0.0.0/0"])
    v4["match"]["srcIpRanges"] = ["203.0.113.7/32"]
    policy["rules"] = [
        r for r in policy["rules"] if r.get("match", {}).get("srcIpRanges") != ["::/0"] or r["action"] != "deny"
    ]
    perimeter(gcp, project).reconcile(CONFIG, GCFG, other)
    now = rules(gcp, project)
    assert {(r["match"]["srcIpRanges"][0], r["targetSecureTags"][0]["name"], r["description"]) for r in now} == whole
    assert sorted(repr({k: v for k, v in r.items() if k != "priority"}) for r in now) == as_written
    assert all(p.empty for p in perimeter(gcp, project).reconcile(CONFIG, GCFG, other))
