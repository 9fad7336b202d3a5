"""A local stand-in for the Google Cloud REST APIs Ringfence calls, for the tests and the lab.

The real SDK clients (``google-cloud-compute``, ``google-cloud-resource-manager``, REST transport,
``AnonymousCredentials``) talk to it on loopback (``client_options={"api_endpoint": url}``), so
what is tested is the SDK's wire format, not a mock of it. It implements only what Ringfence uses:

* compute v1: ``instances`` aggregatedList (paged; a zone made unreachable with
  :meth:`GcpApi.unreachable` answers the ``UNREACHABLE`` scope warning, "A given scope cannot be
  reached", without its VMs, and is listed in ``unreachables`` with ``returnPartialSuccess=true``), get (by name), and list of
  one zone (paged) with a ``filter`` of one AIP-160 comparison ``id = N`` (the numeric id: how
  Ringfence finds a VM by id; anything else is refused with 400; a zone that does not exist,
  not in :data:`ZONES` nor given a VM, answers 404 as on GCE; one made unreachable with
  ``lookups=True`` answers 500); zone and
  global ``operations`` get; network ``firewallPolicies`` list/get/insert/addRule/patchRule/removeRule/
  addAssociation (every mutation answers a finished operation; a rule is answered with the
  output-only ``ruleTupleCount`` and secure tag ``state`` Google adds; as on GCP, a network is
  associated with at most one global network firewall policy: a second ``addAssociation`` of it is
  an error unless ``replaceExistingAssociation=true``; as on GCP, insert adds the four predefined
  ``goto_next`` rules at priorities 2147483644-2147483647 (:data:`PREDEFINED_RULES`), which
  patchRule and removeRule refuse (400; the shape of GCP's error is not verified), and addRule
  refuses a priority above 2147483547);
* Resource Manager v3: ``tagBindings`` and ``effectiveTags`` list by ``parent``;
* Cloud Logging v2: ``entries:list`` over the entries written with :meth:`GcpApi.write_log` (the
  audit entries :mod:`ringfence.local.gcp_events` builds for the changes made here), for
  ``resourceNames`` ``projects/P`` and a filter of ``AND``-joined comparisons of ``logName``,
  ``insertId``, ``timestamp``, ``operation.id``, ``resource.labels.instance_id``,
  ``protoPayload.resourceName`` and ``protoPayload.methodName`` (``:``, has-substring, for the last
  two), a term also a parenthesized
  ``OR`` of such comparisons (what Ringfence sends; anything else is refused with 400);
* the GCE metadata server's identity token path, for one VM (:meth:`GcpApi.serve_metadata_as`);
* Google's OAuth2 certificate endpoint (``/oauth2/v3/certs``, a JWKS) for a local signing key,
  with :meth:`GcpApi.sign_token` minting RS256 tokens shaped like Google's (instance identity
  tokens, Pub/Sub push tokens).

Faults for the bad-input tests: :meth:`GcpApi.throttle` answers the next N API calls (not the
certificate endpoint) with 429 and a ``Retry-After``. Nothing here is a security boundary: loopback only.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ringfence.local.httpd import LabHTTPServer

GOOGLE_ISSUER = "https://accounts.google.com"
# the zones the local API has (GCE's, of the regions the tests use): any other zone answers 404
ZONES = frozenset(
    f"{region}-{z}"
    for region, zs in {"europe-west1": "bcd", "us-central1": "abcf", "asia-southeast1": "abc"}.items()
    for z in zs
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class SigningKey:
    """An RSA key that signs JWTs the way Google's token service does (RS256, a ``kid``)."""

    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def jwk(self) -> dict[str, str]:
        nums = self.key.public_key().public_numbers()
        n = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
        e = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
        return {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid, "n": _b64(n), "e": _b64(e)}

    def sign(self, claims: Mapping[str, Any]) -> str:
        header = {"alg": "RS256", "kid": self.kid, "typ": "JWT"}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(dict(claims)).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(sig)}"


def identity_claims(
    instance: Mapping[str, Any], project: str, project_number: int, audience: str, *, ttl: int = 3600
) -> dict[str, Any]:
    """The claims of an instance identity token with ``format=full`` (cloud_events.md §7.4)."""
    now = int(time.time())
    zone = str(instance["zone"]).rsplit("/", 1)[-1]
    sa = (instance.get("serviceAccounts") or [{"email": f"{project_number}-compute@developer.gserviceaccount.com"}])[0]
    created = instance.get("creationTimestamp")
    return {
        "aud": audience,
        "azp": "1" + str(instance["id"])[:20],
        "email": sa["email"],
        "email_verified": True,
        "exp": now + ttl,
        "iat": now,
        "iss": GOOGLE_ISSUER,
        "sub": "1" + str(instance["id"])[:20],
        "google": {
            "compute_engine": {
                "instance_creation_timestamp": int(created) if isinstance(created, int) else now - 60,
                "instance_id": str(instance["id"]),
                "instance_name": instance["name"],
                "project_id": project,
                "project_number": project_number,
                "zone": zone,
            }
        },
    }


_ids = itertools.count(4340508760561261530)


class GcpApi:
    """The in-memory state and the HTTP server over it (``start()``/``stop()``, ``url``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, page_size: int = 2) -> None:
        self.lock = threading.RLock()
        self.projects: dict[str, int] = {}  # project id → number
        # project → zone → name → instance (the compute v1 JSON)
        self.instances: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        # full resource name (//compute.googleapis.com/projects/NUM/zones/Z/instances/ID) → effective tags
        self.tags: dict[str, list[dict[str, Any]]] = {}
        self.tag_values: dict[str, tuple[str, str]] = {}  # tagValues/N → (namespaced key, namespaced value)
        self.log_entries: list[dict[str, Any]] = []  # Cloud Logging: what write_log stored, oldest first
        # project → policy name → policy JSON (with "rules")
        self.firewall_policies: dict[str, dict[str, dict[str, Any]]] = {}
        self.key = SigningKey()
        self.page_size = page_size
        self.metadata_instance: tuple[str, dict[str, Any]] | None = None
        self.calls: list[tuple[str, str]] = []  # (method, path) of every request, for the tests
        self._throttle: tuple[int, int, str | None] = (0, 1, None)  # calls left to refuse, Retry-After, path
        self.unreachable_zones: set[str] = set()  # zones the aggregated list cannot reach (a fault)
        self.down_zones: set[str] = set()  # zones whose own instances.list fails too (500)
        # the zones that exist (a zone a VM is added to exists too): any other answers 404
        self.zones: set[str] = set(ZONES)
        self._server = LabHTTPServer((host, port), self._handler())
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def jwks_url(self) -> str:
        return self.url + "/oauth2/v3/certs"

    def start(self) -> GcpApi:
        self._thread = threading.Thread(target=self._server.serve_forever, name="gcp-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> GcpApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- state ---------------------------------------------------------------------------------

    def add_project(self, project: str, number: int) -> None:
        with self.lock:
            self.projects[project] = number
            self.instances.setdefault(project, {})
            self.firewall_policies.setdefault(project, {})

    def add_instance(
        self,
        project: str,
        zone: str,
        name: str,
        ips: list[str],
        *,
        labels: Mapping[str, str] | None = None,
        network: str = "default",
        created_by: str | None = None,
        status: str = "RUNNING",
    ) -> dict[str, Any]:
        """A VM with one interface per IP (``created_by``: its managed instance group's URL, set as
        GCE does in the ``created-by`` metadata)."""
        iid = str(next(_ids))
        inst: dict[str, Any] = {
            "kind": "compute#instance",
            "id": iid,
            "name": name,
            "zone": f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{zone}",
            "status": status,
            "labels": dict(labels or {}),
            "labelFingerprint": _b64(uuid.uuid4().bytes[:8]),
            "creationTimestamp": "2026-12-02T12:00:00.000-08:00",
            "selfLink": f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{zone}/instances/{name}",
            "networkInterfaces": [
                {
                    "name": f"nic{i}",
                    "network": f"https://www.googleapis.com/compute/v1/projects/{project}/global/networks/{network}",
                    "subnetwork": f"https://www.googleapis.com/compute/v1/projects/{project}/regions/"
                    f"{zone.rsplit('-', 1)[0]}/subnetworks/{network}",
                    "networkIP": ip,
                }
                for i, ip in enumerate(ips)
            ],
            "serviceAccounts": [{"email": f"{self.projects[project]}-compute@developer.gserviceaccount.com"}],
        }
        if created_by:
            inst["metadata"] = {"items": [{"key": "created-by", "value": created_by}]}
        with self.lock:
            self.zones.add(zone)
            self.instances[project].setdefault(zone, {})[name] = inst
        return inst

    def find(self, project: str, zone: str, name: str) -> dict[str, Any] | None:
        """By name only: ``instances.get`` documents a name (whether GCE also takes the numeric id
        is not relied on, so the stand-in does not answer one)."""
        with self.lock:
            return self.instances.get(project, {}).get(zone, {}).get(name)

    def set_labels(self, project: str, zone: str, name: str, labels: Mapping[str, str]) -> None:
        with self.lock:
            inst = self.instances[project][zone][name]
            inst["labels"] = dict(labels)
            inst["labelFingerprint"] = _b64(uuid.uuid4().bytes[:8])

    def rename(self, project: str, zone: str, name: str, new_name: str) -> dict[str, Any]:
        """``instances.setName``: the same VM (its id, tags, everything) under ``new_name``."""
        with self.lock:
            inst = self.instances[project][zone].pop(name)
            inst["name"] = new_name
            inst["selfLink"] = inst["selfLink"].rsplit("/", 1)[0] + "/" + new_name
            self.instances[project][zone][new_name] = inst
            return inst

    def unreachable(self, *zones: str, lookups: bool = False) -> None:
        """The aggregated list cannot reach ``zones`` (none: every zone answers again);
        ``lookups``: nor can a zone's own ``instances.list`` (it answers 500)."""
        with self.lock:
            self.unreachable_zones = set(zones)
            self.down_zones = set(zones) if lookups else set()

    def delete_instance(self, project: str, zone: str, name: str) -> None:
        with self.lock:
            inst = self.instances[project][zone].pop(name)
            self.tags.pop(self.full_name(project, zone, inst["id"]), None)

    def full_name(self, project: str, zone: str, instance_id: str) -> str:
        return f"//compute.googleapis.com/projects/{self.projects[project]}/zones/{zone}/instances/{instance_id}"

    def tag_value(self, org: str, key: str, value: str) -> str:
        """A secure tag value ``org/key/value`` (created on first use): its ``tagValues/N`` name."""
        with self.lock:
            for name, (_k, v) in self.tag_values.items():
                if v == f"{org}/{key}/{value}":
                    return name
            name = f"tagValues/{next(_ids)}"
            self.tag_values[name] = (f"{org}/{key}", f"{org}/{key}/{value}")
            return name

    def bind_tag(
        self, project: str, zone: str, instance_id: str, org: str, key: str, value: str, *, parent: str | None = None
    ) -> str:
        """Bind the secure tag ``key=value`` to the VM (replacing its value of ``key``). The key is
        ``org``'s (namespace ``org/key``, parent ``organizations/org``), or, with ``parent``
        (``projects/NUMBER``), a project's key (``org`` is then its namespace, the project id)."""
        tv = self.tag_value(org, key, value)
        nk, nv = self.tag_values[tv]
        with self.lock:
            tags = self.tags.setdefault(self.full_name(project, zone, instance_id), [])
            tags[:] = [t for t in tags if t["namespacedTagKey"] != nk]
            tags.append(
                {
                    "tagValue": tv,
                    "namespacedTagValue": nv,
                    "tagKey": f"tagKeys/{abs(hash(nk)) % 10**12}",
                    "namespacedTagKey": nk,
                    "tagKeyParentName": parent or f"organizations/{org}",
                    "inherited": False,
                }
            )
        return tv

    def unbind_tag(self, project: str, zone: str, instance_id: str, org: str, key: str, value: str) -> None:
        """Delete the VM's binding of the secure tag ``org/key/value`` (none: nothing changes)."""
        with self.lock:
            tags = self.tags.setdefault(self.full_name(project, zone, instance_id), [])
            tags[:] = [t for t in tags if t["namespacedTagValue"] != f"{org}/{key}/{value}"]

    def write_log(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Store a log entry as Cloud Logging does (what ``entries:list`` reads); returns it."""
        stored: dict[str, Any] = json.loads(json.dumps(dict(entry)))
        with self.lock:
            self.log_entries.append(stored)
        return stored

    def throttle(self, calls: int, retry_after: int = 1, path: str | None = None) -> None:
        """Answer the next ``calls`` requests (to ``path`` only, if given) with 429 Too Many
        Requests and ``Retry-After``."""
        with self.lock:
            self._throttle = (calls, retry_after, path)

    def sign_token(self, claims: Mapping[str, Any]) -> str:
        return self.key.sign(claims)

    # --- HTTP ----------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _send(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                with api.lock:
                    api.calls.append((method, parts.path))
                    left, retry_after, only = api._throttle
                    if left > 0 and not parts.path.startswith("/oauth2/") and only in (None, parts.path):
                        api._throttle = (left - 1, retry_after, only)
                        self._send(
                            429,
                            _error(429, "Rate Limit Exceeded", "rateLimitExceeded"),
                            {"Retry-After": str(retry_after)},
                        )
                        return
                if parts.path == IDENTITY_PATH and self.headers.get("Metadata-Flavor") != "Google":
                    self._send(403, _error(403, "Missing Metadata-Flavor:Google header", "forbidden"))
                    return
                try:
                    body = json.loads(raw) if raw else {}
                    status, answer = api.route(method, parts.path, query, body)
                except _HttpError as exc:
                    status, answer = exc.status, _error(exc.status, exc.message, exc.reason)
                if isinstance(answer, str):  # the metadata server answers the token as text
                    data = answer.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self._send(status, answer)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_PATCH(self) -> None:
                self._serve("PATCH")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        return Handler

    def serve_metadata_as(self, project: str, instance: Mapping[str, Any] | None) -> None:
        """Answer the GCE metadata server's identity token path as ``instance`` would see it."""
        with self.lock:
            self.metadata_instance = (project, dict(instance)) if instance is not None else None

    def route(self, method: str, path: str, query: dict[str, str], body: dict[str, Any]) -> tuple[int, Any]:
        if path == "/oauth2/v3/certs":
            return 200, {"keys": [self.key.jwk()]}
        if path == IDENTITY_PATH and self.metadata_instance is not None:
            if query.get("format") != "full" or not query.get("audience"):
                raise _HttpError(400, "audience and format=full are expected", "badRequest")
            project, inst = self.metadata_instance
            claims = identity_claims(inst, project, self.projects[project], query["audience"])
            return 200, self.sign_token(claims)
        if path in ("/v3/effectiveTags", "/v3/tagBindings"):
            return 200, self._tags(path.endswith("effectiveTags"), query)
        if path == "/v2/entries:list" and method == "POST":
            return 200, self._entries(body)
        m = _COMPUTE.match(path)
        if not m:
            raise _HttpError(404, f"no such API path {path}", "notFound")
        project, rest = m["project"], m["rest"]
        with self.lock:
            if project not in self.projects:
                raise _HttpError(404, f"The resource 'projects/{project}' was not found", "notFound")
            if method == "GET" and rest == "aggregated/instances":
                return 200, self._aggregated(project, query)
            if method == "GET" and (z := re.fullmatch(r"zones/([^/]+)/instances", rest)):
                return 200, self._list(project, z[1], query)
            if method == "GET" and (z := re.fullmatch(r"zones/([^/]+)/instances/([^/]+)", rest)):
                found = self.find(project, z[1], unquote(z[2]))
                if found is None:
                    raise _HttpError(
                        404, f"The resource 'projects/{project}/zones/{z[1]}/instances/{z[2]}' was not found"
                    )
                return 200, found
            if method == "GET" and (o := re.fullmatch(r"(?:zones/([^/]+)/|global/)operations/([^/]+)", rest)):
                return 200, _operation(project, o[2], zone=o[1])
            if rest.startswith("global/firewallPolicies"):
                return self._firewall(method, project, rest.removeprefix("global/firewallPolicies"), query, body)
        raise _HttpError(404, f"no such API path {path}", "notFound")

    def _list(self, project: str, zone: str, query: dict[str, str]) -> dict[str, Any]:
        """``instances.list`` of one zone, filtered by ``id = N`` (AIP-160; the id a number)."""
        if zone not in self.zones:  # as GCE answers a zone that does not exist
            raise _HttpError(404, f"The resource 'projects/{project}/zones/{zone}' was not found", "notFound")
        if zone in self.down_zones:
            raise _HttpError(500, f"zones/{zone} is unreachable", "backendError")
        text = query.get("filter", "").strip()
        m = re.fullmatch(r"\(?\s*id\s*=\s*\"?(\d+)\"?\s*\)?", text)
        if text and m is None:
            raise _HttpError(400, f"the local API filters instances by 'id = N' only, not {text!r}", "badRequest")
        found = [i for _, i in sorted(self.instances[project].get(zone, {}).items()) if m is None or i["id"] == m[1]]
        size = int(query.get("maxResults") or self.page_size)
        start = int(query.get("pageToken") or 0)
        out: dict[str, Any] = {"kind": "compute#instanceList", "items": found[start : start + size]}
        if start + size < len(found):
            out["nextPageToken"] = str(start + size)
        return out

    def _aggregated(self, project: str, query: dict[str, str]) -> dict[str, Any]:
        gone = self.unreachable_zones
        flat = [
            (z, i)
            for z, items in sorted(self.instances[project].items())
            if z not in gone
            for _, i in sorted(items.items())
        ]
        size = int(query.get("maxResults") or self.page_size)
        start = int(query.get("pageToken") or 0)
        page = flat[start : start + size]
        items: dict[str, Any] = {}
        for z, inst in page:
            items.setdefault(f"zones/{z}", {"instances": []})["instances"].append(inst)
        # zones without instances answer a warning, as GCE does
        items.setdefault("zones/europe-west1-b", {"warning": {"code": "NO_RESULTS_ON_PAGE", "message": "none"}})
        for z in sorted(gone):  # a scope that could not be reached answers a warning, not its VMs
            items[f"zones/{z}"] = {"warning": {"code": "UNREACHABLE", "message": f"zones/{z} is unreachable"}}
        out: dict[str, Any] = {"kind": "compute#instanceAggregatedList", "items": items}
        if gone and query.get("returnPartialSuccess") == "true":
            out["unreachables"] = [f"zones/{z}" for z in sorted(gone)]
        if start + size < len(flat):
            out["nextPageToken"] = str(start + size)
        return out

    def _tags(self, effective: bool, query: dict[str, str]) -> dict[str, Any]:
        parent = query.get("parent", "")
        if not parent.startswith("//"):
            raise _HttpError(400, "parent must be a full resource name", "badRequest")
        with self.lock:
            known = {
                self.full_name(p, z, str(i["id"]))
                for p, zones in self.instances.items()
                for z, items in zones.items()
                for i in items.values()
            }
        if parent not in known:
            # what Resource Manager answers for a resource that does not exist (or is not visible)
            raise _HttpError(
                403,
                "The caller does not have permission or the resource may not exist in this location",
                "PERMISSION_DENIED",
            )
        with self.lock:
            tags = list(self.tags.get(parent, []))
        if effective:
            return {"effectiveTags": tags}
        return {
            "tagBindings": [
                {
                    "name": f"tagBindings/{parent.replace('/', '%2F')}/{t['tagValue']}",
                    "parent": parent,
                    "tagValue": t["tagValue"],
                    "tagValueNamespacedName": t["namespacedTagValue"],
                }
                for t in tags
            ]
        }

    def _entries(self, body: dict[str, Any]) -> dict[str, Any]:
        """``entries:list``: the stored entries of the named projects that match the filter."""
        names = body.get("resourceNames")
        if not isinstance(names, list) or not names:
            raise _HttpError(400, "resourceNames is required", "INVALID_ARGUMENT")
        prefixes = []
        for name in names:
            m = re.fullmatch(r"projects/([^/]+)", str(name))
            if not m or m[1] not in self.projects:
                raise _HttpError(403, f"The caller does not have permission on {name}", "PERMISSION_DENIED")
            prefixes.append(f"projects/{m[1]}/logs/")
        terms = _log_filter(str(body.get("filter") or ""))
        with self.lock:
            found = [
                e
                for e in self.log_entries
                if any(str(e.get("logName", "")).startswith(p) for p in prefixes)
                and all(any(_matches(e, *term) for term in group) for group in terms)
            ]
        found.sort(key=lambda e: str(e.get("timestamp", "")), reverse=body.get("orderBy") == "timestamp desc")
        size = min(int(body.get("pageSize") or 50), 1000)
        start = int(body.get("pageToken") or 0)
        out: dict[str, Any] = {"entries": found[start : start + size]}
        if start + size < len(found):
            out["nextPageToken"] = str(start + size)
        return out

    def _firewall(
        self, method: str, project: str, rest: str, query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        policies = self.firewall_policies[project]
        if rest == "" and method == "GET":
            return 200, {"items": list(policies.values())}
        if rest == "" and method == "POST":
            name = body.get("name") or ""
            if name in policies:
                raise _HttpError(
                    409,
                    f"The resource 'projects/{project}/global/firewallPolicies/{name}' already exists",
                    "alreadyExists",
                )
            policies[name] = {
                "kind": "compute#firewallPolicy",
                "id": str(next(_ids)),
                "name": name,
                "description": body.get("description", ""),
                "rules": [_stored_rule(r) for r in PREDEFINED_RULES],
                "associations": [],
                "fingerprint": _b64(uuid.uuid4().bytes[:8]),
            }
            return 200, _operation(project, f"operation-{uuid.uuid4().hex}", done=True)
        m = re.fullmatch(r"/([^/]+)(?:/(addRule|patchRule|removeRule|getRule|addAssociation))?", rest)
        if not m or m[1] not in policies:
            raise _HttpError(404, f"The resource 'projects/{project}/global/firewallPolicies{rest}' was not found")
        policy, verb = policies[m[1]], m[2]
        rules: list[dict[str, Any]] = policy["rules"]
        if verb is None and method == "GET":
            return 200, policy
        if verb == "getRule":
            rule = next((r for r in rules if r["priority"] == int(query.get("priority", -1))), None)
            if rule is None:
                raise _HttpError(404, "no rule at that priority")
            return 200, rule
        if verb in ("patchRule", "removeRule") and int(query.get("priority", -1)) > MAX_RULE_PRIORITY:
            raise _HttpError(
                400,
                f"Invalid value for field 'priority': {query.get('priority')}. "
                "A predefined rule of a firewall policy cannot be modified or removed.",
                "invalid",
            )
        if verb == "addRule":
            if not 0 <= int(body.get("priority", -1)) <= MAX_RULE_PRIORITY:
                raise _HttpError(
                    400,
                    f"Invalid value for field 'priority': {body.get('priority')}. "
                    f"It must be between 0 and {MAX_RULE_PRIORITY}.",
                    "invalid",
                )
            if any(r["priority"] == body.get("priority") for r in rules):
                raise _HttpError(400, f"a rule with priority {body.get('priority')} already exists", "invalid")
            rules.append(_stored_rule(body))
        elif verb == "patchRule":
            prio = int(query.get("priority", -1))
            idx = next((i for i, r in enumerate(rules) if r["priority"] == prio), None)
            if idx is None:
                raise _HttpError(404, f"no rule at priority {prio}")
            rules[idx] = _stored_rule({**body, "priority": prio})
        elif verb == "removeRule":
            prio = int(query.get("priority", -1))
            if not any(r["priority"] == prio for r in rules):
                raise _HttpError(404, f"no rule at priority {prio}")
            policy["rules"] = [r for r in rules if r["priority"] != prio]
        elif verb == "addAssociation":
            # as GCP: a network has at most one global network firewall policy; a second
            # association of it is an error unless replaceExistingAssociation is set
            target = body.get("attachmentTarget", "")
            holder = next(
                (p for p in policies.values() if any(a.get("attachmentTarget") == target for a in p["associations"])),
                None,
            )
            if holder is not None:
                if query.get("replaceExistingAssociation") != "true":
                    raise _HttpError(
                        400,
                        f"An association with the attachment target {target} already exists"
                        f" (firewall policy {holder['name']})",
                        "invalid",
                    )
                holder["associations"] = [a for a in holder["associations"] if a.get("attachmentTarget") != target]
            policy["associations"].append({**body, "firewallPolicyId": policy["id"], "shortName": policy["name"]})
        else:
            raise _HttpError(405, f"{method} not supported on {rest}")
        policy["fingerprint"] = _b64(uuid.uuid4().bytes[:8])
        return 200, _operation(project, f"operation-{uuid.uuid4().hex}", done=True)


# the lowest priority a rule added to a firewall policy may take, and the rules GCP adds to a
# network firewall policy created through the API (they cannot be modified or removed):
# https://cloud.google.com/firewall/docs/firewall-policies-rule-details,
# https://cloud.google.com/firewall/docs/pre-defined-rules
MAX_RULE_PRIORITY = 2147483547
PREDEFINED_RULES: tuple[dict[str, Any], ...] = tuple(
    {
        "priority": priority,
        "direction": direction,
        "action": "goto_next",
        "match": {ranges: [cidr], "layer4Configs": [{"ipProtocol": "all"}]},
    }
    for priority, direction, ranges, cidr in (
        (2147483644, "EGRESS", "destIpRanges", "::/0"),
        (2147483645, "INGRESS", "srcIpRanges", "::/0"),
        (2147483646, "EGRESS", "destIpRanges", "0.0.0.0/0"),
        (2147483647, "INGRESS", "srcIpRanges", "0.0.0.0/0"),
    )
)


def _stored_rule(body: dict[str, Any]) -> dict[str, Any]:
    """A firewall policy rule as the API answers it: with the output-only fields Google adds (the
    rule's ``ruleTupleCount``, each secure tag's ``state``), so a reader must tell them apart."""
    rule: dict[str, Any] = {"kind": "compute#firewallPolicyRule", **json.loads(json.dumps(body))}
    match = rule.get("match") or {}
    for tag in [*match.get("srcSecureTags", []), *rule.get("targetSecureTags", [])]:
        tag.setdefault("state", "EFFECTIVE")
    rule["ruleTupleCount"] = 1 + sum(len(v) for v in match.values() if isinstance(v, list))
    return rule


IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"
_COMPUTE = re.compile(r"^/compute/v1/projects/(?P<project>[^/]+)/(?P<rest>.+)$")


_TERM = re.compile(
    r"\s*(NOT\s+)?(logName|insertId|timestamp|operation\.id|resource\.labels\.instance_id|protoPayload\.resourceName"
    r"|protoPayload\.methodName|severity|protoPayload\.status\.code)"
    r'\s*(>=|<=|!=|=|>|<|:)\s*(?:"((?:[^"\\]|\\.)*)"|(-?[0-9]+)\b)\s*'
)
_AND = re.compile(r"AND\b")
_OR = re.compile(r"OR\b")
_OPEN = re.compile(r"\s*\(")
_CLOSE = re.compile(r"\)\s*")


def _log_filter(text: str) -> list[list[tuple[bool, str, str, str]]]:
    """The filter's terms, joined by ``AND``: each a comparison (``name op "value"``, or an
    integer unquoted; ``NOT`` before it negates it) or a parenthesized ``OR`` of comparisons, as
    the alternatives of which one must match; 400 for anything else."""
    terms: list[list[tuple[bool, str, str, str]]] = []
    pos = 0
    while pos < len(text) and text[pos:].strip():
        if terms:
            m = _AND.match(text, pos)
            if not m:
                raise _HttpError(
                    400, f"unsupported filter at {text[pos:]!r} (terms are joined by AND)", "INVALID_ARGUMENT"
                )
            pos = m.end()
        group: list[tuple[bool, str, str, str]] = []
        opened = _OPEN.match(text, pos)
        if opened:
            pos = opened.end()
        while True:
            t = _TERM.match(text, pos)
            if not t:
                raise _HttpError(
                    400,
                    f"unsupported filter at {text[pos:]!r} (the stand-in knows logName, insertId, timestamp, "
                    "operation.id, resource.labels.instance_id, protoPayload.resourceName, protoPayload.methodName, "
                    "severity, protoPayload.status.code)",
                    "INVALID_ARGUMENT",
                )
            value = t[5] if t[4] is None else re.sub(r"\\(.)", r"\1", t[4])
            if t[4] is None and t[2] != "protoPayload.status.code":
                raise _HttpError(400, f"{t[2]} is compared with a quoted string here", "INVALID_ARGUMENT")
            group.append((bool(t[1]), t[2], t[3], value))
            pos = t.end()
            if not opened or not (alt := _OR.match(text, pos)):
                break
            pos = alt.end()
        if opened:
            closed = _CLOSE.match(text, pos)
            if not closed:
                raise _HttpError(400, f"unsupported filter at {text[pos:]!r} (an unclosed group)", "INVALID_ARGUMENT")
            pos = closed.end()
        terms.append(group)
    return terms


def _when(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _HttpError(400, f"not an RFC 3339 timestamp: {value!r}", "INVALID_ARGUMENT") from None


def _matches(entry: Mapping[str, Any], negated: bool, name: str, op: str, value: str) -> bool:
    """Whether ``entry`` matches the comparison (``NOT`` of it if ``negated``) as Cloud Logging
    means it: a missing ``severity`` is ``DEFAULT``; a comparison with another missing field is
    false (its ``NOT`` true)."""
    return _compares(entry, name, op, value) != negated


def _compares(entry: Mapping[str, Any], name: str, op: str, value: str) -> bool:
    if name == "severity":
        if op not in ("=", "!="):
            raise _HttpError(400, "severity is compared with = or != only here", "INVALID_ARGUMENT")
        return (str(entry.get("severity") or "DEFAULT") == value) == (op == "=")
    if name == "timestamp":
        want = _when(value)
        try:
            have = _when(str(entry.get("timestamp", "")))
        except _HttpError:
            return False  # a stored entry without a time matches no time
        if op == ":":
            raise _HttpError(400, "timestamp is not compared with : here", "INVALID_ARGUMENT")
        return {"=": have == want, ">=": have >= want, "<=": have <= want, ">": have > want, "<": have < want}[op]
    have_field: Any = entry
    for part in name.split("."):  # a dotted path into the entry (operation.id, resource.labels.…)
        have_field = have_field.get(part) if isinstance(have_field, Mapping) else None
    if name == "protoPayload.status.code":
        try:
            want_code = int(value)
        except ValueError:
            raise _HttpError(400, f"not an integer: {value!r}", "INVALID_ARGUMENT") from None
        if op in (":", "!="):
            raise _HttpError(400, f"{name} is not compared with {op} here", "INVALID_ARGUMENT")
        if not isinstance(have_field, int) or isinstance(have_field, bool):
            return False  # missing: no comparison matches
        return {
            "=": have_field == want_code,
            ">=": have_field >= want_code,
            "<=": have_field <= want_code,
            ">": have_field > want_code,
            "<": have_field < want_code,
        }[op]
    text = "" if have_field is None or isinstance(have_field, Mapping | list) else str(have_field)
    if op == ":" and name in ("protoPayload.resourceName", "protoPayload.methodName"):
        return value in text
    if op != "=":
        raise _HttpError(400, f"{name} is compared with = only here", "INVALID_ARGUMENT")
    return text == value


class _HttpError(Exception):
    def __init__(self, status: int, message: str, reason: str = "notFound") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def _error(status: int, message: str, reason: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "errors": [{"message": message, "reason": reason}]}}


def _operation(project: str, name: str, *, zone: str | None = None, done: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {
        "kind": "compute#operation",
        "id": str(next(_ids)),
        "name": name,
        "status": "DONE" if done else "RUNNING",
        "progress": 100 if done else 0,
        "selfLink": f"https://www.googleapis.com/compute/v1/projects/{project}/global/operations/{name}",
    }
    if zone:
        op["zone"] = zone
    return op
