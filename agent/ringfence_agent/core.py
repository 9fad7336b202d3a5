"""Verify, accept and apply bundles and set deltas; keep the last known good.

All acceptance rules come from :mod:`ringfence.bundlewire` (``Verifier``, ``check_acceptable``); this
module adds the agent's own: a delta applies only onto the set version it was cut from, and a
refused or failed document leaves both the firewall and the state directory exactly as they were.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ringfence import enforced
from ringfence.bundlewire import (
    Bundle,
    BundleError,
    FailsafeDoc,
    SetDelta,
    Verifier,
    check_acceptable,
    check_fresh,
    same_firewall,
)
from ringfence_agent.backends import ABSENT, ApplyError, Backend, ElementChange, ReadError
from ringfence_agent.plan import (
    POSTURE_ADMIN_PORTS,
    LocalFailsafes,
    Plan,
    PlanError,
    PlanSet,
    compile_plan,
    delta_overlap,
    group_changes,
    merge_failsafes,
    split_cidrs,
)
from ringfence_agent.sessions import CutError, SessionCutter
from ringfence_agent.state import StateDir, StateUnreadable

_NOTHING_APPLIED = object()  # no baseline: this process applied nothing yet


class Rejected(Exception):
    """A document the agent refused; the applied state is untouched."""


@dataclass(slots=True)
class Result:
    changed: bool
    lines: list[str] = field(default_factory=list)


def fold_delta(bundle: Bundle, d: SetDelta) -> Bundle:
    """One delta folded into a bundle's set (O(set size), no validation: callers checked it).
    Element order is not canonical afterwards; compare with :func:`same_firewall`."""
    s = bundle.sets[d.set]
    remove = set(d.remove)
    v4 = [x for x in s.v4 if x not in remove] if remove else list(s.v4)
    v6 = [x for x in s.v6 if x not in remove] if remove else list(s.v6)
    for x in d.add:
        (v6 if ":" in x else v4).append(x)
    new_set = replace(s, version=d.to_version, v4=v4, v6=v6)
    return replace(bundle, sets={**bundle.sets, d.set: new_set})


def effective_bundle(bundle: Bundle, deltas: list[SetDelta]) -> Bundle:
    """The bundle with its applied deltas folded into the set contents, in one pass per set
    touched (O(set size + delta sizes), not O(set size) per delta). Same result as folding them one
    by one with :func:`fold_delta`: each delta's removals, then its additions appended."""
    if not deltas:
        return bundle
    if len(deltas) == 1:
        return fold_delta(bundle, deltas[0])
    members: dict[str, dict[str, None]] = {}  # set → its elements, insertion-ordered
    versions: dict[str, int] = {}
    for d in deltas:
        cur = members.get(d.set)
        if cur is None:
            s = bundle.sets[d.set]
            cur = members[d.set] = dict.fromkeys([*s.v4, *s.v6])
        for x in d.remove:
            cur.pop(x, None)
        for x in d.add:
            cur.pop(x, None)  # fold_delta appends: an element added again moves to the end
            cur[x] = None
        versions[d.set] = d.to_version
    sets = dict(bundle.sets)
    for name, cur in members.items():
        v4 = [x for x in cur if ":" not in x]
        v6 = [x for x in cur if ":" in x]
        sets[name] = replace(bundle.sets[name], version=versions[name], v4=v4, v6=v6)
    return replace(bundle, sets=sets)


def applied_revision(bundle: Bundle | None, deltas: list[SetDelta]) -> int | None:
    if bundle is None:
        return None
    return max([bundle.version, *(d.to_version for d in deltas)])


def describe_change(old: Bundle | None, new: Bundle) -> list[str]:
    lines = [f"bundle {new.workload_id} version {new.version} (policy {new.policy_version}), mode {new.mode.value}"]
    if old is None:
        lines.append(
            f"  first apply: {len(new.sets)} sets, {len(new.inbound)} inbound and {len(new.outbound)} outbound rules"
        )
        return lines
    if old.mode != new.mode:
        lines.append(f"  mode {old.mode.value} → {new.mode.value}")
    if old.quarantined != new.quarantined:
        lines.append(f"  quarantined {old.quarantined} → {new.quarantined}")
    for name in sorted(set(new.sets) - set(old.sets)):
        lines.append(f"  + set {name} ({len(new.sets[name].v4) + len(new.sets[name].v6)} elements)")
    for name in sorted(set(old.sets) - set(new.sets)):
        lines.append(f"  - set {name}")
    for name in sorted(set(old.sets) & set(new.sets)):
        a = set(old.sets[name].v4) | set(old.sets[name].v6)
        b = set(new.sets[name].v4) | set(new.sets[name].v6)
        if a != b:
            lines.append(f"  ~ set {name}: +{len(b - a)} -{len(a - b)} elements")
    for direction in ("inbound", "outbound"):
        before, after = getattr(old, direction), getattr(new, direction)
        if before != after:
            lines.append(f"  ~ {direction} rules: {len(before)} → {len(after)}")
    if len(lines) == 1:
        lines.append("  no firewall change (same content)")
    return lines


def _utc(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Agent:
    def __init__(
        self,
        workload_id: str | None,
        verifier: Verifier,
        backend: Backend,
        state: StateDir,
        local: LocalFailsafes,
        log: Callable[[str], None] = print,
        sessions: SessionCutter | None = None,
    ) -> None:
        state.lock()
        self.workload_id = workload_id or state.identity()
        self.verifier = verifier
        self.backend = backend
        self.state = state
        self.local = local
        # the control plane as configured (addresses in the config and the URL); follow_control_plane
        # adds those its host name resolves to
        self.configured_control_plane = local.control_plane
        self.log = log
        # cuts the open connections a new plan no longer admits (None: the backend programs no
        # kernel here, or the operator turned it off)
        self.sessions = sessions
        # why the last known good was set aside at start (None: it was usable, or there was none)
        self.set_aside: str | None = None
        # a verified last known good the kernel refused at start (a table held by another
        # process, a lock, a module missing): kept so that the daemon can try it again
        self.refused_lkg: tuple[Bundle, list[SetDelta]] | None = None
        # a file it may not read (root's, left by the CLI run as root) is not corruption: the last
        # known good is not set aside (the rollback floor with it); it refuses to start, saying
        # how to fix it (end of __init__)
        unreadable = state.unreadable() if os.geteuid() != 0 else None
        try:
            if unreadable is not None:
                raise StateUnreadable(unreadable)
            self.bundle = state.load_bundle()
            self.deltas = state.load_deltas(self.bundle)
        except PermissionError as exc:  # made unreadable since the check, or root without CAP_DAC_OVERRIDE
            self.bundle, self.deltas = None, []
            unreadable = unreadable or state.unreadable() or f"the agent cannot read its state: {exc}"
        except (BundleError, ValueError, OSError) as exc:
            # unreadable (torn, corrupted, tampered): kept aside for inspection, never trusted
            self.bundle, self.deltas = None, []
            self._set_aside(f"unreadable: {exc}")
        self.plan: Plan | None = None
        # what this process last applied as a whole, and the kernel's fingerprint right after
        self._kernel_plan: Plan | None = None
        self._baseline: str | object | None = _NOTHING_APPLIED
        # the backend's last reason the seal check could not run, as status.json holds it
        self._seal_unchecked: str | None = state.read_json("status.json").get("seal_unchecked")
        self.track_drift = False  # the daemon turns it on (a fingerprint after every apply: a few ms)
        # Caches, so that a delta costs O(delta), not O(set size): the effective bundle with the
        # first _eff_n deltas folded in (the rest fold when someone asks for it), each set's
        # version and members, and the plan's sets that deltas have moved since it was built.
        # The observer thread reads them too: one lock.
        self._lock = threading.RLock()
        self._eff: Bundle | None = None
        self._eff_n = 0
        self._versions: dict[str, int] | None = None
        self._members: dict[str, set[str]] = {}
        self._stale: set[str] = set()
        # the signatures of the bundle and of each applied delta (Ed25519 is deterministic: one per
        # content) → the enforced digest they program (check_sets); never by object id (ids are
        # reused) nor by how many deltas (a rewound chain grows back to the same length)
        self._expected: tuple[tuple[object, ...], str] | None = None
        # why the last enforced_state() read failed (None when it succeeded): a heartbeat without
        # a digest for that reason is not healthy
        self.kernel_read_error: str | None = None
        self._posture = False  # the last whole apply of this process was the fail-safe posture
        self.applies = 0  # whole applies made by this process (check_sets: did one land since a read?)
        if unreadable is not None:
            self._refuse_to_start(unreadable)

    def _refuse_to_start(self, why: str) -> None:
        """State it may not read: the kernel keeps the rules it holds (the last applied: the
        agent never flushes on stop); where it holds none of Ringfence's (after a reboot) the
        fail-safe posture first, never an open host. Raises StateUnreadable."""
        try:
            problem = getattr(self.backend, "kernel_problem", None)
            absent = problem is not None and problem() == ABSENT
        except (ApplyError, OSError):
            absent = False  # unknown: left as it is
        if absent:
            try:
                self.hold_failsafe_posture()
                why += "; the kernel held no Ringfence rules (a reboot?): the fail-safe posture (fail-safes, then drop) holds"
            except (ApplyError, PlanError, OSError) as exc:
                why += f"; the kernel holds no Ringfence rules and the fail-safe posture could not be applied: {exc}"
        raise StateUnreadable(why)

    @property
    def kernel_plan(self) -> Plan | None:
        """What this process last programmed as a whole (a bundle's plan, or the posture); None
        before the kernel took anything."""
        return self._kernel_plan

    @property
    def revision(self) -> int | None:
        return applied_revision(self.bundle, self.deltas)

    def stale(self, now: float | None = None) -> bool:
        """The enforced bundle has expired without a refresh. The agent keeps enforcing it (never
        fails open; docs/bundle.md, Expiry) and says so in its status and heartbeat."""
        b = self.bundle
        return b is not None and (b.expires_at is None or b.expires_at <= (time.time() if now is None else now))

    def effective(self) -> Bundle | None:
        with self._lock:
            if self.bundle is None:
                return None
            if self._eff is None:
                self._eff, self._eff_n = self.bundle, 0
            if self._eff_n < len(self.deltas):  # deltas applied since: one pass per set they touched
                self._eff = effective_bundle(self._eff, self.deltas[self._eff_n :])
                self._eff_n = len(self.deltas)
            return self._eff

    def set_versions(self) -> dict[str, int]:
        """The applied version of each set, without folding any delta into the set contents."""
        with self._lock:
            if self._versions is None:
                self._versions = {n: s.version for n, s in self.bundle.sets.items()} if self.bundle else {}
                for d in self.deltas:
                    self._versions[d.set] = d.to_version
            return dict(self._versions)

    def _set_version(self, name: str) -> int | None:
        with self._lock:
            if self._versions is None:
                self.set_versions()
            assert self._versions is not None
            return self._versions.get(name)

    def _set_members(self, name: str) -> set[str]:
        with self._lock:
            members = self._members.get(name)
            if members is None:
                eff = self.effective()
                assert eff is not None
                s = eff.sets[name]
                members = self._members[name] = {*s.v4, *s.v6}
            return members

    def _reset_cache(self, plan: Plan | None) -> None:
        """Forget what was derived from the old bundle and deltas. The plan goes too: a kept plan
        with its stale-set list cleared would hold pre-delta sets for good (grouped-rule deltas
        are computed against it)."""
        with self._lock:
            self._eff, self._eff_n, self._versions = None, 0, None
            self._members = {}
            self._stale = set()
            self.plan = plan

    def _apply(self, plan: Plan) -> None:
        """Every whole-plan apply: then the kernel's fingerprint, the baseline drift is judged by."""
        self.backend.apply(plan)
        self._note_seal_check()
        self._kernel_plan = plan
        self._posture = False
        self.applies += 1
        probe = getattr(self.backend, "fingerprint", None) if self.track_drift else None
        if probe is None:
            return
        if hasattr(self.backend, "applied_fingerprint"):
            # nftables and iptables read the kernel back to seal the apply: that read, verified as
            # what the apply wrote, is the baseline, never a second one (a rule inserted between
            # the seal and it was taken in); none when the apply was not sealed: the next check
            # re-applies
            self._baseline = self.backend.applied_fingerprint
            return
        with contextlib.suppress(ApplyError, OSError):
            self._baseline = probe()

    def _note_seal_check(self) -> None:
        """Where the backend could not check that what it sealed is what it wrote (iptables with
        no namespace of its own on this host: sealed as read), status says so and why
        (``seal_unchecked``), and the log once; cleared by the next apply that was checked."""
        unchecked = getattr(self.backend, "seal_unchecked", None)
        if unchecked == self._seal_unchecked:
            return
        self._seal_unchecked = unchecked
        self.state.update_status(seal_unchecked=unchecked)
        if unchecked is not None:
            self.log(
                f"the seal check cannot run here ({unchecked}): the rules were sealed as read back, so a rule "
                "another process inserted between the commit and the read-back would be sealed with them"
            )

    def _repair(self, plan: Plan, what: str) -> None:
        """Re-apply after tamper, counted in ``tamper_reapplied`` even when the re-apply fails: a
        process that keeps changing the rules while they are applied makes each try fail
        unsealed ("changed while they were applied"), and must show as tamper all the same (the
        control plane's ``tampered`` finding reads that counter). The next check tries again."""
        tamper: dict[str, object] = {"time": time.time(), "what": what, "revision": self.revision}
        try:
            self._apply(plan)
        except ApplyError as exc:
            tamper.update(repaired=False, error=str(exc))
            self.state.update_status(last_tamper=tamper, incr={"tamper_reapplied": 1, "apply_failures": 1})
            raise
        self.state.update_status(last_tamper={**tamper, "repaired": True}, incr={"tamper_reapplied": 1})

    def enforced_state(self) -> tuple[int | None, str | None]:
        """(the applied revision, the enforced-policy digest of what the kernel holds, read back
        from it: not what this process meant to write). The digest is None when the backend
        cannot tell (dry-run, windows-plan) or asking failed, or when an apply
        moved the revision while the kernel was being read (the next heartbeat tells)."""
        probe = getattr(self.backend, "enforced", None)
        before = self.revision
        if probe is None:
            return before, None
        try:
            # the bundle's set names: iptables finds the ipsets named by a hash by them (contents: the kernel's)
            digest = str(probe(list(self.bundle.sets) if self.bundle is not None else []))
        except (ApplyError, OSError, ValueError) as exc:
            self.log(f"reading the kernel's rules back failed: {exc}")
            self.kernel_read_error = str(exc)
            return before, None
        self.kernel_read_error = None
        return (before, digest) if self.revision == before else (self.revision, None)

    def check_drift(self) -> Result:
        """Re-apply when the kernel no longer holds what this process applied last (a rule
        inserted, changed or deleted; the table flushed), or a group set ``g_*`` no longer holds
        what this process last wrote to it (nftables; small sets): tamper, reported. Bundle set
        contents are not compared (listing 100,000 elements costs up to 1.4 s; the enforced
        digest covers them against the control plane's); another table or chain cannot
        undo a drop of ours (a packet must pass every base chain), an iptables rule placed before
        our jump could: the fingerprint covers the jumps' being the first rules of INPUT/OUTPUT."""
        probe = getattr(self.backend, "fingerprint", None) if self.track_drift else None
        if probe is None or self._baseline is _NOTHING_APPLIED:
            return Result(False)
        # the kernel's rules could not be read since the last check (a listing of the heartbeat,
        # the observer or this check died on what someone put in them, or timed out): cannot
        # tell is never intact, so they are programmed again
        unreadable = getattr(self.backend, "read_failure", None)
        if unreadable is not None:
            self.backend.read_failure = None  # type: ignore[attr-defined]
        try:
            now = probe()
        except ReadError as exc:
            now, unreadable = None, str(exc)
        except (ApplyError, OSError):
            return Result(False)
        groups = None
        if now == self._baseline and unreadable is None:
            # group sets (nftables ``g_*``): small, compared with what this process last wrote
            group_probe = getattr(self.backend, "group_problem", None)
            try:
                groups = group_probe() if group_probe is not None else None
            except (ApplyError, OSError, ValueError):
                groups = None  # cannot tell: the next check asks again (enforcement untouched)
            if groups is None:
                return Result(False)
        plan = self.ensure_plan() if self.bundle is not None else self._kernel_plan
        if plan is None:
            return Result(False)
        what = (
            "unreadable"
            if unreadable is not None
            else "removed"
            if now is None
            else "group set altered"
            if groups is not None
            else "changed"
        )
        self._repair(plan, what)
        if unreadable is not None:
            lines = [f"Ringfence's rules could not be read ({unreadable}); re-applied revision {self.revision}"]
        elif groups is not None:
            lines = [f"tamper: {groups}; re-applied revision {self.revision}"]
        else:
            lines = [f"tamper: Ringfence's rules were {what} in the kernel; re-applied revision {self.revision}"]
        return Result(True, lines + self.cut_sessions(plan))

    def check_sets(self, revision: int | None, kernel_digest: str | None, applies: int | None = None) -> Result:
        """Re-apply when the enforced digest the heartbeat just read from the kernel
        (:meth:`enforced_state`) is not this bundle's and deltas': an address added to or removed
        from a bundle set ``s_*`` by another tool (``nft add element inet ringfence s_... { ip }``)
        is covered by neither the seal nor the group-set check, and listing 100,000 elements just
        for the drift check would cost up to 1.4 s; the heartbeat reads them anyway. Only while
        this process enforces the bundle at that revision (not the posture, not mid-apply), and
        only if no whole apply landed since the read (``applies``: :attr:`applies` before it; the
        drift check re-applying the same revision meanwhile would make it repair twice)."""
        with self._lock:
            if (
                not self.track_drift  # drift_interval 0: no tamper repair at all (the control plane sees it)
                or kernel_digest is None
                or self.bundle is None
                or revision is None
                or revision != self.revision
                or (applies is not None and applies != self.applies)
                or self._kernel_plan is None
                or self._posture  # the fail-safe posture is held, not the bundle
            ):
                return Result(False)
            key = (self.bundle.signature, *(d.signature for d in self.deltas))
            if self._expected is None or self._expected[0] != key:
                self._expected = (key, enforced.expected(self.bundle, self.deltas))
            if kernel_digest == self._expected[1]:
                return Result(False)
        plan = self.ensure_plan()
        if plan is None:
            return Result(False)
        self._repair(plan, "set altered")
        lines = [
            "tamper: the kernel's rules or sets are not those of the enforced bundle (an address added to or "
            f"removed from a set by another tool?); re-applied revision {self.revision}"
        ]
        return Result(True, lines + self.cut_sessions(plan))

    def _set_aside(self, reason: str) -> None:
        try:
            where = self.state.set_aside(reason)
            moved = f": moved to {where}" if where is not None else ""
        except OSError as exc:  # a read-only or full filesystem: never trusted all the same
            moved = f"; it could not be moved aside ({exc}): ignored by this process"
        self.set_aside = f"last known good in {self.state.path} set aside ({reason}){moved}"
        self.state.update_status(last_error=self.set_aside, incr={"lkg_set_aside": 1})
        self.log(self.set_aside)

    def kernel_holds(self, bundle: Bundle) -> bool:
        """Whether the kernel holds what ``bundle`` programs (its rules as applied, or no table
        for ``idle``), as far as the backend can tell: the state directory is not the firewall,
        and whole rules in the kernel may be another bundle's (applied from another state
        directory), so what the kernel enforces is compared with the bundle's digest."""
        # one read: the enforced digest is marked altered when the rules are not as applied
        # (the nftables and iptables seals, the iptables jumps), and an idle bundle's is that of no table
        read = getattr(self.backend, "enforced", None)
        probe = getattr(self.backend, "programmed", None)
        try:
            if read is not None:
                return bool(read(list(bundle.sets)) == enforced.expected(bundle))
            if probe is not None:
                return bool(probe()) == (bundle.mode.value != "idle")
        except (ApplyError, OSError, ValueError):
            return False  # cannot tell: apply again (and report what the kernel says then)
        return True  # dry-run, windows-plan: nothing to ask

    def _local_key(self) -> str:
        """Fingerprint of the local fail-safes: a config change re-applies an unchanged bundle."""
        return repr(self.local)

    def _reject(self, what: str, reason: str) -> Rejected:
        self.state.update_status(
            last_rejected={"what": what, "reason": reason, "time": time.time()}, incr={"rejected": 1}
        )
        return Rejected(f"rejected {what}: {reason}")

    # --- whole bundles -----------------------------------------------------------------------

    def apply_bundle(self, new: Bundle, now: float | None = None) -> Result:
        what = f"bundle for {new.workload_id!r} version {new.version}"
        try:
            self.verifier.verify(new)
            check_fresh(new, time.time() if now is None else now)
            if self.workload_id is None:
                self.workload_id = new.workload_id  # first bundle pins the identity (documented)
            check_acceptable(new, self.workload_id, self.revision, self.effective())
            plan = compile_plan(new, self.local)
        except (BundleError, PlanError) as exc:
            raise self._reject(what, str(exc)) from None
        current = self.effective()
        same_local = self.state.read_json("status.json").get("local_failsafes") == self._local_key()
        unchanged = current is not None and new.version == self.revision and same_local and same_firewall(new, current)
        if unchanged and self.kernel_holds(new):  # flushed or lost since: applied again
            # the same firewall, now as one bundle (the delta chain can go), or re-signed with a
            # later expiry (compute's refresh): kept as the last known good, nothing re-applied
            refreshed = self.bundle is not None and (new.expires_at or 0) > (self.bundle.expires_at or 0)
            if self.deltas or refreshed:
                self.state.save_applied(new, [])
                with self._lock:
                    self.bundle, self.deltas = new, []
                    self._reset_cache(plan)  # compiled from ``new``: the same firewall, current sets
                self.state.update_status(expires_at=new.expires_at)
            if refreshed:
                return Result(False, [f"bundle version {new.version} refreshed: valid until {_utc(new.expires_at)}"])
            return Result(False, [f"bundle version {new.version} is already applied: no change"])
        old = self.effective()
        try:
            self._apply(plan)
        except ApplyError as exc:
            self.state.update_status(last_error=str(exc), incr={"apply_failures": 1})
            raise
        self.state.save_applied(new, [])
        if self.state.identity() is None:
            self.state.set_identity(self.workload_id)
        with self._lock:
            self.bundle, self.deltas = new, []
            self._reset_cache(plan)
        self.state.update_status(
            applied_version=new.version,
            mode=new.mode.value,
            applied_at=time.time(),
            expires_at=new.expires_at,
            last_error=None,
            local_failsafes=self._local_key(),
            posture=None,
            incr={"applied": 1},
        )
        lines = describe_change(old, new)
        if unchanged:
            lines.append(
                "  the kernel no longer held these rules (removed, changed or replaced behind the agent's back): applied again"
            )
            self.state.update_status(incr={"tamper_reapplied": 1})
        return Result(True, lines + self.cut_sessions(plan))

    # --- set deltas --------------------------------------------------------------------------

    def apply_delta(self, delta: SetDelta) -> Result:
        what = f"delta for set {delta.set} {delta.from_version}→{delta.to_version}"
        try:
            self.verifier.verify(delta)
        except BundleError as exc:
            raise self._reject(what, str(exc)) from None
        base = self.bundle
        if base is None:
            raise self._reject(what, "no bundle applied yet: fetch the whole bundle")
        version = self._set_version(delta.set)
        if version is None:
            raise self._reject(what, "set is not in the applied bundle: fetch the whole bundle")
        if version >= delta.to_version:
            return Result(False, [f"{what} already applied: no change"])
        if delta.to_version <= delta.from_version:
            raise self._reject(what, "to_version must be newer than from_version")
        if version != delta.from_version:
            raise self._reject(
                what, f"applied set version is {version}, not {delta.from_version}: fetch the whole bundle"
            )
        rev = self.revision or 0
        if delta.to_version < rev:
            raise self._reject(
                what, f"to_version {delta.to_version} is older than the applied revision {rev} (rollback refused)"
            )
        members = self._set_members(delta.set)
        try:
            add4, add6 = split_cidrs(delta.add, f"delta {delta.set}.add")
            rem4, rem6 = split_cidrs(delta.remove, f"delta {delta.set}.remove")
        except PlanError as exc:
            raise self._reject(what, str(exc)) from None
        if {*add4, *add6} != set(delta.add) or {*rem4, *rem6} != set(delta.remove):
            # the state keeps the delta's own text: "10.0.0.7" removing "10.0.0.7/32" would take it
            # out of the kernel but not out of the last known good
            raise self._reject(what, "elements must be canonical CIDR text (10.0.0.7/32, not 10.0.0.7)")
        missing = [x for x in (*rem4, *rem6) if x not in members]
        present = [x for x in (*add4, *add6) if x in members and x not in delta.remove]
        if missing or present:
            raise self._reject(
                what, f"elements do not match the applied set (absent: {missing[:3]}, already present: {present[:3]})"
            )
        hit = delta_overlap(members, {*delta.remove, *rem4, *rem6}, (*add4, *add6))
        if hit is not None:
            # the kernel would refuse it (nft: conflicting intervals) or, worse, accept it and fail
            # every later bundle of this set: refused here, before anything is touched
            raise self._reject(what, f"{hit[0]} overlaps {hit[1]}: a set must stay disjoint prefixes")
        change = ElementChange(delta.set, add4, add6, rem4, rem6)
        # a delta that moves a grouped rule across the backend's size bound: the whole plan,
        # re-applied with the new set (plan before it, plan after it)
        reapply: tuple[Plan, Plan] | None = None
        if any(m.set == delta.set for r in (*base.inbound, *base.outbound) for m in r.members or ()):
            # a grouped rule has a member on this set: its (address, service) elements move too
            plan = self.ensure_plan()
            if plan is None:
                raise self._reject(what, "the applied bundle no longer compiles: fetch the whole bundle")
            current = self.effective()
            assert current is not None
            new_set = fold_delta(current, delta).sets[delta.set]
            v4, _ = split_cidrs(new_set.v4, f"sets.{delta.set}.v4")
            _, v6 = split_cidrs(new_set.v6, f"sets.{delta.set}.v6")
            # a backend may keep some grouped rules as plain rules over the bundle sets (nftables
            # past a size bound): only the others' elements are computed and moved
            route = getattr(self.backend, "group_delta", None)
            counters = route(plan, delta.set, PlanSet(v4, v6)) if route is not None else None
            if route is not None and counters is None:
                reapply = (plan, replace(plan, sets={**plan.sets, delta.set: PlanSet(v4, v6)}))
            else:
                groups = group_changes(plan, delta.set, PlanSet(v4, v6), (*add4, *add6), (*rem4, *rem6), counters)
                change = ElementChange(delta.set, add4, add6, rem4, rem6, groups)
        try:
            if reapply is not None:
                self._apply(reapply[1])
            else:
                self.backend.apply_delta(change)
        except ApplyError as exc:
            self.state.update_status(last_error=str(exc), incr={"apply_failures": 1})
            raise
        try:
            self.state.append_delta(base, [*self.deltas, delta])
        except OSError as exc:
            # the state directory must describe the firewall: take the change back out
            try:
                if reapply is not None:
                    self._apply(reapply[0])
                else:
                    self.backend.apply_delta(change.inverse())
                undone = "the firewall change was undone"
            except ApplyError as undo:
                undone = f"undoing the firewall change failed too: {undo}"
            with contextlib.suppress(OSError):
                self.state.update_status(last_error=f"{exc}; {undone}", incr={"apply_failures": 1})
            raise ApplyError(f"could not record the delta in {self.state.path} ({exc}); {undone}") from None
        with self._lock:
            # caches move by the delta only: the effective bundle and the plan's copy of the set
            # are brought up to date when next asked for (effective(), ensure_plan())
            self.deltas = [*self.deltas, delta]
            if self._versions is not None:
                self._versions[delta.set] = delta.to_version
            members.difference_update(delta.remove)
            members.update(delta.add)
            if self.plan is not None:
                self._stale.add(delta.set)
        if getattr(self.backend, "rerender_on_delta", False):
            plan = self.ensure_plan()
            if plan is not None:
                self._apply(plan)  # addresses live inline in the rules (windows-plan)
        self.state.update_status(applied_version=self.revision, applied_at=time.time(), incr={"deltas_applied": 1})
        lines = [
            f"set {delta.set}: version {delta.from_version} → {delta.to_version}, +{len(delta.add)} -{len(delta.remove)} elements"
        ]
        if self._delta_revokes(base, delta) and base.mode.value == "enforce":
            # the plan's copy of the set is brought up to date (O(set)) only if a connection
            # with a peer of this delta is open
            lines += self.cut_sessions(self.ensure_plan, peers=[*delta.remove, *delta.add])
        return Result(True, lines)

    @staticmethod
    def _delta_revokes(bundle: Bundle, delta: SetDelta) -> bool:
        """Elements leaving a set an allow rule uses, or joining one a drop rule uses."""
        for r in (*bundle.inbound, *bundle.outbound):
            sets = {r.set, *(m.set for m in r.members or ())}
            if delta.set in sets and (delta.remove if r.action == "allow" else delta.add):
                return True
        return False

    def cut_sessions(self, plan: Plan | Callable[[], Plan | None], peers: list[str] | None = None) -> list[str]:
        """Delete the conntrack entries ``plan`` would not admit (``peers``: only theirs); the
        lines say what was cut. A failure is reported, never raised: the rules are in force."""
        if self.sessions is None or (isinstance(plan, Plan) and plan.mode != "enforce"):
            return []
        try:
            report = self.sessions.cut(plan, peers)
        except (CutError, OSError) as exc:
            msg = f"could not cut open connections the new rules do not admit: {exc}"
            self.state.update_status(last_error=msg, incr={"session_cut_failures": 1})
            return [msg]
        if report.cut:
            self.state.update_status(
                last_cut={
                    "time": time.time(),
                    "revision": self.revision,
                    "cut": report.deleted.deleted,
                    "tracked": report.listed,
                    "ms": round(report.seconds * 1000, 1),
                    "connections": [f"{f.direction} {s.describe()} ({why.by})" for s, f, why in report.cut[:20]],
                },
                incr={"sessions_cut": report.deleted.deleted},
            )
        return report.lines()

    def rewind_deltas(self, keep: int) -> Result:
        """Forget the applied deltas after the first ``keep`` and enforce what is left.

        For a batch of deltas that failed half-way: its applied part may claim the revision of the
        whole bundle that must now replace it. Nothing newer than the batch was accepted, so going
        back to before it only gives up what that batch brought."""
        if self.bundle is None or len(self.deltas) <= keep:
            return Result(False)
        dropped = self.deltas[keep:]
        self.state.save_deltas(self.bundle, self.deltas[:keep])
        with self._lock:
            self.deltas = self.deltas[:keep]
            self._reset_cache(None)
        lines = [f"undid {len(dropped)} delta(s) of a batch that failed half-way: back to revision {self.revision}"]
        plan = self.ensure_plan()
        try:
            if plan is not None:
                self._apply(plan)
        except ApplyError as exc:
            self.state.update_status(last_error=str(exc), incr={"apply_failures": 1})
            lines.append(str(exc))
        self.state.update_status(applied_version=self.revision, applied_at=time.time())
        return Result(True, lines)

    # --- last known good ---------------------------------------------------------------------

    def reapply_last_known_good(self) -> Result:
        """Re-verify and re-apply what the state directory holds, before any network contact."""
        if self.bundle is None:
            return Result(False, ["no last known good bundle in the state directory"])
        try:
            self.verifier.verify(self.bundle)
            for d in self.deltas:
                self.verifier.verify(d)
            if self.workload_id is not None and self.bundle.workload_id != self.workload_id:
                raise BundleError(
                    f"state holds a bundle for {self.bundle.workload_id!r}, this agent is {self.workload_id!r}"
                )
            eff = self._fold_valid_deltas()
            self._reset_cache(None)
            plan = compile_plan(eff, self.local)
        except (BundleError, PlanError) as exc:
            # set aside, or its version would make the next good bundle look like a replay
            with self._lock:
                self.bundle, self.deltas = None, []
                self._reset_cache(None)
            self._set_aside(f"does not verify: {exc}")
            raise Rejected(f"last known good in {self.state.path} is unusable: {exc}") from None
        try:
            self._apply(plan)
        except ApplyError:
            # the kernel refused it (a lock held, a module missing): the file stays for the next
            # start, but nothing is held in memory, so the daemon holds the fail-safe posture and
            # fetches the bundle whole instead of believing it enforces what the kernel lacks;
            # the daemon tries it again (retry_last_known_good) until something is enforced
            with self._lock:
                self.refused_lkg = (self.bundle, self.deltas)
                self.bundle, self.deltas = None, []
                self._reset_cache(None)
            raise
        self.refused_lkg = None
        self.plan = plan
        self.state.update_status(
            applied_version=self.revision,
            mode=eff.mode.value,
            applied_at=time.time(),
            local_failsafes=self._local_key(),
            posture=None,
            expires_at=self.bundle.expires_at,
            incr={"lkg_reapplied": 1},
        )
        lines = [f"re-applied last known good: {eff.workload_id} revision {self.revision}, mode {eff.mode.value}"]
        return Result(True, lines + self.cut_sessions(plan))

    def retry_last_known_good(self) -> Result:
        """The last known good the kernel refused at start, tried again — unless a bundle applied
        since (then it is no longer the last known good). Raises like
        :meth:`reapply_last_known_good`; a Result(False) when there is nothing to try."""
        with self._lock:
            if self.refused_lkg is None or self.bundle is not None:
                self.refused_lkg = None
                return Result(False)
            self.bundle, self.deltas = self.refused_lkg
            self._reset_cache(None)
        return self.reapply_last_known_good()

    def forget_last_known_good(self) -> None:
        """Hold nothing from the state directory in memory, and leave it on disk: for a start
        with no usable pinned key, where nothing can be verified (a restored key finds it
        again at the next start)."""
        with self._lock:
            self.bundle, self.deltas, self.refused_lkg = None, [], None
            self._reset_cache(None)

    def follow_control_plane(
        self, addresses: tuple[str, ...], apply: bool = True, dns_resolvers: tuple[str, ...] | None = None
    ) -> Result:
        """The control plane's addresses resolved from its host name (API Gateway's change over
        time): the control-plane fail-safe becomes the configured ones plus ``addresses``, and
        (when given) the DNS fail-safe ``dns_resolvers`` (the host's resolv.conf, which DHCP
        rewrites). A change re-applies what is enforced (the bundle, or the boot posture) with
        them; open connections survive it (established flows pass first). ``apply`` False: only
        remembered, for the first apply (before the last known good is re-applied)."""
        with self._lock:
            wanted = tuple(dict.fromkeys((*self.configured_control_plane, *addresses)))
            dns = self.local.dns_resolvers if dns_resolvers is None else dns_resolvers
            if wanted == self.local.control_plane and dns == self.local.dns_resolvers:
                return Result(False)
            lines = []
            if wanted != self.local.control_plane:
                lines.append(f"control-plane fail-safe now admits {', '.join(wanted) or 'nothing'}")
            if dns != self.local.dns_resolvers:
                lines.append(f"DNS fail-safe now admits {', '.join(dns) or 'nothing'}")
            before, self.local = self.local, replace(self.local, control_plane=wanted, dns_resolvers=dns)
            eff = self.effective()
        if not apply:
            return Result(False)
        try:
            if eff is not None:
                plan = compile_plan(eff, self.local)
                self._apply(plan)
                with self._lock:
                    self.plan, self._stale = plan, set()
                self.state.update_status(local_failsafes=self._local_key())
            elif self._kernel_plan is not None:  # the boot posture: held again with them
                self.hold_failsafe_posture()
            else:
                return Result(False)
        except (ApplyError, PlanError):
            with self._lock:
                self.local = before  # not in the kernel: the next call tries again
            raise
        return Result(True, lines)

    def hold_failsafe_posture(self, control_plane: tuple[str, ...] = ()) -> Result:
        """Fail-safes plus default deny, until a verified bundle applies: what a host enforces
        with no usable last known good (none yet, or set aside). ``control_plane``: addresses
        of the control plane resolved at start (a URL with a name), so that it stays reachable."""
        local = replace(
            self.local,
            control_plane=tuple(dict.fromkeys((*self.local.control_plane, *control_plane))),
            admin_ports=self.local.admin_ports or POSTURE_ADMIN_PORTS,
        )
        plan = Plan(
            workload_id=self.workload_id or "-",
            version=0,
            mode="enforce",
            quarantined=False,
            failsafes=merge_failsafes(FailsafeDoc(), local),
        )
        self._apply(plan)
        self._posture = True
        self.state.update_status(posture="failsafe", posture_since=time.time(), incr={"failsafe_postures": 1})
        fs = plan.failsafes
        reach = [
            f"{what} {', '.join(items)}"
            for what, items in (
                ("admin", (*fs.admin_v4, *fs.admin_v6)),
                ("dns", (*fs.dns_v4, *fs.dns_v6)),
                ("control plane", (*fs.control_v4, *fs.control_v6)),
            )
            if items
        ]
        lines = [
            f"no valid bundle: holding the fail-safe posture (fail-safes, then drop): {'; '.join(reach) or 'no addresses'}"
        ]
        return Result(True, lines + self.cut_sessions(plan))

    def _fold_valid_deltas(self) -> Bundle:
        """Keep the chain of deltas that still fits (a crash may leave stale ones behind)."""
        assert self.bundle is not None
        kept: list[SetDelta] = []
        versions = {name: s.version for name, s in self.bundle.sets.items()}
        for d in self.deltas:
            if versions.get(d.set) == d.from_version:
                kept.append(d)
                versions[d.set] = d.to_version
        if len(kept) != len(self.deltas):
            self.deltas = kept
            try:
                self.state.save_deltas(self.bundle, kept)
            except OSError as exc:
                # best effort: what was verified is enforced all the same; the journal on disk
                # still holds the stale deltas, cut again at the next start
                self.log(f"could not rewrite the delta journal in {self.state.path} (enforcing anyway): {exc}")
        return effective_bundle(self.bundle, kept)

    def ensure_plan(self) -> Plan | None:
        with self._lock:
            if self.bundle is None:
                return self.plan
            if self.plan is None:
                eff = self.effective()
                assert eff is not None
                try:
                    self.plan = compile_plan(eff, self.local)
                except PlanError:
                    return None
                self._stale = set()
            elif self._stale:  # sets moved by deltas since the plan was built
                eff = self.effective()
                assert eff is not None
                for name in self._stale:
                    s = eff.sets[name]
                    self.plan.sets[name] = PlanSet(tuple(s.v4), tuple(s.v6))
                self._stale = set()
            return self.plan

    def flush(self) -> bool:
        return self.backend.flush()
