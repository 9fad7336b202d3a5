"""The admin API service: provision policy, modes, quarantine, pairing keys — each audited."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Callable
from typing import Any

from ringfence.audit import canonical, state_digest
from ringfence.engine import Engine
from ringfence.model import Mode
from ringfence.policy import PolicyError, file_name_problems, load_policy_texts
from ringfence.policydiff import failsafe_widening, newly_idle
from ringfence.policytests import run_tests
from ringfence.policywarnings import warnings
from ringfence.store.base import (
    AgentKeyReset,
    AuditedChange,
    AuditRecord,
    ChangeFailed,
    ConflictError,
    InventoryRecord,
    OperatorChange,
    PolicyActivation,
    PolicyVersion,
    Unconfirmed,
    WorkloadChanged,
    agent_key_id_of,
    registration_as_read,
)
from ringfence.versions import digest_of

from .api import Response, error, secret_hash
from .wiring import BaseWiring, Metric, PolicyTampered, log, no_metric, queue_stored

# the metric every action that lowers a safeguard counts toward (a CloudWatch alarm watches it):
# a workload set to idle (its firewall untouched), a release from quarantine, fail-safes widened
SAFEGUARDS_LOWERED = "SafeguardsLowered"
# the metric an operator's reset of an agent key counts toward: each one lets a new key claim a
# workload's identity, so an alarm on it catches a reset nobody asked for
AGENT_KEY_RESETS = "AgentKeyResets"
# how many of a list (warnings, newly idle workloads) a provision's audit record names: the count
# and, for warnings, a digest of the whole list stand for the rest
LISTED = 100
# the longest refusal target (``admin.denied``) recorded as it is: a workload id's bound. A longer
# one (a path of any length) is recorded by its start and digest, so a caller without a role
# cannot write records of any size into the audit log
DENIED_TARGET_MAX = 128
DENIED_TARGET_PREFIX = 64


def denied_target(target: str) -> str:
    """``target`` as an ``admin.denied`` record holds it: as it is up to :data:`DENIED_TARGET_MAX`
    characters, else its first :data:`DENIED_TARGET_PREFIX` and the length and SHA-256 of the whole."""
    if len(target) <= DENIED_TARGET_MAX:
        return target
    digest = hashlib.sha256(target.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{target[:DENIED_TARGET_PREFIX]}… ({len(target)} characters, sha256 {digest})"


def is_deregistered(rec: InventoryRecord) -> bool:
    """A deregistered on-premise workload or a terminated instance: refused as an unknown one
    (404) by every change an operator makes to a workload, as a label binding is: the id may name
    another host when registered again, which starts from nothing of this one's."""
    return rec.state == "terminated"


# --- admin API --------------------------------------------------------------------------------------


class Admin:
    """Operator actions; each is recorded in the append-only audit table with the IAM principal."""

    def __init__(self, w: BaseWiring, metric: Metric = no_metric) -> None:
        self.w = w
        self.metric = metric

    def _audit(
        self,
        principal: str,
        action: str,
        target: str,
        detail: dict[str, Any],
        reason: str,
        before: str = "",
        after: str = "",
    ) -> str:
        """A record no change goes with (:meth:`_audit_with` for one that does): its id."""
        rec = AuditRecord(
            principal=principal, action=action, target=target, detail=detail, reason=reason, before=before, after=after
        )
        self.w.audit(rec)
        return rec.id

    def _audit_with(self, rec: AuditRecord, change: AuditedChange) -> tuple[str, Exception | None]:
        """``rec`` and ``change`` in one store transaction (:meth:`Store.audit_with`; SQLite one
        ``BEGIN IMMEDIATE``, DynamoDB one TransactWriteItems: a process killed between the two
        leaves neither): the record's id, and the change's exception (None: made). A change that
        failed is recorded all the same, as an attempt: the transaction wrote neither, so the
        record is written alone now, and the caller follows it with ``<action>.failed``. A failing
        record write raises, nothing changed (:class:`Unconfirmed`: not known which)."""
        try:
            self.w.audit_with(rec, change)
        except ChangeFailed as exc:
            self.w.audit(rec)
            return rec.id, exc.cause
        return rec.id, None

    def _operator_state(self, workload_id: str) -> str:
        """The digest of a workload's operator state (mode, quarantine): an audit record's before/after."""
        rec = self.w.store.get(workload_id)
        if rec is None:
            return ""
        return state_digest({"mode": rec.op_mode.value if rec.op_mode else None, "quarantined": rec.op_quarantined})

    def _lowered(self, principal: str, what: str, target: str) -> None:
        log.warning("%s lowered a safeguard: %s (%s)", principal, what, target)
        self.metric(SAFEGUARDS_LOWERED, 1)

    def denied(self, principal: str, action: str, target: str, roles: list[str]) -> Response:
        """An admin action the caller's roles do not allow: refused, and audited."""
        self._audit(principal, "admin.denied", denied_target(target), {"action": action, "roles": roles}, "")
        held = ", ".join(roles) or "none"
        return error(403, "not allowed", f"{action} needs another admin role (the caller holds: {held})")

    def provision(self, principal: str, files: dict[str, str], reason: str = "") -> Response:
        if not files:
            return error(400, "no policy files")
        # before anything is read, numbered or written (the routes' request model refuses these too)
        bad = file_name_problems(files)
        if bad:
            return error(400, "policy rejected: nothing provisioned", "\n".join(bad))
        try:
            policy = load_policy_texts(files)
        except PolicyError as exc:
            return error(400, "policy rejected", str(exc))
        # the policy's own tests must pass against the live inventory before it becomes active
        live = [r.effective() for r in self.w.store.all_records() if r.active]
        engine = Engine(policy)
        engine.load(live)
        failures = [t.report() for t in run_tests(policy, engine.workloads) if not t.passed]
        if failures:
            return error(422, "policy tests fail", "\n".join(failures))
        # warnings never refuse a version: they are answered and audited (the record holds the
        # first ones, their number and the digest of them all: thousands made the record too large
        # for the audit table, and the version was active with no record)
        found = [str(w) for w in warnings(policy, live)]
        digest = digest_of(files)
        # the active version: the compare-and-swap is over its number, and its policy is the base
        # the fail-safe widening and newly idle workloads are judged against. Should its files no
        # longer be its own (rewritten or removed in the bucket), there is no comparable base: the
        # version replacing it is how an operator repairs that, so it goes ahead, uncompared, and
        # says so (in its record and as a lowered safeguard), rather than failing until someone
        # restores the object by hand
        active_pv = self.w.store.active_policy()
        base, unverifiable = None, ""
        if active_pv is not None:
            try:
                base = self.w.policy(active_pv)
            except PolicyTampered as exc:
                unverifiable = str(exc)
        if active_pv is not None and base is not None and active_pv.digest == digest:
            # the active version's files (its own, as read): no new version, which would roll back
            # any version provisioned between the two, as a retry of a provisioning answered 503
            # (compute not queued) did. Its rebuild is queued (what that retry is for); audited
            # with the version already
            queue_stored(
                self.w,
                [],
                f"already the active version (v{active_pv.number})",
                f"policy/v{active_pv.number}",
                None,
                rebuild=True,
                again=f"the same files again queue it while v{active_pv.number} is the active version",
                urgent=True,
            )
            return Response(200, {"version": active_pv.number, "digest": digest, "audit_id": None, "warnings": found})
        widened = failsafe_widening(base.failsafes, policy.failsafes) if base else []
        idle = newly_idle(base, policy, live) if base else []
        version = self.w.store.next_policy_version()
        target = f"policy/v{version}"
        detail: dict[str, Any] = {"digest": digest}
        if active_pv is not None and unverifiable:
            detail["replaces_unverifiable"] = {"version": active_pv.number, "why": unverifiable}
        if found:
            detail["warnings"] = found[:LISTED]
            detail["warning_count"] = len(found)
            detail["warnings_sha256"] = hashlib.sha256(canonical(found)).hexdigest()
        if widened:
            detail["widens_failsafes"] = widened
        if idle:
            detail["newly_idle"] = {"count": len(idle), "workloads": idle[:LISTED]}
        keys = {}
        for name, text in sorted(files.items()):
            key = f"policies/v{version:06d}/{name}"
            self.w.publisher.put_text(key, text)
            keys[name] = key
        pv = PolicyVersion(number=version, keys=keys, digest=digest, author=principal, message=reason)

        # the record with the activation, in one store transaction: a version is never active
        # without its record, nor a record left claiming a version a killed process never
        # activated. Should the activation lose (below), the attempt is recorded and a second
        # record says so; the store's version history (written with the activation, in one step)
        # is what became active. Only over the version this one was tested and compared against:
        activate = PolicyActivation(pv, expected_active=active_pv.number if active_pv else None)
        try:
            audit_rec = AuditRecord(
                principal=principal,
                action="policy.provision",
                target=target,
                detail=detail,
                reason=reason,
                before=active_pv.digest if active_pv else "",
                after=digest,
            )
            audit_id, failed = self._audit_with(audit_rec, activate)
        except Unconfirmed:
            # active with its record, or neither: its files stay (an active version needs them)
            log.error("provisioning %s: not known whether it is active (see the audit log)", target)
            raise
        except Exception as exc:
            # the store said not written; its files go only once it shows the version is not
            # active (a transaction that committed and was answered as failed - a ConflictError
            # read from a retry of it - left this version active, its record with it)
            try:
                now = self.w.store.active_policy()
            except Exception:
                log.error("provisioning %s: not known whether it is active (see the audit log)", target)
                raise exc from None
            if now is None or now.number != version:
                # nothing activated: the call fails (the function's error alarm), its files are removed
                log.error("the audit record of %s could not be written: nothing provisioned", target)
                self._unpublish(keys)
                raise
            log.warning("provisioning %s raised %s, but it is active with its record", target, exc)
            audit_id, failed = audit_rec.id, None
        try:
            if failed is not None:
                raise failed
        except ConflictError as exc:
            # a concurrent provision won: this version never becomes active, nor is it kept (its
            # number stays unused); provision again over the one that won. Only as the store
            # shows it (a version active is kept, whatever the store answered)
            now = self.w.store.active_policy()
            if now is None or now.number != version:
                self._unpublish(keys)
                self._failed(principal, "policy.provision", target, audit_id, str(exc), reason, outcome="abandoned")
                return error(409, "policy changed meanwhile: nothing provisioned", str(exc))
            log.warning("provisioning %s was refused (%s), but it is active", target, exc)
        except Exception as exc:
            # the store failed (throttled, unreachable): active or not, as the store now says
            now = self.w.store.active_policy()
            if now is None or now.number != version:
                self._failed(
                    principal,
                    "policy.provision",
                    target,
                    audit_id,
                    f"{type(exc).__name__}: {exc}",
                    reason,
                    outcome="abandoned",
                )
                raise
            log.warning("activating %s raised %s, but it is active", target, exc)
        if widened:
            self._lowered(principal, "fail-safes widened: " + "; ".join(widened), target)
        if idle:
            self._lowered(principal, f"{len(idle)} workload(s) newly idle", target)
        if active_pv is not None and unverifiable:
            why = f"replaces version {active_pv.number}, whose files are not its own: fail-safes and idle not compared"
            self._lowered(principal, why, target)
        # active: a failed compute message is answered 503 (NotQueued); the same files provisioned
        # again, while this version is the active one, queue the rebuild (above). Once another is
        # provisioned, that one queues it: a retry then would roll it back, so the advice says when
        queue_stored(
            self.w,
            [],
            "provisioned",
            target,
            audit_id,
            rebuild=True,
            again=f"the same files again queue it while v{version} is the active version (a later version "
            "provisioned queues the rebuild itself: do not send these files again then)",
            urgent=True,
        )
        return Response(201, {"version": version, "digest": digest, "audit_id": audit_id, "warnings": found})

    def _unpublish(self, keys: dict[str, str]) -> None:
        for key in keys.values():
            with contextlib.suppress(Exception):
                self.w.publisher.delete(key)

    def _failed(
        self, principal: str, action: str, target: str, audit_id: str, why: str, reason: str, outcome: str = "failed"
    ) -> None:
        """The record that a change whose attempt or request is recorded (``audit_id``) did not happen:
        ``<action>.failed`` (``.unconfirmed``: not known; ``.abandoned``: a provision that lost
        its race), naming the first record and why."""
        try:
            self._audit(principal, f"{action}.{outcome}", target, {"audit_id": audit_id, "why": why}, reason)
        except Exception:
            log.exception("%s of %s (audit record %s) failed; that could not be recorded", action, target, audit_id)

    def _raised(
        self,
        principal: str,
        action: str,
        target: str,
        audit_id: str,
        exc: Exception,
        reason: str,
        in_force: Callable[[], bool],
    ) -> bool:
        """After a change raised (its attempt recorded): ``<action>.failed`` only where the store
        shows it is not in force; where it is (made meanwhile by another request), the first record
        stands (logged); where the store cannot say, ``<action>.unconfirmed``. True
        when the change is in force."""
        why = f"{type(exc).__name__}: {exc}"
        try:
            done = in_force()
        except Exception:
            self._failed(principal, action, target, audit_id, why, reason, outcome="unconfirmed")
            return False
        if done:
            log.warning(
                "%s of %s (audit record %s) is in force although the call raised: %s", action, target, audit_id, why
            )
            return True
        self._failed(principal, action, target, audit_id, why, reason)
        return False

    def _changed(
        self, principal: str, action: str, workload_id: str, audit_id: str, exc: WorkloadChanged, reason: str
    ) -> Response:
        """409 for an operator change refused because the workload is not the one read any more
        (:class:`WorkloadChanged`): nothing was written (the change and its record are one
        transaction), so the attempt, recorded alone, is followed by ``<action>.failed``."""
        self._failed(principal, action, workload_id, audit_id, f"workload changed meanwhile: {exc}", reason)
        return error(
            409,
            "workload changed meanwhile: nothing set",
            f"{exc}; read the workload again and send the request again if it still applies",
        )

    @staticmethod
    def _op_digest(mode: str | None, quarantined: bool) -> str:
        return state_digest({"mode": mode, "quarantined": quarantined})

    # A mode, quarantine and release (as a provision) are written with their record in one store
    # transaction (Store.audit_with; SQLite: one BEGIN IMMEDIATE, DynamoDB: one TransactWriteItems
    # holding the change's items and the audit chain's): a process killed in between leaves
    # neither, so no change is in force without its record and no record claims a change that
    # never happened. A change refused or failing writes neither; the attempt is then recorded
    # alone, followed by ``<action>.failed``. A failed audit write changes nothing and the call
    # fails (the function's error alarm). The pairing and agent-key actions below are several
    # writes each: their request is recorded BEFORE they are made, and what they did after.

    def set_mode(self, principal: str, workload_id: str, mode: Mode | None, reason: str = "") -> Response:
        rec = self.w.store.get(workload_id)
        if rec is None or is_deregistered(rec):
            return error(404, "unknown workload", workload_id)
        value = mode.value if mode else None
        before = self._op_digest(rec.op_mode.value if rec.op_mode else None, rec.op_quarantined)
        after = self._op_digest(value, rec.op_quarantined)
        # the record with the change (see above): a mode is never in force without its record
        audit_rec = AuditRecord(
            principal=principal,
            action="workload.mode",
            target=workload_id,
            detail={"mode": value},
            reason=reason,
            before=before,
            after=after,
        )
        # only over the record read where the id may be reused (on-premise): an id deregistered and
        # registered again meanwhile names another host, which must not run with a mode (idle:
        # unenforced) meant for this one. A cloud id never is, and its version moves with tag writes
        change = OperatorChange(workload_id, set_mode=True, mode=mode, as_read=registration_as_read(rec))
        audit_id, failed = self._audit_with(audit_rec, change)
        try:
            if failed is not None:
                raise failed
        except KeyError:
            self._failed(principal, "workload.mode", workload_id, audit_id, "unknown workload", reason)
            return error(404, "unknown workload", workload_id)
        except WorkloadChanged as exc:
            return self._changed(principal, "workload.mode", workload_id, audit_id, exc, reason)
        except Exception as exc:

            def moded() -> bool:
                now = self.w.store.get(workload_id)
                return now is not None and (now.op_mode.value if now.op_mode else None) == value

            # in force although the write's answer was lost: answered as stored (compute queued,
            # or 503 NotQueued), never a bare 500 that leaves the mode stored and not enforced
            if not self._raised(principal, "workload.mode", workload_id, audit_id, exc, reason, moded):
                raise
        if mode is Mode.IDLE and rec.op_mode is not Mode.IDLE:  # idle again lowers nothing more
            self._lowered(principal, "mode idle (its firewall left untouched)", workload_id)
        # stored: a failed compute message is answered 503 (NotQueued); setting the mode again queues it
        queue_stored(
            self.w,
            [workload_id],
            f"mode set to {value}" if value else "mode cleared",
            workload_id,
            audit_id,
            urgent=True,
        )
        return Response(200, {"workload_id": workload_id, "mode": value, "audit_id": audit_id})

    def quarantine(self, principal: str, workload_id: str, on: bool, reason: str = "") -> Response:
        rec = self.w.store.get(workload_id)
        if rec is None or is_deregistered(rec):
            return error(404, "unknown workload", workload_id)
        mode = rec.op_mode.value if rec.op_mode else None
        before, after = self._op_digest(mode, rec.op_quarantined), self._op_digest(mode, on)
        action = "workload.quarantine" if on else "workload.release"
        # the record with the change (see above): a release is never in force without its record
        audit_rec = AuditRecord(
            principal=principal,
            action=action,
            target=workload_id,
            detail={"quarantined": on},
            reason=reason,
            before=before,
            after=after,
        )
        # only over the record read, as a mode: a quarantine (or release) meant for a host
        # deregistered meanwhile never lands on the next host registered under its id; a cloud
        # instance's tag writes (its own among them) never refuse a responder's
        change = OperatorChange(workload_id, quarantined=on, as_read=registration_as_read(rec))
        audit_id, failed = self._audit_with(audit_rec, change)
        try:
            if failed is not None:
                raise failed
        except KeyError:
            self._failed(principal, action, workload_id, audit_id, "unknown workload", reason)
            return error(404, "unknown workload", workload_id)
        except WorkloadChanged as exc:
            return self._changed(principal, action, workload_id, audit_id, exc, reason)
        except Exception as exc:

            def made() -> bool:
                now = self.w.store.get(workload_id)
                return now is not None and now.op_quarantined == on

            if not self._raised(principal, action, workload_id, audit_id, exc, reason, made):
                raise
            # in force (the write's answer lost): answered as stored, below, as a mode's
        if not on and rec.op_quarantined:  # releasing a workload not quarantined lowers nothing
            self._lowered(principal, "released from quarantine", workload_id)
        # as a mode's: the same request again stores the same and queues compute
        # urgent: an incident responder's quarantine never waits behind a tag storm's backlog
        queue_stored(self.w, [workload_id], "quarantined" if on else "released", workload_id, audit_id, urgent=True)
        return Response(200, {"workload_id": workload_id, "quarantined": on, "audit_id": audit_id})

    def pairing_key(self, principal: str, workload_id: str | None, uses: int, ttl: int, reason: str = "") -> Response:
        """A pairing key that enrolls only ``workload_id`` (a registered on-premise workload), at
        most ``uses`` times within ``ttl`` seconds. The key is in this response only: the store
        keeps its hash."""
        if not workload_id:
            return error(400, "bad pairing key request", "workload_id: a pairing key is issued for one workload")
        if uses < 1 or ttl < 60:
            return error(400, "bad pairing key request", "uses ≥ 1 and ttl ≥ 60 seconds")
        rec = self.w.store.get(workload_id)
        if rec is None or is_deregistered(rec):
            return error(404, "unknown workload", f"{workload_id}: register the on-premise workload first")
        if rec.workload.cloud != "onprem":
            return error(
                409,
                "not an on-premise workload",
                f"{workload_id} is a {rec.workload.cloud} instance: it enrolls with its cloud identity",
            )
        key = secrets.token_urlsafe(24)
        # the record first: no pairing key enrolls anything without its record
        audit_id = self._audit(
            principal,
            "pairing.create",
            workload_id,
            {"uses": uses, "ttl": ttl, "key_sha256": secret_hash(key)},
            reason,
        )
        try:
            # only over the registration read: one deregistered and registered again meanwhile is
            # another host, which a key meant for this one must not enroll
            self.w.store.put_pairing(secret_hash(key), workload_id, uses, ttl, as_read=registration_as_read(rec))
        except WorkloadChanged as exc:
            return self._changed(principal, "pairing.create", workload_id, audit_id, exc, reason)
        except Exception as exc:
            self._failed(principal, "pairing.create", workload_id, audit_id, f"{type(exc).__name__}: {exc}", reason)
            raise
        return Response(
            201, {"pairing_key": key, "workload_id": workload_id, "uses": uses, "expires_in": ttl, "audit_id": audit_id}
        )

    def revoke_pairing_keys(self, principal: str, workload_id: str, reason: str = "") -> Response:
        """Revoke every pairing key issued for ``workload_id``: a key that leaked before it was
        used (or with uses left) enrolls nothing any more. The agent key it bound stays bound."""
        rec = self.w.store.get(workload_id)
        if rec is None:
            return error(404, "unknown workload", workload_id)
        # the request is recorded before anything is revoked (see above); how many keys it revoked
        # is known only after, so the pairing.revoke record that counts them follows the change
        requested = self._audit(principal, "pairing.revoke.requested", workload_id, {}, reason)
        try:
            # only the keys of the registration read: another host registered under the id
            # meanwhile keeps the keys issued for it (its enrollment is not this request's to stop)
            revoked = self.w.store.drop_pairings(workload_id, as_read=registration_as_read(rec))
        except WorkloadChanged as exc:
            return self._changed(principal, "pairing.revoke", workload_id, requested, exc, reason)
        except Exception as exc:
            self._failed(principal, "pairing.revoke", workload_id, requested, f"{type(exc).__name__}: {exc}", reason)
            raise
        audit_id = self._audit(principal, "pairing.revoke", workload_id, {"pairing_keys_revoked": revoked}, reason)
        return Response(200, {"workload_id": workload_id, "pairing_keys_revoked": revoked, "audit_id": audit_id})

    def reset_agent_key(
        self, principal: str, workload_id: str, reason: str = "", next_agent_key: str | None = None
    ) -> Response:
        """Unbind ``workload_id``'s agent key and revoke its token (and nudge connection) and its
        pairing keys: an agent that lost its state directory (its key with it) can then enroll
        again, with a new key, by its identity (the instance's document, STS, or a pairing key
        issued after the reset). Until it does, no token and no key renew anything for the
        workload. A token whose issue raced the reset authorizes nothing either: tokens hold
        only while the key they were issued under is bound (store.base.token_key_holds).

        ``next_agent_key``: the fingerprint of the reinstalled agent's key, the only one the next enrollment
        may bind. An identity proof without freshness (an EC2 instance identity document never
        expires, and copies of it sit in logs and backups) would otherwise let whoever presents
        one first after the reset bind their own key."""
        rec = self.w.store.get(workload_id)
        if rec is None:
            return error(404, "unknown workload", workload_id)
        pem = self.w.store.agent_key(workload_id)
        # named before anything changes; a key bound before agent keys were read strictly (a text
        # holding more than one key) is still named: the reset is how an operator clears it
        dropped = (agent_key_id_of(pem) or "(not one Ed25519 key)") if pem else None
        # the request is recorded before anything changes (see above): a reset lets a new key claim
        # the workload, and is never made without its record. What it revoked (a token, pairing
        # keys) is known only after, so the agent-key.reset record that counts it follows
        requested = self._audit(
            principal,
            "agent-key.reset.requested",
            workload_id,
            {"agent_key": dropped, "next_agent_key": next_agent_key},
            reason,
        )
        try:
            # the named key, the pairing keys (one issued before the reset, leaked with uses left,
            # must not claim the workload), the agent key, token and connection in one store step,
            # only over the registration read: another host registered under the id meanwhile
            # keeps its agent, and takes no key named for the old one
            pairings, revoked = self.w.store.reset_agent_key(
                AgentKeyReset(workload_id, next_agent_key, registration_as_read(rec))
            )
        except WorkloadChanged as exc:
            return self._changed(principal, "agent-key.reset", workload_id, requested, exc, reason)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc} (the steps before it stand)"
            self._failed(principal, "agent-key.reset", workload_id, requested, why, reason)
            raise
        log.warning("%s reset the agent key of %s (was %s)", principal, workload_id, dropped or "none")
        self.metric(AGENT_KEY_RESETS, 1)
        audit_id = self._audit(
            principal,
            "agent-key.reset",
            workload_id,
            {
                "agent_key": dropped,
                "token_revoked": revoked,
                "pairing_keys_revoked": pairings,
                "next_agent_key": next_agent_key,
            },
            reason,
        )
        return Response(
            200,
            {
                "workload_id": workload_id,
                "agent_key_dropped": dropped,
                "token_revoked": revoked,
                "pairing_keys_revoked": pairings,
                "next_agent_key": next_agent_key,
                "audit_id": audit_id,
            },
        )

    def findings(self, bound: float, agents: bool = False) -> Response:
        """Effective policy, checked (``ringfence findings``' code, ringfence.control.findings);
        ``agents``: every enrolled workload's agent listed too."""
        from .findings import findings

        return Response(200, findings(self.w.store, bound=bound, agents_listed=agents).model_dump())

    def dependency_map(
        self, fmt: str, app: str | None = None, env: str | None = None, decision: str | None = None, min_flows: int = 0
    ) -> tuple[str, str] | Response:
        """The dependency map (``ringfence map``'s code): from the store's flow rows, else from
        the active policy over the running inventory; (content type, text)."""
        from ringfence.viz.depmap import MapFilter, build_map
        from ringfence.viz.render import render

        try:
            active = self.w.active_policy()
        except PolicyTampered as exc:
            return error(409, "active policy unverifiable", f"{exc}: provision a good version")
        if active is None:
            return error(409, "no active policy", "provision a policy version first")
        inventory = [r.effective() for r in self.w.store.all_records() if r.active]
        m = build_map(active[1], inventory, self.w.store.flow_rows(), MapFilter(app, env, decision, min_flows))
        try:
            text = render(m, fmt)
        except ValueError as exc:
            return error(400, "bad map format", str(exc))
        kind = {"html": "text/html", "svg": "image/svg+xml"}.get(fmt, "text/vnd.graphviz")
        return (f"{kind}; charset=utf-8", text)

    def suggest(self, app: str, env: str | None = None, min_flows: int = 0, include_allowed: bool = False) -> Response:
        """Rule suggestions (``ringfence suggest``'s code) from the store's flow rows under the
        active policy."""
        from ringfence.flows.suggest import SuggestError, agent_groups, suggest

        try:
            active = self.w.active_policy()
        except PolicyTampered as exc:
            return error(409, "active policy unverifiable", f"{exc}: provision a good version")
        if active is None:
            return error(409, "no active policy", "provision a policy version first")
        agents = agent_groups(active[1], self.w.store.all_records())  # one end's word about these is not taken
        try:
            sug = suggest(active[1], self.w.store.flow_rows(), app, env, min_flows, include_allowed, agents)
        except SuggestError as exc:
            return error(422, "no suggestion", f"{exc}; narrow it with min_flows or env")
        return Response(200, sug.doc())
