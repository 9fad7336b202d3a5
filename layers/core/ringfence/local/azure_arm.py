"""A local Azure Resource Manager: the ARM REST calls Ringfence makes, on loopback, for the real
azure-mgmt-compute and azure-mgmt-network clients (tests and the lab).

Resources are kept by their ARM id (case-insensitive, as ARM compares them). What is served:

* ``GET`` a resource (404 ``ResourceNotFound`` else), ``GET`` a collection — a subscription-wide
  ``list_all`` (``/subscriptions/{s}/providers/{ns}/{type}``), a resource group's ``list``, a
  child collection (scale-set VMs, their NICs) — paged with ``nextLink`` as ARM pages;
* ``PUT`` (create or replace: ``201`` with ``Azure-AsyncOperation`` and ``Retry-After``, as ARM
  answers a long-running create; the operation reads ``Succeeded``), ``PATCH`` (tags merged in,
  ``200``), ``DELETE`` (``202`` with ``Location``; the location answers ``204`` once gone);
* etags as ARM's resource provider contract has them: every write gives the resource a new
  ``etag`` (in the body, and the ``ETag`` header of a single read or write); a ``PUT``, ``PATCH`` or
  ``DELETE`` with ``If-Match`` is ``412 PreconditionFailed`` unless the resource exists and the
  value is its etag or ``*``, one with ``If-None-Match: *`` is ``412`` when it exists (a ``DELETE``
  of what is gone stays ``204``, a ``PATCH`` of it ``404``);
* a bearer token on every call (401 without one), and injected throttling (``429`` with
  ``Retry-After``) for the next calls, as ARM throttles a subscription;
* :meth:`ArmServer.before`: another client's write landing just before a request is handled (the
  race a read-modify-write must survive), for tests.

This is not a model of Azure: it stores what it is given and fills in ``id``, ``name``, ``type``,
``etag`` and ``provisioningState``. Callers seed VMs and NICs with :meth:`ArmServer.put`.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from ringfence.local.httpd import LabHTTPServer

PAGE_SIZE = 50
# ARM's rule for ASG and NSG names (1-80 characters; alphanumerics, _ . -; starting alphanumeric,
# ending alphanumeric or _): another is refused with InvalidResourceName, as ARM does
ARM_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,78}[A-Za-z0-9_]$")
NAME_RULED = ("applicationsecuritygroups", "networksecuritygroups")
# read-only properties ARM keeps across a PUT that leaves them out (the SDK drops read-only fields)
PLATFORM_SET = ("virtualMachine", "vmId", "macAddress", "virtualMachineScaleSet")


def _segments(path: str) -> tuple[str, str | None, list[str]] | None:
    """``/subscriptions/s[/resourceGroups/rg]/providers/ns/t[/n/t2…]`` → (s, rg, [ns, t, n, t2…])."""
    parts = [p for p in path.split("/") if p]
    if len(parts) < 4 or parts[0].lower() != "subscriptions":
        return None
    sub, rest = parts[1], parts[2:]
    rg = None
    if rest and rest[0].lower() == "resourcegroups":
        if len(rest) < 2:
            return None
        rg, rest = rest[1], rest[2:]
    if not rest or rest[0].lower() != "providers" or len(rest) < 3:
        return None
    return sub, rg, rest[1:]


class ArmServer:
    """``with ArmServer() as arm:`` — ``arm.url`` is the ``base_url`` for the SDK clients."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, page_size: int = PAGE_SIZE) -> None:
        self.resources: dict[str, dict[str, Any]] = {}  # lower-case id → resource
        self.deleting: set[str] = set()  # operation ids of deletes (all finish at once)
        self.page_size = page_size
        self.requests: list[tuple[str, str]] = []  # (method, path) in order, for tests
        self._throttle: list[int] = []  # Retry-After seconds of the next 429 answers
        self._before: list[tuple[str, str, Callable[[], object]]] = []  # (method, lower-case id, what runs)
        self._lock = threading.Lock()
        arm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                return None

            def _answer(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("x-ms-request-id", str(uuid.uuid4()))
                if body is not None:
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                with arm._lock:
                    arm.requests.append((method, self.path))
                    throttle = arm._throttle.pop(0) if arm._throttle else None
                    target = urlsplit(self.path).path.rstrip("/").lower()
                    hook = next((h for h in arm._before if (h[0], h[1]) == (method, target)), None)
                    if hook is not None:
                        arm._before.remove(hook)
                if hook is not None:  # outside the lock: it writes through the server's own methods
                    hook[2]()
                if not (self.headers.get("Authorization") or "").startswith("Bearer "):
                    return self._answer(401, _error("AuthenticationFailed", "no bearer token"))
                if throttle is not None:
                    return self._answer(
                        429,
                        _error("TooManyRequests", "subscription throttled"),
                        {"Retry-After": str(throttle)},
                    )
                body = json.loads(raw) if raw else None
                conditions = {k: v for k in ("If-Match", "If-None-Match") if (v := self.headers.get(k)) is not None}
                status, out, headers = arm.handle(method, self.path, body, conditions)
                self._answer(status, out, headers)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self._server = LabHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # --- lifecycle

    def start(self) -> ArmServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-arm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ArmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- seeding and inspection (what the portal or Terraform would have made)

    def put(self, resource_id: str, resource: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return self._store(resource_id, resource)

    def get(self, resource_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self.resources.get(resource_id.lower())

    def delete(self, resource_id: str) -> None:
        with self._lock:
            self.resources.pop(resource_id.lower(), None)

    def throttle(self, times: int = 1, retry_after: int = 1) -> None:
        """The next ``times`` requests are answered 429 with ``Retry-After: retry_after``."""
        with self._lock:
            self._throttle.extend([retry_after] * times)

    def before(self, method: str, resource_id: str, fn: Callable[[], object], times: int = 1) -> None:
        """``fn`` runs before each of the next ``times`` ``method`` requests on ``resource_id`` is
        handled: another client's write that lands between a caller's read and its write."""
        with self._lock:
            self._before.extend([(method, resource_id.lower(), fn)] * times)

    @contextmanager
    def recording(self) -> Iterator[list[tuple[str, str]]]:
        """The requests made inside the block."""
        with self._lock:
            start = len(self.requests)
        out: list[tuple[str, str]] = []
        yield out
        with self._lock:
            out.extend(self.requests[start:])

    # --- ARM

    def _store(self, resource_id: str, resource: dict[str, Any]) -> dict[str, Any]:
        seg = _segments(resource_id)
        if seg is None or len(seg[2]) % 2 == 0:
            raise ValueError(f"not an ARM resource id: {resource_id!r}")
        names = seg[2]
        rtype = "/".join([names[0], *names[1::2]])
        res: dict[str, Any] = json.loads(json.dumps(resource))  # a copy: callers keep theirs
        res["id"] = resource_id
        res["name"] = names[-1]
        res["type"] = rtype
        res["etag"] = f'W/"{uuid.uuid4()}"'
        res.setdefault("properties", {})["provisioningState"] = "Succeeded"
        self.resources[resource_id.lower()] = res
        return res

    def handle(
        self, method: str, target: str, body: Any, conditions: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        """One request; ``conditions``: its ``If-Match`` and ``If-None-Match`` headers."""
        url = urlsplit(target)
        path = url.path.rstrip("/")
        query = parse_qs(url.query)
        if "api-version" not in query:
            return 400, _error("MissingApiVersionParameter", "api-version is required"), {}
        if "/operationstatuses/" in path.lower():  # Azure-AsyncOperation of a create
            return 200, {"status": "Succeeded"}, {}
        if "/operationresults/" in path.lower():  # Location of a delete
            return 204, None, {}
        seg = _segments(path)
        if seg is None:
            return 404, _error("InvalidResourceType", f"no such ARM path: {path}"), {}
        sub, rg, names = seg
        with self._lock:
            if len(names) % 2 == 0:
                if method != "GET":
                    return 405, _error("MethodNotAllowed", f"{method} on a collection"), {}
                return self._list(target, sub, rg, names, query)
            key = path.lower()
            if method == "GET":
                res = self.resources.get(key)
                if res is None:
                    return 404, _error("ResourceNotFound", f"The Resource '{'/'.join(names)}' was not found."), {}
                return 200, res, {"ETag": res["etag"]}
            current = self.resources.get(key)
            if not (method == "PATCH" and current is None) and not (method == "DELETE" and current is None):
                refused = _precondition(conditions or {}, current)
                if refused:
                    return 412, _error("PreconditionFailed", refused), {}
            if method == "PUT":
                if not isinstance(body, dict):
                    return 400, _error("InvalidRequestContent", "a JSON object is required"), {}
                if len(names) == 3 and names[1].lower() in NAME_RULED and not ARM_NETWORK_NAME.match(unquote(names[2])):
                    return 400, _error("InvalidResourceName", f"Resource name {unquote(names[2])} is invalid."), {}
                created = key not in self.resources
                if not created:  # what the platform sets is not the caller's to drop (ARM ignores it in a PUT)
                    old = self.resources[key].get("properties") or {}
                    props = body.setdefault("properties", {})
                    for k in PLATFORM_SET:
                        if k in old and k not in props:
                            props[k] = old[k]
                res = self._store(path, body)
                if not created:
                    return 200, res, {"ETag": res["etag"]}
                op = f"{self._base(sub, names)}/locations/{res.get('location', 'local')}/operationStatuses/{uuid.uuid4()}"
                return (
                    201,
                    res,
                    {
                        "Azure-AsyncOperation": op + "?api-version=" + query["api-version"][0],
                        "Retry-After": "0",
                        "ETag": res["etag"],
                    },
                )
            if method == "PATCH":
                res = self.resources.get(key)
                if res is None:
                    return 404, _error("ResourceNotFound", f"The Resource '{'/'.join(names)}' was not found."), {}
                if isinstance(body, dict) and "tags" in body:
                    res["tags"] = dict(body["tags"] or {})
                res["etag"] = f'W/"{uuid.uuid4()}"'
                return 200, res, {"ETag": res["etag"]}
            if method == "DELETE":
                if self.resources.pop(key, None) is None:
                    return 204, None, {}
                loc = f"{self._base(sub, names)}/locations/local/operationResults/{uuid.uuid4()}"
                return 202, None, {"Location": loc + "?api-version=" + query["api-version"][0], "Retry-After": "0"}
        return 405, _error("MethodNotAllowed", method), {}

    def _base(self, sub: str, names: list[str]) -> str:
        return f"{self.url}/subscriptions/{sub}/providers/{names[0]}"

    def _list(
        self, target: str, sub: str, rg: str | None, names: list[str], query: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        want = [n.lower() for n in names]
        found = []
        for res in self.resources.values():
            seg = _segments(res["id"])
            assert seg is not None
            s, r, n = seg
            if s.lower() != sub.lower() or (rg is not None and (r or "").lower() != rg.lower()):
                continue
            low = [x.lower() for x in n]
            if len(n) == len(want) + 1 and low[:-1] == want:
                found.append(res)
            elif (
                _scale_set_wide(want)
                and len(n) == 7
                and low[:3] == want[:3]
                and low[3::2] == ["virtualmachines", want[3]]
            ):
                found.append(res)  # a scale set's NICs of all its instances, as ARM lists them
        found.sort(key=lambda r: r["id"].lower())
        skip = int(query.get("$skiptoken", ["0"])[0])
        page = found[skip : skip + self.page_size]
        out: dict[str, Any] = {"value": page}
        if skip + self.page_size < len(found):
            url = urlsplit(target)
            q = {k: v[0] for k, v in query.items()}
            q["$skiptoken"] = str(skip + self.page_size)
            out["nextLink"] = f"{self.url}{url.path}?{urlencode(q)}"
        return 200, out, {}


def _scale_set_wide(want: list[str]) -> bool:
    """``…/virtualMachineScaleSets/{ss}/networkInterfaces``: the set's instances' NICs."""
    return len(want) == 4 and want[1] == "virtualmachinescalesets" and want[3] == "networkinterfaces"


def _precondition(conditions: dict[str, str], current: dict[str, Any] | None) -> str | None:
    """Why a write's ``If-Match`` / ``If-None-Match`` refuses it against the resource as held
    (``None``: it does not exist), or None: ARM's resource provider contract."""
    match = {k.lower(): v.strip() for k, v in conditions.items()}
    if "if-match" in match:
        want = match["if-match"]
        if current is None:
            return "If-Match given and the resource does not exist."
        if want != "*" and want != current.get("etag"):
            return f"The etag {want} does not match the resource's current etag {current.get('etag')}."
    if match.get("if-none-match") == "*" and current is not None:
        return "If-None-Match: * given and the resource exists."
    return None


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
