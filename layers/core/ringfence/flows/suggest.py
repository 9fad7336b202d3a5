"""Rule suggestions from observed flows (``ringfence suggest``, ``GET /admin/suggest``).

From the flow rows of one app (:mod:`ringfence.flows.aggregate`), the label-level rules that
would allow what was observed blocked or potentially blocked, and nothing broader: one rule per
(source app/role, destination app/role, protocol), selectors naming app, role and the envs and
locations seen, ``same:`` pinning env and loc (and app inside one app), ports exactly as seen (a
range only where every port of it was seen). Each observed flow is pinned by a policy test
(``expect: allow``); with ``include_allowed`` the flows already allowed are pinned too (tests only).

Flows that look like lateral movement are **flagged**, never proposed: an env crossing
(``dev → prod``, or an end without env), a flow into a crown-jewel app from outside its app group,
a flow from the internet or from an address no workload holds. So is a flow whose only evidence
is the destination's word (``unconfirmed``): reported by the destination's agent alone, while the
source's label group runs an agent (``agents``) that reported no such flow and no flow log saw
it; an agent sees every connection its host opens (a flow, or a drop on its way out), so one end's
claim that a peer with an agent called it is not taken as that peer's behaviour (a compromised
host could otherwise have a path into itself opened). A flow reported by its source alone is
proposed: it is what the source did, which a host may also do for real (its own egress may have
stopped it before the destination saw it). Each observation names who reported it
(``reported_by``: src, dst, vpc; ``reporters``: the agents' workloads). Flows no label rule can express
(to the internet, an end without app or role, a port not recorded) are listed as skipped, and
so are flows blocked when ingested that the policy given allows now.

The suggestion is a policy file: it is loaded with the policy it extends by the real loader, and
every proposed flow is decided again by :func:`ringfence.engine.explain.decide` under the merged
policy; a flow an override-deny still blocks (an allow cannot open it) is moved to the flagged
list rather than proposed.

Crown jewels: an app group is one when any of its labels has the value ``crown-jewel``,
``crown-jewels`` or ``restricted`` (e.g. a custom dimension ``tier: crown-jewel``), or when the
policy has a label group named ``crown-jewels`` or ``restricted`` holding one of its values
(``{name: crown-jewels, dimension: app, values: [payroll]}``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import yaml

from ringfence.engine.explain import Endpoint, decide, labels_endpoint
from ringfence.flows.aggregate import FlowRow, group_name, merge
from ringfence.model import NAME_PATTERN
from ringfence.policy import Policy, PolicyError, load_policy_texts

if TYPE_CHECKING:
    from ringfence.store.base import InventoryRecord

CROWN_JEWEL_VALUES = frozenset({"crown-jewel", "crown-jewels", "restricted"})
_PORTED = ("tcp", "udp", "sctp")
_NAME = re.compile(NAME_PATTERN)
_PLAIN = re.compile(r"[A-Za-z0-9_.:/-]+")  # fullmatch: `$` would let a trailing newline through unquoted
# More distinct ports than this from one reporter between the ends of one rule (a port scan, or
# one host's reports naming every port) are one flagged observation, never a rule.
MAX_PORTS = 32
# Tests (one per proposed or pinned flow) in one suggestion at most; past it the room is shared
# among who reported the flows (:func:`_fair`), each one's flows seen least (pinned after
# proposed) left out and the reporters named (``left_out``): a file of thousands of tests is reviewed by no one, and the
# loader refuses documents past its size limit.
MAX_TESTS = 1_000
LEFT_OUT_NAMED = 10  # reporters named in a left_out line at most (the rest counted)


class SuggestError(ValueError):
    """The suggestion cannot be made (it does not load with the policy): a 4xx, not a crash."""


FlagKind = Literal[
    "env-crossing", "crown-jewel", "from-internet", "from-unknown", "override-deny", "unconfirmed", "many-ports"
]


def parse_end(name: str) -> dict[str, str] | None:
    """A row end's labels (``app=ordering,env=prod,role=web``); None for ``internet``/``unknown``."""
    if name == "(no labels)":
        return {}
    if "=" not in name:
        return None
    return dict(part.split("=", 1) for part in name.split(","))


def is_crown_jewel(policy: Policy, labels: Mapping[str, str]) -> bool:
    if any(v in CROWN_JEWEL_VALUES for v in labels.values()):
        return True
    for name, (dim, values) in policy.label_groups.items():
        if name in CROWN_JEWEL_VALUES and labels.get(dim) in values:
            return True
    return False


def _port_text(proto: str, port: int | None) -> str:
    return proto if port is None else f"{proto}/{port}"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(t)) if t else "?"


@dataclass(slots=True)
class Observation:
    """One merged flow row, as the suggestion sees it."""

    src: str
    dst: str
    proto: str
    port: int | None
    decision: str
    rule: str
    flows: int
    first_seen: float
    last_seen: float
    reported_by: list[str] = field(default_factory=list)  # src, dst, vpc (none: not recorded)
    reporters: list[str] = field(default_factory=list)  # the agents' workloads
    span: str = ""  # several ports folded into one observation (many-ports): what they were
    sample_src: str = ""  # the row's one source address seen: who sent it, for flow-log evidence

    @staticmethod
    def of(r: FlowRow) -> Observation:
        return Observation(
            r.src, r.dst, r.proto, r.port, r.decision, r.rule, r.flows, r.first_seen, r.last_seen,
            # a row stored before reporters were recorded: flow logs are still flow logs
            list(r.reported_by) or (["vpc"] if "vpc" in r.origins else []), list(r.reporters),
            sample_src=r.sample_src,
        )  # fmt: skip

    @property
    def by_text(self) -> str:
        if not self.reported_by:
            return "reported by: not recorded"
        return f"reported by {', '.join(self.reported_by)}" + (
            f" ({', '.join(self.reporters)})" if self.reporters else ""
        )

    @property
    def port_text(self) -> str:
        return self.span or _port_text(self.proto, self.port)

    def line(self) -> str:
        return (
            f"{self.src} → {self.dst} {self.port_text}: {self.flows} flows, {self.decision} "
            f"({_when(self.first_seen)} – {_when(self.last_seen)}); {self.rule}; {self.by_text}"
        )

    def doc(self) -> dict[str, Any]:
        return {
            "src": self.src, "dst": self.dst, "port": self.port_text, "decision": self.decision, "rule": self.rule,
            "flows": self.flows, "first_seen": self.first_seen, "last_seen": self.last_seen,
            "reported_by": self.reported_by, "reporters": self.reporters,
        }  # fmt: skip


@dataclass(slots=True)
class Flagged:
    kind: str
    reason: str
    flow: Observation

    def doc(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, **self.flow.doc()}


@dataclass(slots=True)
class ProposedRule:
    name: str
    from_: str
    to: str
    services: list[str]
    same: list[str]
    flows: list[Observation]

    def rule_doc(self) -> dict[str, Any]:
        seen = sum(f.flows for f in self.flows)
        first = min(f.first_seen for f in self.flows)
        last = max(f.last_seen for f in self.flows)
        was = sorted({f.decision for f in self.flows})
        by = sorted({b for f in self.flows for b in f.reported_by})
        return {
            "name": self.name,
            "from": self.from_,
            "to": self.to,
            "services": self.services,
            "same": self.same,
            "description": f"observed {seen} flow{'s' if seen != 1 else ''} {_when(first)} – {_when(last)}, "
            f"{' / '.join(was)} then" + (f", reported by {', '.join(by)}" if by else ""),
        }

    def doc(self) -> dict[str, Any]:
        return {**self.rule_doc(), "observed": [f.doc() for f in self.flows]}


@dataclass(slots=True)
class Suggestion:
    app: str
    env: str | None
    file_name: str
    ruleset: str
    rules: list[ProposedRule] = field(default_factory=list)
    pinned: list[Observation] = field(default_factory=list)  # already allowed: tests only
    flagged: list[Flagged] = field(default_factory=list)
    skipped: list[Flagged] = field(default_factory=list)
    rows: int = 0
    yaml: str = ""
    left_out: list[str] = field(default_factory=list)  # what the bounds left out of the answer (partial)

    @property
    def proposed_flows(self) -> list[Observation]:
        return [f for r in self.rules for f in r.flows]

    def doc(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "env": self.env,
            "file": self.file_name,
            "ruleset": self.ruleset,
            "rows": self.rows,
            "rules": [r.doc() for r in self.rules],
            "pinned": [f.doc() for f in self.pinned],
            "flagged": [f.doc() for f in self.flagged],
            "skipped": [f.doc() for f in self.skipped],
            "yaml": self.yaml,
            "partial": bool(self.left_out),
            "left_out": self.left_out,
        }

    def summary(self) -> str:
        return (
            f"{self.app}: {self.rows} flow rows → {len(self.rules)} rules proposed "
            f"({len(self.proposed_flows)} flows), {len(self.pinned)} allowed flows pinned, "
            f"{len(self.flagged)} flagged, {len(self.skipped)} skipped"
            + "".join(f"; left out: {x}" for x in self.left_out)
        )


def _value(v: str) -> str:
    return v if _PLAIN.fullmatch(v) else "'" + v.replace("'", "") + "'"


def _term(dim: str, values: Iterable[str]) -> str:
    vs = sorted(set(values))
    if len(vs) == 1:
        return f"{dim} == {_value(vs[0])}"
    return f"{dim} in {{{', '.join(_value(v) for v in vs)}}}"


def _selector(ends: list[dict[str, str]]) -> str:
    """The narrowest selector over the dimensions every end has (app, env, loc, role first): each
    dimension's term names exactly the values seen."""
    dims = set.intersection(*(set(e) for e in ends))
    first = [d for d in ("app", "env", "loc", "role") if d in dims]
    rest = sorted(dims - set(first))
    return " && ".join(_term(d, (e[d] for e in ends)) for d in [*first, *rest])


def port_specs(proto: str, ports: Iterable[int]) -> list[str]:
    """Exact ports; consecutive runs (every port seen) as one range."""
    out: list[str] = []
    run: list[int] = []
    for p in sorted(set(ports)):
        if run and p == run[-1] + 1:
            run.append(p)
            continue
        if run:
            out.append(f"{proto}/{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else ""))
        run = [p]
    if run:
        out.append(f"{proto}/{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else ""))
    return out


def _rule_name(src: Mapping[str, str], dst: Mapping[str, str], proto: str, taken: set[str]) -> str:
    base = f"{src['role']}-to-{dst['role']}"
    if src["app"] != dst["app"]:
        base = f"{src['app']}-{src['role']}-to-{dst['app']}-{dst['role']}"
    where = "-".join(v for v in (src.get("env"), src.get("loc")) if v)
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", "-".join(x for x in (base, where, proto) if x))[:56].strip("-_.") or "rule"
    name, n = base, 2
    while name in taken or not _NAME.match(name):
        name = f"{base}-{n}"
        n += 1
    taken.add(name)
    return name


def _involves(labels: Mapping[str, str] | None, app: str, env: str | None) -> bool:
    return labels is not None and labels.get("app") == app and (env is None or labels.get("env") == env)


def _triage(
    policy: Policy, o: Observation, s: dict[str, str] | None, d: dict[str, str] | None
) -> tuple[str, str, str] | None:
    """("flagged"|"skipped", kind, reason) for a flow not to propose; None: propose it."""
    if s is None:
        if o.src == "internet":
            return ("flagged", "from-internet", "from the internet into the estate: expose it deliberately, by hand")
        return ("flagged", "from-unknown", f"from an address no workload holds ({o.src}): find out what it is")
    if d is None:
        return (
            "skipped",
            "to-outside",
            f"to {o.dst} (no workload): label rules name workloads; an ip_list rule is yours to write",
        )
    for end, labels in (("source", s), ("destination", d)):
        missing = [dim for dim in ("app", "role") if dim not in labels]
        if missing:
            return (
                "skipped",
                "unlabeled",
                f"the {end} has no {' or '.join(missing)} label: no narrow selector names it",
            )
    if s.get("env") != d.get("env"):
        se, de = s.get("env", "(no env)"), d.get("env", "(no env)")
        return ("flagged", "env-crossing", f"crosses environments: {se} → {de}")
    if is_crown_jewel(policy, d) and (s.get("app"), s.get("env")) != (d.get("app"), d.get("env")):
        return ("flagged", "crown-jewel", f"into crown-jewel app {d['app']} from {s['app']}")
    if o.port is None:
        what = "port" if o.proto in _PORTED else "ICMP type"
        return ("skipped", "no-port", f"the {what} was not recorded: a rule for all of {o.proto} would be broader")
    return None


def agent_groups(policy: Policy, records: Iterable[InventoryRecord]) -> set[str]:
    """The row ends (label sets, as rows name them) holding a workload whose agent enrolled."""
    return {group_name(policy.labels.resolve(r.effective()).labels) for r in records if r.enrolled}


def unconfirmed(o: Observation, agents: Collection[str]) -> str | None:
    """Why ``o`` rests on the destination's word alone about a source that runs an agent
    (:data:`agent_groups`), or None: its source's agent or a flow log saw it, or the source's
    group runs no agent (then the destination's agent is the only one that can)."""
    if {"src", "vpc"} & set(o.reported_by) or o.src not in agents:
        return None
    who = ", ".join(o.reporters) or "?"
    if not o.reported_by:
        return (
            f"who reported it was not recorded (a row stored before it was), and {o.src} runs an agent: "
            "confirm it by hand or wait for it to be seen again"
        )
    return (
        f"only the destination's agent reported it ({who}): {o.src} runs an agent, which saw no such flow leave, "
        "and no flow log saw it: one end's word about its peer (check that host)"
    )


def suggest(
    policy: Policy,
    rows: Iterable[FlowRow],
    app: str,
    env: str | None = None,
    min_flows: int = 0,
    include_allowed: bool = False,
    agents: Collection[str] | None = None,
) -> Suggestion:
    """The suggestion for ``app`` (``env``: only flows with that env at the app's end).
    ``agents``: the label groups running an agent (:func:`agent_groups`); a flow from one that
    only its destination reported is flagged ``unconfirmed``, not proposed (None: not checked)."""
    taken_rulesets = {r.ruleset for r in policy.rules}
    ruleset = f"suggested-{app}" + (f"-{env}" if env else "")
    ruleset = re.sub(r"[^A-Za-z0-9_.-]", "-", ruleset)[:56]
    base, n = ruleset, 2
    while ruleset in taken_rulesets:
        ruleset = f"{base}-{n}"
        n += 1
    sug = Suggestion(app, env, f"{ruleset}.yaml", ruleset)
    wanted = {"blocked", "potentially-blocked"} | ({"allowed"} if include_allowed else set())

    candidates: list[tuple[Observation, dict[str, str], dict[str, str]]] = []
    pending: list[tuple[Observation, dict[str, str], dict[str, str]]] = []
    for r in merge(rows):
        s, d = parse_end(r.src), parse_end(r.dst)
        if not (_involves(s, app, env) or _involves(d, app, env)):
            continue
        if r.decision not in wanted or r.flows < min_flows:
            continue
        sug.rows += 1
        o = Observation.of(r)
        verdict = _triage(policy, o, s, d)
        if verdict is not None:
            where, kind, reason = verdict
            (sug.flagged if where == "flagged" else sug.skipped).append(Flagged(kind, reason, o))
            continue
        assert s is not None and d is not None
        if r.decision == "allowed":
            sug.pinned.append(o)
        else:
            pending.append((o, s, d))
    # a spread of ports folded first: each flow decided below costs a decision under the policy
    ends: dict[str, Endpoint] = {}

    def end(name: str, labels: dict[str, str]) -> Endpoint:
        if name not in ends:
            ends[name] = labels_endpoint(policy, labels)
        return ends[name]

    # one end's word about its peer is set apart before the ports are folded: folded with the
    # flows its peer confirmed, it would count toward their many-ports fold (hiding a real flow)
    # and lend them its reporters
    if agents is not None:
        doubt = {id(c[0]): unconfirmed(c[0], agents) for c in pending}  # once per flow
        doubtful = [c for c in pending if doubt[id(c[0])] is not None]
        pending = [c for c in pending if doubt[id(c[0])] is None]
        for o, _, _ in _collapsed(sug, doubtful, "unconfirmed"):  # the flows themselves, not folded
            sug.flagged.append(Flagged("unconfirmed", doubt[id(o)] or "", o))
    for o, s, d in _collapsed(sug, pending):
        if decide(policy, end(o.src, s), end(o.dst, d), o.proto, o.port).policy_verdict == "allow":
            # decided when ingested, under the policy of that day: the policy given allows it now
            if include_allowed:
                sug.pinned.append(o)
            else:
                sug.skipped.append(Flagged("allowed-now", "the policy allows it now (it did not when it was seen)", o))
        else:
            candidates.append((o, s, d))

    candidates = _bounded(sug, candidates)
    # build, load with the policy, decide each proposed flow again; a flow still denied (an
    # override-deny no allow can open) leaves the proposal and is flagged, then build again
    for _ in range(3):
        _build(sug, policy, candidates)
        merged = _load(policy, sug)
        held = []
        for o, s, d in candidates:
            dec = decide(merged, labels_endpoint(merged, s), labels_endpoint(merged, d), o.proto, o.port)
            if dec.policy_verdict != "allow":
                why = "; ".join(
                    f"{side.direction}: {side.deciding.action.value} {side.deciding.id} ({side.deciding.location})"
                    for side in dec.sides
                    if side.decision == "deny" and side.deciding is not None
                )
                held.append((o, why or "still denied"))
        if not held:
            return sug
        gone = {id(o) for o, _ in held}
        candidates = [c for c in candidates if id(c[0]) not in gone]
        for o, why in held:
            sug.flagged.append(Flagged("override-deny", f"an allow cannot open it: {why}", o))
    raise AssertionError("the suggestion did not settle")  # pragma: no cover (each round removes flows)


def _rule_key(o: Observation, s: Mapping[str, str], d: Mapping[str, str]) -> tuple[Any, ...]:
    """What one proposed rule covers (:func:`_build` makes one rule per key)."""
    # the dimensions both ends share a value of (env always: crossings are flagged)
    pins = tuple(dim for dim in ("app", "env", "loc") if dim in s and s.get(dim) == d.get(dim))
    # one rule per env and loc seen: a rule over two envs would open each env's flows in the other
    at = (s.get("env", ""), s.get("loc", ""), d.get("loc", ""))
    return (s["app"], s["role"], d["app"], d["role"], *at, o.proto, pins)


def _collapsed(
    sug: Suggestion,
    candidates: list[tuple[Observation, dict[str, str], dict[str, str]]],
    kind: str = "many-ports",
) -> list[tuple[Observation, dict[str, str], dict[str, str]]]:
    """The candidates but the flows of a reporter (:func:`_evidence`) naming more than
    ``MAX_PORTS`` ports between the ends of one rule: each rule's such flows are one flagged
    observation of ``kind`` (their ports as a span). Counted per reporter, not per rule: one
    host's reports on 33 ports of a rule, with the single real flow another reported, folded it
    into its own flagged observation. A flow another reporter (within the bound) vouches for
    stays a candidate."""
    by: dict[tuple[Any, ...], list[tuple[Observation, dict[str, str], dict[str, str]]]] = {}
    for c in candidates:
        by.setdefault(_rule_key(*c), []).append(c)
    keep: list[tuple[Observation, dict[str, str], dict[str, str]]] = []
    for members in by.values():
        seen: dict[str, set[int]] = {}
        for o, _, _ in members:
            if o.port is not None:
                for who in _evidence(o):
                    seen.setdefault(who, set()).add(o.port)
        wide = {who for who, ports in seen.items() if len(ports) > MAX_PORTS}
        if not wide:
            keep += members
            continue
        folded: list[tuple[Observation, dict[str, str], dict[str, str]]] = []
        for c in members:
            (folded if wide.issuperset(_evidence(c[0])) else keep).append(c)
        if not folded:  # each of its flows vouched for by another reporter too
            continue
        obs = [o for o, _, _ in folded]
        ports = sorted({o.port for o in obs if o.port is not None})
        first = obs[0]
        one = Observation(
            first.src, first.dst, first.proto, None, "/".join(sorted({o.decision for o in obs})), first.rule,
            sum(o.flows for o in obs), min(o.first_seen for o in obs), max(o.last_seen for o in obs),
            sorted({b for o in obs for b in o.reported_by}), sorted({r for o in obs for r in o.reporters}),
            f"{first.proto}/{ports[0]}-{ports[-1]} ({len(ports)} ports)",
        )  # fmt: skip
        why = (
            f"{len(ports)} distinct ports between these groups, more than {MAX_PORTS} from one reporter "
            f"({', '.join(sorted(wide))}): a scan, or one host's reports naming every port; not proposed "
            "as a range: find out what it is"
        )
        if kind == "unconfirmed":
            why += f"; only the destination's agent reported them ({', '.join(one.reporters) or '?'})"
        sug.flagged.append(Flagged(kind, why, one))
    return keep


def _bounded(
    sug: Suggestion, candidates: list[tuple[Observation, dict[str, str], dict[str, str]]]
) -> list[tuple[Observation, dict[str, str], dict[str, str]]]:
    """At most ``MAX_TESTS`` tests, proposed and pinned flows shared fairly together among who
    reported them (:func:`_fair`: each reporter's proposed flows before its pinned ones); what is
    left out is counted in ``left_out`` with the reporters of those flows. Shared apart (proposals
    first, pins in the room left), one reporter's flood of proposals took every other reporter's
    pins."""
    if len(candidates) + len(sug.pinned) <= MAX_TESTS:
        return candidates
    n = len(candidates)
    kept = _fair([(0, c[0]) for c in candidates] + [(1, o) for o in sug.pinned], MAX_TESTS)
    keep = [c for i, c in enumerate(candidates) if i in kept]
    keep.sort(key=lambda c: (-c[0].flows, c[0].src, c[0].dst, c[0].port or 0))
    pinned = [o for j, o in enumerate(sug.pinned) if n + j in kept]
    if len(keep) < n:
        left = _tally(c[0] for i, c in enumerate(candidates) if i not in kept)
        sug.left_out.append(
            f"{n - len(keep)} flows to propose (more than {MAX_TESTS} tests; the room is shared among the "
            f"reporters, each one's proposed flows before its pinned ones, those seen least left out), "
            f"reported by {_named(left)}: narrow it with min_flows or env"
        )
    if len(pinned) < len(sug.pinned):
        left = _tally(o for j, o in enumerate(sug.pinned) if n + j not in kept)
        sug.left_out.append(
            f"{len(sug.pinned) - len(pinned)} allowed flows to pin (more than {MAX_TESTS} tests), "
            f"reported by {_named(left)}"
        )
    sug.pinned = sorted(pinned, key=lambda o: -o.flows)
    return keep


def _evidence(o: Observation) -> list[str]:
    """Who vouches for ``o``, for its share of the bound and the many-ports fold: each agent's
    workload that reported it; else, seen by flow logs only, ``vpc:`` and the address that sent
    it (the row's sample source, or its source group for a row without one); else ``(not
    recorded)`` (a row stored before reporters were). Flow logs are not one reporter: as one,
    one host's real traffic filled the share of every agentless workload's flows."""
    if o.reporters:
        return list(o.reporters)
    if "vpc" in o.reported_by:
        return [f"vpc:{o.sample_src or o.src}"]
    return ["(not recorded)"]


def _fair(items: list[tuple[int, Observation]], most: int) -> set[int]:
    """The indexes of at most ``most`` of ``items`` ((tier, flow)), shared among who reported them
    (:func:`_evidence`): round by round each reporter's next flow is kept, its lower tier first,
    within a tier the one it saw most. A reporter with few flows keeps them all whatever another
    reports: one compromised host's thousand flows, each claimed seen a billion times, take only
    the room the others leave (ranked by count alone, they pushed every other flow out)."""
    if len(items) <= most:
        return set(range(len(items)))
    queues: dict[str, list[int]] = {}
    for i, (_, o) in enumerate(items):
        for who in _evidence(o):
            queues.setdefault(who, []).append(i)

    def rank(i: int) -> tuple[int, int, str, str, int]:
        tier, o = items[i]
        return (tier, -o.flows, o.src, o.dst, o.port or 0)

    for q in queues.values():
        q.sort(key=rank)
    kept: set[int] = set()
    at = dict.fromkeys(queues, 0)
    order = sorted(queues)
    while len(kept) < most:
        took = False
        for who in order:
            q = queues[who]
            while at[who] < len(q) and q[at[who]] in kept:  # kept through another reporter
                at[who] += 1
            if at[who] < len(q) and len(kept) < most:
                kept.add(q[at[who]])
                at[who] += 1
                took = True
        if not took:
            break
    return kept


def _tally(left: Iterable[Observation]) -> dict[str, int]:
    """Per reporter, how many of the flows it reported were left out."""
    out: dict[str, int] = {}
    for o in left:
        for who in _evidence(o):
            out[who] = out.get(who, 0) + 1
    return out


def _named(left: Mapping[str, int]) -> str:
    """``dc3-app-1 (980), vpc (3)``: the reporters of what was left out, most first."""
    ranked = sorted(left.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{who} ({n})" for who, n in ranked[:LEFT_OUT_NAMED])
    more = len(ranked) - LEFT_OUT_NAMED
    return text + (f" and {more} more" if more > 0 else "")


def _build(
    sug: Suggestion, policy: Policy, candidates: list[tuple[Observation, dict[str, str], dict[str, str]]]
) -> None:
    groups: dict[tuple[Any, ...], list[tuple[Observation, dict[str, str], dict[str, str]]]] = {}
    for o, s, d in candidates:
        groups.setdefault(_rule_key(o, s, d), []).append((o, s, d))
    taken: set[str] = set()
    sug.rules = []
    for key, members in sorted(groups.items()):
        proto, pins = key[-2], key[-1]
        srcs, dsts = [m[1] for m in members], [m[2] for m in members]
        ports = [m[0].port for m in members if m[0].port is not None]
        sug.rules.append(
            ProposedRule(
                name=_rule_name(srcs[0], dsts[0], proto, taken),
                from_=_selector(srcs),
                to=_selector(dsts),
                services=port_specs(proto, ports),
                same=list(pins),
                flows=sorted((m[0] for m in members), key=lambda o: (o.src, o.dst, o.port or 0)),
            )
        )
    sug.yaml = render_yaml(sug, candidates)


class _Flow(dict[str, Any]):
    """A mapping written on one line (``{labels: {app: ordering, role: web}}``), as the examples do."""


class _FlowList(list[str]):
    pass


# libyaml's emitter where PyYAML was built with it (ten times the pure-Python one's speed: a
# suggestion may pin thousands of flows)
class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    pass


_Dumper.add_representer(_Flow, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True))
_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _test(o: Observation, s: Mapping[str, str], d: Mapping[str, str], why: str) -> dict[str, Any]:
    return {
        "name": f"{why}: {o.src} → {o.dst} {o.port_text}"[:200],
        "from": _Flow(labels=_Flow(s)),
        "to": _Flow(labels=_Flow(d)),
        "port": o.port_text,
        "expect": "allow",
    }


def render_yaml(sug: Suggestion, candidates: list[tuple[Observation, dict[str, str], dict[str, str]]]) -> str:
    doc: dict[str, Any] = {"rulesets": []}
    if sug.rules:
        doc["rulesets"] = [
            {
                "name": sug.ruleset,
                "description": f"suggested from observed flows of app {sug.app}: review before merging",
                "scope": "all()",
                "same": [],
                "rules": [
                    {**r.rule_doc(), "services": _FlowList(r.services), "same": _FlowList(r.same)} for r in sug.rules
                ],
            }
        ]
    tests = [_test(o, s, d, "observed") for o, s, d in candidates]
    for o in sug.pinned:
        s, d = parse_end(o.src), parse_end(o.dst)
        assert s is not None and d is not None
        tests.append(_test(o, s, d, "observed, allowed today"))
    doc["tests"] = tests
    head = [
        "# Suggested by `ringfence suggest` from observed flows: label-level rules allowing what was",
        f"# seen of app {sug.app}"
        + (f" (env {sug.env})" if sug.env else "")
        + ", nothing broader, and the tests pinning it.",
        "# Review, then put this file in the policy directory.",
    ]
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=140)
    tail: list[str] = []
    for title, items in (
        (
            "FLAGGED, not proposed: these look like lateral movement or rest on one end's word; decide by hand",
            sug.flagged,
        ),
        ("Skipped: no label-level rule can express these", sug.skipped),
    ):
        if items:
            tail += ["", f"# {title}:"]
            tail += [f"#   [{f.kind}] {f.reason}\n#       {f.flow.line()}" for f in items]
    return "\n".join(head) + "\n" + body + ("\n".join(tail) + "\n" if tail else "")


def _load(policy: Policy, sug: Suggestion) -> Policy:
    """The policy with the suggestion's file added, by the real loader (a problem is a bug here)."""
    sources = dict(policy.sources)
    name = sug.file_name
    while name in sources:
        name = "_" + name
    sources[name] = sug.yaml
    try:
        return load_policy_texts(sources)
    except PolicyError as exc:
        # built to load, and bounded (MAX_TESTS, MAX_PORTS): still, an answer naming why, never a crash
        raise SuggestError(f"the suggested rules ({sug.file_name}) do not load with the policy: {exc}") from None


def merged_policy(policy: Policy, sug: Suggestion) -> Policy:
    """The policy with the suggestion merged in, as provisioning it would make it."""
    return _load(policy, sug)
