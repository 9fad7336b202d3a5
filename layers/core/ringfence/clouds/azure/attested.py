"""The IMDS attested document: a PKCS7 SignedData over a small JSON document (``vmId``,
``subscriptionId``, ``nonce``, ``timeStamp``…), verified here — the signature, the signer's chain
to a configured root, the signer's name, the expiry. No I/O.

The nonce: the agent asks IMDS for :func:`ringfence.agentwire.imds_nonce` of the server's nonce.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from asn1crypto import cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from ringfence.agentwire import imds_nonce
from ringfence.control.enroll import ProofError

__all__ = ["Attested", "imds_nonce", "load_roots", "verify_attested"]

# the attested document's signer in Azure's public cloud [unverified against a live document:
# configure RINGFENCE_AZURE_ATTESTED_SIGNER for another cloud]
DEFAULT_SIGNER = "metadata.azure.com"
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


@dataclass(frozen=True)
class Attested:
    vm_id: str
    subscription: str
    nonce: str
    expires: datetime | None


def load_roots(pem: str) -> list[x509.Certificate]:
    try:
        roots = x509.load_pem_x509_certificates(pem.encode()) if pem.strip() else []
    except ValueError as exc:
        raise ValueError(f"RINGFENCE_AZURE_ATTESTED_ROOTS is not PEM certificates: {exc}") from None
    return roots


def verify_attested(
    signature_b64: str,
    roots: list[x509.Certificate],
    signer_name: str = DEFAULT_SIGNER,
    now: datetime | None = None,
) -> Attested:
    """The document inside ``signature_b64`` (IMDS's ``signature``: base64 DER PKCS7), once its
    signature, chain and signer name hold; ProofError naming what does not."""
    if not roots:
        raise ProofError("azure-attested: no attested-document root is configured (RINGFENCE_AZURE_ATTESTED_ROOTS)")
    try:
        der = base64.b64decode("".join(signature_b64.split()), validate=True)
        info = cms.ContentInfo.load(der)
        if info["content_type"].native != "signed_data":
            raise ProofError("azure-attested: document is not a PKCS7 SignedData")
        sd = info["content"]
        content = sd["encap_content_info"]["content"]
        body: bytes = content.native if content is not None else b""
        certs = [x509.load_der_x509_certificate(c.chosen.dump()) for c in (sd["certificates"] or [])]
        signer_info = sd["signer_infos"][0]
    except ProofError:
        raise
    except (ValueError, binascii.Error, KeyError, IndexError, TypeError) as exc:
        raise ProofError(f"azure-attested: document is not base64 DER PKCS7 ({exc})") from None
    signer = _signer_cert(signer_info, certs)
    _check_signature(signer_info, signer, body)
    _check_chain(signer, [c for c in certs if c is not signer], roots, signer_name, now)
    try:
        doc = json.loads(body)
    except ValueError:
        raise ProofError("azure-attested: the signed content is not JSON") from None
    if not isinstance(doc, dict) or not doc.get("vmId") or not doc.get("subscriptionId"):
        raise ProofError("azure-attested: the signed document names no vmId and subscriptionId")
    expires = _time((doc.get("timeStamp") or {}).get("expiresOn"))
    if expires is not None and expires < (now or datetime.now(UTC)):
        raise ProofError(f"azure-attested: the document expired at {expires.isoformat()}")
    return Attested(str(doc["vmId"]).lower(), str(doc["subscriptionId"]).lower(), str(doc.get("nonce", "")), expires)


def _signer_cert(signer_info: cms.SignerInfo, certs: list[x509.Certificate]) -> x509.Certificate:
    sid = signer_info["sid"]
    if sid.name != "issuer_and_serial_number":
        raise ProofError("azure-attested: the signer is not named by issuer and serial number")
    serial = sid.chosen["serial_number"].native
    issuer = sid.chosen["issuer"].dump()
    for c in certs:
        if c.serial_number == serial and c.issuer.public_bytes() == issuer:
            return c
    raise ProofError("azure-attested: the signer's certificate is not in the document")


def _check_signature(signer_info: cms.SignerInfo, signer: x509.Certificate, body: bytes) -> None:
    algo = _HASHES.get(signer_info["digest_algorithm"]["algorithm"].native)
    if algo is None:
        raise ProofError("azure-attested: unsupported digest algorithm")
    attrs = signer_info["signed_attrs"]
    if attrs is not None and len(attrs):
        digest = next((a["values"][0].native for a in attrs if a["type"].native == "message_digest"), None)
        h = hashes.Hash(algo())
        h.update(body)
        if digest != h.finalize():
            raise ProofError("azure-attested: the content does not match its signed digest")
        signed = b"\x31" + attrs.dump()[1:]  # signed over as a SET OF, not the [0] IMPLICIT tag
    else:
        signed = body
    key = signer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ProofError("azure-attested: the signer's key is not RSA")
    try:
        key.verify(signer_info["signature"].native, signed, padding.PKCS1v15(), algo())
    except InvalidSignature:
        raise ProofError("azure-attested: the document's signature does not verify") from None


def _check_chain(
    signer: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: list[x509.Certificate],
    signer_name: str,
    now: datetime | None,
) -> None:
    names = {a.value for a in signer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        san = signer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names |= set(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    if signer_name not in names:
        raise ProofError(f"azure-attested: the signer is {sorted(names)}, not {signer_name}")
    builder = PolicyBuilder().store(Store(roots)).time(now or datetime.now(UTC))
    # the chain is checked as the web PKI checks it; the signer's own extensions (its key usage
    # is for signing documents, not for TLS) are not held to a TLS profile
    builder = builder.extension_policies(
        ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
    )
    try:
        builder.build_client_verifier().verify(signer, intermediates)
    except VerificationError as exc:
        raise ProofError(f"azure-attested: the signer does not chain to a configured root ({exc})") from None


def _time(value: object) -> datetime | None:
    """IMDS's ``timeStamp`` form, ``12/06/25 19:06:17 -0000``."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.strptime(value, "%m/%d/%y %H:%M:%S %z")
    except ValueError:
        raise ProofError(f"azure-attested: timeStamp {value!r} is not MM/DD/YY HH:MM:SS +ZZZZ") from None
