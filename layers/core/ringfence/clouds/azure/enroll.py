"""The ``azure-attested`` enroller: the IMDS attested document for a server nonce, bound to the
agent's own key as ``aws-iid`` binds it (the document is readable by any process on the VM and may
be captured; the agent key signing this nonce is what a second claimant lacks)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ringfence import agentapi
from ringfence.control import credentials
from ringfence.control.enroll import ProofError

from .attested import DEFAULT_SIGNER, imds_nonce, load_roots, verify_attested
from .inventory import observe_subscription
from .wiring import Azure

if TYPE_CHECKING:
    from ringfence.control.agents import AgentApi


class AzureAttested:
    method = "azure-attested"

    def __init__(self, azure: Azure, signer_name: str | None = None, read_unseen: bool = True) -> None:
        self.azure = azure
        # False: a VM not in the inventory yet is refused (the agent retries once its event has
        # arrived) rather than read from ARM: the AWS agent API holds no Azure credentials
        self.read_unseen = read_unseen
        self.signer_name = signer_name or os.environ.get("RINGFENCE_AZURE_ATTESTED_SIGNER") or DEFAULT_SIGNER
        self._roots = load_roots(azure.cfg.attested_roots_pem)

    def __call__(self, api: AgentApi, req: agentapi.EnrollRequest) -> str:
        if not req.document:
            raise ProofError("azure-attested needs document (the attested document's base64 PKCS7 signature)")
        if req.agent_key is None:
            raise ProofError("azure-attested needs agent_key and agent_signature (the agent's own key)")
        doc = verify_attested(req.document, self._roots, self.signer_name)
        if doc.nonce != imds_nonce(req.nonce):
            raise ProofError("azure-attested: the document was not made for this nonce")
        if not self.azure.cfg.governs(doc.subscription):
            raise ProofError(f"subscription {doc.subscription} is not enrolled with this control plane")
        if not api.w.store.burn_nonce(req.nonce):
            raise ProofError("nonce is unknown, expired or already used")
        credentials.verify_proof(req.agent_key, req.agent_signature, "enroll", doc.vm_id, req.nonce)
        rec = api.w.store.get(doc.vm_id)
        if (rec is None or not rec.active) and self.read_unseen:
            # a VM not seen yet (its event may still be on its way): read the subscription now,
            # counted as the wiring counts (a failed hand-off: ComputeNotQueued)
            observe_subscription(api.w, self.azure.arm(doc.subscription), api.w.metric)
            rec = api.w.store.get(doc.vm_id)
        if rec is None or not rec.active or (rec.workload.account or "").lower() != doc.subscription:
            raise ProofError(f"VM {doc.vm_id} is not a running VM of subscription {doc.subscription}")
        api.bind_key(req, doc.vm_id)
        return doc.vm_id
