"""Enrollment dispatch, independent of how an instance proves its identity.

An :class:`Enroller` checks one method's proof (``aws-iid``, ``aws-sts``, ``azure-attested``,
``pairing``…) and returns the workload id it proves; the agent API
(:class:`~ringfence.control.agents.AgentApi`) turns that into a token. Each cloud's wiring names
the enrollers it offers (:attr:`~ringfence.control.wiring.BaseWiring.enrollers`); the
configuration (``enroll_methods``) says which of them this control plane accepts. Pairing keys are
the cloud-neutral method and live here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ringfence import agentapi
from ringfence.store.base import NotTheNamedKey, agent_key_fingerprint_of, agent_key_id_of

from .api import secret_hash

if TYPE_CHECKING:
    from .agents import AgentApi


class ProofError(ValueError):
    """The identity proof is invalid (maps to 401)."""


class Enroller(Protocol):
    """One enrollment method: the proof in ``req`` → the workload id it proves (ProofError if
    it proves nothing). ``api`` offers the nonce store and the agent-key binding
    (:meth:`~ringfence.control.agents.AgentApi.bind_key`)."""

    def __call__(self, api: AgentApi, req: agentapi.EnrollRequest) -> str: ...


def enroll_pairing(api: AgentApi, req: agentapi.EnrollRequest) -> str:
    """An operator-issued one-time pairing key for an on-premise workload.

    Until a valid pairing key is shown, a refusal says nothing about the workload and writes no
    audit record: an unknown or terminated id, a cloud instance and a bad key get the same
    answer, and the check of the key an operator's reset named (audited) is made only by the
    store's pairing use, which finds a valid key first."""
    from . import credentials  # it imports this module (ProofError)

    if not req.pairing_key or not req.workload_id:
        raise ProofError("pairing needs pairing_key and workload_id")
    refused = ProofError(f"pairing key is unknown, expired, used up, revoked or not issued for {req.workload_id}")
    store = api.w.store
    if not store.burn_nonce(req.nonce):
        raise ProofError("nonce is unknown, expired or already used")
    if req.agent_key is None:
        raise ProofError(f"{req.method} needs agent_key and agent_signature (the agent's own key)")
    rec = store.get(req.workload_id)
    # the agent's signature over this nonce with the key it presents: checks the caller's own key only
    credentials.verify_proof(req.agent_key, req.agent_signature, "enroll", req.workload_id, req.nonce)
    # deregistered (or never registered): a leftover key must not bind an agent key to the id, to
    # be used once the id is registered again for another host; a cloud instance proves its
    # identity with the cloud's document, never with a key. No key is issued for either: the
    # answer is the unknown key's
    if rec is None or rec.state == "terminated" or rec.workload.cloud != "onprem":
        raise refused
    # the key is spent only by the workload it was issued for, and an operator-issued key rebinds
    # the agent key (a reinstalled host) in the same atomic step, refusing a key other than the one
    # a reset named (the use rolled back): a use checked before an operator's reset (which
    # revokes the pairing keys first) cannot bind after it
    before = store.agent_key(req.workload_id)
    try:
        used = store.use_pairing(secret_hash(req.pairing_key), req.workload_id, agent_key=req.agent_key)
    except NotTheNamedKey as exc:  # a valid key, but a reset names another agent key: audited
        raise api.not_named(req, req.workload_id, str(exc)) from None
    if not used:
        raise refused
    if before is not None and agent_key_fingerprint_of(before) != credentials.agent_key_fingerprint(req.agent_key):
        # an operator-issued key took the identity from the agent bound before (a reinstall, or a
        # leaked key with uses left): said apart from a first binding, with both keys
        credentials.audit(
            api.w,
            "agent.key.replaced",
            req.workload_id,
            f"agent-key:{credentials.agent_key_id(req.agent_key)}",
            method="pairing",
            replaced_key=agent_key_id_of(before) or "(not one Ed25519 key)",
        )
    return req.workload_id
