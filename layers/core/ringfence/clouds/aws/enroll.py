"""Verifying an EC2 instance identity document (IID) and its RSA-SHA256 signature.

AWS publishes one certificate per Region for the ``/rsa2048`` PKCS7 form and one for the
``/signature`` form (base64 RSA-SHA256 over the document bytes). We verify the latter with a
configured PEM certificate (``RINGFENCE_IID_CERT`` or an SSM parameter): production uses the
AWS Region certificate from the EC2 user guide; tests use a throwaway key pair.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


class ProofError(ValueError):
    """The identity proof is invalid (maps to 401)."""


@dataclass(frozen=True)
class Identity:
    instance_id: str
    account: str
    region: str
    private_ip: str | None
    pending_time: str


def load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    try:
        if b"CERTIFICATE" in pem:
            key: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"IID verification certificate is not valid PEM: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("IID verification certificate must hold an RSA public key")
    return key


def verify_iid(document: str, signature_b64: str, public_key: rsa.RSAPublicKey) -> Identity:
    try:
        sig = base64.b64decode("".join(signature_b64.split()), validate=True)
    except ValueError:
        raise ProofError("document_signature is not base64") from None
    try:
        public_key.verify(sig, document.encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise ProofError("instance identity document signature does not verify") from None
    try:
        doc = json.loads(document)
        return Identity(
            instance_id=str(doc["instanceId"]),
            account=str(doc["accountId"]),
            region=str(doc["region"]),
            private_ip=doc.get("privateIp"),
            pending_time=str(doc.get("pendingTime", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ProofError(f"instance identity document is missing a field: {exc}") from None
