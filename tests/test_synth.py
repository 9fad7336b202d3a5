"""The synthetic estate generator: reproducible with a seed, and shaped as documented."""

from __future__ import annotations

import ipaddress
from collections import Counter

from ringfence import synth
from ringfence.engine import Engine
from ringfence.model import Action
from ringfence.policy import load_policy_texts


def test_same_seed_same_estate_different_seed_different_estate() -> None:
    a, b, c = synth.generate(600, seed=3), synth.generate(600, seed=3), synth.generate(600, seed=4)
    assert a.policy_texts == b.policy_texts
    assert [w.model_dump() for w in a.workloads] == [w.model_dump() for w in b.workloads]
    assert a.policy_texts != c.policy_texts or [w.id for w in a.workloads] != [w.id for w in c.workloads]


def test_shape_counts_and_labels() -> None:
    estate = synth.generate(2000, seed=1)
    assert len(estate.workloads) == 2000
    assert len({w.id for w in estate.workloads}) == 2000
    assert len(estate.apps) == synth.default_apps(2000)
    policy = load_policy_texts(estate.policy_texts)
    engine = Engine(policy)
    engine.load(estate.workloads)
    # every workload is fully labelled from its tags (no hygiene failures in the synthetic estate)
    assert all(not ws.unlabeled for ws in engine.workloads.values())
    envs = Counter(ws.labels["env"] for ws in engine.workloads.values())
    assert envs["prod"] > envs["dev"] > 0 and envs["staging"] > 0 and envs["shared"] > 0
    roles = Counter(ws.labels["role"] for ws in engine.workloads.values())
    assert {"lb", "web", "app", "db", "dns", "ntp", "ldap", "monitoring", "jumpbox"} <= set(roles)
    # the documented policy features are all present
    actions = Counter(r.action for r in policy.rules)
    assert actions[Action.OVERRIDE_DENY] >= 1 and actions[Action.DENY] >= 1
    assert any(r.staged for r in policy.rules)
    assert any(r.consumer.ip_list for r in policy.rules) and any(r.provider.ip_list for r in policy.rules)
    assert any(r.same == ("env",) for r in policy.rules), "cross-app rules pin env only"
    assert {m.mode.value for m in policy.modes} == {"observe", "idle"}
    assert {ws.mode.value for ws in engine.workloads.values()} >= {"enforce", "observe"}
    internet = policy.ip_lists["internet"]
    assert any(p[0] == 6 for p in internet) and len(internet) > 2, "exclusions split 0.0.0.0/0"


def test_rules_scale_with_apps() -> None:
    small = load_policy_texts(synth.generate(1000).policy_texts)
    large = load_policy_texts(synth.generate(10000).policy_texts)
    assert 80 <= len(small.rules) <= 160
    assert 850 <= len(large.rules) <= 1150, "~1,000 rules at N = 10,000"


def test_addresses_contiguous_per_subnet_with_some_v6() -> None:
    estate = synth.generate(1500, seed=2)
    ips = [ip for w in estate.workloads for ip in w.ips]
    assert len(ips) == len(set(ips)), "no two workloads share an address"
    v6 = [ip for ip in ips if ":" in ip]
    assert 0 < len(v6) < len(ips) / 2
    # one app group's v4 addresses form one contiguous run
    group = [w for w in estate.workloads if w.id.startswith(f"{estate.apps[0]}-prod-")]
    by_loc: dict[str, list[int]] = {}
    for w in group:
        by_loc.setdefault(w.tags["ringfence:loc"], []).append(int(ipaddress.ip_address(w.ips[0])))
    for values in by_loc.values():
        values.sort()
        assert values[-1] - values[0] < len(values) + 6 * (len(values) // 250 + 1)
