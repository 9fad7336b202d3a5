"""The agent API service (docs/agent-api.md): nonce, enroll, own bundle, deltas, heartbeat, reports."""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import itertools
import json
import math
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

from ringfence import agentapi, enforced
from ringfence.bundlewire import BundleError, SetDelta, load_bundle, load_delta
from ringfence.store.base import (
    ACTIVE_STATES,
    BundlePointer,
    DeltaPointer,
    EnforcementReport,
    Grant,
    InventoryRecord,
    NotTheNamedKey,
    agent_key_fingerprint_of,
    agent_key_id_of,
)

from . import artifact, credentials
from .api import Response, error, secret_hash
from .enroll import ProofError
from .findings import tamper_progress
from .launchgate import report_enforcing
from .publish import PUBLIC_KEYS_KEY
from .wiring import COMPUTE_NOT_QUEUED, COMPUTE_OWED_NOT_MARKED, BaseWiring, log

DOCUMENTS_KEPT = 256  # signed bundle and delta documents an agent API process keeps in memory
HISTORY_LOOKUPS = 8  # addresses of a report batch looked up in the address history, at most
WAITS_PER_WORKLOAD = 2  # long-polls of one workload a process answers at once (a reconnect overlaps one)
# a bundle marked pending this long (s) and still not pointed at is a job lost on the way (its
# message in the publish DLQ): its agent gets no set deltas past the mark until it lands, so a
# heartbeat asks compute to render it again (an active workload's only: compute renders no
# other). Publication takes seconds; one failed receive (the publish queue's visibility timeout)
# is 12 minutes.
PENDING_STALE_S = 900.0

# an enrollment method given to this API alone (beside the wiring's, ringfence.control.enroll): checks
# the request's proof, calls bind(req, workload_id) to bind the agent key (required, first binding
# wins) and returns the workload id (ProofError: refused)
BindingEnroller = Callable[[agentapi.EnrollRequest, Callable[[agentapi.EnrollRequest, str], None]], str]


# the grant :meth:`AgentApi.authorize` read for the request being answered (a request is answered
# in one context: a Lambda invocation, one of serve's worker calls): the record and the bundle
# pointer it read with the token are what the request's own handler would read next
_GRANT: ContextVar[Grant | None] = ContextVar("ringfence_agent_grant", default=None)


# how far (s) a renewal-by-token proof's time may be from this clock (the agents' clock skew)
REFRESH_WINDOW = 300
# the share of a token's lifetime that must have gone by before it renews by token: each renewal
# issues a fresh token (so the once-per-token claim never stops the next one) and writes a token,
# a claim and an audit record, and that renewal is left out of the per-address limits (the WAF
# rule, serve's). The agent renews at 4/5 of the lifetime, so it is never refused for this.
RENEW_AFTER_SHARE = 0.5

FLOW_SYNC_MAX_AGE = 30.0  # seconds between full passes over address owners while compute is quiet


class AgentApi:
    def __init__(self, w: BaseWiring, enrollers: Mapping[str, BindingEnroller] | None = None) -> None:
        self.w = w
        self.enrollers = dict(enrollers or {})
        self._documents: OrderedDict[str, bytes] = OrderedDict()  # key → stored bytes, least recent first
        self._documents_lock = threading.Lock()  # serve answers from a thread pool
        self._public_keys: str | None = None
        self._expected: OrderedDict[tuple[str, int], str] = OrderedDict()  # (bundle key, version) → digest
        self._reported: set[str] = set()  # instances whose agent's enforcing is recorded (lifecycle gate "agent")
        self._open_waits: dict[str, int] = {}  # workload → its long-polls being answered in this process
        self._open_waits_lock = threading.Lock()
        # set name → head version, as read under one change mark, and the names read (a set
        # without a head is absent from the heads): see _set_heads
        self._heads: tuple[int, dict[str, int], set[str]] | None = None
        self._heads_lock = threading.Lock()
        # the last full pass over the inventory's address owners for inline flows: ((engine head
        # revision, inventory generation), when); see _ingest_flows
        self._flows_synced: tuple[tuple[int, int | None], float] | None = None
        # a report is making that pass now: the others take the fast path meanwhile, else each
        # report arriving during a pass would start one of its own (under _flows_lock)
        self._flows_passing = False
        self._flows_lock = threading.Lock()

    def nonce(self) -> Response:
        n = secrets.token_urlsafe(24)
        self.w.store.put_nonce(n, self.w.cfg.nonce_ttl)
        return Response(200, agentapi.NonceResponse(nonce=n, expires_in=self.w.cfg.nonce_ttl).model_dump())

    def enroll(self, req: agentapi.EnrollRequest) -> Response:
        if req.method not in self.w.cfg.enroll_methods:
            return error(400, "unsupported enrollment method", f"{req.method} is not enabled on this control plane")
        enroller = self.w.enrollers.get(req.method)
        given = self.enrollers.get(req.method)
        if enroller is None and given is None:  # configured, but no such proof here (another cloud's method)
            return error(400, "unsupported enrollment method", f"{req.method} is not enabled on this control plane")
        try:
            if enroller is not None:
                wid = enroller(self, req)
            else:
                assert given is not None
                wid = given(req, self.bind_key)
        except ProofError as exc:
            log.warning("enrollment refused: %s", exc)
            return error(401, "enrollment refused", str(exc))
        key_id = self._key_id(req.agent_key)
        fingerprint = credentials.agent_key_fingerprint(req.agent_key) if req.agent_key else ""
        token = self._issue(wid, "agent.enroll", fingerprint, method=req.method, agent_key=key_id)
        if token is None:
            return error(401, "enrollment refused", f"the agent key of {wid} was reset meanwhile: enroll again")
        rec = self.w.store.get(wid)
        if rec is not None:
            with contextlib.suppress(KeyError):
                self.w.store.set_liveness(wid, enrolled=True, heartbeat=time.time(), offline=False)
            if rec.offline:
                # its next heartbeat finds it online already: it rejoins its peers' sets here
                self._rejoin(wid)
        return Response(
            200,
            agentapi.EnrollResponse(
                workload_id=wid,
                token=token,
                expires_in=self.w.cfg.token_ttl,
                public_key_pem=self.signing_public_keys(),
            ).model_dump(),
        )

    def _rejoin(self, workload_id: str) -> None:
        """``workload_id``'s agent is back (a heartbeat or an enrollment of a workload stored
        offline, now stored online): compute puts it back into its peers' sets. The agent API is
        internet-facing and has no grant to mark it owed to compute (:func:`~ringfence.control.
        wiring.owe_compute`): a refused hand-off stores it offline again instead, so its next
        heartbeat hands it on again (peers keep denying it meanwhile, the safe side). Never
        raised: the agent's request succeeded either way."""
        log.info("agent %s is back online: rejoining peers' sets", workload_id)
        try:
            self.w.enqueue_compute([workload_id])
            return
        except Exception:
            log.exception("agent %s is back online but compute could not be queued: stored offline again", workload_id)
            self.w.metric(COMPUTE_NOT_QUEUED, 1)
        try:
            self.w.store.set_liveness(workload_id, offline=True)
        except KeyError:
            pass  # gone meanwhile: compute takes it out for that
        except Exception:
            # online and handed to no one: its peers deny it until it changes or a rebuild
            log.exception("agent %s is back online, not handed to compute nor stored offline again", workload_id)
            self.w.metric(COMPUTE_OWED_NOT_MARKED, 1)

    def signing_public_keys(self) -> str:
        """The bundle signing public key(s) compute published (PEM; :data:`PUBLIC_KEYS_KEY`): this
        function never holds the private key, so it reads what compute wrote."""
        if self._public_keys is None:
            try:
                self._public_keys = self.w.publisher.get(PUBLIC_KEYS_KEY).decode()
            except Exception:  # not published yet (no computation so far): nothing to offer
                return ""
        return self._public_keys

    @staticmethod
    def _key_id(pem: str | None) -> str | None:
        return credentials.agent_key_id(pem) if pem else None

    def _issue(self, wid: str, action: str, key: str, **detail: object) -> str | None:
        """A fresh access token for ``wid``, issued under the agent key of fingerprint ``key`` (``""``: none):
        the workload's one active token (the store revokes the previous one; a nudge connection
        opened with it is dropped). Audited. None if that key is no longer the bound one once the
        token is written: an operator's reset raced this request (the token would authorize
        nothing, :func:`~ringfence.store.base.token_key_holds`)."""
        token = secrets.token_urlsafe(32)
        self.w.store.put_token(secret_hash(token), wid, self.w.cfg.token_ttl, agent_key=key)
        self.w.store.drop_connection(wid)
        if self.w.store.token_workload(secret_hash(token)) != wid:
            log.warning("token for %s not issued: its agent key %s was reset meanwhile", wid, key[:16] or "(none)")
            return None
        credentials.audit(self.w, action, wid, f"agent:{wid}", expires_in=self.w.cfg.token_ttl, **detail)
        return token

    def bind_key(self, req: agentapi.EnrollRequest, wid: str) -> None:
        """Check the agent's signature over the nonce with the key it presents (required) and bind
        that key to ``wid``. The first binding wins: another key is refused (and audited)."""
        self.check_key(req, wid)
        assert req.agent_key is not None  # check_key refuses a request without one
        try:
            bound = self.w.store.bind_agent_key(wid, req.agent_key)
        except NotTheNamedKey as exc:  # a reset naming another key landed since check_key
            raise self.not_named(req, wid, str(exc)) from None
        # the whole fingerprint: a key whose 64-bit id matches the bound one's could be searched for
        if agent_key_fingerprint_of(bound) != credentials.agent_key_fingerprint(req.agent_key):
            raise self._refused(
                req,
                wid,
                f"{wid} is enrolled with another agent key: a second claim of its identity is refused "
                "(the bound agent renews with its key; an operator resets a lost one)",
                reason="identity already claimed by another agent key",
                bound_key=agent_key_id_of(bound) or "(not one Ed25519 key)",
            )

    def check_key(self, req: agentapi.EnrollRequest, wid: str) -> None:
        """The agent's signature over the nonce verifies with the key it presents, and that key is
        the one an operator's reset named, if it named one (:class:`ProofError`, audited, if not).
        Binds nothing. Every method needs the key, pairing too: a token issued without one would be
        bound to no key, so that no reset could end it."""
        if req.agent_key is None:
            raise ProofError(f"{req.method} needs agent_key and agent_signature (the agent's own key)")
        credentials.verify_proof(req.agent_key, req.agent_signature, "enroll", wid, req.nonce)
        expected = self.w.store.expected_agent_key(wid)
        if expected is not None and credentials.agent_key_fingerprint(req.agent_key) != expected:
            raise self.not_named(req, wid, expected)

    def not_named(self, req: agentapi.EnrollRequest, wid: str, expected: str) -> ProofError:
        """The refusal (audited) of a key an operator's reset did not name: a replayed identity
        document (or a leaked pairing key) presented with another key binds nothing. The store
        checks this again where it binds (NotTheNamedKey), against a reset landing meanwhile."""
        return self._refused(
            req,
            wid,
            f"{wid}'s agent key was reset for another key: this key is not the one named",
            reason="not the agent key the operator's reset named",
            expected_key=expected,
        )

    def _refused(self, req: agentapi.EnrollRequest, wid: str, message: str, **detail: object) -> ProofError:
        """An enrollment refused for the key it presents: audited under that key's id."""
        assert req.agent_key is not None
        offered = credentials.agent_key_id(req.agent_key)
        credentials.audit(self.w, "agent.enroll.refused", wid, f"agent-key:{offered}", method=req.method, **detail)
        return ProofError(message)

    def refresh(self, workload_id: str, req: agentapi.TokenRequest, authorization: str | None = None) -> Response:
        """A new access token for an enrolled agent: a signature by its bound key over a fresh
        nonce, or (``req.time``) over its current token and the time, that token being the
        bearer (:meth:`_refresh_by_token`). The previous token is revoked. Refused for a
        workload that is not running.

        A request carrying an ``Authorization`` header (``authorization`` not None, even empty)
        is a renewal by token or nothing: the agent API's web ACL leaves such requests out of its
        per-address rate rule, so one that could still burn a nonce would be a way around it;
        it is refused before any write, after one read at most."""
        if authorization is not None:
            if req.nonce is not None:
                return error(401, "token refused", "a renewal over a nonce carries no Authorization header")
            return self._refresh_by_token(workload_id, req, authorization)
        if req.nonce is None:
            return error(401, "token refused", "a renewal without a nonce needs the current token as the bearer")
        if not self.w.store.burn_nonce(req.nonce):
            return error(401, "token refused", "nonce is unknown, expired or already used")
        pem = self.w.store.agent_key(workload_id)
        if pem is None:
            return error(401, "token refused", f"no agent key is bound to {workload_id}: enroll")
        try:
            credentials.verify_proof(pem, req.signature, "token", workload_id, req.nonce)
        except ProofError as exc:
            log.warning("token refresh for %s refused: %s", workload_id, exc)
            return error(401, "token refused", str(exc))
        gone = self._not_running(workload_id)
        if gone:
            return error(401, "token refused", gone)
        return self._renewed(workload_id, pem)

    def _refresh_by_token(self, workload_id: str, req: agentapi.TokenRequest, authorization: str | None) -> Response:
        """The renewal that needs no server nonce, so that a flood of anonymous GET /v1/nonce
        cannot let working agents' tokens lapse: the bearer is the workload's current token
        (unexpired, not revoked), the bound agent key signed
        :func:`~ringfence.agentwire.token_proof_message` over it and ``req.time``, that time is
        within :data:`REFRESH_WINDOW` of this clock, the token is at least
        :data:`RENEW_AFTER_SHARE` of its lifetime old (else ``429`` with ``Retry-After``, before
        any write), and the proof is claimed once (a claim per token: one such renewal of a token,
        however often it is replayed or raced). An expired or revoked token renews over a nonce
        only."""
        if not authorization or not authorization.startswith("Bearer "):
            return error(401, "token refused", "a renewal without a nonce needs the current token as the bearer")
        current = authorization.removeprefix("Bearer ").strip()
        held = secret_hash(current)
        if self.w.store.token_workload(held) != workload_id:
            return error(401, "token refused", f"not the current token of {workload_id}: renew over a nonce")
        assert req.time is not None  # TokenRequest: a nonce or a time
        if abs(time.time() - req.time) > REFRESH_WINDOW:
            return error(401, "token refused", f"the proof's time is more than {REFRESH_WINDOW} s off this clock")
        pem = self.w.store.agent_key(workload_id)
        if pem is None:
            return error(401, "token refused", f"no agent key is bound to {workload_id}: enroll")
        try:
            credentials.verify_token_proof(pem, req.signature, workload_id, current, req.time)
        except ProofError as exc:
            log.warning("token renewal of %s refused: %s", workload_id, exc)
            return error(401, "token refused", str(exc))
        early = self._too_early(workload_id, held)
        if early is not None:
            return early
        # kept past the window on both sides of any time the proof can carry: once the claim is
        # gone, no proof over this token is within the window any more
        if not self.w.store.claim_once(f"refresh:{held}", 2 * REFRESH_WINDOW + 60):
            log.warning("token renewal of %s refused: that token's renewal proof was used already", workload_id)
            return error(401, "token refused", "this token was renewed without a nonce already: renew over a nonce")
        gone = self._not_running(workload_id)
        if gone:
            return error(401, "token refused", gone)
        return self._renewed(workload_id, pem, proof="token")

    def _too_early(self, workload_id: str, held: str) -> Response | None:
        """``429`` with ``Retry-After`` (the seconds until it may) for a token less than
        :data:`RENEW_AFTER_SHARE` of its lifetime old, else None. One read. The age is the
        lifetime configured now less the time the token has left: a lifetime lowered since the
        token was issued makes it look younger (its agent renews over a nonce then)."""
        expires = self.w.store.token_expires(held)
        if expires is None:  # expired since it was read as current
            return error(401, "token refused", f"not the current token of {workload_id}: renew over a nonce")
        ttl = self.w.cfg.token_ttl
        wait = math.ceil(expires - time.time() - ttl * (1 - RENEW_AFTER_SHARE))
        if wait <= 0:
            return None
        log.warning(
            "token renewal of %s refused: its token is not %g of its lifetime old", workload_id, RENEW_AFTER_SHARE
        )
        refused = error(
            429,
            "too early",
            f"a token renews by token once {RENEW_AFTER_SHARE:g} of its lifetime ({ttl} s) has gone by: "
            f"retry after {wait} s and call with the token held meanwhile",
        )
        refused.headers["Retry-After"] = str(wait)
        return refused

    def _renewed(self, workload_id: str, pem: str, **detail: object) -> Response:
        key_id = credentials.agent_key_id(pem)
        token = self._issue(
            workload_id, "token.refresh", credentials.agent_key_fingerprint(pem), agent_key=key_id, **detail
        )
        if token is None:
            return error(401, "token refused", f"the agent key of {workload_id} was reset: enroll again")
        return Response(
            200,
            agentapi.TokenResponse(workload_id=workload_id, token=token, expires_in=self.w.cfg.token_ttl).model_dump(),
        )

    def _not_running(self, workload_id: str) -> str | None:
        """Why ``workload_id`` may hold no token (unknown, stopped, terminated), or None."""
        return _not_running(workload_id, self.w.store.get(workload_id))

    def authorize(self, authorization: str | None, workload_id: str, heartbeat: bool = False) -> Response | None:
        """``heartbeat``: the workload's last enforcement report read with the grant (what the
        heartbeat compares the tamper counter with), in the same round trip."""
        if not authorization or not authorization.startswith("Bearer "):
            return error(401, "missing bearer token")
        _GRANT.set(None)
        grant = self.w.store.token_grant(
            secret_hash(authorization.removeprefix("Bearer ").strip()), workload_id, with_enforcement=heartbeat
        )
        owner, rec = grant.workload_id, grant.record
        if owner is None:
            return error(401, "unknown, expired or revoked token")
        if owner != workload_id:
            log.warning("agent %s asked for workload %s: refused", owner, workload_id)
            return error(403, "forbidden", "an agent reads only its own bundle")
        gone = _not_running(owner, rec)
        if gone:
            return error(401, "token revoked", gone)
        _GRANT.set(grant)
        return None

    @staticmethod
    def _granted(workload_id: str) -> Grant | None:
        """The grant this request was authorized with, once (a later read goes to the store)."""
        grant = _GRANT.get()
        _GRANT.set(None)
        return grant if grant is not None and grant.workload_id == workload_id else None

    def _pointer(self, workload_id: str) -> BundlePointer | None:
        grant = self._granted(workload_id)
        return grant.pointer if grant is not None else self.w.store.bundle_pointer(workload_id)

    def _latest(self, ptr: BundlePointer, fresh: bool = False) -> tuple[int, dict[str, int]]:
        """The workload's newest version and set versions: the stored bundle's, moved on by set
        heads (``fresh``: read now, not kept ones — an agent asks for deltas when it knows of a
        change, e.g. a WebSocket nudge that can arrive before the watch sees the publication)."""
        heads = self.w.store.set_heads(list(ptr.sets)) if fresh else self._set_heads(list(ptr.sets))
        # a bundle of this workload is on its way (compute marked its version before moving any
        # set head): a set head at or past that version is not served over this older bundle.
        # The agent would take the deltas, move past the new bundle's version with its old rules,
        # and refuse the new bundle (a replay or a rollback) for good; the long-poll waits for
        # the bundle instead, which carries those sets, and the deltas since it follow.
        cap = ptr.in_flight
        sets: dict[str, int] = {}
        for n, v in ptr.sets.items():
            h = heads.get(n, v)
            if cap is not None and h >= cap:
                # as far as the set's chain goes below the mark: an agent may hold those deltas
                # already (taken before the set moved on), and is not told of a newest version
                # below the one it holds
                h = self._chain_below(n, v, cap)
            sets[n] = max(v, h)
        return max([ptr.version, ptr.rules_revision, *sets.values()]), sets

    def _chain_below(self, set_name: str, from_version: int, cap: int) -> int:
        """The newest version the set's delta chain reaches from ``from_version`` without
        reaching ``cap`` (``from_version`` when none)."""
        cur = from_version
        for d in self.w.store.deltas_after(set_name, from_version):
            if d.to_version >= cap:
                break
            if d.from_version == cur:
                cur = d.to_version
        return cur

    def _set_heads(self, names: list[str]) -> dict[str, int]:
        """The sets' head versions, kept while the change watch sees no change (its mark). Every
        publication moves the engine head, which moves the mark at the watch's next look, so a
        kept head is at most one watch interval behind the store. Why: with a fleet waiting,
        every wait and heartbeat read the heads of the sets its bundle holds — the same few
        sets for all of them — about 300 reads in a 50-instance scale-out."""
        mark = self.w.change_mark()
        if mark is not None:
            with self._heads_lock:
                if self._heads is not None and self._heads[0] == mark and self._heads[2].issuperset(names):
                    kept = self._heads[1]
                    return {n: kept[n] for n in names if n in kept}
        heads = self.w.store.set_heads(names)
        if mark is not None:
            with self._heads_lock:
                if self._heads is None or self._heads[0] != mark:
                    self._heads = (mark, {}, set())
                self._heads[1].update(heads)
                self._heads[2].update(names)
        return heads

    def _chain(self, set_name: str, from_version: int, to_version: int) -> list[DeltaPointer] | None:
        chain = [d for d in self.w.store.deltas_after(set_name, from_version) if d.to_version <= to_version]
        if not chain or chain[-1].to_version != to_version or chain[0].from_version > from_version:
            return None
        if any(a.to_version != b.from_version for a, b in itertools.pairwise(chain)):
            return None
        return chain

    def current(self, workload_id: str) -> tuple[BundlePointer, bytes] | Response:
        """The workload's last full bundle, byte for byte as compute signed and stored it. This
        function holds no signing key and never re-signs: set changes since that bundle reach the
        agent as the signed deltas compute published (:meth:`deltas`)."""
        ptr = self._pointer(workload_id)
        if ptr is None:
            return error(404, "no bundle published for this workload yet")
        return ptr, self._document(ptr.key)

    def _document(self, key: str) -> bytes:
        """A stored bundle or delta document. Their keys name a hash of their bytes and are never
        rewritten (a re-signed bundle is a new key), so the bytes are kept: the agents a change
        reaches fetch the same delta one after another, and only the first costs a read."""
        with self._documents_lock:
            body = self._documents.get(key)
            if body is not None:
                self._documents.move_to_end(key)
                return body
        body = self.w.publisher.get(key)
        with self._documents_lock:
            self._documents[key] = body
            while len(self._documents) > DOCUMENTS_KEPT:
                self._documents.popitem(last=False)
        return body

    def artifact(self, name: str) -> Response:
        """A file of the agent artifact as ``ringfence publish-agent`` stored it: only the names
        :func:`artifact.content_type` knows (no other key of the bucket is reachable), 404 else."""
        kind = artifact.content_type(name)
        if kind is None:
            return error(
                404,
                "no such agent artifact",
                "expected ringfence_agent-<version>-py3-none-any.whl[.sha256] or install-<16 hex>.sh",
            )
        try:
            body = self.w.publisher.get(artifact.key(name))
        except Exception as exc:  # S3's NoSuchKey, a missing file: not published (yet)
            log.info("agent artifact %s not served: %s", name, exc)
            return error(404, "no such agent artifact", "not published: run ringfence publish-agent")
        return Response(200, body, {"Content-Type": kind})

    def bundle(self, workload_id: str, if_none_match: str | None) -> Response:
        cur = self.current(workload_id)
        if isinstance(cur, Response):
            return cur
        ptr, body = cur
        if if_none_match and if_none_match.strip() == ptr.etag:
            return Response(304, None, {"ETag": ptr.etag})
        return Response(200, body, {"ETag": ptr.etag})

    def deltas(self, workload_id: str, since: int) -> Response:
        """The signed set deltas from revision ``since`` to the newest, each document byte for byte
        as compute stored it; 409 when they cannot bridge (the agent fetches the whole bundle)."""
        ptr = self._pointer(workload_id)
        if ptr is None:
            return error(404, "no bundle published for this workload yet")
        return self._deltas(workload_id, ptr, since, repair=True)

    def _deltas(self, workload_id: str, ptr: BundlePointer, since: int, *, repair: bool) -> Response:
        version, sets = self._latest(ptr, fresh=repair)  # the deltas route reads fresh; a wait's answer, as it saw
        if since >= version:
            return Response(200, b'{"bundle_version": %d, "deltas": []}' % version)
        if ptr.rules_revision > since:
            return error(409, "deltas cannot bridge", "rules changed since that revision: fetch the bundle")
        chosen: list[DeltaPointer] = []
        for name, v in sets.items():
            if v <= since:
                continue
            chain = self._chain(name, since, v)
            if chain is None:
                base = ptr.sets.get(name, v)
                if repair and base < v and self._chain(name, base, v) is None:
                    # a gap the stored bundle cannot bridge either: compute renders a whole one
                    log.warning("deltas of %s for %s do not bridge %s→%s: re-rendering", name, workload_id, since, v)
                    self.w.enqueue_compute(publish=[workload_id])
                return error(409, "deltas cannot bridge", f"set {name}: fetch the bundle")
            chosen.extend(chain)
        chosen.sort(key=lambda d: (d.to_version, d.set))
        # the stored documents themselves, not re-serialized: what compute signed is what is served
        docs = b",".join(self._document(d.key).strip() for d in chosen)
        return Response(200, b'{"bundle_version": %d, "deltas": [%s]}' % (version, docs))

    def heartbeat(self, workload_id: str, hb: agentapi.Heartbeat) -> Response:
        grant = self._granted(workload_id)
        rec = grant.record if grant is not None else self.w.store.get(workload_id)
        if rec is None:
            return error(404, "unknown workload")
        now = time.time()
        if rec.offline or rec.last_heartbeat is None or now - rec.last_heartbeat >= self._liveness_resolution():
            self.w.store.set_liveness(workload_id, heartbeat=now, offline=False if rec.offline else None)
        if rec.offline:
            self._rejoin(workload_id)
        ptr = grant.pointer if grant is not None else self.w.store.bundle_pointer(workload_id)
        if rec.state not in ACTIVE_STATES:
            # compute renders active workloads only: one terminating (its agent still up) would
            # get no render and no fresh mark, and every heartbeat would ask compute again
            in_flight, pending_at = None, None
        elif ptr is not None:
            in_flight, pending_at = ptr.in_flight, ptr.pending_at
        else:
            # no bundle pointed at yet: its first one on its way, or that job lost or refused
            # by the publish workers (nothing else renders it again until the workload changes)
            in_flight, pending_at = self.w.store.bundle_pending(workload_id) or (None, None)
        if in_flight is not None and now - (pending_at or now) > PENDING_STALE_S:
            # compute re-marks it as it hands the new render on: asked again only once that one
            # is as old
            log.warning("bundle %s of %s marked pending long ago, not published: re-rendering", in_flight, workload_id)
            self.w.enqueue_compute(publish=[workload_id])
        latest = self._latest(ptr)[0] if ptr is not None else None
        claimed = hb.applied_version
        if claimed is not None and ptr is not None and latest is not None and claimed > latest:
            latest = self._latest(ptr, fresh=True)[0]  # set heads kept a moment too long: read them now
        if claimed is not None and (latest is None or claimed > latest):
            # a version never published for this workload: enforcing nothing we know of (a finding)
            log.warning("agent %s claims version %s; the newest published is %s", workload_id, claimed, latest)
            if latest is not None and claimed < self.w.store.head().rebuilt_from:
                # below the revision the engine was rebuilt from (a rebuild over a restored store
                # numbers from the clock, above every version issued before the restore), so
                # issued before the store was restored from a backup: the agent refuses anything
                # lower as a rollback and keeps what the restore undid, so the workload gets a
                # whole bundle above it, of the restored state. Not below the head: each re-issue
                # moves the head, and colluding agents' false claims would re-issue one another's
                # bundles forever; the re-issued bundle is above the rebuild start, so once per
                # workload per rebuild
                self.w.enqueue_compute(reissue={workload_id: claimed})
        elif (
            self.w.cfg.lifecycle_gate == "agent" and claimed is not None and ptr is not None and claimed >= ptr.version
        ):
            self._report_enforcing(rec, claimed)  # its stored bundle, or deltas past it: what the launch waits for
        before = grant.enforcement if grant is not None and grant.enforcement_read else None
        if grant is None or not grant.enforcement_read:
            before = self.w.store.enforcement(workload_id)
        self._record_enforcement(workload_id, hb, ptr, latest, before)
        return Response(200, agentapi.HeartbeatResponse(latest_version=latest).model_dump())

    def _liveness_resolution(self) -> float:
        """How stale the inventory's ``last_heartbeat`` may grow before a heartbeat rewrites it: a
        tenth of the offline bound, at most a minute. Enough for reconcile's offline check, and it
        spares a write on most heartbeats (the first after an enrollment above all, which the
        enrollment has just recorded). What each heartbeat says is written whatever this is: the
        enforcement report, whose time the findings read."""
        return min(60.0, self.w.cfg.offline_after / 10)

    def _record_enforcement(
        self,
        workload_id: str,
        hb: agentapi.Heartbeat,
        ptr: BundlePointer | None,
        latest: int | None,
        before: EnforcementReport | None,
    ) -> None:
        """What the agent says it enforces, kept for the findings (ringfence.control.findings):
        with the published digest when it claims the newest version and read its kernel back.
        ``before``: the previous report (read with the token's grant): where the tamper counter's
        last value, its last rise and the clock of an agent behind carry over from."""
        now = time.time()
        # not at the newest version: behind it, or claiming one never published (the same clock)
        behind = latest is not None and hb.applied_version != latest
        expected = None
        if hb.kernel_digest is not None and ptr is not None and latest is not None and hb.applied_version == latest:
            try:
                expected = self._expected_digest(ptr, latest)
            except (BundleError, ValueError, KeyError) as exc:  # a stored document unreadable: no verdict
                log.warning("expected digest of %s at %s not computed: %s", workload_id, latest, exc)
        tamper = tamper_progress(before, hb.counters, now)
        if tamper["tampered_at"] == now:
            log.warning("agent %s re-applied its rules or sets after another tool changed them", workload_id)
        self.w.store.put_enforcement(
            EnforcementReport(
                workload_id=workload_id,
                time=now,
                version=hb.applied_version,
                kernel_digest=hb.kernel_digest,
                expected_digest=expected,
                latest_version=latest,
                behind_since=(before.behind_since if before and before.behind_since else now) if behind else None,
                **tamper,
                agent_version=hb.agent_version,
            )
        )

    def _expected_digest(self, ptr: BundlePointer, latest: int) -> str | None:
        """The enforced-policy digest of the stored bundle moved on by its deltas to ``latest``;
        None when the deltas do not bridge (the agent fetches the whole bundle then anyway)."""
        cache_key = (ptr.key, latest)
        with self._documents_lock:
            known = self._expected.get(cache_key)
        if known is not None:
            return known
        doc = load_bundle(self._document(ptr.key))
        _, sets = self._latest(ptr)
        deltas: list[SetDelta] = []
        for name, v in sets.items():
            base = ptr.sets.get(name, v)
            if v <= base:
                continue
            chain = self._chain(name, base, v)
            if chain is None:
                return None
            deltas.extend(load_delta(self._document(d.key)) for d in chain)
        deltas.sort(key=lambda d: (d.to_version, d.set))
        digest = enforced.expected(doc, deltas)
        with self._documents_lock:
            self._expected[cache_key] = digest
            while len(self._expected) > DOCUMENTS_KEPT:
                self._expected.popitem(last=False)
        return digest

    def _report_enforcing(self, rec: InventoryRecord, version: int) -> None:
        """The agent enforces a bundle: recorded for a launch its Auto Scaling group may hold
        (lifecycle gate "agent"). Compute completes the action once the perimeter is in place too;
        this function has no Auto Scaling rights. Once per instance per warm container (the
        first report is the fact; later heartbeats add nothing)."""
        if rec.id in self._reported or rec.workload.cloud != "aws":
            return
        report_enforcing(self.w, rec.id, version)
        self._reported.add(rec.id)

    def latest_version(self, workload_id: str) -> int | None:
        """The newest version of the workload's bundle (its stored bundle moved on by set deltas)."""
        ptr = self.w.store.bundle_pointer(workload_id)
        return self._latest(ptr)[0] if ptr is not None else None

    def wait(
        self,
        workload_id: str,
        version: int,
        timeout: float,
        with_deltas: bool = False,
        with_bundle: bool = False,
        *,
        authorization: str | None,
    ) -> Response:
        """Long-poll: answers as soon as the workload's latest version is newer than ``version``,
        or when ``timeout`` (capped at the wiring's ``max_wait``) has passed, with that version.
        The answer may carry what the agent would fetch next, so that a change costs it one
        request: ``with_deltas``, the deltas since ``version`` when they bridge; else
        ``with_bundle``, the stored bundle when it is newer than ``version`` (as a string, byte
        for byte), with its ETag and the deltas since it when there are any.
        ``authorization``: the request's header, as :meth:`authorize` took it when the wait
        opened; every wake-up authorizes it again (a token revoked meanwhile is answered 401)."""
        with self._open_waits_lock:
            # a workload's waits, whatever token each came with (an agent renewing its token
            # again and again keeps no more open): the others' threads are not its to hold
            open_now = self._open_waits.get(workload_id, 0)
            if open_now >= WAITS_PER_WORKLOAD:
                refused = error(429, "too many waits", f"{workload_id} has {open_now} long-polls open: wait for one")
                refused.headers["Retry-After"] = "5"
                return refused
            self._open_waits[workload_id] = open_now + 1
        try:
            return self._wait(workload_id, version, timeout, with_deltas, with_bundle, authorization)
        finally:
            with self._open_waits_lock:
                left = self._open_waits[workload_id] - 1
                if left:
                    self._open_waits[workload_id] = left
                else:
                    del self._open_waits[workload_id]

    def _wait(
        self,
        workload_id: str,
        version: int,
        timeout: float,
        with_deltas: bool,
        with_bundle: bool,
        authorization: str | None,
    ) -> Response:
        deadline = time.monotonic() + max(0.0, min(timeout, self.w.cfg.max_wait))
        ptr = self._pointer(workload_id)  # the grant's: authorize read it when the wait opened
        while True:
            latest = self._latest(ptr)[0] if ptr is not None else None
            left = deadline - time.monotonic()
            if ptr is not None and latest is not None and latest > version:
                update = self._update(workload_id, ptr, version, latest, with_deltas, with_bundle)
                if update is not None:
                    return Response(200, b'{"latest_version": %d, %s}' % (latest, update))
            if (latest is not None and latest > version) or left <= 0:
                return Response(200, agentapi.WaitResponse(latest_version=latest).model_dump(exclude_unset=True))
            self.w.wait_for_change(left, workload_id)
            # the token may have been revoked, or the workload deregistered (and its id given to
            # another host), while this wait slept: authorized again, by the read that brings the
            # pointer anyway (AWS: one BatchGetItem instead of the pointer's GetItem), before any
            # answer — the timeout's too, which costs nothing more
            denied = self.authorize(authorization, workload_id)
            if denied:
                return denied
            ptr = self._pointer(workload_id)

    def _update(
        self, workload_id: str, ptr: BundlePointer, version: int, latest: int, with_deltas: bool, with_bundle: bool
    ) -> bytes | None:
        """The fields a wait's answer carries beside the version (JSON members), or None."""
        if with_deltas and version >= 0:
            found = self._deltas(workload_id, ptr, version, repair=False)
            if found.status == 200 and isinstance(found.body, bytes):
                return b'"deltas": %s' % found.body
        if not with_bundle or ptr.version <= version:
            return None  # the agent holds that bundle or a newer one: deltas or nothing
        out = b'"etag": %s, "bundle": %s' % (
            json.dumps(ptr.etag).encode(),
            json.dumps(self._document(ptr.key).decode()).encode(),
        )
        if with_deltas and latest > ptr.version:  # set deltas since that bundle
            after = self._deltas(workload_id, ptr, ptr.version, repair=False)
            if after.status == 200 and isinstance(after.body, bytes):
                out += b', "deltas": %s' % after.body
        return out

    def reports(self, workload_id: str, batch: agentapi.ReportBatch) -> Response:
        grant = self._granted(workload_id)
        doc = batch.model_dump(mode="json")
        # what one workload's token may write: serve's in-memory bucket, on AWS a count per window
        # in the state table (ringfence.clouds.aws.reportquota)
        quota = getattr(self.w, "report_quota", None)
        size = len(json.dumps(doc))
        if quota is not None:
            retry = quota.take(workload_id, size)
            if retry is not None:
                self.w.metric("ReportsOverQuota", 1)
                r = error(429, "report quota exceeded", f"{workload_id} sent more report bytes than its quota")
                r.headers["Retry-After"] = str(retry)
                return r
        try:
            kept, archived = self._archive(workload_id, grant, batch)
        except BaseException:
            # answered 5xx with nothing archived (a failed store, objects/ unwritable: the agent
            # sends it again), so the batch costs the sender nothing
            if quota is not None:
                quota.give_back(workload_id, size)
            raise
        if archived is not None:
            if self.w.flows_inline:
                self._ingest_flows(workload_id, archived)
            if self.w.siem is not None and kept.drops:
                # never raises: the batch is archived already
                held_back = self.w.siem.drops(workload_id, kept.drops)
                if held_back:  # past the SIEM drop budget: summarized, not sent one by one
                    self.w.metric("SiemDropEventsSuppressed", held_back)
        return Response(202, {"accepted": len(kept.flows) + len(kept.drops)})

    def _archive(
        self, workload_id: str, grant: Grant | None, batch: agentapi.ReportBatch
    ) -> tuple[agentapi.ReportBatch, dict[str, Any] | None]:
        """The records kept of ``batch`` and, when any was, the document archived under
        ``reports/`` (None: nothing to archive)."""
        # a host's agent sees its own traffic: records whose own end (by direction) is not its
        # address are not kept
        rec = grant.record if grant is not None else self.w.store.get(workload_id)
        batch = self._recent(workload_id, rec, batch)  # records dated too far back: logged, not kept
        kept = self._own_records(workload_id, rec, batch)
        foreign = len(batch.flows) + len(batch.drops) - len(kept.flows) - len(kept.drops)
        if foreign:
            log.warning(
                "%d report records of %s do not name its address at the end their direction gives: not kept",
                foreign,
                workload_id,
            )
        if kept.flows or kept.drops or kept.dropped_records:
            key = f"reports/{workload_id}/{time.strftime('%Y/%m/%d', time.gmtime())}/{uuid.uuid4().hex}.json"
            doc = kept.model_dump(mode="json")
            self.w.publisher.put_json(key, doc)
            return kept, doc
        return kept, None

    def _recent(
        self, workload_id: str, rec: InventoryRecord | None, batch: agentapi.ReportBatch
    ) -> agentapi.ReportBatch:
        """The batch without records dated before the flow rows' retention (a row of that day
        would outlive it), or more than a day (a record's longest span) before the control plane
        first noted one of the reporter's addresses: an agent stamps what it sees when it sees it,
        after its host was registered. The history is read only for a batch holding a record
        older than a day (an honest agent's are minutes old). The ingest checks the same
        (:meth:`ringfence.flows.ingest.FlowIngest.flows`)."""
        from ringfence.flows.aggregate import DEFAULT_RETENTION_DAYS

        now = time.time()
        oldest = now - DEFAULT_RETENTION_DAYS * 86400
        times = [f.start for f in batch.flows] + [d.time for d in batch.drops]
        if not times or min(times) >= now - agentapi.MAX_SPAN:
            return batch
        if rec is not None:
            history = self.w.store.address_history(sorted(rec.workload.ips)[:HISTORY_LOOKUPS])
            seen = [o.since for h in history.values() for o in h if o.workload_id == workload_id]
            if seen:
                oldest = max(oldest, min(seen) - agentapi.MAX_SPAN)
        flows = [f for f in batch.flows if f.start >= oldest]
        drops = [d for d in batch.drops if d.time >= oldest]
        stale = len(batch.flows) + len(batch.drops) - len(flows) - len(drops)
        if stale:
            log.warning(
                "%d report records of %s are dated before %s (the flow retention, or before it was first seen): "
                "not kept",
                stale,
                workload_id,
                time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(oldest)),
            )
        return agentapi.ReportBatch.model_construct(flows=flows, drops=drops, dropped_records=batch.dropped_records)

    def _own_records(
        self, workload_id: str, rec: InventoryRecord | None, batch: agentapi.ReportBatch
    ) -> agentapi.ReportBatch:
        """The batch's records whose own end is the reporter's address: the source of an
        ``outbound`` record, the destination of an ``inbound`` one (a record with the direction
        turned round would put the reporter's word on the peer's side: the peer named as the one
        who reported it in SIEM events, the row counted as the peer's own report). The address is
        one its inventory record holds now, or one the address history gives it when the record
        was seen. The ingest (:meth:`ringfence.flows.ingest.FlowIngest.flows`) decides again by
        the time the record was seen: a record dated into another workload's interval of the
        address is not taken."""
        from ringfence.flows.resolve import AddressBook

        def norm(address: str) -> str:
            try:
                return ipaddress.ip_address(address).compressed
            except ValueError:
                return address

        mine = {norm(a) for a in rec.workload.ips} if rec is not None else set()

        def end(r: agentapi.FlowRecord | agentapi.DropEvent) -> str:
            return r.src if r.direction == "outbound" else r.dst

        def at_home(r: agentapi.FlowRecord | agentapi.DropEvent) -> bool:
            return norm(end(r)) in mine

        flows = [f for f in batch.flows if at_home(f)]
        drops = [d for d in batch.drops if at_home(d)]
        rest = [(end(f), f.start) for f in batch.flows if not at_home(f)]
        rest += [(end(d), d.time) for d in batch.drops if not at_home(d)]
        if rest:  # an address it held when the record was seen, by the history
            # its former address is the own end of each of its records: the most frequent ones are
            # looked up, a bounded number (DynamoDB reads one per address)
            counts = collections.Counter(a for a, _ in rest)
            asked = sorted(a for a, _ in counts.most_common(HISTORY_LOOKUPS))
            book = AddressBook(self.w.store.address_history(asked))

            def held(address: str, t: float) -> bool:
                # when the record was seen, never "or now": a host that took over an address
                # reports no flows dated into its previous owner's interval
                o = book.interval(address, t)
                return o is not None and o.workload_id == workload_id

            flows += [f for f in batch.flows if not at_home(f) and held(end(f), f.start)]
            drops += [d for d in batch.drops if not at_home(d) and held(end(d), d.time)]
        # validated already (as the request's body): constructed, not validated again, as the
        # batch's clock check would measure again
        return agentapi.ReportBatch.model_construct(flows=flows, drops=drops, dropped_records=batch.dropped_records)

    def _ingest_flows(self, workload_id: str, doc: dict[str, Any]) -> None:
        """Fold the batch into flow rows (docs/visibility.md); a failure is logged, never the
        agent's: the batch is archived already and a later ingest can read it again.

        Address owners are noted from the whole inventory only when compute moved the engine
        head or an inventory record changed (:meth:`Store.inventory_generation`) since the last
        such pass, or ``FLOW_SYNC_MAX_AGE`` seconds went by; in between, and while another
        report is making that pass, the reporter's own addresses alone (its flows are taken by
        them). A full pass reads every record: once per report it cost 45 ms at 1,000 workloads
        and 316 ms at 5,000 (docs/benchmarks.md, "Flows in")."""
        from ringfence.flows.ingest import FlowIngest

        active = self.w.active_policy()
        if active is None:
            return
        try:
            ingest = FlowIngest(self.w.store, active[1])
            now = time.time()
            # what moves address owners: compute's head, and any inventory write compute has not
            # reached yet (an observation, an operator's quarantine) where the store counts them
            moved = (self.w.store.head().revision, self.w.store.inventory_generation())
            with self._flows_lock:
                last = self._flows_synced
                due = last is None or last[0] != moved or now - last[1] > FLOW_SYNC_MAX_AGE
                full = due and not self._flows_passing
                if full:
                    self._flows_passing = True
            if full:
                done = False
                try:
                    ingest.sync(now)
                    done = True
                finally:  # a pass that failed is not recorded: the next report makes it again
                    with self._flows_lock:
                        self._flows_passing = False
                        if done:
                            self._flows_synced = (moved, now)
            else:
                ingest.sync_workload(workload_id, now)
            res = ingest.agent_batch(workload_id, doc)
            # serve's counters (GET /metrics), as the flows function counts it on AWS
            metric = getattr(getattr(self.w, "compute", None), "metric", None)
            if res.capped and metric is not None:
                metric("FlowRowsCapped", res.capped)
        except Exception:  # reports are accepted whatever the flow store says
            log.exception("flows of %s's report not ingested", workload_id)

    # WebSocket nudge channel

    def connect(self, token: str | None, connection_id: str) -> Response:
        """The nudge channel of the workload whose current token this is. Only the holder of the
        workload's one active token connects (a revoked or replaced token is refused, and a new
        token drops the connection opened with the old one); a connection replacing another is
        logged and audited, never silent."""
        owner = self.w.store.token_workload(secret_hash(token)) if token else None
        if owner is None:
            return error(401, "unknown, expired or revoked token")
        gone = self._not_running(owner)
        if gone:
            return error(401, "token revoked", gone)
        old = self.w.store.connection(owner)
        # written only while the token is still current: a refresh or retirement that landed
        # since the check above would otherwise find no connection to drop, then see ours written
        if not self.w.store.put_connection(owner, connection_id, secret_hash(token or "")):
            return error(401, "token revoked", "replaced or revoked while connecting")
        if old is not None and old != connection_id:
            log.warning("nudge connection of %s replaced: %s → %s", owner, old, connection_id)
            credentials.audit(self.w, "agent.connect", owner, f"agent:{owner}", connection=connection_id, replaced=old)
        return Response(200, {"workload_id": owner})


def _not_running(workload_id: str, rec: InventoryRecord | None) -> str | None:
    """Why the workload of this inventory record may hold no token (unknown, stopped,
    terminated), or None."""
    if rec is None:
        return f"{workload_id} is not in inventory"
    if rec.state not in (*ACTIVE_STATES, "terminating"):
        return f"{workload_id} is {rec.state}: its token is revoked"
    return None
