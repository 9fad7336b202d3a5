"""The application dependency map as data: app groups (boxes) holding roles, the internet,
unknown addresses and the core services (collapsed) as nodes; edges with direction, ports, a
decision and what decided it.

From flows (:class:`ringfence.flows.aggregate.FlowRow`) when there are flows, else from policy:
the allowed connectivity matrix (:mod:`ringfence.engine.connectivity`). With a draft policy each
edge also says what the draft would make of it: ``opens`` (blocked now, allowed by the draft) or
``cuts`` (allowed now, blocked by the draft).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ringfence import addresses
from ringfence.engine.connectivity import compute_inventory
from ringfence.engine.explain import Endpoint, decide
from ringfence.flows.aggregate import FlowRow, merge
from ringfence.flows.classify import INTERNET, UNKNOWN, Classified
from ringfence.model import Workload
from ringfence.policy import Policy

GROUP_DIMS = ("app", "env", "loc")  # an app group: same app, env and loc
CORE = "core services"
Change = Literal["opens", "cuts"]


@dataclass(slots=True)
class MapFilter:
    app: str | None = None
    env: str | None = None
    decision: str | None = None
    min_flows: int = 0
    core_app: str = "core"  # the app whose roles are collapsed into one node

    def keeps(self, e: MapEdge, ends: Mapping[str, dict[str, str]]) -> bool:
        if self.decision and e.decision != self.decision and e.draft != self.decision:
            return False
        if e.flows < self.min_flows:
            return False
        for dim, want in (("app", self.app), ("env", self.env)):
            if want and not any(ends.get(x, {}).get(dim) == want for x in (e.source, e.target)):
                return False
        return True


@dataclass(slots=True)
class MapEdge:
    source: str  # node ids
    target: str
    decision: str
    ports: set[str] = field(default_factory=set)
    flows: int = 0
    bytes: int = 0
    first_seen: float | None = None
    last_seen: float | None = None
    rules: set[str] = field(default_factory=set)  # what decided, with file:line
    draft: str | None = None  # the draft's decision, when a draft was given
    change: Change | None = None
    samples: set[str] = field(default_factory=set)

    @property
    def id(self) -> str:
        return f"{self.source}>{self.target}>{self.decision}>{self.change or ''}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "target": self.target,
            "decision": self.decision,
            "draft": self.draft,
            "change": self.change,
            "ports": sorted(self.ports),
            "flows": self.flows,
            "bytes": self.bytes,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "rules": sorted(self.rules),
            "samples": sorted(self.samples)[:5],
        }


@dataclass(slots=True)
class DependencyMap:
    source: Literal["flows", "policy"]
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    edges: dict[str, MapEdge] = field(default_factory=dict)
    draft: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "draft": self.draft,
            "nodes": sorted(self.nodes.values(), key=lambda n: str(n["id"])),
            "edges": [e.to_json() for e in sorted(self.edges.values(), key=lambda e: e.id)],
        }


def parse_end(name: str) -> dict[str, str]:
    if name in (INTERNET, UNKNOWN) or "=" not in name:
        return {}
    return dict(p.split("=", 1) for p in name.split(","))


def _group_id(labels: Mapping[str, str]) -> str:
    return "g:" + ",".join(f"{d}={labels[d]}" for d in GROUP_DIMS if d in labels)


class _Builder:
    def __init__(self, f: MapFilter, source: Literal["flows", "policy"]) -> None:
        self.f = f
        self.m = DependencyMap(source)
        self.labels_of: dict[str, dict[str, str]] = {}

    def node(self, end: str) -> str:
        """The node id of an end (created with its box when new)."""
        if end in (INTERNET, UNKNOWN):
            self.m.nodes.setdefault(end, {"id": end, "label": end, "kind": end})
            return end
        labels = parse_end(end)
        if labels.get("app") == self.f.core_app:
            self.m.nodes.setdefault("core", {"id": "core", "label": CORE, "kind": "core"})
            self.labels_of["core"] = {"app": self.f.core_app}
            return "core"
        gid = _group_id(labels)
        glabel = " / ".join(labels[d] for d in GROUP_DIMS if d in labels) or "(no app group)"
        self.m.nodes.setdefault(
            gid, {"id": gid, "label": glabel, "kind": "group", **{d: labels.get(d) for d in GROUP_DIMS}}
        )
        nid = f"r:{end}"
        role = labels.get("role", "(no role)")
        self.m.nodes.setdefault(nid, {"id": nid, "label": role, "kind": "role", "parent": gid, "labels": labels})
        self.labels_of[nid] = labels
        return nid

    def edge(self, src: str, dst: str, decision: str, change: Change | None = None) -> MapEdge:
        e = MapEdge(self.node(src), self.node(dst), decision, change=change)
        return self.m.edges.setdefault(e.id, e)

    def finish(self) -> DependencyMap:
        kept = {k: e for k, e in self.m.edges.items() if self.f.keeps(e, self.labels_of)}
        used = {n for e in kept.values() for n in (e.source, e.target)}
        used |= {self.m.nodes[n].get("parent") for n in list(used) if self.m.nodes[n].get("parent")}  # type: ignore[misc]
        self.m.edges = kept
        self.m.nodes = {k: v for k, v in self.m.nodes.items() if k in used}
        return self.m


def _endpoint(policy: Policy, end: str, sample: str) -> Endpoint:
    """A row's end as the draft sees it: a labelled workload (mode by the draft's rules) or the
    sample address."""
    addrs = (addresses.parse_address(sample),) if sample else ()
    labels = parse_end(end)
    if not labels:
        return Endpoint(sample or end, None, addrs)
    res = policy.labels.resolve(Workload(id="(map)", labels=labels))
    return Endpoint(end, res.labels, addrs, policy.mode_for(res.labels, res.unlabeled), False)


def _change(active: str, draft: str) -> Change | None:
    if active != "allowed" and draft == "allowed":
        return "opens"
    if active == "allowed" and draft != "allowed":
        return "cuts"
    return None


def from_flows(rows: Iterable[FlowRow], f: MapFilter | None = None, draft: Policy | None = None) -> DependencyMap:
    b = _Builder(f or MapFilter(), "flows")
    b.m.draft = draft is not None
    for r in merge(rows):
        draft_decision, change = None, None
        if draft is not None:
            s, d = _endpoint(draft, r.src, r.sample_src), _endpoint(draft, r.dst, r.sample_dst)
            draft_decision = Classified.of(decide(draft, s, d, r.proto, r.port)).outcome
            change = _change(r.decision, draft_decision)
        e = b.edge(r.src, r.dst, r.decision, change)
        e.draft = draft_decision
        e.ports.add(f"{r.proto}/{r.port}" if r.port is not None else r.proto)
        e.flows += r.flows
        e.bytes += r.bytes
        e.first_seen = min(e.first_seen or r.first_seen, r.first_seen)
        e.last_seen = max(e.last_seen or r.last_seen, r.last_seen)
        if r.rule:
            e.rules.add(r.rule)
        e.samples.add(f"{r.sample_src} → {r.sample_dst}")
    return b.finish()


def _end_of(key: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in key) or "(no labels)"


def from_policy(
    policy: Policy, inventory: list[Workload], f: MapFilter | None = None, draft: Policy | None = None
) -> DependencyMap:
    """What policy allows between the estate's label groups (no flows seen yet)."""
    b = _Builder(f or MapFilter(), "policy")
    b.m.draft = draft is not None
    where = {r.id: r.location for r in policy.rules}
    active = compute_inventory(policy, inventory).edges
    after = compute_inventory(draft, inventory).edges if draft is not None else None
    if draft is not None:
        where.update({r.id: r.location for r in draft.rules if r.id not in where})
    for pair in sorted(set(active) | set(after or {})):
        now = active.get(pair)
        then = after.get(pair) if after is not None else None
        decision = "allowed" if now is not None else "blocked"
        draft_decision = None if after is None else ("allowed" if then is not None else "blocked")
        change = _change(decision, draft_decision) if draft_decision else None
        e = b.edge(_end_of(pair[0]), _end_of(pair[1]), decision, change)
        e.draft = draft_decision
        for edge in (x for x in (now, then) if x is not None):
            e.ports.update(str(s) for s in edge.services)
            e.rules.update(f"allow {r} ({where.get(r, '?')})" for r in edge.rules)
        if now is None:
            e.rules.add("not allowed by the active policy (default deny)")
    return b.finish()


def build_map(
    policy: Policy,
    inventory: list[Workload],
    rows: list[FlowRow],
    f: MapFilter | None = None,
    draft: Policy | None = None,
) -> DependencyMap:
    """From flows when there are flows, from policy (what is allowed) when not: the one entry
    point of ``ringfence map`` and the admin API's ``GET /v1/map``."""
    return from_flows(rows, f, draft) if rows else from_policy(policy, inventory, f, draft)
