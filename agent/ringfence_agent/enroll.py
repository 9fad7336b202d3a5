"""Identity proofs for enrollment (docs/agent-api.md): no secret is baked into an image.

* ``pairing`` — an operator-issued key with a use limit and an expiry (on premise).
* ``aws-iid`` — the EC2 instance identity document and its signature, read from IMDSv2, plus the
  server's single-use nonce. Which IMDS signature is sent is configurable (``iid_signature``):
  ``signature`` (base64 RSA-SHA256, the default: the form the AWS control plane verifies, with the
  Region's "RSA" certificate), ``rsa2048`` or ``pkcs7`` (PKCS7 forms, for a control plane that
  verifies those).
* ``gcp-jwt`` — the GCE instance identity token from the metadata server
  (``audience`` the control plane's, ``format=full``), plus the nonce, signed by the agent's key.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from ringfence.agentwire import EnrollRequest

Prover = Callable[[str], EnrollRequest]

MAX_IMDS_BYTES = 64 * 1024  # an identity document and its signature are a few KB


class ProofError(Exception):
    """The identity proof could not be gathered (e.g. IMDS unreachable)."""


def pairing(workload_id: str, key: str) -> Prover:
    def prove(nonce: str) -> EnrollRequest:
        return EnrollRequest(method="pairing", nonce=nonce, workload_id=workload_id, pairing_key=key)

    return prove


def _bounded(raw: bytes, what: str) -> str:
    if len(raw) > MAX_IMDS_BYTES:
        raise ProofError(f"instance metadata {what}: answer over {MAX_IMDS_BYTES} bytes")
    return raw.decode()


def aws_iid(imds_url: str = "http://169.254.169.254", signature: str = "signature", timeout: float = 2.0) -> Prover:
    base = imds_url.rstrip("/")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy

    def fetch(path: str, token: str) -> str:
        req = urllib.request.Request(f"{base}{path}", headers={"X-aws-ec2-metadata-token": token})  # noqa: S310
        with opener.open(req, timeout=timeout) as resp:
            return _bounded(resp.read(MAX_IMDS_BYTES + 1), path)

    def prove(nonce: str) -> EnrollRequest:
        try:
            req = urllib.request.Request(  # noqa: S310
                f"{base}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
            )
            with opener.open(req, timeout=timeout) as resp:
                token = _bounded(resp.read(MAX_IMDS_BYTES + 1), "/latest/api/token")
            document = fetch("/latest/dynamic/instance-identity/document", token)
            sig = fetch(f"/latest/dynamic/instance-identity/{signature}", token)
        except (urllib.error.URLError, OSError, http.client.HTTPException, UnicodeDecodeError) as exc:
            raise ProofError(
                f"instance metadata (IMDSv2) unavailable at {base}: {getattr(exc, 'reason', exc)}"
            ) from None
        return EnrollRequest(method="aws-iid", nonce=nonce, document=document, document_signature=sig.strip())

    return prove


def gcp_jwt(audience: str, metadata_url: str = "http://metadata.google.internal", timeout: float = 2.0) -> Prover:
    """The VM's identity token for ``audience`` (the control plane's RINGFENCE_GCP_IDENTITY_AUDIENCE)."""
    query = urllib.parse.urlencode({"audience": audience, "format": "full"})
    url = f"{metadata_url.rstrip('/')}/computeMetadata/v1/instance/service-accounts/default/identity?{query}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy

    def prove(nonce: str) -> EnrollRequest:
        try:
            req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})  # noqa: S310
            with opener.open(req, timeout=timeout) as resp:
                token = _bounded(resp.read(MAX_IMDS_BYTES + 1), "identity token")
        except (urllib.error.URLError, OSError, http.client.HTTPException, UnicodeDecodeError) as exc:
            raise ProofError(
                f"GCE metadata server unavailable at {metadata_url}: {getattr(exc, 'reason', exc)}"
            ) from None
        return EnrollRequest(method="gcp-jwt", nonce=nonce, document=token.strip())

    return prove
