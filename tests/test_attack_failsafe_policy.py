"""Fail-safes bounded (issue 10): a policy author cannot turn the fail-safes (what no rule can
remove) into "everything", neither at once (0.0.0.0/0, ::/0) nor in halves (0.0.0.0/1 +
128.0.0.0/1). Each refused prefix is a positioned policy error; the agent refuses a bundle or
a local setting carrying one too (tests/agent/test_attack_agent_bounds.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ringfence import bundlewire as wire
from ringfence.bundlewire import FAILSAFE_WIDEST
from ringfence.policy import PolicyError, load_policy_texts

RINGFENCE = str(Path(sys.executable).parent / "ringfence")

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


def test_explain_admits_the_control_plane_on_its_port_only(tmp_path: Path) -> None:
    """``ringfence explain`` decides the control-plane fail-safe as the agents render it: outbound
    to the control plane on tcp/443, not every port, and never inbound from it."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        POLICY.format(admin="10.20.0.0/16", control="198.51.100.10/32").replace(
            "rulesets:",
            'labels:\n  dimensions:\n    role: {keys: ["ringfence:role"]}\n    app: {keys: ["ringfence:app"]}\nrulesets:',
        )
    )

    def verdict(src: str, dst: str, port: str) -> tuple[str, list[str | None]]:
        out = subprocess.run(
            [RINGFENCE, "explain", "--policy", str(policy), "--from", src, "--to", dst, "--port", port, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        doc = json.loads(out)
        return doc["verdict"], [s.get("failsafe") for s in doc["sides"]]

    assert verdict("role=web,app=shop", "198.51.100.10", "tcp/443") == ("allow", ["the control-plane endpoint"])
    assert verdict("role=web,app=shop", "198.51.100.10", "tcp/22")[0] == "deny"
    assert verdict("198.51.100.10", "role=web,app=shop", "tcp/443")[0] == "deny"


def test_attack_failsafes_as_many_slash_8s_are_refused_as_one_list() -> None:
    """Each /8 passes the per-prefix bound; all 256 are 0.0.0.0/0 and every other one is half of
    it. A list may open four /8s' worth in all (overlaps counted once)."""
    for admin, about in (
        (", ".join(f"{i}.0.0.0/8" for i in range(256)), 256),
        (", ".join(f"{i}.0.0.0/8" for i in range(0, 256, 2)), 128),
    ):
        msgs = problems(admin, "192.0.2.10")
        assert len(msgs) == 1 and msgs[0].startswith("p.yaml:3:"), msgs
        assert f"open more than 4 /8s' worth of addresses (about {about}" in msgs[0]
    v6 = ", ".join(f"'2001:{i:x}::/32'" for i in range(5))
    assert "IPv6 fail-safe prefixes open more than 4 /32s' worth" in problems("10.0.0.0/8", v6)[0]
    # RFC 1918 in all, and four /8s with overlaps inside them, still load
    policy = load_policy_texts(
        {
            "p.yaml": POLICY.format(
                admin="10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 10.1.0.0/16",
                control="11.0.0.0/8, 12.0.0.0/8, 13.0.0.0/8, 14.0.0.0/8",
            )
        }
    )
    assert len(policy.failsafes.admin_cidrs) == 4 and len(policy.failsafes.control_plane) == 4
