"""iptables + ipset for hosts without nftables: same plan, same order, same semantics.

A grouped rule (bundle ``members``) is expanded into its members' rules, one after another under
the group's counter: each matches its member's ipset and services, exactly as a plain rule.

Atomicity: the new generation's ipsets (suffix ``a`` / ``b``, alternating) are built first, then
one ``iptables-restore --noflush`` (and one ``ip6tables-restore``) replaces the ``RF-IN`` /
``RF-OUT`` chains in a single commit that references them; only then are the previous
generation's sets destroyed. If any step fails the new sets are destroyed and the old rules and
sets are still in force. Only Ringfence's chains, the two jumps into them and ``rf*`` ipsets
are ever touched.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from ringfence_agent.backends import ApplyError, DropTuple, ElementChange, Observation, run
from ringfence_agent.plan import Direction, Match, Plan, PlanRule, safe_comment

CHAINS = {"inbound": ("RF-IN", "INPUT"), "outbound": ("RF-OUT", "OUTPUT")}
_GEN = re.compile(r'--comment "?ringfence gen=([ab])')
_COUNTER = re.compile(r"^\[(\d+):(\d+)\] -A (RF-IN|RF-OUT) .*--comment \"?(r_(?:in|out)_\d+|d_in|d_out)\b")


def ipset_name(bundle_set: str, family: int, gen: str) -> str:
    return f"{bundle_set}-{family}{gen}"


def _split_zero(items: Iterable[str]) -> list[str]:
    """hash:net refuses a /0: cover it with two /1 halves."""
    out: list[str] = []
    for x in items:
        net = ipaddress.ip_network(x)
        out.extend(str(s) for s in net.subnets(1)) if net.prefixlen == 0 else out.append(x)
    return out


def _svc(m: Match, family: int) -> str:
    if m.proto is None:
        return ""
    if m.proto in ("tcp", "udp"):
        if m.ports is None:
            return f"-p {m.proto}"
        lo, hi = m.ports
        return f"-p {m.proto} --dport {lo}" if lo == hi else f"-p {m.proto} --dport {lo}:{hi}"
    if m.proto == "icmp":
        return "-p icmp" + (f" --icmp-type {m.icmp_type}" if m.icmp_type is not None else "")
    return "-p ipv6-icmp" + (f" --icmpv6-type {m.icmp_type}" if m.icmp_type is not None else "")


def _fams(m: Match) -> tuple[int, ...]:
    return (4,) if m.proto == "icmp" else (6,) if m.proto == "icmpv6" else (4, 6)


def _j(*parts: str) -> str:
    return " ".join(p for p in parts if p)


class IptablesRenderer:
    def sets_script(self, plan: Plan, gen: str) -> str:
        """``ipset restore`` input creating the generation's sets."""
        lines: list[str] = []

        def create(name: str, family: int, items: Iterable[str]) -> None:
            fam = "inet" if family == 4 else "inet6"
            lines.append(f"create {name} hash:net family {fam} hashsize 1024 maxelem 1048576 -exist")
            lines.append(f"flush {name}")
            lines.extend(f"add {name} {x}" for x in _split_zero(items))

        fs = plan.failsafes
        for label, v4, v6 in (
            ("rf-fs-admin", fs.admin_v4, fs.admin_v6),
            ("rf-fs-dns", fs.dns_v4, fs.dns_v6),
            ("rf-fs-cp", fs.control_v4, fs.control_v6),
            ("rf-fs-meta", fs.metadata_v4, fs.metadata_v6),
        ):
            create(f"{label}-4{gen}", 4, v4)
            create(f"{label}-6{gen}", 6, v6)
        for name, s in sorted(plan.sets.items()):
            create(ipset_name(name, 4, gen), 4, s.v4)
            create(ipset_name(name, 6, gen), 6, s.v6)
        for point in self.drop_points(plan):
            for fam in (4, 6):
                f = "inet" if fam == 4 else "inet6"
                lines.append(
                    f"create rf-t-{point}-{fam}{gen} hash:ip,port,ip family {f} timeout 300 maxelem 1024 -exist"
                )
                lines.append(f"flush rf-t-{point}-{fam}{gen}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def drop_points(plan: Plan) -> list[str]:
        return [r.counter for r in plan.rules if r.drops] + ["d_in", "d_out"]

    def rules_script(self, plan: Plan, family: int, gen: str, add_jumps: Iterable[str]) -> str:
        out = ["*filter"]
        for chain, _ in CHAINS.values():
            out.append(f":{chain} - [0:0]")
        for parent in add_jumps:
            chain = "RF-IN" if parent == "INPUT" else "RF-OUT"
            out.append(f"-I {parent} 1 -j {chain}")
        for direction in ("inbound", "outbound"):
            chain = CHAINS[direction][0]
            out.append(f'-A {chain} -m comment --comment "ringfence gen={gen} version={plan.version} mode={plan.mode}"')
            out.extend(f"-A {chain} {line}" for line in self._failsafes(plan, direction, family, gen))
            for r in plan.by_direction(direction):
                out.extend(f"-A {chain} {line}" for line in self._rule(plan, r, family, gen))
            point = "d_in" if direction == "inbound" else "d_out"
            verdict = "DROP" if plan.mode == "enforce" else "ACCEPT"
            out.append(f"-A {chain} -j SET --add-set rf-t-{point}-{family}{gen} src,dst,dst --exist")
            out.append(f'-A {chain} -m comment --comment "{point} default {plan.mode}" -j {verdict}')
        out.append("COMMIT")
        return "\n".join(out) + "\n"

    @staticmethod
    def _failsafes(plan: Plan, direction: Direction, family: int, gen: str) -> list[str]:
        fs = plan.failsafes
        io = "-i lo" if direction == "inbound" else "-o lo"
        lines = [f"{io} -j ACCEPT", "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
        if family == 6:
            types = (
                ("neighbour-solicitation", "neighbour-advertisement", "router-advertisement", "redirect")
                if direction == "inbound"
                else ("neighbour-solicitation", "neighbour-advertisement", "router-solicitation")
            )
            lines += [f"-p ipv6-icmp --icmpv6-type {t} -j ACCEPT" for t in types]
        if fs.dhcp:
            if family == 4:
                lines.append(
                    "-p udp --sport 67 --dport 68 -j ACCEPT"
                    if direction == "inbound"
                    else "-p udp --sport 68 --dport 67 -j ACCEPT"
                )
            else:
                lines.append(
                    "-p udp --sport 547 --dport 546 -j ACCEPT"
                    if direction == "inbound"
                    else "-p udp --sport 546 --dport 547 -j ACCEPT"
                )
        if direction == "inbound":
            for m in fs.admin_ports:
                if family in _fams(m):
                    lines.append(f"-m set --match-set rf-fs-admin-{family}{gen} src {_svc(m, family)} -j ACCEPT")
        else:
            dns = f"rf-fs-dns-{family}{gen}"
            lines.append(f"-m set --match-set {dns} dst -p udp --dport 53 -j ACCEPT")
            lines.append(f"-m set --match-set {dns} dst -p tcp --dport 53 -j ACCEPT")
            lines.append(f"-m set --match-set rf-fs-meta-{family}{gen} dst -j ACCEPT")
            lines.append(f"-m set --match-set rf-fs-cp-{family}{gen} dst -j ACCEPT")
        return lines

    @staticmethod
    def _rule(plan: Plan, r: PlanRule, family: int, gen: str) -> list[str]:
        side = "src" if r.direction == "inbound" else "dst"
        verdict = "ACCEPT" if r.action == "allow" or plan.mode != "enforce" else "DROP"
        lines: list[str] = []
        for part in r.parts():  # a grouped rule: its members one after another, under its counter
            for m in part.services:
                if family not in _fams(m):
                    continue
                match = f"-m set --match-set {ipset_name(part.set, family, gen)} {side}" if part.set is not None else ""
                comment = f'-m comment --comment "{r.counter} {safe_comment(part.rule_id, 200)}"'
                if r.drops:
                    track = f"-j SET --add-set rf-t-{r.counter}-{family}{gen} src,dst,dst --exist"
                    lines.append(_j(match, _svc(m, family), track))
                lines.append(_j(match, _svc(m, family), comment, f"-j {verdict}"))
        return lines

    def render(self, plan: Plan) -> str:
        if plan.mode == "idle":
            return "# idle: Ringfence chains and sets removed\n"
        gen = "a"
        return (
            f"# ipset restore\n{self.sets_script(plan, gen)}"
            f"# iptables-restore --noflush\n{self.rules_script(plan, 4, gen, ['INPUT', 'OUTPUT'])}"
            f"# ip6tables-restore --noflush\n{self.rules_script(plan, 6, gen, ['INPUT', 'OUTPUT'])}"
        )

    @staticmethod
    def delta_script(change: ElementChange, gen: str) -> str:
        lines = [f"del {ipset_name(change.set, 4, gen)} {x}" for x in _split_zero(change.remove_v4)]
        lines += [f"del {ipset_name(change.set, 6, gen)} {x}" for x in _split_zero(change.remove_v6)]
        lines += [f"add {ipset_name(change.set, 4, gen)} {x}" for x in _split_zero(change.add_v4)]
        lines += [f"add {ipset_name(change.set, 6, gen)} {x}" for x in _split_zero(change.add_v6)]
        return "\n".join(lines) + "\n"

    def render_delta(self, change: ElementChange) -> str:
        return self.delta_script(change, "a")


class IptablesBackend(IptablesRenderer):
    name = "iptables"

    def _save(self, family: int, counters: bool = False) -> str:
        cmd = ["iptables-save" if family == 4 else "ip6tables-save", "-t", "filter"]
        if counters:
            cmd.append("-c")
        proc = run(cmd)
        return proc.stdout if proc.returncode == 0 else ""

    def active_gen(self) -> str | None:
        m = _GEN.search(self._save(4))
        return m.group(1) if m else None

    def _ipsets(self) -> list[str]:
        proc = run(["ipset", "list", "-n"])
        return [n for n in proc.stdout.split() if n.startswith("rf")] if proc.returncode == 0 else []

    def _destroy(self, gen: str) -> None:
        names = [n for n in self._ipsets() if n.endswith(gen) and re.search(r"-[46][ab]$", n)]
        if names:
            run(["ipset", "restore"], stdin="".join(f"destroy {n}\n" for n in names))

    def apply(self, plan: Plan) -> None:
        if plan.mode == "idle":
            self.flush()
            return
        old = self.active_gen()
        gen = "b" if old == "a" else "a"
        self._destroy(gen)  # leftovers of an interrupted apply
        proc = run(["ipset", "restore"], stdin=self.sets_script(plan, gen))
        if proc.returncode != 0:
            self._destroy(gen)
            raise ApplyError(f"ipset restore failed (previous rules still in force): {proc.stderr.strip()[:400]}")
        done: list[int] = []
        for family in (4, 6):
            tool = "iptables" if family == 4 else "ip6tables"
            jumps = [p for c, p in CHAINS.values() if run([tool, "-C", p, "-j", c]).returncode != 0]
            proc = run([f"{tool}-restore", "--noflush"], stdin=self.rules_script(plan, family, gen, jumps))
            if proc.returncode != 0:
                if not done:
                    self._destroy(gen)
                    raise ApplyError(
                        f"{tool}-restore failed (previous rules still in force): {proc.stderr.strip()[:400]}"
                    )
                # IPv4 already switched to the new generation: keep both generations' sets alive
                raise ApplyError(
                    f"{tool}-restore failed: IPv4 runs the new bundle, IPv6 still the previous one: {proc.stderr.strip()[:400]}"
                )
            done.append(family)
        if old is not None:
            self._destroy(old)

    def apply_delta(self, change: ElementChange) -> None:
        gen = self.active_gen()
        if gen is None:
            raise ApplyError("no Ringfence chains are loaded: apply a bundle first")
        proc = run(["ipset", "restore"], stdin=self.delta_script(change, gen))
        if proc.returncode != 0:
            raise ApplyError(f"ipset refused the delta for {change.set}: {proc.stderr.strip()[:400]}")

    def flush(self) -> bool:
        present = False
        for family in (4, 6):
            tool = "iptables" if family == 4 else "ip6tables"
            for chain, parent in CHAINS.values():
                while run([tool, "-D", parent, "-j", chain]).returncode == 0:
                    present = True
                if run([tool, "-F", chain]).returncode == 0:
                    present = True
                    run([tool, "-X", chain])
        for gen in ("a", "b"):
            self._destroy(gen)
        return present

    def observe(self, plan: Plan, previous: dict[str, int]) -> Observation:
        obs = Observation()
        for family in (4, 6):
            for line in self._save(family, counters=True).splitlines():
                m = _COUNTER.match(line)
                if m:
                    obs.counters[m.group(4)] = obs.counters.get(m.group(4), 0) + int(m.group(1))
        gen = self.active_gen()
        if gen is None:
            return obs
        for point in self.drop_points(plan):
            if obs.counters.get(point, 0) == previous.get(point, 0):
                continue
            for family in (4, 6):
                proc = run(["ipset", "list", f"rf-t-{point}-{family}{gen}"])
                members = proc.stdout.split("Members:", 1)[-1].splitlines() if proc.returncode == 0 else []
                for row in members:
                    parts = row.split()
                    if not parts:
                        continue
                    fields = parts[0].split(",")
                    if len(fields) != 3:
                        continue
                    src, pp, dst = fields
                    proto, _, port = pp.partition(":")
                    proto = {"ipv6-icmp": "icmpv6"}.get(proto, proto)
                    dport = int(port) if proto in ("tcp", "udp") and port.isdigit() else None
                    obs.tuples.append(DropTuple(point, src, dst, proto, dport, 1))
        return obs
