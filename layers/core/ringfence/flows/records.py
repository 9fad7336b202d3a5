"""A flow as it arrives: from an agent's report or a VPC Flow Log line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Origin = Literal["agent", "vpc"]


@dataclass(frozen=True, slots=True)
class Flow:
    """One observed flow (or an aggregate of identical ones: ``count``)."""

    start: float
    end: float
    src: str
    dst: str
    proto: str  # tcp, udp, icmp, icmpv6, other
    dport: int | None
    packets: int = 0
    bytes: int = 0
    origin: Origin = "agent"
    observed: str = ""  # what the reporter saw: "accept", "drop", "would-drop", "reject"
    reporter: str = ""  # the reporting workload (agent) or interface (VPC Flow Logs)
    rule_id: str | None = None  # the rule the agent's kernel counted a drop under
    count: int = 1
    # an agent's record: "outbound" (its end is the source) or "inbound" (the destination); the
    # ingest takes the flow only if that end is the reporter's. "" for flow logs
    direction: str = ""


_PROTO_NUMBERS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}


def proto_name(number: int) -> str:
    return _PROTO_NUMBERS.get(number, "other")
