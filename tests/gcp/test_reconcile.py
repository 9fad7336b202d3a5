"""The scheduled GCP reconcile: the real compute SDK client against the local Google API, the
local wiring (SQLite) as the control plane. A VM no event announced is inventoried, the firewall
policy follows the labels, a second run writes nothing, an over-limit plan changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ringfence.clouds.gcp.firewall import FwRule, GcpLimits, GcpPerimeterConfig, policy_name
from ringfence.clouds.gcp.reconcile import GcpPerimeter, GcpReconcile
from ringfence.local.gcp_api import GcpApi
from ringfence.local.gcp_project import PROJECT, gcp_config
from ringfence.local.wiring import LocalWiring
from ringfence.perimeter import PerimeterConfig
from tests.gcp.conftest import web_vm

PROD = "tagValues/301"
PERIMETER = GcpPerimeter(
    PerimeterConfig(admin_cidrs=["10.255.0.0/24"], control_plane_cidrs=["10.254.0.0/24"]),
    GcpPerimeterConfig(env_tags={"prod": PROD}),
)


def rules(gcp: GcpApi, network: str = "default") -> set[FwRule]:
    policy = gcp.firewall_policies[PROJECT][policy_name(network)]
    return {FwRule.from_resource(r)[1] for r in policy["rules"]}


def test_a_vm_no_event_announced_is_inventoried_and_the_policy_follows_then_nothing_changes(
    gcp: GcpApi, wiring: LocalWiring
) -> None:
    inst = web_vm(gcp, "10.30.0.5")  # created behind the events' back: only the full list sees it
    assert wiring.store.get(inst["id"]) is None
    res = GcpReconcile(wiring, gcp_config(gcp), PERIMETER).run()
    assert res.failed == {}
    rec = wiring.store.get(inst["id"])
    assert rec is not None and inst["id"] in res.changed
    assert rec.labels.get("env") == "prod", rec.labels
    assert res.perimeter_writes > 0
    got = rules(gcp)
    assert (
        FwRule("INGRESS", "deny", "all", (), src_ranges=("0.0.0.0/0",), target_tags=(PROD,), group="rf-prod-boundary")
        in got
    )
    assert any(r.action == "allow" and r.src_tags == (PROD,) and r.target_tags == (PROD,) for r in got)
    assert any(r.src_ranges == ("10.255.0.0/24",) for r in got)
    # smallest diff: the second run finds everything in place and writes nothing
    again = GcpReconcile(wiring, gcp_config(gcp), PERIMETER).run()
    assert again.failed == {} and again.perimeter_writes == 0 and inst["id"] not in again.changed
    assert rules(gcp) == got


def test_a_vm_gone_behind_the_events_back_is_tombstoned(gcp: GcpApi, wiring: LocalWiring) -> None:
    inst = web_vm(gcp, "10.30.0.6")
    GcpReconcile(wiring, gcp_config(gcp)).run()
    gcp.delete_instance(PROJECT, inst["zone"].rsplit("/", 1)[-1], inst["name"])
    res = GcpReconcile(wiring, gcp_config(gcp)).run()
    rec = wiring.store.get(inst["id"])
    assert rec is not None and rec.state == "terminated" and inst["id"] in res.changed


def test_an_over_limit_plan_changes_nothing_and_says_which_limit(gcp: GcpApi, wiring: LocalWiring) -> None:
    web_vm(gcp, "10.30.0.7")
    before = json.dumps(gcp.firewall_policies.get(PROJECT, {}), sort_keys=True)
    limits = GcpLimits(rules_per_policy=1)
    tight = GcpPerimeter(PERIMETER.config, GcpPerimeterConfig(env_tags={"prod": PROD}, limits=limits))
    res = GcpReconcile(wiring, gcp_config(gcp), tight).run()
    assert "rules per firewall policy" in res.failed[PROJECT]
    assert res.perimeter_writes == 0
    assert json.dumps(gcp.firewall_policies.get(PROJECT, {}), sort_keys=True) == before


def test_a_new_env_adds_only_its_rules_and_the_existing_keep_their_priorities(gcp: GcpApi, wiring: LocalWiring) -> None:
    from ringfence.local.gcp_project import ORG, ZONE, vm_name

    both = GcpPerimeter(PERIMETER.config, GcpPerimeterConfig(env_tags={"prod": PROD, "dev": "tagValues/302"}))
    web_vm(gcp, "10.30.0.8")
    GcpReconcile(wiring, gcp_config(gcp), both).run()
    policy = gcp.firewall_policies[PROJECT][policy_name("default")]
    before = {int(r["priority"]): FwRule.from_resource(r)[1] for r in policy["rules"]}
    dev = gcp.add_instance(PROJECT, ZONE, vm_name(), ["10.30.1.8"])
    for k, v in {"ringfence-role": "web", "ringfence-app": "ordering", "ringfence-env": "dev"}.items():
        gcp.bind_tag(PROJECT, ZONE, dev["id"], ORG, k, v)
    res = GcpReconcile(wiring, gcp_config(gcp), both).run()
    assert res.failed == {} and dev["id"] in res.changed
    policy = gcp.firewall_policies[PROJECT][policy_name("default")]
    after = {int(r["priority"]): FwRule.from_resource(r)[1] for r in policy["rules"]}
    assert {p: after[p] for p in before} == before  # nothing moved or rewritten
    added = [r for p, r in after.items() if p not in before]
    assert added and all(r.target_tags == ("tagValues/302",) for r in added)
    assert res.perimeter_writes == len(added)


def test_a_refused_perimeter_write_fails_the_project_by_network_and_is_counted(
    gcp: GcpApi, wiring: LocalWiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rule write refused (400): the run reports the project failed, naming the network,
    counts it (GcpReconcileFailed) and no perimeter write; the other networks' plans are applied
    on their own (tests/gcp/test_attack_gcp_firewall.py)."""
    from ringfence.local import gcp_api

    tags = GcpPerimeterConfig(env_tags={"prod": PROD, "dev": "tagValues/302"})  # the module's VMs' envs
    web_vm(gcp, "10.30.0.9")
    assert GcpReconcile(wiring, gcp_config(gcp), GcpPerimeter(PERIMETER.config, tags)).run().failed == {}
    real = GcpApi._firewall

    def refuse(self: GcpApi, method: str, project: str, rest: str, query: Any, body: Any) -> Any:
        if rest.endswith(("/addRule", "/removeRule")):
            raise gcp_api._HttpError(400, "simulated refusal", "invalid")
        return real(self, method, project, rest, query, body)

    monkeypatch.setattr(GcpApi, "_firewall", refuse)
    moved = GcpPerimeter(PERIMETER.config.model_copy(update={"admin_cidrs": ["10.255.9.0/24"]}), tags)
    counted: list[tuple[str, float]] = []
    res = GcpReconcile(wiring, gcp_config(gcp), moved, metric=lambda n, v: counted.append((n, v))).run()
    assert res.failed[PROJECT].startswith("perimeter apply failed for network default: BadRequest")
    assert "simulated refusal" in res.failed[PROJECT] and res.perimeter_writes == 0
    assert ("GcpReconcileFailed", 1) in counted
