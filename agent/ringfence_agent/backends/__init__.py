"""Firewall backends: every one renders the same :class:`~ringfence_agent.plan.Plan`."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from ringfence_agent.plan import GroupChange, Plan

BACKENDS = ("nftables", "iptables", "windows-plan", "dry-run")


# Drop-tuple set elements expire this long after their last packet (nftables and ipset alike).
TUPLE_LINGER_S = 60


# what ``kernel_problem()`` answers when the kernel holds nothing of Ringfence's (no table, no chains)
ABSENT = "the kernel holds no Ringfence rules"


def agent_uid() -> int:
    """The user whose sockets the control-plane fail-safe admits: the one the agent runs as (the
    unit's ``ringfence-agent``; root where it is run as root). Another local user is dropped."""
    return os.geteuid()


class ApplyError(RuntimeError):
    """The backend refused the change; the previous state is still in force."""


class ReadError(OSError):
    """The kernel's rules could not be read (nftables: the listing process died, e.g. libnftables
    aborting on a string that is not UTF-8, or timed out): the agent cannot tell what they are,
    never takes them for intact, and programs them again."""


@dataclass(frozen=True, slots=True)
class DropTuple:
    """One entry of a drop point's address tuple table (a real kernel-side record)."""

    point: str  # counter name: r_in_3, d_out, ...
    src: str
    dst: str
    proto: str
    dport: int | None
    packets: int
    sport: int | None = None  # None: no ports (ICMP), or the backend cannot tell (see iptables)


@dataclass(slots=True)
class Observation:
    counters: dict[str, int] = field(default_factory=dict)  # counter name → packets
    tuples: list[DropTuple] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ElementChange:
    set: str
    add_v4: tuple[str, ...] = ()
    add_v6: tuple[str, ...] = ()
    remove_v4: tuple[str, ...] = ()
    remove_v6: tuple[str, ...] = ()
    # what the change does to grouped rules that have a member on this set (backends that keep
    # (address, service) elements per group apply these; the others only need the set's own)
    groups: tuple[GroupChange, ...] = ()

    def inverse(self) -> ElementChange:
        """The change that takes this one back out (deletes run before adds in every backend),
        grouped rules' elements included."""
        groups = tuple(replace(g, add=g.remove, remove=g.add) for g in self.groups)
        return ElementChange(self.set, self.remove_v4, self.remove_v6, self.add_v4, self.add_v6, groups)


class Backend(Protocol):
    name: str

    def render(self, plan: Plan) -> str: ...

    def apply(self, plan: Plan) -> None: ...

    def render_delta(self, change: ElementChange) -> str: ...

    def apply_delta(self, change: ElementChange) -> None: ...

    def flush(self) -> bool: ...

    def observe(self, plan: Plan, previous: dict[str, int]) -> Observation: ...


def run(cmd: list[str], stdin: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise ApplyError(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ApplyError(f"{cmd[0]} timed out after {timeout:.0f}s") from None


def make_backend(name: str, state_dir: Path | None = None) -> Backend:
    """``state_dir``: the agent's, where nftables and iptables keep the key of their seal
    (without one, a seal only this process can check: any other reads the rules as altered)."""
    if name == "nftables":
        from ringfence_agent.backends.nft import NftBackend

        return NftBackend(state_dir=state_dir)
    if name == "iptables":
        from ringfence_agent.backends.iptables import IptablesBackend

        return IptablesBackend(state_dir=state_dir)
    if name == "windows-plan":
        from ringfence_agent.backends.windows import WindowsPlanBackend

        return WindowsPlanBackend()
    if name == "dry-run":
        from ringfence_agent.backends.dryrun import DryRunBackend

        return DryRunBackend()
    raise ValueError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
