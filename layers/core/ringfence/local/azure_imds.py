"""An Azure instance metadata service stand-in for tests and the lab: a CA that signs attested
documents (PKCS7 SignedData, DER, certificates included, as IMDS returns them; made with
cryptography's PKCS7 builder) and ``GET /metadata/attested/document?nonce=…`` answering
``{"encoding": "pkcs7", "signature": …}`` for the VM it is asked for, as the real IMDS answers
only the VM it runs beside."""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from ringfence.local.httpd import LabHTTPServer

NOW = dt.datetime.now(dt.UTC)


def _cert(
    subject: str, key: rsa.RSAPrivateKey, issuer: x509.Certificate | None, issuer_key: rsa.RSAPrivateKey, ca: bool
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class AttestedCa:
    root: x509.Certificate
    signer: x509.Certificate
    signer_key: rsa.RSAPrivateKey

    @classmethod
    def make(cls, root_name: str = "Test Attested Root", signer_name: str = "metadata.azure.com") -> AttestedCa:
        root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        root = _cert(root_name, root_key, None, root_key, ca=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(root, _cert(signer_name, key, root, root_key, ca=False), key)

    @property
    def root_pem(self) -> str:
        return self.root.public_bytes(serialization.Encoding.PEM).decode()

    def document(self, vm_id: str, subscription: str, nonce: str, expires_in: int = 300) -> str:
        """IMDS's ``signature``: base64 DER PKCS7 over the attested JSON."""
        fmt = "%m/%d/%y %H:%M:%S -0000"
        body = {
            "nonce": nonce,
            "plan": {"name": "", "product": "", "publisher": ""},
            "timeStamp": {
                "createdOn": NOW.strftime(fmt),
                "expiresOn": (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_in)).strftime(fmt),
            },
            "vmId": vm_id,
            "subscriptionId": subscription,
            "sku": "22_04-lts-gen2",
        }
        der = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(json.dumps(body).encode())
            .add_signer(self.signer, self.signer_key, hashes.SHA256())
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
        )
        return base64.b64encode(der).decode()


class AzureImds:
    """``with AzureImds(ca, lambda address: (vm_id, subscription)) as imds:`` — ``imds.url``."""

    def __init__(
        self,
        ca: AttestedCa,
        identify: Callable[[str], tuple[str, str] | None],
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.ca = ca
        self.identify = identify
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                return None

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if self.headers.get("Metadata") != "true" or self.headers.get("X-Forwarded-For"):
                    return self._answer(400, {"error": "Bad request. Required metadata header not specified"})
                if url.path != "/metadata/attested/document":
                    return self._answer(404, {"error": "Not found"})
                who = imds.identify(self.client_address[0])
                if who is None:
                    return self._answer(404, {"error": "no VM at this address"})
                nonce = parse_qs(url.query).get("nonce", [""])[0]
                if len(nonce) > 32 or not nonce.isalnum():
                    return self._answer(400, {"error": "nonce: up to 32 alphanumeric characters"})
                self._answer(200, {"encoding": "pkcs7", "signature": imds.ca.document(*who, nonce)})

        self._server = LabHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self._server.server_address[1]}"

    def __enter__(self) -> AzureImds:
        threading.Thread(target=self._server.serve_forever, name="local-azure-imds", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
