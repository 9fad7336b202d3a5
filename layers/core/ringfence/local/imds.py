"""An instance metadata service (IMDSv2) stand-in for the lab: each instance namespace reaches it at
169.254.169.254, as on EC2, and is told its own identity — chosen by the caller's address, the
way the real IMDS answers only the instance it runs beside.

Serves ``PUT /latest/api/token`` and, with that token, ``/latest/dynamic/instance-identity/
document`` and ``/signature`` (base64 RSA-SHA256 over the document: the form the control plane
verifies, ``ringfence.clouds.aws.enroll.verify_iid``). The documents come from the embedded AWS
(:meth:`ringfence.local.aws.EmbeddedAws.identity_document`) signed with its IID key.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from ringfence.local.httpd import LabHTTPServer

IMDS_ADDRESS = "169.254.169.254"
TOKEN_TTL_MAX = 21600


class Imds:
    def __init__(
        self,
        identify: Callable[[str], str | None],
        document_for: Callable[[str], str],
        sign: Callable[[str], str],
        host: str = IMDS_ADDRESS,
        port: int = 80,
    ) -> None:
        """``identify(address)``: the instance id at that private address, or None (the caller is
        no instance); ``document_for(instance_id)``: its identity document. Without namespaces
        (dry-run agents, all on loopback) an agent's base URL names it: ``/instance/<id>``."""
        self.identify = identify
        self.document_for = document_for
        self.sign = sign
        self.tokens: dict[str, str] = {}  # token → the address it was issued to
        self.requests = 0
        imds = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _send(self, status: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _who(self) -> tuple[str | None, str]:
                """(instance id, path below the instance's base URL)."""
                caller, path = self.client_address[0], self.path
                if caller.startswith("127.") and path.startswith("/instance/"):
                    iid, _, rest = path.removeprefix("/instance/").partition("/")
                    return iid, "/" + rest
                return imds.identify(caller), path

            def do_PUT(self) -> None:
                imds.requests += 1
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                iid, path = self._who()
                if path != "/latest/api/token" or not ttl.isdigit() or not 1 <= int(ttl) <= TOKEN_TTL_MAX:
                    self._send(400)
                    return
                token = secrets.token_urlsafe(32)
                imds.tokens[token] = f"{self.client_address[0]} {iid}"
                self._send(200, token)

            def do_GET(self) -> None:
                imds.requests += 1
                iid, path = self._who()
                holder = imds.tokens.get(self.headers.get("X-aws-ec2-metadata-token", ""))
                if holder != f"{self.client_address[0]} {iid}":
                    self._send(401)  # IMDSv2: a token, issued to this caller
                    return
                if iid is None:
                    self._send(404)
                    return
                try:
                    doc = imds.document_for(iid)
                except Exception:  # the instance is gone from moto
                    self._send(404)
                    return
                if path == "/latest/dynamic/instance-identity/document":
                    self._send(200, doc)
                elif path == "/latest/dynamic/instance-identity/signature":
                    self._send(200, imds.sign(doc))
                else:
                    self._send(404)

        self.server = LabHTTPServer((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="imds", daemon=True)

    def start(self) -> Imds:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
