"""Enrollment method ``gcp-jwt``: the VM's instance identity token, bound to the agent's key.

The agent asks its metadata server for
``instance/service-accounts/default/identity?audience=<ours>&format=full`` and sends the token as
``document``, with its public key and a signature by it over the server's nonce and the instance
id (as ``aws-iid``). We check (cloud_events.md §7.4):

* the token: signed by Google (the configured JWKS), ``iss`` Google's, ``aud`` exactly our
  identity audience, not expired (:mod:`.oidc`); the ``google.compute_engine`` claims present
  (``format=full``); the project one we serve;
* each token once: a token is remembered (instance id + ``iat``) for its lifetime, a replay refused;
* the VM lives: the token's instance id is listed in its project and zone, running and of its name,
  with the token's id (a recreated VM of the same name has another id);
* the nonce single-use, the agent's signature over it by the key it presents, and that key bound
  to the instance on first enrollment (a second key claiming the identity is refused).

The token names the instance; the agent key is what someone who captured a token lacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ringfence import agentapi
from ringfence.control import credentials
from ringfence.control.enroll import ProofError
from ringfence.control.wiring import BaseWiring

from .config import GcpConfig
from .ingest import GcpIngest
from .instances import STATES
from .oidc import OidcVerifier, TokenError

METHOD = "gcp-jwt"
BindKey = Callable[[agentapi.EnrollRequest, str], None]


@dataclass(frozen=True)
class GcpIdentity:
    instance_id: str
    instance_name: str
    project_id: str
    project_number: int
    zone: str
    issued_at: int
    expires_at: int


def identity(claims: dict[str, Any]) -> GcpIdentity:
    """The VM the token's ``format=full`` claims name; ProofError when they are missing."""
    ce = claims.get("google", {}).get("compute_engine") if isinstance(claims.get("google"), dict) else None
    if not isinstance(ce, dict):
        raise ProofError("the identity token has no google.compute_engine claims: request it with format=full")
    try:
        return GcpIdentity(
            instance_id=str(ce["instance_id"]),
            instance_name=str(ce["instance_name"]),
            project_id=str(ce["project_id"]),
            project_number=int(ce["project_number"]),
            zone=str(ce["zone"]),
            issued_at=int(claims["iat"]),
            expires_at=int(claims["exp"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProofError(f"the identity token's compute_engine claims lack {exc}") from None


class GcpEnroller:
    """``gcp-jwt`` for the agent API (``AgentApi(w, enrollers={METHOD: GcpEnroller(...)})``)."""

    def __init__(self, w: BaseWiring, cfg: GcpConfig, ingest: GcpIngest | None = None) -> None:
        if not cfg.identity_audience:
            raise ValueError("gcp-jwt needs the identity token audience (RINGFENCE_GCP_IDENTITY_AUDIENCE)")
        self.w = w
        self.cfg = cfg
        self.verifier = OidcVerifier(cfg.identity_audience, cfg.jwks_url)
        self.ingest = ingest or GcpIngest(w, cfg)

    def __call__(self, req: agentapi.EnrollRequest, bind: BindKey) -> str:
        if not req.document:
            raise ProofError("gcp-jwt needs document: the instance identity token (audience ours, format=full)")
        if req.agent_key is None:
            raise ProofError("gcp-jwt needs agent_key and agent_signature (the agent's own key)")
        try:
            claims = self.verifier.verify(req.document, "identity token")
        except TokenError as exc:
            raise ProofError(str(exc)) from None
        ident = identity(claims)
        if self.cfg.projects.get(ident.project_id) != ident.project_number:
            raise ProofError(f"project {ident.project_id} is not enrolled with this control plane")
        wid = ident.instance_id
        if req.workload_id is not None and req.workload_id != wid:
            raise ProofError(f"the identity token is for instance {wid}, not {req.workload_id}")
        if not self.w.store.burn_nonce(req.nonce):
            raise ProofError("nonce is unknown, expired or already used")
        credentials.verify_proof(req.agent_key, req.agent_signature, "enroll", wid, req.nonce)
        # jti-less tokens: (instance, iat) names one token; remembered as long as it could be valid
        ttl = max(60, ident.expires_at - ident.issued_at + 120)
        if not self.w.store.claim_once(f"gcp-jwt:{wid}:{ident.issued_at}", ttl):
            raise ProofError("this identity token was already used: request a fresh one")
        # by the token's id, in its zone, and of its name: a VM of that name with another id, or
        # of that id with another name, is not the token's
        live = self.ingest.instances.by_id(ident.project_id, ident.zone, wid)
        if live is not None and live.get("name") != ident.instance_name:
            live = None
        if live is None or STATES.get(str(live.get("status"))) not in ("pending", "running"):
            raise ProofError(
                f"instance {wid} ({ident.instance_name}) is not running in {ident.project_id}/{ident.zone}"
            )
        bind(req, wid)
        if self.w.enroll_records_instance and self.w.store.get(wid) is None:
            self.ingest.observe(ident.project_id, ident.zone, [wid], names={wid: ident.instance_name})
            self.w.enqueue_compute([wid])
        return wid
