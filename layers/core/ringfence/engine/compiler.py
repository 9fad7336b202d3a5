"""Policy + inventory → per-workload rules over shared, content-addressed address sets.

The pipeline mirrors Calico's calculation graph in miniature:

* :class:`~ringfence.engine.index.LabelIndex` keeps label → members bitsets;
* a rule's selectors are evaluated per workload to find the rules that *apply to it*
  (inbound where it is a provider, outbound where it is a consumer);
* each such rule points at an address set whose content is defined by the peer selector plus
  the app-group values the rule's ``same:`` pins (the set *key*); the set's name is a hash of
  that key, so identical selectors share one set across every bundle;
* sets exist while some workload references them and are filled from bitsets.

One inventory change re-evaluates the changed workload only: against each distinct selector
(for set membership → element deltas) and against each rule (for its own bundle). Nothing is
ever expanded into workload pairs.

At render, a bundle's allow rules whose *owner side* is identical (same direction, same owner
selector text, same ``same:`` dimensions) become one grouped rule (``members``), as in Cilium's
per-endpoint policy map: such rules apply to exactly the same workloads, so grouping them never
splits what bundles share. Port ranges that partially overlap within a group are cut at the
group's range boundaries (the bundle contract: a group's ranges are identical or disjoint); a
member one of whose ranges would be cut into more than :data:`MAX_PIECES` pieces stays out of the
group, a plain rule of its own.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from ringfence import addresses, selectors
from ringfence.addresses import Address, AddressSet, Prefix
from ringfence.bundle import span_whole
from ringfence.engine.index import LabelIndex, RestrictionIndex, iter_bits
from ringfence.labels import UNLABELED_KINDS, Problem
from ringfence.model import Mode, Workload
from ringfence.policy import ACTION_RANK, CompiledRule, Peer, Policy
from ringfence.services import PortRange

log = logging.getLogger("ringfence.engine")

INBOUND, OUTBOUND = "inbound", "outbound"

SameValues = tuple[tuple[str, str | None], ...]
SetKey = tuple[str, SameValues]
"""(peer canonical text, pinned app-group values)."""


def set_name(key: SetKey) -> str:
    # JSON keeps the encoding unambiguous: an absent value (null) differs from "", and values
    # holding separators cannot make two different keys hash alike
    text = json.dumps([key[0], [[d, v] for d, v in key[1]]], separators=(",", ":"), ensure_ascii=False)
    return "rf_" + hashlib.sha256(text.encode()).hexdigest()[:16]


# At most this many pieces per port range of a grouped member. Each piece costs the agent one
# (address . service) element per prefix of the member's set (nftables' concatenated sets): a
# wide range beside k single ports of the same owner is cut into 2k+1 pieces, so a range with 20
# such ports would multiply its member's elements by 41 (the review's reproducer: 120,540 group
# elements where the ungrouped rule needs one). 8 admits a range around three single ports or
# two sub-ranges, the common shapes, and bounds the blow-up to 8x; a member cut more is cheaper
# as a plain rule (one rule over its own set).
MAX_PIECES = 8

ANY_ADDRESS: frozenset[Prefix] = frozenset({(addresses.V4, 0, 0), (addresses.V6, 0, 0)})


@dataclass(slots=True)
class WorkloadState:
    id: str
    slot: int
    labels: dict[str, str]
    addrs: tuple[Address, ...]
    mode: Mode
    quarantined: bool
    problems: list[Problem]
    name: str | None = None
    # (rule position, direction, set key | None for "any address")
    entries: tuple[tuple[int, str, SetKey | None], ...] = ()
    # indexes into ``entries`` of deny and override-deny entries left out of the bundle: no allow
    # of the same direction admits any of their peers on any of their services (see _dropped)
    dropped: frozenset[int] = frozenset()
    rules_revision: int = 0

    @property
    def unlabeled(self) -> bool:
        return any(p.kind in UNLABELED_KINDS for p in self.problems)

    @property
    def selectable(self) -> bool:
        return not self.quarantined


@dataclass(slots=True)
class AddressSetState:
    key: SetKey
    name: str
    elements: AddressSet | StaticSet
    version: int
    refs: set[str] = field(default_factory=set)
    """workloads with an entry on this set (it lives while they do)"""
    allow_refs: set[str] = field(default_factory=set)
    deny_refs: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    """workloads whose bundle holds this set: refs less those whose only entries on it are dropped"""
    static: bool = False  # IP-list sets never change with the inventory
    rendered: tuple[list[str], list[str]] | None = None  # (v4, v6) text, kept in step by patch_text
    rendered_at: tuple[list[Prefix], list[Prefix]] | None = None  # the prefixes behind ``rendered``

    def cover_text(self) -> tuple[list[str], list[str]]:
        if self.rendered is None or self.rendered_at is None:
            v4: list[str] = []
            v6: list[str] = []
            k4: list[Prefix] = []
            k6: list[Prefix] = []
            for p in self.elements.elements():
                if p[0] == addresses.V4:
                    v4.append(addresses.format_prefix(p))
                    k4.append(p)
                else:
                    v6.append(addresses.format_prefix(p))
                    k6.append(p)
            self.rendered, self.rendered_at = (v4, v6), (k4, k6)
        return self.rendered

    def patch_text(self, added: list[Prefix], removed: list[Prefix]) -> None:
        """Keep the rendered text in step with a delta of the cover, formatting only what
        changed: at 100,000 workloads re-rendering a set of thousands of prefixes whole for one
        address was most of a change's time. Anything unexpected drops the text (rendered anew)."""
        if self.rendered is None or self.rendered_at is None:
            return
        for p in removed:
            i = 0 if p[0] == addresses.V4 else 1
            keys, text = self.rendered_at[i], self.rendered[i]
            j = bisect.bisect_left(keys, p)
            if j == len(keys) or keys[j] != p:
                self.rendered = self.rendered_at = None
                return
            del keys[j], text[j]
        for p in added:
            i = 0 if p[0] == addresses.V4 else 1
            keys, text = self.rendered_at[i], self.rendered[i]
            j = bisect.bisect_left(keys, p)
            if j < len(keys) and keys[j] == p:
                self.rendered = self.rendered_at = None
                return
            keys.insert(j, p)
            text.insert(j, addresses.format_prefix(p))


@dataclass(slots=True)
class _SelectorEntry:
    """A distinct workload selector used as a rule peer, with the sets built on it."""

    node: selectors.Node
    match: selectors.Matcher
    # same-dims tuple → pinned values → set
    variants: dict[tuple[str, ...], dict[SameValues, AddressSetState]] = field(default_factory=dict)


@dataclass(slots=True)
class Update:
    """What one change did: the contract between the engine and whoever publishes to agents."""

    revision: int
    set_deltas: dict[str, tuple[int, list[Prefix], list[Prefix]]] = field(default_factory=dict)
    """set name → (from_version, elements added, elements removed); to_version is ``revision``."""
    notify: set[str] = field(default_factory=set)
    """agents to nudge: their bundle references a changed set, or their own rules changed."""
    rebuilt: set[str] = field(default_factory=set)
    """workloads whose own rules (or mode) changed: fetch a whole new bundle."""
    removed: set[str] = field(default_factory=set)
    bundles: dict[str, dict[str, object]] = field(default_factory=dict)
    """the new (unsigned) bundles of the ``rebuilt`` workloads."""

    @property
    def changed(self) -> bool:
        return bool(self.set_deltas or self.rebuilt or self.removed)


class Engine:
    """Holds the compiled state for one policy version over one inventory."""

    def __init__(self, policy: Policy, policy_version: int = 0, revision: int = 0, all_denies: bool = False) -> None:
        self.policy = policy
        self.policy_version = policy_version
        self.revision = revision
        # every deny and override-deny a bundle is scoped by, also where no allow overlaps it
        # (larger bundles, drops named by their deny rule); by default those are left out (_dropped)
        self.all_denies = all_denies
        self.index = LabelIndex()
        self.workloads: dict[str, WorkloadState] = {}
        # the workload ids :meth:`load` was given more than once (each once per copy left out)
        self.duplicates: list[str] = []
        self.sets: dict[SetKey, AddressSetState] = {}
        self.sets_by_name: dict[str, AddressSetState] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._slots: dict[int, str] = {}
        # enforced rules only (staged rulesets are explained, never compiled into bundles), in
        # precedence order: override-deny, allow, deny; policy order within each action
        self.rules: list[CompiledRule] = sorted(
            (r for r in policy.rules if not r.staged), key=lambda r: ACTION_RANK[r.action]
        )
        self._provider_match = [
            selectors.matcher(r.provider.selector) if r.provider.selector is not None else None for r in self.rules
        ]
        self._consumer_match = [
            selectors.matcher(r.consumer.selector) if r.consumer.selector is not None else None for r in self.rules
        ]
        self._services_json = [[_service_json(p) for p in r.services] for r in self.rules]
        self._rule_ids = [r.id for r in self.rules]
        self._actions = [r.action.value for r in self.rules]
        # grouping at render: an allow rule joins the group of rules with the same owner side
        self._spans = [tuple(_span(p) for p in r.services) for r in self.rules]
        self._groupable = [r.action.value == "allow" for r in self.rules]
        self._group_layouts: dict[tuple[str, tuple[int, ...]], list[tuple[int, ...]]] = {}
        self._group_services: dict[tuple[int, ...], list[list[dict[str, object]]]] = {}
        self._owner = {
            INBOUND: [(r.provider.canonical(), r.same) for r in self.rules],
            OUTBOUND: [(r.consumer.canonical(), r.same) for r in self.rules],
        }
        self._selector_entries: dict[str, _SelectorEntry] = {}
        self._static_sets: dict[str, AddressSetState] = {}
        self._by_addr: dict[Address, set[str]] = {}
        self._service_overlap: dict[tuple[int, int], bool] = {}
        # workloads with an allow / a deny entry whose peer is any address (no set)
        self._allow_any: set[str] = set()
        self._deny_any: set[str] = set()
        self._ip_peers: dict[str, tuple[Prefix, ...]] = {}
        for r in self.rules:
            for peer in (r.provider, r.consumer):
                if peer.selector is None:
                    self._ip_peers[peer.canonical()] = peer.prefixes
                else:
                    canon = peer.canonical()
                    if canon not in self._selector_entries:
                        self._selector_entries[canon] = _SelectorEntry(peer.selector, selectors.matcher(peer.selector))
        # a changed workload is tested only against rules and selectors its labels can match
        self._rule_candidates: RestrictionIndex[tuple[int, str]] = RestrictionIndex(
            [
                ((pos, INBOUND), r.provider.selector)
                for pos, r in enumerate(self.rules)
                if r.provider.selector is not None
            ]
            + [
                ((pos, OUTBOUND), r.consumer.selector)
                for pos, r in enumerate(self.rules)
                if r.consumer.selector is not None
            ]
        )
        self._entry_candidates: RestrictionIndex[_SelectorEntry] = RestrictionIndex(
            (entry, entry.node) for entry in self._selector_entries.values()
        )
        fs = policy.failsafes
        self._failsafes = {
            "admin_cidrs": [addresses.format_prefix(p) for p in fs.admin_cidrs],
            "admin_ports": [_service_json(p) for p in fs.admin_ports],
            "dns_resolvers": [addresses.format_address(a) for a in fs.dns_resolvers],
            "control_plane": [addresses.format_prefix(p) for p in fs.control_plane],
        }

    # --- workload resolution -------------------------------------------------------------------

    def resolve(self, w: Workload, slot: int) -> WorkloadState:
        res = self.policy.labels.resolve(w)
        addrs = tuple(sorted({addresses.parse_address(ip) for ip in w.ips}))
        mode = w.mode if w.mode is not None else self.policy.mode_for(res.labels, res.unlabeled)
        return WorkloadState(
            id=w.id,
            slot=slot,
            labels=res.labels,
            addrs=addrs,
            mode=mode,
            quarantined=w.quarantined,
            problems=res.problems,
            name=w.name,
        )

    def _alloc_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        self._next_slot += 1
        return self._next_slot - 1

    # --- full compile --------------------------------------------------------------------------

    def load(self, inventory: Iterable[Workload]) -> None:
        """Compile from scratch (the reference the incremental path must equal).

        A workload id given more than once is compiled once, never a failure of the whole load
        (one bad record must not stop publishing for everyone): the first copy is kept, unless a
        later one is quarantined and it is not, so a copy never releases a quarantine. The copies
        left out are logged and listed in :attr:`duplicates`."""
        self.revision += 1
        chosen: dict[str, Workload] = {}
        for w in inventory:
            first = chosen.get(w.id)
            if first is None:
                chosen[w.id] = w
                continue
            self.duplicates.append(w.id)
            log.warning("workload %r given more than once: one copy compiled, the other left out", w.id)
            if w.quarantined and not first.quarantined:
                chosen[w.id] = w
        for w in chosen.values():
            slot = self._alloc_slot()
            ws = self.resolve(w, slot)
            self.workloads[w.id] = ws
            self._slots[slot] = w.id
            for addr in ws.addrs:
                self._by_addr.setdefault(addr, set()).add(w.id)
            if ws.selectable:
                self.index.add(slot, ws.labels)
        # rule → workloads, via bitsets (no per-pair work)
        entries: dict[str, list[tuple[int, str, SetKey | None]]] = {wid: [] for wid in self.workloads}
        for pos, rule in enumerate(self.rules):
            for direction, own, other in (
                (INBOUND, rule.provider, rule.consumer),
                (OUTBOUND, rule.consumer, rule.provider),
            ):
                if own.selector is None:
                    continue
                bits = selectors.evaluate(own.selector, self.index)
                for slot in iter_bits(bits):
                    ws = self.workloads[self._slots[slot]]
                    if ws.mode is Mode.IDLE:
                        continue
                    entries[ws.id].append((pos, direction, self._key_for(other, rule.same, ws.labels)))
        for wid, ws in self.workloads.items():
            ws.entries = tuple(sorted(entries[wid], key=_entry_order))
            ws.rules_revision = self.revision
            for key in _keys(ws.entries):
                self._ref(key, wid)
        # set contents are final now; workloads with the same entries drop the same ones, and
        # share one entries tuple (a change re-decides its candidates once per shared tuple,
        # by identity: hashing whole entries per candidate cost more than deciding them)
        Entries = tuple[tuple[int, str, SetKey | None], ...]
        dropped: dict[Entries, tuple[Entries, frozenset[int]]] = {}
        for wid, ws in self.workloads.items():
            shared = dropped.get(ws.entries)
            if shared is None:
                shared = dropped[ws.entries] = (ws.entries, self._dropped(ws))
            ws.entries, ws.dropped = shared
            self._move_roles(wid, None, ws)

    # --- sets ----------------------------------------------------------------------------------

    @staticmethod
    def _key_for(peer: Peer, same: tuple[str, ...], labels: dict[str, str]) -> SetKey | None:
        if peer.selector is None and frozenset(peer.prefixes) == ANY_ADDRESS:
            return None  # decided by content, never by the list's name
        pinned = tuple((d, labels.get(d)) for d in same) if peer.selector is not None else ()
        return (peer.canonical(), pinned)

    def _ref(self, key: SetKey, wid: str) -> None:
        s = self.sets.get(key)
        if s is None:
            s = self._create_set(key)
        s.refs.add(wid)

    def _unref(self, key: SetKey, wid: str) -> None:
        s = self.sets[key]
        s.refs.discard(wid)
        if not s.refs:
            del self.sets[key]
            del self.sets_by_name[s.name]
            self._static_sets.pop(s.name, None)
            if not s.static:
                entry = self._selector_entries[key[0]]
                dims = tuple(d for d, _ in key[1])
                variant = entry.variants[dims]
                del variant[key[1]]
                if not variant:
                    del entry.variants[dims]

    def _create_set(self, key: SetKey) -> AddressSetState:
        canon, pinned = key
        elements = AddressSet()
        entry = self._selector_entries.get(canon)
        if entry is None:  # an IP list: fixed prefixes, never touched by inventory changes
            s = AddressSetState(key, set_name(key), StaticSet(self._ip_peers[canon]), self.revision, static=True)
            self._static_sets[s.name] = s
        else:
            # the pinned app group is usually small: narrow to it before the selector. A missing
            # value is shared with nobody: a workload lacking a pinned dimension has an empty set
            bits = 0 if any(v is None for _, v in pinned) else self.index.universe()
            for d, v in pinned:
                if not bits:
                    break
                assert v is not None
                bits &= self.index.members(d, v)
            if bits:
                bits &= selectors.evaluate(entry.node, self.index)
            for slot in iter_bits(bits):
                for addr in self.workloads[self._slots[slot]].addrs:
                    elements.add(addr)
            s = AddressSetState(key, set_name(key), elements, self.revision)
            entry.variants.setdefault(tuple(d for d, _ in pinned), {})[pinned] = s
        self.sets[key] = s
        self.sets_by_name[s.name] = s
        return s

    # --- incremental ---------------------------------------------------------------------------

    def upsert(self, w: Workload) -> Update:
        """Apply one added or changed workload; returns what changed (empty if nothing did)."""
        old = self.workloads.get(w.id)
        slot = old.slot if old is not None else self._alloc_slot()
        new = self.resolve(w, slot)
        if old is not None and (old.labels, old.addrs, old.mode, old.quarantined) == (
            new.labels,
            new.addrs,
            new.mode,
            new.quarantined,
        ):
            old.problems, old.name = new.problems, new.name
            return Update(self.revision)
        return self._change(old, new)

    def shared_addresses(self, wids: Iterable[str] | None = None) -> dict[str, list[str]]:
        """Address → the compiled workloads holding it, for each address more than one holds:
        those of ``wids`` (None: of every workload). Peers' sets give such an address the access
        of every holder (:class:`~ringfence.addresses.AddressSet` counts it once per holder)."""
        if wids is None:
            addrs: Iterable[Address] = self._by_addr
        else:
            addrs = {a for wid in wids if (ws := self.workloads.get(wid)) is not None for a in ws.addrs}
        return {
            addresses.format_address(a): sorted(held)
            for a in sorted(addrs)
            if len(held := self._by_addr.get(a, set())) > 1
        }

    def reissue(self, workload_id: str) -> Update:
        """A whole new bundle of the workload at a fresh revision, its rules as they are: its agent
        holds a version above every one published for it (issued before the store was restored
        from a backup), and refuses anything lower as a rollback."""
        ws = self.workloads[workload_id]
        self.revision += 1
        ws.rules_revision = self.revision
        upd = Update(self.revision, rebuilt={workload_id}, notify={workload_id})
        upd.bundles = {workload_id: self.render(workload_id)}
        return upd

    def remove(self, workload_id: str) -> Update:
        old = self.workloads.get(workload_id)
        if old is None:
            return Update(self.revision)
        return self._change(old, None)

    def _change(self, old: WorkloadState | None, new: WorkloadState | None) -> Update:
        self.revision += 1
        upd = Update(self.revision)
        pending: dict[str, tuple[AddressSetState, dict[Prefix, int]]] = {}

        def note(s: AddressSetState, added: list[Prefix], removed: list[Prefix]) -> None:
            acc = pending.setdefault(s.name, (s, {}))[1]
            for p in added:
                acc[p] = acc.get(p, 0) + 1
            for p in removed:
                acc[p] = acc.get(p, 0) - 1

        # 1. membership of existing sets: test the changed workload against each distinct selector
        old_in = self._memberships(old)
        new_in = self._memberships(new)
        for name in old_in | new_in:
            s = self.sets_by_name[name]
            assert isinstance(s.elements, AddressSet)  # only selector sets have members
            o = old.addrs if old is not None and name in old_in else ()
            n = new.addrs if new is not None and name in new_in else ()
            for addr in set(o) - set(n):
                note(s, *s.elements.remove(addr))
            for addr in set(n) - set(o):
                note(s, *s.elements.add(addr))

        # 2. the label index
        if old is not None and old.selectable:
            self.index.remove(old.slot, old.labels)
        if new is not None and new.selectable:
            self.index.add(new.slot, new.labels)

        # 3. the changed workload's own rules; sets appear and disappear with their references
        wid = (new or old).id  # type: ignore[union-attr]
        if old is not None:
            for addr in old.addrs:
                self._by_addr[addr].discard(wid)
                if not self._by_addr[addr]:
                    del self._by_addr[addr]
        if new is not None:
            new.entries = self._entries_for(new)
            self.workloads[wid] = new
            self._slots[new.slot] = wid
            for addr in new.addrs:
                self._by_addr.setdefault(addr, set()).add(wid)
        old_keys = _keys(old.entries) if old is not None else set()
        new_keys = _keys(new.entries) if new is not None else set()
        for key in new_keys - old_keys:
            self._ref(key, wid)
        if new is not None:
            new.dropped = self._dropped(new)  # every set it names exists and is filled now
        self._move_roles(wid, old, new)
        for key in old_keys - new_keys:
            self._unref(key, wid)
        if new is None:
            del self.workloads[wid]
            del self._slots[old.slot]  # type: ignore[union-attr]
            self._free_slots.append(old.slot)  # type: ignore[union-attr]
            upd.removed.add(wid)
        elif old is None or (old.entries, old.dropped, old.mode, old.quarantined) != (
            new.entries,
            new.dropped,
            new.mode,
            new.quarantined,
        ):
            new.rules_revision = self.revision
            upd.rebuilt.add(wid)
            upd.notify.add(wid)
        else:
            new.rules_revision = old.rules_revision

        # 4. net element deltas per set; bump versions; nudge every agent referencing a changed set
        for name, (s, acc) in pending.items():
            added = sorted(p for p, c in acc.items() if c > 0)
            removed = sorted(p for p, c in acc.items() if c < 0)
            if not added and not removed:
                continue
            if self.sets_by_name.get(name) is not s:
                continue  # the set died with its last reference in this same change
            upd.set_deltas[name] = (s.version, added, removed)
            s.version = self.revision
            s.patch_text(added, removed)  # bundles copy the text (_set_json): patching in place is safe
        # 5. a deny dropped elsewhere comes back where this change lets an allow admit one of its
        # peers (and goes where none does any more): those bundles are rebuilt in this same update
        admitting: set[str] = set()
        if upd.set_deltas:
            changed = (old.addrs if old is not None else ()) + (new.addrs if new is not None else ())
            admitting, candidates, holding = self._drop_candidates(wid, changed, old_in | new_in)
            # the same entries drop the same ones (contents are fixed now): keyed by the entries
            # tuple's identity (shared since load, see load), alive in ``ws`` throughout the loop
            memo: dict[int, frozenset[int]] = {}
            meets: dict[tuple[SetKey | None, SetKey | None], bool] = {}
            for other in candidates:
                ws = self.workloads[other]
                dropped = memo.get(id(ws.entries))
                if dropped is None:
                    dropped = memo[id(ws.entries)] = self._dropped(ws, holding, meets)
                if dropped != ws.dropped:
                    before = replace(ws)
                    ws.dropped = dropped
                    self._move_roles(other, before, ws)
                    ws.rules_revision = self.revision
                    upd.rebuilt.add(other)
                    upd.notify.add(other)
        # 6. nudge every agent whose bundle holds a changed set, where it matters: a change at an
        # address no allow of the agent admits moves no decision of its (only a deny set holds it
        # there). Such an agent's copy of the deny set lags, deciding alike, until its next fetch
        # walks the whole delta chain (as every fetch does).
        for name in upd.set_deltas:
            s = self.sets_by_name[name]
            upd.notify |= s.allow_refs
            upd.notify |= s.held & admitting if len(s.held) > len(admitting) else admitting & s.held
        upd.notify -= upd.removed
        upd.bundles = {w: self.render(w) for w in upd.rebuilt}
        return upd

    # --- dropped denies -------------------------------------------------------------------------

    def _dropped(
        self,
        ws: WorkloadState,
        holding: set[SetKey] | None = None,
        meets: dict[tuple[SetKey | None, SetKey | None], bool] | None = None,
    ) -> frozenset[int]:
        """The deny and override-deny entries of ``ws`` no allow entry of the same direction
        overlaps (on peer addresses and on services). Such an entry decides nothing: a flow it
        matches matches no allow, so the default deny decides it alike (and a plain deny, after
        the allows, only ever renames the default). Leaving it out keeps the big boundary sets
        (``non-prod ↛ prod``) out of bundles that allow nothing across the boundary anyway, and
        keeps their holders from being nudged by every change on the other side.

        After one workload's change, ``holding`` (the keys of the sets that hold one of its
        addresses now or held one before) limits the work to the deny entries that can flip: a
        deny set that holds none of the changed addresses kept its content, and whatever an
        allow set gained or lost is a changed address, so their overlap (and an any-address
        allow's) is as it was and ``ws.dropped`` still says it. A deny on any address is always
        rechecked (an allow set may have emptied or filled). ``meets`` memoises peer overlaps
        across the workloads of that change (set contents are fixed while it is decided)."""
        if self.all_denies:
            return frozenset()
        entries = ws.entries
        groupable = self._groupable
        if holding is not None and not any(
            not groupable[pos] and (key is None or key in holding) for pos, _, key in entries
        ):
            return ws.dropped  # no deny entry of it can flip
        allows = [(pos, d, key) for pos, d, key in entries if groupable[pos]]
        out: list[int] = []
        for i, (pos, direction, key) in enumerate(entries):
            if groupable[pos]:
                continue
            if holding is not None and key is not None and key not in holding:
                if i in ws.dropped:
                    out.append(i)
                continue
            if not any(
                d == direction and self._services_meet(pos, p) and self._peers_meet(key, k, meets) for p, d, k in allows
            ):
                out.append(i)
        return frozenset(out)

    def _services_meet(self, a: int, b: int) -> bool:
        hit = self._service_overlap.get((a, b))
        if hit is None:
            hit = self._service_overlap[(a, b)] = any(_spans_meet(x, y) for x in self._spans[a] for y in self._spans[b])
        return hit

    def _peers_meet(
        self, a: SetKey | None, b: SetKey | None, meets: dict[tuple[SetKey | None, SetKey | None], bool] | None = None
    ) -> bool:
        """Whether two peers (sets by key, None: any address) share an address now."""
        if meets is not None:
            hit = meets.get((a, b))
            if hit is None:
                hit = meets[(a, b)] = self._peers_meet(a, b)
            return hit
        if a is None or b is None:
            other = b if a is None else a
            return other is None or len(self.sets[other].elements) > 0
        return _contents_meet(self.sets[a].elements, self.sets[b].elements)

    def _drop_candidates(
        self, wid: str, changed: tuple[Address, ...], touched: set[str]
    ) -> tuple[set[str], set[str], set[SetKey]]:
        """(the workloads with an allow entry admitting one of the ``changed`` addresses before
        or after, the workloads besides ``wid`` whose dropped denies this change may flip, the
        keys of the live sets that hold one of those addresses now or held one before). A flip
        needs a deny entry's set and an allow entry's set to come to share, or stop sharing, one
        of the ``changed`` addresses, so both sets hold it now or held it before. ``touched``: the
        names of the sets the changed workload is a member of, before and after."""
        names = set(touched)
        for addr in set(changed):
            for other in self._by_addr.get(addr, ()):
                if other != wid:
                    names |= self._memberships(self.workloads[other])
            for name, s in self._static_sets.items():
                if isinstance(s.elements, StaticSet) and s.elements.contains(addr):
                    names.add(name)
        holding = [self.sets_by_name[n] for n in names if n in self.sets_by_name]
        allow = set(self._allow_any)  # an any-address allow meets a deny set that gains its first address
        for s in holding:
            allow |= s.allow_refs
        denies = [s.deny_refs for s in holding if s.deny_refs]
        if self._deny_any:
            denies.append(self._deny_any)
        out = {w for w in allow if any(w in d for d in denies)}
        out.discard(wid)
        return allow, out, {s.key for s in holding}

    def _move_roles(self, wid: str, old: WorkloadState | None, new: WorkloadState | None) -> None:
        """Keep each set's ``allow_refs``, ``deny_refs`` and ``held`` (and the any-address
        entries' equivalents) in step with a workload's entries and dropped denies."""
        before = _roles(old, self._groupable)
        after = _roles(new, self._groupable)
        for i, (attr, anyone) in enumerate(
            (("allow_refs", self._allow_any), ("deny_refs", self._deny_any), ("held", None))
        ):
            for key in after[i] - before[i]:
                target = anyone if key is None else getattr(self.sets[key], attr)
                if target is not None:
                    target.add(wid)
            for key in before[i] - after[i]:
                target = anyone if key is None else getattr(self.sets[key], attr)
                if target is not None:
                    target.discard(wid)

    def _memberships(self, ws: WorkloadState | None) -> set[str]:
        """Names of existing sets whose members include ``ws``."""
        out: set[str] = set()
        if ws is None or not ws.selectable or not ws.addrs:
            return out
        labels = ws.labels
        for entry in self._entry_candidates.candidates(labels):
            if not entry.variants or not entry.match(labels):
                continue
            for dims, by_values in entry.variants.items():
                if any(d not in labels for d in dims):
                    continue  # a missing value is shared with nobody: never in a pinned set
                s = by_values.get(tuple((d, labels.get(d)) for d in dims))
                if s is not None:
                    out.add(s.name)
        return out

    def _entries_for(self, ws: WorkloadState) -> tuple[tuple[int, str, SetKey | None], ...]:
        if not ws.selectable or ws.mode is Mode.IDLE:
            return ()
        out: list[tuple[int, str, SetKey | None]] = []
        labels = ws.labels
        for pos, direction in self._rule_candidates.candidates(labels):
            rule = self.rules[pos]
            if direction == INBOUND:
                pm = self._provider_match[pos]
                if pm is not None and pm(labels):
                    out.append((pos, INBOUND, self._key_for(rule.consumer, rule.same, labels)))
            else:
                cm = self._consumer_match[pos]
                if cm is not None and cm(labels):
                    out.append((pos, OUTBOUND, self._key_for(rule.provider, rule.same, labels)))
        return tuple(sorted(out, key=_entry_order))

    # --- rendering -----------------------------------------------------------------------------

    def bundle_version(self, wid: str) -> int:
        ws = self.workloads[wid]
        versions = [ws.rules_revision]
        versions.extend(
            self.sets[key].version
            for i, (_, _, key) in enumerate(ws.entries)
            if key is not None and i not in ws.dropped
        )
        return max(versions)

    def render(self, wid: str) -> dict[str, object]:
        """The unsigned bundle of one workload as a plain dict (see :mod:`ringfence.bundle`)."""
        ws = self.workloads[wid]
        rules: dict[str, list[tuple[int, str | None]]] = {INBOUND: [], OUTBOUND: []}  # (position, peer set)
        used: dict[str, AddressSetState] = {}
        for i, (pos, direction, key) in enumerate(ws.entries):
            if i in ws.dropped:
                continue
            name = None
            if key is not None:
                s = self.sets[key]
                used[s.name] = s
                name = s.name
            rules[direction].append((pos, name))
        return {
            "format": "ringfence.bundle/v2",
            "workload_id": wid,
            "version": self.bundle_version(wid),
            "policy_version": self.policy_version,
            "mode": "enforce" if ws.quarantined else ws.mode.value,
            "quarantined": ws.quarantined,
            "sets": {name: _set_json(s) for name, s in sorted(used.items())},
            "inbound": self._rules_json(INBOUND, rules[INBOUND]),
            "outbound": self._rules_json(OUTBOUND, rules[OUTBOUND]),
            "failsafes": self._failsafes,
            "signature": None,
        }

    def _rules_json(self, direction: str, items: list[tuple[int, str | None]]) -> list[dict[str, object]]:
        """One direction's rules, allow rules of the same owner side merged into grouped rules."""
        key = (direction, tuple(pos for pos, _ in items))
        layout = self._group_layouts.get(key)
        if layout is None:
            layout = self._group_layouts[key] = self._group_layout(direction, key[1])
        ids, actions, services = self._rule_ids, self._actions, self._services_json
        out: list[dict[str, object]] = []
        for slot in layout:
            if len(slot) == 1:
                pos, name = items[slot[0]]
                out.append(
                    {"id": ids[pos], "action": actions[pos], "set": name, "services": [dict(m) for m in services[pos]]}
                )
                continue
            members = [items[i] for i in slot]
            positions = tuple(pos for pos, _ in members)
            cut = self._group_services.get(positions)
            if cut is None:
                cut = self._group_services[positions] = self._cut_services(positions)
            out.append(
                {
                    "id": ids[members[0][0]],
                    "action": "allow",
                    "set": None,
                    "services": [],
                    "members": [
                        {"id": ids[pos], "set": name, "services": [dict(m) for m in svcs]}
                        for (pos, name), svcs in zip(members, cut, strict=True)
                    ],
                }
            )
        return out

    def _cut_services(self, positions: tuple[int, ...]) -> list[list[dict[str, object]]]:
        """The services of a group's members (by rule position), each tcp/udp port range short of
        all ports cut at every boundary of the group's port ranges: the pieces allow exactly what
        the range did, and the group's port ranges become identical or disjoint (the bundle
        contract), so a range overlapping another member's (a scanner's tcp/1-65535 beside
        tcp/9100) costs elements for the scanner's addresses per piece, not a rule of its own.
        Whole protocols and ``any`` stay whole: the agent keeps them in sets of their own."""
        cuts: dict[str, set[int]] = {}
        for pos in positions:
            for span in self._spans[pos]:
                if span[0] in ("tcp", "udp") and not span_whole(span):
                    cuts.setdefault(span[0], set()).update((span[1], span[2] + 1))
        out: list[list[dict[str, object]]] = []
        for pos in positions:
            services: list[dict[str, object]] = []
            for svc, span in zip(self._services_json[pos], self._spans[pos], strict=True):
                proto, lo, hi = span
                inner = sorted(x for x in cuts.get(proto, ()) if lo < x <= hi) if not span_whole(span) else []
                if not inner:
                    if svc not in services:  # a piece of an earlier range may equal it
                        services.append(svc)
                    continue
                for a, b in zip([lo, *inner], [x - 1 for x in inner] + [hi], strict=True):
                    piece: dict[str, object] = {"proto": proto, "ports": [a, b], "icmp_type": None}
                    if piece not in services:
                        services.append(piece)
            out.append(services)
        return out

    def _group_layout(self, direction: str, positions: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Which of a direction's rules (by index) form each rule of the bundle, in bundle order.

        Every allow rule joins the group of its owner side; overlapping port ranges are cut when
        the group is rendered (:meth:`_cut_services`), whole protocols and ``any`` need no cut.
        A group stands where its first member stood; allows all sit between the override-denies
        and the denies, so their order among themselves does not change what a bundle allows.
        Depends on the rule positions only, so workloads with the same rules share one layout
        (cached)."""
        slots: list[list[int]] = []
        slot_by_owner: dict[tuple[str, tuple[str, ...]], int] = {}
        owner = self._owner[direction]
        for i, pos in enumerate(positions):
            if not self._groupable[pos]:
                slots.append([i])
                continue
            g = slot_by_owner.get(owner[pos])
            if g is None:
                slot_by_owner[owner[pos]] = len(slots)
                slots.append([i])
            else:
                slots[g].append(i)
        out: list[tuple[int, ...]] = []
        for slot in slots:
            kept, alone = self._bounded_cut(slot, positions)
            out.append(tuple(kept))
            out.extend((i,) for i in alone)  # allows: their order among themselves is free
        return out

    def _bounded_cut(self, slot: list[int], positions: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """Split a group's members (indexes into ``positions``) into those that stay and those
        that would have a port range cut into more than :data:`MAX_PIECES` pieces. The member cut
        most leaves first, then the cuts are recomputed: fewer members means fewer boundaries, so
        the others are cut less. Rule positions only (cached with the layout)."""
        kept = list(slot)
        alone: list[int] = []
        while len(kept) > 1:
            cuts: dict[str, set[int]] = {}
            for i in kept:
                for proto, lo, hi in self._spans[positions[i]]:
                    if proto in ("tcp", "udp") and not span_whole((proto, lo, hi)):
                        cuts.setdefault(proto, set()).update((lo, hi + 1))
            worst, most = -1, MAX_PIECES
            for i in kept:
                for proto, lo, hi in self._spans[positions[i]]:
                    if proto in ("tcp", "udp") and not span_whole((proto, lo, hi)):
                        pieces = 1 + sum(1 for x in cuts.get(proto, ()) if lo < x <= hi)
                        if pieces > most:
                            worst, most = i, pieces
            if worst < 0:
                break
            kept.remove(worst)
            alone.append(worst)
        return kept, sorted(alone)


class StaticSet:
    """IP-list content: fixed prefixes rather than member addresses."""

    __slots__ = ("_prefixes",)

    def __init__(self, prefixes: Iterable[Prefix]) -> None:
        self._prefixes = addresses.collapse(list(prefixes))

    def elements(self) -> list[Prefix]:
        return list(self._prefixes)

    def __len__(self) -> int:
        return len(self._prefixes)

    def contains(self, addr: Address) -> bool:
        return any(addresses.prefix_contains(p, addr) for p in self._prefixes)


def _entry_order(e: tuple[int, str, SetKey | None]) -> tuple[int, str]:
    return (e[0], e[1])


def _service_json(p: PortRange) -> dict[str, object]:
    out: dict[str, object] = {"proto": p.proto, "ports": None, "icmp_type": None}
    j = p.to_json()
    if "ports" in j:
        out["ports"] = j["ports"]
    if "icmp_type" in j:
        out["icmp_type"] = j["icmp_type"]
    return out


def _span(p: PortRange) -> tuple[str, int, int]:
    """What :func:`ringfence.bundle.service_span` gives for this range's bundle encoding."""
    return ("any", 0, 0) if p.proto == "any" else (p.proto, p.lo, p.hi)


def _set_json(s: AddressSetState) -> dict[str, object]:
    v4, v6 = s.cover_text()
    return {"version": s.version, "v4": list(v4), "v6": list(v6)}


def _keys(entries: tuple[tuple[int, str, SetKey | None], ...]) -> set[SetKey]:
    return {key for _, _, key in entries if key is not None}


def _roles(ws: WorkloadState | None, allows: list[bool]) -> tuple[set[SetKey | None], ...]:
    """(keys of allow entries, keys of deny entries, keys of the sets its bundle holds)."""
    if ws is None:
        return set(), set(), set()
    allow = {key for pos, _, key in ws.entries if allows[pos]}
    deny = {key for pos, _, key in ws.entries if not allows[pos]}
    kept = {key for i, (_, _, key) in enumerate(ws.entries) if i not in ws.dropped and key is not None}
    return allow, deny, kept  # type: ignore[return-value]


def _spans_meet(a: tuple[str, int, int], b: tuple[str, int, int]) -> bool:
    if a[0] == "any" or b[0] == "any":
        return True
    return a[0] == b[0] and a[1] <= b[2] and b[1] <= a[2]


def _contents_meet(a: AddressSet | StaticSet, b: AddressSet | StaticSet) -> bool:
    """Whether two peer sets share an address (covers of member addresses are exact)."""
    if isinstance(a, AddressSet) and isinstance(b, AddressSet):
        small, large = (a, b) if len(a) <= len(b) else (b, a)
        return any(addr in large.counts for addr in small.counts)
    if isinstance(a, StaticSet) and isinstance(b, StaticSet):
        return any(addresses.prefixes_meet(p, q) for p in a.elements() for q in b.elements())
    members, static = (a, b) if isinstance(a, AddressSet) else (b, a)
    assert isinstance(members, AddressSet)
    return any(members.meets(p) for p in static.elements())
