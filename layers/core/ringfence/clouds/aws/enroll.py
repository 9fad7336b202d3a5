"""Verifying an EC2 instance identity document (IID) and its RSA-SHA256 signature.

AWS publishes one certificate per Region for the ``/rsa2048`` PKCS7 form and one for the
``/signature`` form (base64 RSA-SHA256 over the document bytes). We verify the latter with a
configured PEM certificate (``RINGFENCE_IID_CERT``): production uses the Region's "RSA"
certificate from the EC2 user guide (infra/examples/basic/README.md, step 2); tests use a
throwaway key pair.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

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


# --- aws-sts: a presigned sts:GetCallerIdentity the server replays (as Vault's aws iam method) -----

NONCE_HEADER = "x-ringfence-nonce"
_DEFAULT_STS = re.compile(r"^https://sts(\.[a-z0-9-]+)?\.amazonaws\.com(\.cn)?/")
_ARN = re.compile(r"^arn:aws[a-z-]*:sts::(\d{12}):assumed-role/([^/]+)/(i-[0-9a-f]{8,17})$")


@dataclass(frozen=True)
class StsIdentity:
    account: str
    role: str
    instance_id: str
    arn: str


def check_sts_request(url: str, headers: dict[str, str], nonce: str, allowed: list[str]) -> None:
    """Refuse anything but a GetCallerIdentity call to STS that signs our nonce header."""
    ok_host = any(url.startswith(p) for p in allowed) if allowed else bool(_DEFAULT_STS.match(url))
    if not ok_host:
        raise ProofError("sts_url is not an STS endpoint this control plane accepts")
    query = parse_qs(urlsplit(url).query)
    if query.get("Action") != ["GetCallerIdentity"]:
        raise ProofError("sts_url must call GetCallerIdentity")
    lower = {k.lower(): v for k, v in headers.items()}
    if lower.get(NONCE_HEADER) != nonce:
        raise ProofError(f"the {NONCE_HEADER} header must carry the server nonce")
    auth = lower.get("authorization", "")
    signed = auth.split("SignedHeaders=", 1)[1].split(",", 1)[0].split(";") if "SignedHeaders=" in auth else []
    if NONCE_HEADER not in signed:
        raise ProofError(f"the {NONCE_HEADER} header must be signed (SigV4 SignedHeaders)")


def replay_sts(url: str, headers: dict[str, str], timeout: float = 5.0) -> StsIdentity:
    """Send the caller's presigned request to STS; the answer says who signed it."""
    req = urllib.request.Request(url, headers=headers, method="GET")  # noqa: S310 - URL checked by check_sts_request
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - URL checked by check_sts_request
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raise ProofError(f"STS refused the signed request ({exc.code})") from None
    except OSError as exc:
        raise ProofError(f"STS could not be reached: {exc}") from None
    try:
        root = ElementTree.fromstring(body)  # noqa: S314 - the response of a fixed AWS endpoint
    except ElementTree.ParseError:
        raise ProofError("STS answered something that is not XML") from None
    arn = next((el.text for el in root.iter() if el.tag.endswith("Arn")), None) or ""
    m = _ARN.match(arn)
    if not m:
        raise ProofError(f"caller {arn!r} is not an EC2 instance-profile session (assumed-role/<role>/<instance-id>)")
    return StsIdentity(account=m.group(1), role=m.group(2), instance_id=m.group(3), arn=arn)
