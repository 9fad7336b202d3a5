"""The DNS fail-safe's servers read from resolv.conf (``ringfence_agent.resolvers``) and how the
configuration takes them (``system_resolvers``, the width rule on ``dns_resolvers``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringfence_agent import config as agent_config
from ringfence_agent.config import AgentConfig
from ringfence_agent.plan import PlanError, bounded_cidrs
from ringfence_agent.resolvers import MAX_RESOLVERS, nameservers, system_resolvers


def test_resolv_conf_nameservers(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\nsearch ec2.internal\nnameserver 169.254.169.253\nnameserver fe80::1%eth0\n"
        "nameserver not-an-address\nnameserver 0.0.0.0\nnameserver 10.0.0.2 # trailing\n"
        "options timeout:2\n nameserver 10.0.0.3\n"
    )
    assert nameservers(conf) == (["169.254.169.253", "fe80::1", "10.0.0.2", "10.0.0.3"], False)
    assert nameservers(tmp_path / "missing") == ([], False)


def test_a_loopback_stub_admits_the_servers_it_forwards_to(tmp_path: Path) -> None:
    """systemd-resolved: /etc/resolv.conf names 127.0.0.53 (loopback passes anyway); the servers
    the stub forwards to are what the firewall must admit."""
    stub, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    stub.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    upstream.write_text("nameserver 10.0.0.2\nnameserver 10.0.0.2\nnameserver ::1\n")
    assert system_resolvers(stub, upstream) == ("10.0.0.2",)
    stub.write_text("nameserver 10.1.1.1\n")  # no stub: the upstream file is not consulted
    assert system_resolvers(stub, upstream) == ("10.1.1.1",)
    stub.write_text("".join(f"nameserver 10.0.0.{i}\n" for i in range(1, 40)))
    assert len(system_resolvers(stub, upstream)) == MAX_RESOLVERS


def test_config_admits_the_hosts_resolvers_only_for_a_named_control_plane(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 169.254.169.253\n")
    monkeypatch.setattr(agent_config, "system_resolvers", lambda: system_resolvers(conf, tmp_path / "none"))
    base = {"workload_id": "w", "public_key": Path("k"), "enroll": None}
    named = AgentConfig(**base, source="https://abc.execute-api.us-east-1.amazonaws.com/v1", dns_resolvers=["10.0.0.2"])
    assert named.local_failsafes().dns_resolvers == ("10.0.0.2", "169.254.169.253")
    off = AgentConfig(**base, source="https://abc.execute-api.us-east-1.amazonaws.com/v1", system_resolvers=False)
    assert off.local_failsafes().dns_resolvers == ()
    by_address = AgentConfig(**base, source="http://10.0.0.9:8080")  # nothing to resolve
    assert by_address.local_failsafes().dns_resolvers == ()


def test_attack_a_local_dns_resolver_cannot_widen_the_failsafe_to_everything() -> None:
    """The DNS fail-safe is bounded like the others: ``dns_resolvers: [0.0.0.0/0]`` would open
    port 53 to the world (a tunnel out through DNS to any server)."""
    for wide in ("0.0.0.0/0", "::/0", "10.0.0.0/7"):
        with pytest.raises(ValueError, match="fail-safe may not open"):
            AgentConfig(workload_id="w", public_key=Path("k"), source="/x", dns_resolvers=[wide])
    with pytest.raises(PlanError, match="fail-safe may not open"):
        bounded_cidrs(["0.0.0.0/0"], "failsafes.dns_resolvers")
