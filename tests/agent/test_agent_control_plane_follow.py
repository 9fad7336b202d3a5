"""The control-plane fail-safe's address list (``Daemon.follow_control_plane``) without a kernel:
the current DNS answer, the last one while lookups fail, and earlier addresses only when a
verified TLS handshake reached them within ``CONTROL_PLANE_RETAIN_S`` — the dataplane attack is
tests/agent/test_attack_control_plane_dns_spoof.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ringfence_agent import daemon as daemon_mod
from ringfence_agent import sources
from ringfence_agent.config import AgentConfig
from tests.agent.bundles import PUBLIC_KEY

HOST = "cp.follow.test"


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> daemon_mod.Daemon:
    monkeypatch.setattr(sources, "_verified", {})
    cfg = AgentConfig(
        workload_id="w",
        public_key=PUBLIC_KEY,
        state_dir=tmp_path / "state",
        backend="dry-run",
        source=f"https://{HOST}",
        control_plane=["192.0.2.7"],
        system_resolvers=False,
    )
    return daemon_mod.Daemon(cfg)


def answer(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> None:
    monkeypatch.setattr(daemon_mod, "_lookup", lambda host: tuple(addresses) or None)


def proved(address: str, ago: float) -> None:
    sources._verified.setdefault(HOST, {})[address] = time.monotonic() - ago


def admitted(d: daemon_mod.Daemon) -> tuple[str, ...]:
    return d.agent.local.control_plane


def test_a_dns_only_address_drops_out_at_the_next_answer(
    daemon: daemon_mod.Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer(monkeypatch, "203.0.113.66")
    daemon.follow_control_plane(apply=False)
    assert admitted(daemon) == ("192.0.2.7", "203.0.113.66")
    answer(monkeypatch, "203.0.113.10")
    daemon.follow_control_plane(apply=False)
    assert admitted(daemon) == ("192.0.2.7", "203.0.113.10"), "the earlier answer is no proof"


def test_the_last_answer_stays_while_the_name_does_not_resolve(
    daemon: daemon_mod.Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer(monkeypatch, "203.0.113.10")
    daemon.follow_control_plane(apply=False)
    answer(monkeypatch)  # no answer at all
    daemon.follow_control_plane(apply=False)
    assert admitted(daemon) == ("192.0.2.7", "203.0.113.10")


def test_the_last_answer_is_dropped_once_older_than_the_retention(
    daemon: daemon_mod.Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One spoofed answer, then DNS blocked: the address goes once the answer is as old as a
    proved address may be."""
    answer(monkeypatch, "203.0.113.66")
    daemon.follow_control_plane(apply=False)
    answer(monkeypatch)
    later = time.monotonic() + daemon_mod.CONTROL_PLANE_RETAIN_S + 1
    monkeypatch.setattr(daemon_mod.time, "monotonic", lambda: later)
    daemon.follow_control_plane(apply=False)
    assert admitted(daemon) == ("192.0.2.7",)


def test_a_proved_address_stays_within_retention_only(
    daemon: daemon_mod.Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer(monkeypatch, "203.0.113.10")
    proved("203.0.113.1", ago=60)
    proved("203.0.113.2", ago=daemon_mod.CONTROL_PLANE_RETAIN_S + 60)
    daemon.follow_control_plane(apply=False)
    assert admitted(daemon) == ("192.0.2.7", "203.0.113.1", "203.0.113.10")


def test_the_cap_keeps_the_current_answer_first_then_the_newest_proved(
    daemon: daemon_mod.Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer(monkeypatch, "198.51.100.1")
    for i in range(100):
        proved(f"203.0.113.{i}", ago=i)
    daemon.follow_control_plane(apply=False)
    got = set(admitted(daemon)) - {"192.0.2.7"}
    assert len(got) == daemon_mod.CONTROL_PLANE_MAX and "198.51.100.1" in got
    assert got - {"198.51.100.1"} == {f"203.0.113.{i}" for i in range(daemon_mod.CONTROL_PLANE_MAX - 1)}


def test_a_handshake_is_recorded_only_when_it_verified_the_name() -> None:
    class Sock:
        pass

    sources.note_verified_peer(HOST, Sock())  # no TLS socket: nothing
    assert sources.verified_peers(HOST, 3600) == {}


def test_a_lookup_that_outlives_its_deadline_is_waited_for_not_started_again(
    daemon: daemon_mod.Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def slow(host: str) -> tuple[str, ...]:
        calls.append(host)
        time.sleep(0.5)
        return ("203.0.113.10",)

    monkeypatch.setattr(daemon_mod, "_lookup", slow)
    started = time.monotonic()
    daemon.follow_control_plane(apply=False, within=0.05)
    assert time.monotonic() - started < 0.4 and admitted(daemon) == ("192.0.2.7",)
    daemon.follow_control_plane(apply=False, within=2)
    assert calls == [HOST] and admitted(daemon) == ("192.0.2.7", "203.0.113.10")
