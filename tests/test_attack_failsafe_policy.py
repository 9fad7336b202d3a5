"""Fail-safes bounded (issue 10): a policy author cannot turn the fail-safes (what no rule can
remove) into "everything", neither at once (0.0.0.0/0, ::/0) nor in halves (0.0.0.0/1 +
128.0.0.0/1). Each refused prefix is a positioned policy error; the agent refuses a bundle or
a local setting carrying one too (tests/agent/test_attack_agent_bounds.py)."""

from __future__ import annotations

import pytest

from ringfence import bundlewire as wire
from ringfence.bundlewire import FAILSAFE_WIDEST
from ringfence.policy import PolicyError, load_policy_texts

POLICY = """\
defaults:
  failsafes:
    admin_cidrs: [{admin}]
    control_plane: [{control}]
rulesets:
  - name: shop
    scope: app == shop
    rules:
      - {{name: a, from: role == lb, to: role == web, services: [tcp/443]}}
"""


def problems(admin: str, control: str) -> list[str]:
    with pytest.raises(PolicyError) as exc:
        load_policy_texts({"p.yaml": POLICY.format(admin=admin, control=control)})
    return [str(p) for p in exc.value.problems]


def test_attack_a_policy_widening_failsafes_to_everything_is_refused_at_the_offending_entry() -> None:
    msgs = problems("10.20.0.0/16, 0.0.0.0/0", "'::/0'")
    assert len(msgs) == 2
    assert msgs[0].startswith("p.yaml:3:33: 0.0.0.0/0: a fail-safe may not open every address")
    assert msgs[1].startswith("p.yaml:4:21: ::/0: a fail-safe may not open every address")
    assert "IPv6 fail-safe prefixes must be /32 or longer" in msgs[1]
    assert "list the management networks themselves" in msgs[0]


def test_attack_failsafe_halves_and_short_prefixes_are_refused_too() -> None:
    msgs = problems("0.0.0.0/1, 128.0.0.0/1", "'2000::/3', 10.0.0.0/7")
    assert [m.split(": ", 2)[1] for m in msgs] == ["0.0.0.0/1", "128.0.0.0/1", "2000::/3", "10.0.0.0/7"]
    assert all("IPv4 fail-safe prefixes must be /8 or longer" in m for m in (msgs[0], msgs[1], msgs[3]))


def test_the_widest_allowed_failsafe_prefixes_load() -> None:
    policy = load_policy_texts({"p.yaml": POLICY.format(admin="10.0.0.0/8, 192.0.2.7", control="'2001:db8::/32'")})
    assert len(policy.failsafes.admin_cidrs) == 2 and len(policy.failsafes.control_plane) == 1
    assert FAILSAFE_WIDEST == {4: 8, 6: 32}
    assert wire.failsafe_width_problem(4, 8) is None and wire.failsafe_width_problem(6, 31) is not None
