"""windows-plan: a PowerShell script for Windows Defender Firewall (rendered, not executed here).

Windows Firewall evaluates block rules before allow rules whatever their order, so the bundle's
order is mapped as follows (and the script says so in comments):

* fail-safes and ``allow`` rules → ``New-NetFirewallRule -Action Allow`` in group ``Ringfence``;
* ``override-deny`` → ``-Action Block`` (on Windows a block also beats the fail-safes: the plan
  refuses a block rule whose addresses overlap an admin range, to keep the operator in);
* ``deny`` after the allows equals the default action in ``enforce`` and is therefore omitted;
* ``enforce`` → ``Set-NetFirewallProfile -DefaultInboundAction Block -DefaultOutboundAction Block``;
  ``observe`` → default Allow, ``-LogAllowed True`` (Windows cannot report would-drops per rule);
* ``idle`` → the group is removed and the profile defaults restored to Windows' own;
* a grouped allow rule (bundle ``members``) becomes its members' rules, each with its own addresses.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import TextIO

from ringfence_agent.backends import ElementChange, Observation
from ringfence_agent.plan import METADATA_PORTS, Match, Plan, PlanError, joined_ports, safe_comment

GROUP = "Ringfence"
CHUNK = 1000  # remote addresses per rule: Windows accepts long lists, but keep rules reviewable


def _ps(text: str) -> str:
    """A single-quoted PowerShell string: nothing in it is expanded. PowerShell also ends such a
    string at the typographic quotes (U+2018, U+2019, U+201A, U+201B), so every one is doubled."""
    for q in "'\u2018\u2019\u201a\u201b":
        text = text.replace(q, q + q)
    return "'" + text + "'"


def _addrs(items: list[str]) -> str:
    """``-RemoteAddress`` values: a PowerShell array of single-quoted strings."""
    return ",".join(_ps(x) for x in items)


def _proto_args(m: Match, direction: str) -> str:
    if m.proto is None:
        return "-Protocol Any"
    if m.proto in ("tcp", "udp"):
        port = "LocalPort" if direction == "inbound" else "RemotePort"
        if m.ports is None:
            return f"-Protocol {m.proto.upper()}"
        lo, hi = m.ports
        return f"-Protocol {m.proto.upper()} -{port} {lo if lo == hi else f'{lo}-{hi}'}"
    proto = "ICMPv4" if m.proto == "icmp" else "ICMPv6"
    return f"-Protocol {proto}" + (f" -IcmpType {m.icmp_type}" if m.icmp_type is not None else "")


class WindowsPlanBackend:
    name = "windows-plan"
    rerender_on_delta = True

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def render(self, plan: Plan) -> str:
        lines = [
            "# Ringfence plan for Windows Defender Firewall (generated; review, then run elevated)",
            f"# workload {safe_comment(plan.workload_id)} bundle version {plan.version} mode {plan.mode}",
            "$ErrorActionPreference = 'Stop'",
            f"Get-NetFirewallRule -Group {_ps(GROUP)} -ErrorAction SilentlyContinue | Remove-NetFirewallRule",
        ]
        if plan.mode == "idle":
            lines.append(
                "Set-NetFirewallProfile -All -DefaultInboundAction NotConfigured -DefaultOutboundAction NotConfigured"
            )
            return "\n".join(lines) + "\n"
        n = 0

        def rule(name: str, direction: str, action: str, extra: str) -> None:
            nonlocal n
            n += 1
            d = "Inbound" if direction == "inbound" else "Outbound"
            lines.append(
                f"New-NetFirewallRule -Group {_ps(GROUP)} -Name {_ps(f'RF-{n:05d}')} -DisplayName {_ps(safe_comment(name))} "
                f"-Direction {d} -Action {action} -Profile Any {extra}".rstrip()
            )

        fs = plan.failsafes
        admin = [*fs.admin_v4, *fs.admin_v6]
        lines.append("# fail-safes (always allowed)")
        if admin:
            for m in fs.admin_ports:
                rule(
                    "failsafe admin",
                    "inbound",
                    "Allow",
                    f"-RemoteAddress {_addrs(admin)} {_proto_args(m, 'inbound')}",
                )
        dns = [*fs.dns_v4, *fs.dns_v6]
        if dns:
            for proto in ("UDP", "TCP"):
                rule(
                    "failsafe dns",
                    "outbound",
                    "Allow",
                    f"-RemoteAddress {_addrs(dns)} -Protocol {proto} -RemotePort 53",
                )
        meta = [*fs.metadata_v4, *fs.metadata_v6]
        if meta:
            for proto in ("TCP", "UDP"):
                ports = ",".join(str(m.ports[0]) for m in METADATA_PORTS if m.proto == proto.lower() and m.ports)
                rule(
                    "failsafe metadata",
                    "outbound",
                    "Allow",
                    f"-RemoteAddress {_addrs(meta)} -Protocol {proto} -RemotePort {ports}",
                )
        cp = [*fs.control_v4, *fs.control_v6]
        if cp:
            for m in fs.control_ports:
                rule(
                    "failsafe control-plane",
                    "outbound",
                    "Allow",
                    f"-RemoteAddress {_addrs(cp)} {_proto_args(m, 'outbound')}",
                )
        if fs.dhcp:
            rule("failsafe dhcp", "outbound", "Allow", "-Protocol UDP -LocalPort 68 -RemotePort 67")
            rule("failsafe dhcpv6", "outbound", "Allow", "-Protocol UDP -LocalPort 546 -RemotePort 547")
        admin_nets = [ipaddress.ip_network(a) for a in admin]
        lines.append("# bundle rules (block rules win over allow rules on Windows)")
        for r in plan.rules:
            if r.action == "deny":
                lines.append(f"# {safe_comment(r.rule_id)}: deny after allows = the default action, omitted")
                continue
            if plan.mode != "enforce" and r.action != "allow":
                lines.append(f"# {safe_comment(r.rule_id)}: {r.action} not enforced in {plan.mode} mode")
                continue
            action = "Allow" if r.action == "allow" else "Block"
            for part in r.parts():  # a grouped rule: one set of Windows rules per member
                addrs: list[str] = []
                if part.set is not None:
                    s = plan.sets[part.set]
                    addrs = [*s.v4, *s.v6]
                    if not addrs:
                        lines.append(f"# {safe_comment(part.rule_id)}: peer set {safe_comment(part.set)} is empty")
                        continue
                    if action == "Block":
                        for a in addrs:
                            net = ipaddress.ip_network(a)
                            if any(net.overlaps(x) for x in admin_nets):
                                raise PlanError(
                                    f"{part.rule_id}: block of {a} overlaps an admin range; Windows would lock the operator out"
                                )
                chunks = [addrs[i : i + CHUNK] for i in range(0, len(addrs), CHUNK)] or [[]]
                for m in joined_ports(part.services) if r.members else part.services:
                    for chunk in chunks:
                        remote = f"-RemoteAddress {_addrs(chunk)} " if chunk else ""
                        rule(
                            f"{part.rule_id} ({m.describe()})",
                            r.direction,
                            action,
                            remote + _proto_args(m, r.direction),
                        )
        if plan.mode == "enforce":
            lines.append(
                "Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Block -DefaultOutboundAction Block -LogBlocked True"
            )
        else:
            lines.append(
                "Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Allow -DefaultOutboundAction Allow -LogAllowed True"
            )
        return "\n".join(lines) + "\n"

    def apply(self, plan: Plan) -> None:
        self.out.write(self.render(plan))

    def render_delta(self, change: ElementChange) -> str:
        return (
            f"# set {safe_comment(change.set)} changed: +{len(change.add_v4) + len(change.add_v6)} "
            f"-{len(change.remove_v4) + len(change.remove_v6)} elements; Windows rules hold addresses inline,\n"
            "# the whole plan follows.\n"
        )

    def apply_delta(self, change: ElementChange) -> None:
        self.out.write(self.render_delta(change))

    def flush(self) -> bool:
        self.out.write(
            f"Get-NetFirewallRule -Group {_ps(GROUP)} -ErrorAction SilentlyContinue | Remove-NetFirewallRule\n"
        )
        return False

    def observe(self, plan: Plan, previous: dict[str, int]) -> Observation:
        return Observation()
