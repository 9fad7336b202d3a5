"""Draft vs active policy: rules added, removed and changed, and who gains or loses access.

Access is compared on the connectivity matrix of the same inventory under both policies, so
the answer is in workload pairs and ports, not just rule text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ringfence.addresses import V4, Prefix, format_address, format_prefix
from ringfence.engine.connectivity import LabelKey, Matrix, compute_inventory, normalise, subtract
from ringfence.enums import Mode
from ringfence.model import Workload
from ringfence.policy import CompiledRule, ParsedFailsafes, Policy
from ringfence.services import PortRange


def _rule_text(r: CompiledRule) -> str:
    same = f" same [{', '.join(r.same)}]" if r.same else ""
    staged = " (staged)" if r.staged else ""
    services = ", ".join(str(s) for s in r.services)
    return f"{r.action.value} from {r.consumer.describe()} to {r.provider.describe()} on {services}{same}{staged}"


@dataclass(slots=True)
class AccessChange:
    source: str
    destination: str
    services: list[PortRange]


@dataclass(slots=True)
class PolicyDiff:
    added: list[CompiledRule] = field(default_factory=list)
    removed: list[CompiledRule] = field(default_factory=list)
    changed: list[tuple[CompiledRule, CompiledRule]] = field(default_factory=list)
    gained: list[AccessChange] = field(default_factory=list)
    lost: list[AccessChange] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.gained or self.lost)

    def format(self, limit: int = 50) -> str:
        lines: list[str] = []
        for title, rules, sign in (("rules added", self.added, "+"), ("rules removed", self.removed, "-")):
            if rules:
                lines.append(f"{title}:")
                lines.extend(f"  {sign} {r.id} ({r.location}): {_rule_text(r)}" for r in rules)
        if self.changed:
            lines.append("rules changed:")
            for old, new in self.changed:
                lines.append(f"  ~ {new.id} ({new.location})")
                lines.append(f"      was: {_rule_text(old)}")
                lines.append(f"      now: {_rule_text(new)}")
        for title, changes, sign in (("access gained", self.gained, "+"), ("access lost", self.lost, "-")):
            if changes:
                lines.append(f"{title} ({len(changes)} workload pairs):")
                for c in changes[:limit]:
                    lines.append(f"  {sign} {c.source} → {c.destination} {', '.join(str(s) for s in c.services)}")
                if len(changes) > limit:
                    lines.append(f"  … and {len(changes) - limit} more")
        return "\n".join(lines) if lines else "no differences"


def _match_rules(
    old: list[CompiledRule], new: list[CompiledRule]
) -> tuple[list[CompiledRule], list[CompiledRule], list[tuple[CompiledRule, CompiledRule]]]:
    """Pair rules by content within their ruleset first, then by id.

    Unnamed rules are numbered by position, so inserting one renumbers the rest: matching on
    content first keeps those from showing up as "changed".
    """
    left = list(old)
    unmatched_new: list[CompiledRule] = []
    for r in new:
        twin = next((o for o in left if o.ruleset == r.ruleset and _rule_text(o) == _rule_text(r)), None)
        if twin is not None:
            left.remove(twin)
        else:
            unmatched_new.append(r)
    by_id = {o.id: o for o in left}
    changed = [(by_id.pop(r.id), r) for r in unmatched_new if r.id in by_id]
    changed_ids = {r.id for _, r in changed}
    added = [r for r in unmatched_new if r.id not in changed_ids]
    return added, list(by_id.values()), changed


def _matrix(policy: Policy, inventory: Iterable[Workload]) -> Matrix:
    return compute_inventory(policy, inventory)


def _group_of(m: Matrix) -> dict[str, LabelKey]:
    return {w: key for key, ids in m.groups.items() for w in ids}


def diff(active: Policy | None, draft: Policy, inventory: list[Workload]) -> PolicyDiff:
    out = PolicyDiff()
    out.added, out.removed, out.changed = _match_rules(active.rules if active else [], draft.rules)
    if inventory:
        after = _matrix(draft, inventory)
        before = _matrix(active, inventory) if active else None
        # workloads in one group under both policies gain and lose alike: compare each pair of
        # such joint groups once, then name its workload pairs
        g_after, g_before = _group_of(after), _group_of(before) if before else {}
        joint: dict[tuple[LabelKey | None, LabelKey], list[str]] = {}
        for w in sorted(g_after):
            joint.setdefault((g_before.get(w), g_after[w]), []).append(w)
        for (old_src, new_src), sources in joint.items():
            for (old_dst, new_dst), destinations in joint.items():
                # () is a group too (no labels): test for None, not truth
                old_edge = (
                    before.edges.get((old_src, old_dst))
                    if before is not None and old_src is not None and old_dst is not None
                    else None
                )
                new_edge = after.edges.get((new_src, new_dst))
                old_s = old_edge.services if old_edge else []
                new_s = new_edge.services if new_edge else []
                if old_s == new_s:
                    continue
                gained = normalise(subtract(new_s, old_s)) if new_s else []
                lost = normalise(subtract(old_s, new_s)) if old_s else []
                for a in sources:
                    for b in destinations:
                        if a != b:
                            if gained:
                                out.gained.append(AccessChange(a, b, gained))
                            if lost:
                                out.lost.append(AccessChange(a, b, lost))
        out.gained.sort(key=lambda c: (c.source, c.destination))
        out.lost.sort(key=lambda c: (c.source, c.destination))
    return out


# --- fail-safes ------------------------------------------------------------------------------------


def _covered(p: Prefix, by: tuple[Prefix, ...]) -> bool:
    fam, net, length = p
    bits = 32 if fam == V4 else 128
    return any(
        f == fam and ln <= length and (net >> (bits - ln) if ln else 0) == (n >> (bits - ln) if ln else 0)
        for f, n, ln in by
    )


def _within(r: PortRange, by: tuple[PortRange, ...]) -> bool:
    return any((o.proto == "any" or o.proto == r.proto) and o.lo <= r.lo and r.hi <= o.hi for o in by)


def failsafe_widening(old: ParsedFailsafes, new: ParsedFailsafes) -> list[str]:
    """What ``new``'s fail-safes let through that ``old``'s did not (fail-safes are never
    blocked, so widening them weakens every enforced host): one line per widened field."""
    out = []
    for name in ("admin_cidrs", "control_plane"):
        wider = [p for p in getattr(new, name) if not _covered(p, getattr(old, name))]
        if wider:
            out.append(f"{name}: {', '.join(format_prefix(p) for p in wider)}")
    ports = [r for r in new.admin_ports if not _within(r, old.admin_ports)]
    if ports:
        out.append(f"admin_ports: {', '.join(str(r) for r in ports)}")
    resolvers = [a for a in new.dns_resolvers if a not in old.dns_resolvers]
    if resolvers:
        out.append(f"dns_resolvers: {', '.join(format_address(a) for a in resolvers)}")
    return out


def newly_idle(old: Policy, new: Policy, workloads: Iterable[Workload]) -> list[str]:
    """The workloads ``new`` leaves ``idle`` (firewall untouched) that ``old`` did not: a policy
    can lower that safeguard for many hosts at once (a default mode, a mode rule)."""
    out = []
    for w in workloads:
        if w.mode is not None:  # an operator's mode wins under either policy
            continue
        after, before = new.labels.resolve(w), old.labels.resolve(w)
        if new.mode_for(after.labels, after.unlabeled) is Mode.IDLE and (
            old.mode_for(before.labels, before.unlabeled) is not Mode.IDLE
        ):
            out.append(w.id)
    return sorted(out)
