"""Where bundles come from: the agent API (enroll + bearer token) or a static directory / URL."""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from ringfence.agentwire import API_PREFIX, ROUTES, Heartbeat, ReportBatch, ResponseError, TokenRequest, read_response
from ringfence.bundlewire import Bundle, BundleError, SetDelta, delta_from_json, load_bundle, load_delta
from ringfence.staticlayout import Head, HeadError, bundle_path, delta_path, head_path, load_head
from ringfence_agent.agentkey import KEY_FILE, AgentKey
from ringfence_agent.enroll import ProofError, Prover
from ringfence_agent.logline import log
from ringfence_agent.state import StateDir

# default cap of a bundle body: 100,000 addresses are ~2 MB, and parsing costs ~6x the body in
# memory, so 16 MiB (~800,000 addresses) keeps the agent under a 128 MiB service limit
MAX_BUNDLE_BYTES = 16 * 1024 * 1024
MAX_HEAD_BYTES = 1024 * 1024  # a static head: a version per set
MAX_ANSWER_BYTES = 256 * 1024  # the agent API's small answers (nonce, enroll, wait, heartbeat, reports)
MAX_ERROR_BYTES = 64 * 1024  # what is kept of an error answer's body (for messages only)
MAX_CHAIN_LINKS = 64  # deltas a static source walks per poll; further behind, the whole bundle


# The control plane's addresses that a TLS handshake proved: the peer of a connection to a host
# name whose certificate verified for that name (CERT_REQUIRED, hostname checked), not through a
# proxy. host name → {address: time.monotonic() of the last such handshake}. The daemon keeps an
# address it resolved earlier in the control-plane fail-safe only when it is here (a DNS answer
# alone is trusted until the next answer: whoever spoofs it once would otherwise open a port).
_verified_lock = threading.Lock()
_verified: dict[str, dict[str, float]] = {}
MAX_VERIFIED_PER_HOST = 256  # a bound on memory, not a policy (the daemon keeps the newest 64)


def note_verified_peer(host: str, sock: object) -> None:
    """Record ``sock``'s peer address for ``host`` when ``sock`` is a TLS socket whose handshake
    verified the certificate against ``host`` (what http.client's HTTPS connections do with a
    default or ``tls_context`` context)."""
    if not isinstance(sock, ssl.SSLSocket):
        return
    ctx = sock.context
    if ctx.verify_mode != ssl.CERT_REQUIRED or not ctx.check_hostname or sock.server_hostname != host:
        return
    try:
        address = str(sock.getpeername()[0]).split("%")[0]
    except (OSError, IndexError):
        return
    with _verified_lock:
        seen = _verified.setdefault(host.lower(), {})
        seen[address] = time.monotonic()
        if len(seen) > MAX_VERIFIED_PER_HOST:
            for old in sorted(seen, key=seen.__getitem__)[: len(seen) - MAX_VERIFIED_PER_HOST]:
                del seen[old]


def verified_peers(host: str, within: float) -> dict[str, float]:
    """The addresses a verified TLS handshake to ``host`` reached in the last ``within`` seconds,
    with the monotonic time of the last one (older ones are forgotten)."""
    now = time.monotonic()
    with _verified_lock:
        seen = _verified.get(host.lower(), {})
        for a in [a for a, t in seen.items() if now - t > within]:
            del seen[a]
        return dict(seen)


class _VerifiedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection that records its peer once the handshake verified the certificate
    (:func:`note_verified_peer`); through a proxy's tunnel the peer is the proxy: not recorded."""

    def connect(self) -> None:
        super().connect()
        if getattr(self, "_tunnel_host", None) is None:
            note_verified_peer(self.host, self.sock)


class _VerifiedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext | None) -> None:
        super().__init__(context=context)
        self._ctx = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_VerifiedHTTPSConnection, req, context=self._ctx)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is the answer: urllib would follow it with the request's headers, bearer token
    included, to wherever the ``Location`` names."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Unreachable(Exception):
    """The source cannot be reached now (network, 5xx, 429): back off and keep enforcing.
    ``throttled``: the answer was a 429; ``retry_after``: its ``Retry-After`` in seconds, as the
    server gave it (None: none, or unreadable; the daemon caps it)."""

    def __init__(self, message: str, throttled: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.throttled = throttled
        self.retry_after = retry_after


def retry_after(headers: Any, now: float | None = None) -> float | None:
    """A ``Retry-After`` header's seconds (delta-seconds or an HTTP date; RFC 9110), at least 0;
    None when there is none or it does not read. ``headers``: a mapping or an email Message."""
    raw = next((str(v) for k, v in headers.items() if str(k).lower() == "retry-after"), None) if headers else None
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isascii() and raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _unreachable(where: str, status: int, headers: Any) -> Unreachable:
    """A 5xx or 429 answer as :class:`Unreachable` (a 429 with its ``Retry-After``)."""
    if status == 429:
        return Unreachable(f"{where}: HTTP 429", throttled=True, retry_after=retry_after(headers))
    return Unreachable(f"{where}: HTTP {status}")


class SourceError(Exception):
    """The source answered, but not usefully (4xx other than 401/409): logged, backed off."""


class Blocked(SourceError):
    """A 403 from a route that takes no bearer token (the nonce, the nonce-path token request):
    the control plane answers those 401, so this is a gateway in front refusing the address (a
    web ACL's plain block); a token the agent holds says nothing about it."""


class Source(Protocol):
    kind: str
    # fetches made: bundle and delta requests or reads (deltas that came with a wait's answer
    # are not one); the daemon reports them per sync
    fetches: int

    def wait(self, version: int | None, timeout: float, stop: threading.Event) -> int | None:
        """Block until something newer than ``version`` may exist or ``timeout``; return the latest
        version when the source knows it."""
        ...

    def announced(self) -> int | None:
        """The newest version the source publishes, when it can tell cheaply (a static head);
        None when it cannot (the agent API announces through ``wait`` and heartbeats)."""
        ...

    def bundle(self) -> Bundle | None:
        """The whole bundle; None when unchanged since the last one :meth:`settled` (an ETag's 304)
        or not published."""
        ...

    def settled(self) -> None:
        """The bundle last returned by :meth:`bundle` was applied, or refused for good: later
        fetches may answer "unchanged". Not called when its apply failed, so the next poll fetches
        it again instead of being told nothing changed."""
        ...

    def deltas(self, since: int, sets: dict[str, int], bundle_version: int) -> list[SetDelta] | None:
        """Signed deltas after revision ``since`` for the applied ``sets`` (name → version) of the
        applied bundle (``bundle_version``); None when deltas cannot bridge (fetch the whole bundle)."""
        ...

    def heartbeat(self, hb: Heartbeat) -> int | None: ...

    def report(self, batch: ReportBatch) -> None: ...

    def abort(self) -> None:
        """The daemon is stopping (from its signal handler, in the main thread): a request in
        flight returns now, as :class:`Unreachable`, and no new one starts."""
        ...


def fetched_bundle(status: int, body: bytes, what: str) -> Bundle | None:
    """The answer to a (conditional) bundle GET: None when unchanged (304) or not published yet (404)."""
    if status in (304, 404):
        return None
    if status != 200:
        raise SourceError(f"{what}: HTTP {status}")
    return load_bundle(body)


def _http(
    url: str,
    timeout: float,
    method: str = "GET",
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    limit: int = MAX_ANSWER_BYTES,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request (``tls``: how an https URL's certificate is verified; None, the system's way): (status, headers, body) for 2xx-4xx answers. Whatever keeps an answer from
    arriving whole (network, timeout, 5xx, 429, a torn or non-HTTP answer) is :class:`Unreachable`,
    naming the URL and the problem; a body over ``limit`` bytes is a :class:`SourceError` (read in
    chunks: never more than the limit in memory). Error bodies are cut at MAX_ERROR_BYTES."""
    where = f"{method} {url}"
    data, h = _json_request(body, headers)
    req = urllib.request.Request(url, data=data, method=method, headers=h)  # noqa: S310
    try:
        try:
            # https: an opener whose connections record a verified peer (note_verified_peer); a
            # request that carries a credential never follows a redirect
            handlers: list[urllib.request.BaseHandler] = [_VerifiedHTTPSHandler(tls)] if req.type == "https" else []
            if req.has_header("Authorization"):
                handlers.append(_NoRedirect())
            opener = urllib.request.build_opener(*handlers) if handlers else None
            opened = opener.open(req, timeout=timeout) if opener else urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) only, validated in config
            with opened as resp:
                return resp.status, dict(resp.headers.items()), _read_body(resp, limit, where)
        except urllib.error.HTTPError as exc:
            status = exc.code
            if status >= 500 or status == 429:
                raise _unreachable(where, status, exc.headers) from None
            payload = exc.read(MAX_ERROR_BYTES) if exc.fp is not None else b""
            return status, dict(exc.headers.items()) if exc.headers else {}, payload
    except http.client.HTTPException as exc:  # first: RemoteDisconnected is an OSError too
        raise Unreachable(f"{where}: {_http_problem(exc)}") from None
    except (urllib.error.URLError, OSError) as exc:  # TimeoutError is an OSError
        raise Unreachable(f"{where}: {getattr(exc, 'reason', exc)}") from None


class Connections:
    """Requests to one agent API over kept-alive connections, with :func:`_http`'s answers and
    errors. The agent asks every few seconds (long-poll, heartbeat, reports) and a TLS handshake
    per request cost it and the API ~10 ms of CPU each. A connection serves one request at a time
    (taken from the pool, given back once its answer was read whole); one idle longer than
    ``IDLE_REUSE`` is not reused (servers close idle ones: uvicorn after 5 s), and a reused one
    found closed before it answered is retried once on a new connection. Through an HTTP proxy
    (the environment's), every request goes by :func:`_http`, as before."""

    IDLE_REUSE = 4.0

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self._idle: dict[tuple[str, str, int | None], list[tuple[float, http.client.HTTPConnection]]] = {}
        self._lock = threading.Lock()
        self.opened = 0  # connections made (what keep-alive saves)
        # connections with a request in flight, for abort(); no lock: abort runs in a signal
        # handler, which may interrupt the main thread while it holds _lock
        self._busy: set[http.client.HTTPConnection] = set()
        self.stopping = False

    def abort(self) -> None:
        """No new request starts, and those in flight end now: their sockets are shut down, so a
        long-poll returns at once instead of when the server answers (up to ``wait_timeout``)."""
        self.stopping = True
        for conn in list(self._busy):
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the fd's, under TLS too

    def request(
        self,
        url: str,
        timeout: float,
        method: str = "GET",
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        limit: int = MAX_ANSWER_BYTES,
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or _proxied(parts.scheme, parts.hostname):
            return _http(url, timeout, method, body, headers, limit, self.tls)
        where = f"{method} {url}"
        key = (parts.scheme, parts.hostname, parts.port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        data, h = _json_request(body, headers)
        try:
            for attempt in (0, 1):
                conn, reused = self._take(key, timeout)
                self._busy.add(conn)
                try:
                    try:
                        if self.stopping:  # after the add: abort() either saw it or set this first
                            raise ConnectionAbortedError("the agent is stopping")
                        conn.request(method, target, body=data, headers=h)
                        resp = conn.getresponse()
                    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                        conn.close()
                        if reused and attempt == 0 and not self.stopping:
                            continue  # the server had closed it while idle: once more on a new one
                        raise
                    except BaseException:
                        conn.close()
                        raise
                    return self._answer(key, conn, resp, limit, where)
                finally:
                    self._busy.discard(conn)
            raise AssertionError("unreachable")  # pragma: no cover
        except http.client.HTTPException as exc:  # first: RemoteDisconnected is an OSError too
            raise Unreachable(f"{where}: {_http_problem(exc)}") from None
        except OSError as exc:  # TimeoutError, refused, TLS verification (ssl.SSLError)
            raise Unreachable(f"{where}: {exc}") from None

    def _answer(
        self,
        key: tuple[str, str, int | None],
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        limit: int,
        where: str,
    ) -> tuple[int, dict[str, str], bytes]:
        status, hdrs = resp.status, dict(resp.headers.items())
        try:
            if status >= 500 or status == 429:
                raise _unreachable(where, status, hdrs)
            # an answer in full, or what is kept of another (304, 404, 409…) for messages
            payload = _read_body(resp, limit, where) if 200 <= status < 300 else resp.read(MAX_ERROR_BYTES)
        except BaseException:
            conn.close()
            raise
        if resp.will_close or not resp.isclosed():  # closing, or a body left unread: done with it
            conn.close()
        else:
            with self._lock:
                self._idle.setdefault(key, []).append((time.monotonic(), conn))
        return status, hdrs, payload

    def _take(self, key: tuple[str, str, int | None], timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection to ``key`` (True) or a new one (False), with ``timeout``."""
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                since, conn = idle.pop()
                if now - since < self.IDLE_REUSE:
                    conn.timeout = timeout
                    if conn.sock is not None:
                        conn.sock.settimeout(timeout)
                    return conn, True
                conn.close()
        scheme, host, port = key
        self.opened += 1
        if scheme == "https":
            return _VerifiedHTTPSConnection(host, port, timeout=timeout, context=self.tls), False
        return http.client.HTTPConnection(host, port, timeout=timeout), False


def _json_request(body: dict[str, Any] | None, headers: dict[str, str] | None) -> tuple[bytes | None, dict[str, str]]:
    """A request's body as JSON and its headers (with the content type when there is a body)."""
    h = dict(headers or {})
    if body is None:
        return None, h
    h["Content-Type"] = "application/json"
    return json.dumps(body).encode(), h


def _proxied(scheme: str, host: str) -> bool:
    """Would urllib send a request to ``host`` through the environment's proxy?"""
    return scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host)


def _read_body(resp: http.client.HTTPResponse, limit: int, where: str) -> bytes:
    announced = resp.headers.get("Content-Length")
    length = int(announced) if announced is not None and announced.strip().isdigit() else None
    if length is not None and length > limit:
        raise SourceError(f"{where}: answer of {length} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while chunk := resp.read(min(1 << 20, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise SourceError(f"{where}: answer over the limit of {limit} bytes")
    if length is not None and size < length:
        # http.client returns what it got when the connection closes early: not a whole answer
        raise Unreachable(f"{where}: answer cut short after {size} of {length} bytes")
    return b"".join(chunks)


def _http_problem(exc: http.client.HTTPException) -> str:
    if isinstance(exc, http.client.IncompleteRead):
        return f"answer cut short after {len(exc.partial)} bytes (IncompleteRead)"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "connection closed without an answer (RemoteDisconnected)"
    if isinstance(exc, http.client.BadStatusLine):
        return f"not an HTTP answer: {str(exc)[:100]!r} (BadStatusLine)"
    return f"bad HTTP answer ({type(exc).__name__}: {str(exc)[:200]})"


def _lifetime(resp: dict[str, Any]) -> int:
    """A token answer's ``expires_in``; 0 (renew on a 401 only) when it has none."""
    exp = resp.get("expires_in")
    return exp if type(exp) is int and exp > 0 else 0


def _answer(body: bytes, what: str, **fields: type | tuple[type, None]) -> dict[str, Any]:
    """An agent-API answer's JSON object (:func:`read_response`); one that is not is a
    :class:`SourceError` (a captive portal's HTML page, a proxy's error text)."""
    try:
        return read_response(body, what, **fields)
    except ResponseError as exc:
        raise SourceError(f"{exc} ({len(body)} bytes: {body[:80]!r})") from None


def tls_context(ca_file: Path | None) -> ssl.SSLContext | None:
    """Verification against ``ca_file`` (a private CA's certificates) instead of the system's store."""
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None


class StaticSource:
    """A directory or plain HTTP base URL in the layout of :mod:`ringfence.staticlayout`."""

    kind = "static"
    fetches = 0

    def __init__(
        self,
        base: str,
        workload_id: str,
        poll_interval: float,
        timeout: float,
        verify: Callable[[SetDelta], object] | None = None,
        max_bundle_bytes: int = MAX_BUNDLE_BYTES,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.base = base.rstrip("/")
        self.tls = tls
        self.verify = verify  # checks a delta's signature (raises BundleError) as the chain is walked
        self.max_bundle_bytes = max_bundle_bytes
        self.max_delta_bytes = max(MAX_HEAD_BYTES, max_bundle_bytes // 4)
        self.is_http = self.base.startswith(("http://", "https://"))
        self.workload_id = workload_id
        self.poll_interval = poll_interval
        self.timeout = timeout
        self._etag: str | None = None  # of the bundle last settled: sent as If-None-Match
        self._fetched_etag: str | None = None  # of the bundle last fetched, until settled
        self._head_etag: str | None = None
        self.head: Head | None = None
        self._first = True

    def wait(self, version: int | None, timeout: float, stop: threading.Event) -> int | None:
        if self._first:
            self._first = False
            return None
        stop.wait(min(timeout, self.poll_interval))
        return None

    def _read(self, relative: str, limit: int) -> bytes | None:
        """A file of the layout; None when it is not there."""
        if not self.is_http:
            path = Path(self.base) / relative
            try:
                with path.open("rb") as f:
                    raw = f.read(limit + 1)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise Unreachable(f"{path}: {exc.strerror}") from None
            if len(raw) > limit:
                raise SourceError(f"{path}: over the limit of {limit} bytes")
            return raw
        status, _, body = _http(f"{self.base}/{quote(relative)}", self.timeout, limit=limit, tls=self.tls)
        if status == 404:
            return None
        if status != 200:
            raise SourceError(f"GET {relative}: HTTP {status}")
        return body

    def announced(self) -> int | None:
        """Reads the head (a conditional GET over HTTP: unchanged costs a 304). Without a usable
        head the source announces nothing and the whole bundle decides, as in a bundles-only layout."""
        relative = head_path(self.workload_id)
        if self.is_http:
            headers = {"If-None-Match": self._head_etag} if self._head_etag else {}
            status, hdrs, body = _http(
                f"{self.base}/{quote(relative)}", self.timeout, headers=headers, limit=MAX_HEAD_BYTES, tls=self.tls
            )
            if status == 304:
                return self.head.version if self.head is not None else None
            raw = body if status == 200 else None
            if status not in (200, 404):
                raise SourceError(f"GET {relative}: HTTP {status}")
            self._head_etag = (hdrs.get("ETag") or hdrs.get("Etag")) if raw is not None else None
        else:
            raw = self._read(relative, MAX_HEAD_BYTES)
        try:
            head = load_head(raw) if raw is not None else None
        except HeadError:
            head = None
        self.head = head if head is not None and head.workload_id == self.workload_id else None
        return self.head.version if self.head is not None else None

    def bundle(self) -> Bundle | None:
        name = bundle_path(self.workload_id)
        self.fetches += 1
        if not self.is_http:
            raw = self._read(name, self.max_bundle_bytes)
            return load_bundle(raw) if raw is not None else None
        headers = {"If-None-Match": self._etag} if self._etag else {}
        status, hdrs, body = _http(
            f"{self.base}/{quote(name)}", self.timeout, headers=headers, limit=self.max_bundle_bytes, tls=self.tls
        )
        doc = fetched_bundle(status, body, f"GET {name}")
        if doc is not None:
            self._fetched_etag = hdrs.get("ETag") or hdrs.get("Etag")
        return doc

    def settled(self) -> None:
        self._etag = self._fetched_etag

    def deltas(self, since: int, sets: dict[str, int], bundle_version: int) -> list[SetDelta] | None:
        """Walks each set's chain from the applied version to the head's, one file per step.

        The head is unsigned, so it bounds nothing: at most MAX_CHAIN_LINKS links per poll (further
        behind, the whole bundle is the truth), and each link's signature is checked as it arrives —
        the walk ends at the first that fails, which is handed on so that the agent refuses (and
        reports) it and the whole bundle bridges."""
        self.fetches += 1
        head = self.head
        if head is None:
            return None  # bundles-only layout: the whole bundle is the truth
        if head.version <= since:
            return []
        if head.rules_version > bundle_version or set(head.sets) != set(sets):
            return None  # this workload's own rules changed: only the whole bundle carries them
        out: list[SetDelta] = []
        for name, target in sorted(head.sets.items()):
            v = sets[name]
            while v < target:
                if len(out) >= MAX_CHAIN_LINKS:
                    return None  # too far behind for deltas: the whole bundle
                raw = self._read(delta_path(name, v), self.max_delta_bytes)
                if raw is None:
                    return None  # the chain is missing a link
                try:
                    d = load_delta(raw)
                except BundleError:
                    return None
                if d.set != name or d.from_version != v or not v < d.to_version <= target:
                    return None  # does not continue the chain: never guess
                out.append(d)
                if self.verify is not None:
                    try:
                        self.verify(d)
                    except BundleError:
                        return _oldest_first(out)  # walk no further: the agent refuses this link
                v = d.to_version
        return _oldest_first(out)

    def heartbeat(self, hb: Heartbeat) -> int | None:
        return None

    def report(self, batch: ReportBatch) -> None:
        return None

    def abort(self) -> None:
        """Nothing to end: its waits watch the stop event and a read takes ``request_timeout`` at most."""


def _oldest_first(deltas: list[SetDelta]) -> list[SetDelta]:
    """Across sets, in the order the agent API sends them."""
    return sorted(deltas, key=lambda d: (d.to_version, d.set))


AGENT_VERSION_RETRY_S = 3600.0  # after a refused agent_version: heartbeats go without it this long


def _refused_field(body: bytes, name: str) -> str | None:
    """The detail of a 422 answer (agentapi.ErrorBody) that names ``body.<name>``, else None."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return None
    if not isinstance(detail, str):
        return None
    mine = [p.strip() for p in detail.split(";") if p.strip().startswith(f"body.{name}:")]
    return "; ".join(mine)[:300] if mine else None


class ApiSource:
    """The agent API of docs/agent-api.md; ``prove`` builds the enrollment proof for a nonce."""

    kind = "api"
    fetches = 0

    def __init__(
        self,
        base: str,
        workload_id: str,
        prove: Prover,
        state: StateDir,
        timeout: float,
        wait_timeout: float,
        max_bundle_bytes: int = MAX_BUNDLE_BYTES,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.base = base.rstrip("/") + API_PREFIX
        self.tls = tls
        self.http = Connections(tls)
        self.max_answer_bytes = max_answer_bytes  # nonce, enroll, wait, heartbeat, reports
        self.max_bundle_bytes = max_bundle_bytes  # the bundle, and the deltas answer (as much as a bundle)
        self.workload_id = workload_id
        self.prove = prove
        self.state = state
        self.timeout = timeout
        self.wait_timeout = wait_timeout
        tok = state.read_json("token.json")
        mine = tok.get("workload_id") == workload_id
        self.token: str | None = tok.get("token") if mine else None
        # when to renew: a fifth of the lifetime before expiry (0: unknown, renew on a 401 only)
        self.renew_at: float = float(tok.get("renew_at", 0)) if mine else 0.0
        self._key: AgentKey | None = None
        self._etag: str | None = None  # of the bundle last settled: sent as If-None-Match
        self._fetched_etag: str | None = None  # of the bundle last fetched, until settled
        # what the last wait answered with, taken by the next bundle() / deltas(): the bundle's
        # text, ETag and the deltas after it (keyed once the bundle is read); the deltas as
        # (since, documents)
        self._pushed_bundle: tuple[str, str | None, list[Any] | None] | None = None
        self._pushed: tuple[int, list[Any]] | None = None
        self._version_refused_until = 0.0  # monotonic: until then heartbeats go without agent_version
        # status.json says a refusal (this run's, or one before a restart): cleared once taken
        self._version_refusal_shown = bool(state.read_json("status.json").get("agent_version_refused"))

    def _url(self, route: str, query: str = "") -> tuple[str, str]:
        """(method, URL) of one of the agent API's routes (:data:`ROUTES`)."""
        method, path = ROUTES[route]
        url = self.base + path.replace("{id}", quote(self.workload_id, safe=""))
        return method, f"{url}?{query}" if query else url

    @property
    def key(self) -> AgentKey:
        """The agent's own key (created in the state directory on first use)."""
        if self._key is None:
            self._key = AgentKey.load_or_create(self.state.path)
        return self._key

    def _nonce(self) -> str:
        method, url = self._url("nonce")
        status, _, body = self.http.request(url, self.timeout, method, limit=self.max_answer_bytes)
        if status == 403:
            raise Blocked(f"nonce: HTTP {status} {body[:200]!r}")
        if status != 200:
            raise SourceError(f"nonce: HTTP {status} {body[:200]!r}")
        nonce: str = _answer(body, "nonce", nonce=str)["nonce"]
        return nonce

    def _keep(self, token: str, expires_in: int) -> None:
        self.token = token
        self.renew_at = time.time() + max(1.0, expires_in * 0.8) if expires_in > 0 else 0.0
        self.state.write_json(
            "token.json", {"workload_id": self.workload_id, "token": token, "renew_at": self.renew_at}
        )

    def enroll(self) -> None:
        nonce = self._nonce()
        try:
            req = self.prove(nonce)
        except ProofError as exc:
            raise Unreachable(str(exc)) from None
        # the agent's key rides along: the first enrollment binds it, later ones must match it
        req = replace(
            req, agent_key=self.key.public_pem, agent_signature=self.key.prove("enroll", self.workload_id, nonce)
        )
        method, url = self._url("enroll")
        status, _, body = self.http.request(url, self.timeout, method, req.to_json(), limit=self.max_answer_bytes)
        if status != 200:
            raise SourceError(f"enroll refused: HTTP {status} {body[:300]!r}")
        resp = _answer(body, "enroll", workload_id=str, token=str)
        if resp["workload_id"] != self.workload_id:
            raise SourceError(f"enrolled as {resp['workload_id']!r}, configured as {self.workload_id!r}")
        self._keep(resp["token"], _lifetime(resp))

    def refresh(self) -> bool:
        """A fresh token by signing with the agent key: while the token held is valid, over that
        token and the time (no nonce: a flood of GET /v1/nonce cannot stop the renewal), else
        (or when that is refused) over a nonce. False when the control plane refuses (no key
        bound, another key bound, workload not running): enroll instead."""
        if self.token is not None and self._refresh_by_token(self.token):
            return True
        nonce = self._nonce()
        body = TokenRequest(nonce=nonce, signature=self.key.prove("token", self.workload_id, nonce)).to_json()
        method, url = self._url("token")
        status, _, payload = self.http.request(url, self.timeout, method, body)
        if status == 403 and self.token is not None:
            # not the control plane's refusal (a 401): while the token held is not known to be
            # invalid, renewing is what waits, not a new enrollment
            raise Blocked(f"token: HTTP {status} {payload[:200]!r}")
        if status in (401, 403, 404):
            return False
        if status != 200:
            raise SourceError(f"token: HTTP {status} {payload[:200]!r}")
        resp = _answer(payload, "token", workload_id=str, token=str)
        if resp["workload_id"] != self.workload_id:
            raise SourceError(f"token issued for {resp['workload_id']!r}, configured as {self.workload_id!r}")
        self._keep(resp["token"], _lifetime(resp))
        return True

    def _refresh_by_token(self, token: str) -> bool:
        """The renewal without a nonce (docs/agent-api.md, "Tokens"); False on any refusal (an
        expired or revoked token, a clock too far off, a control plane without it): the nonce
        path follows."""
        at = int(time.time())
        body = TokenRequest(time=at, signature=self.key.prove_token(self.workload_id, token, at)).to_json()
        method, url = self._url("token")
        try:
            status, _, payload = self.http.request(
                url, self.timeout, method, body, {"Authorization": f"Bearer {token}"}, self.max_answer_bytes
            )
        except Unreachable as exc:  # a 429 or 5xx (a throttled route) too: the nonce path may still answer
            log(f"token renewal without a nonce: {exc}; over a nonce instead")
            return False
        if status != 200:
            return False
        resp = _answer(payload, "token", workload_id=str, token=str)
        if resp["workload_id"] != self.workload_id:
            raise SourceError(f"token issued for {resp['workload_id']!r}, configured as {self.workload_id!r}")
        self._keep(resp["token"], _lifetime(resp))
        return True

    def _renew(self) -> None:
        """A token for the next calls: renewed with the key when there is one, else enrolled."""
        if (
            self.token is None and self._key is None and not (self.state.path / KEY_FILE).exists()
        ) or not self.refresh():
            self.enroll()

    def _call(
        self,
        route: str,
        query: str = "",
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
        limit: int | None = None,
        lasts: float = 0.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One authenticated request; the token travels in the Authorization header, never in the
        URL. ``lasts``: how long the server may hold it (a long poll), which the token must outlive:
        the server authorizes a wait again at each wake-up and at its end."""
        limit = self.max_answer_bytes if limit is None else limit
        for attempt in range(2):
            if self.token is None:
                self._renew()
            elif self.renew_at and time.time() + lasts >= self.renew_at:
                try:
                    self._renew()  # renewed before it expires: the agent is never locked out
                except (Unreachable, Blocked) as exc:
                    # the token held has a fifth of its life left: the call goes on with it (a
                    # throttled or blocked token or nonce route must not stop bundles and
                    # heartbeats); a 401 below means it lapsed, and the next attempt renews or fails
                    log(f"token renewal due but failed ({exc}): calling with the current token")
            h = {"Authorization": f"Bearer {self.token}", **(headers or {})}
            method, url = self._url(route, query)
            status, hdrs, payload = self.http.request(url, timeout or self.timeout, method, body, h, limit)
            if status == 401 and attempt == 0:
                self.token = None  # expired or revoked: renew with the key, else enroll again
                continue
            if status in (401, 403):
                raise SourceError(f"{method} {route}: HTTP {status} {payload[:200]!r}")
            return status, hdrs, payload
        raise SourceError("unreachable")  # pragma: no cover

    def wait(self, version: int | None, timeout: float, stop: threading.Event) -> int | None:
        """The long poll; it asks for what :meth:`deltas` or :meth:`bundle` would fetch next to
        come with the answer (the deltas since ``version``, else a newer bundle and the deltas
        since it), so a change costs one request, not two or three."""
        v = -1 if version is None else version
        self._pushed = self._pushed_bundle = None
        status, _, body = self._call(
            "wait",
            f"version={v}&timeout={int(timeout)}&deltas=true&bundle=true",
            timeout=timeout + self.timeout,
            limit=self.max_bundle_bytes,  # a bundle may come along
            lasts=timeout,
        )
        if status != 200:
            raise SourceError(f"wait: HTTP {status}")
        resp = _answer(body, "wait")
        latest = resp.get("latest_version")
        pushed = resp.get("deltas")
        docs = pushed["deltas"] if isinstance(pushed, dict) and isinstance(pushed.get("deltas"), list) else None
        bundle, etag = resp.get("bundle"), resp.get("etag")
        if isinstance(bundle, str):  # the deltas, if any, follow that bundle
            self._pushed_bundle = (bundle, etag if isinstance(etag, str) else None, docs)
        elif version is not None and docs is not None:
            self._pushed = (version, docs)  # verified like fetched ones, by the daemon
        return latest if type(latest) is int else None

    def announced(self) -> int | None:
        return None  # announced by wait() and heartbeats

    def bundle(self) -> Bundle | None:
        pushed, self._pushed_bundle = self._pushed_bundle, None
        if pushed is not None:  # came with the wait's answer: read as a fetched one is
            text, self._fetched_etag, after = pushed
            doc = fetched_bundle(200, text.encode(), "bundle")
            if doc is not None and after is not None:
                self._pushed = (doc.version, after)
            return doc
        headers = {"If-None-Match": self._etag} if self._etag else {}
        self.fetches += 1
        status, hdrs, body = self._call("bundle", headers=headers, limit=self.max_bundle_bytes)
        doc = fetched_bundle(status, body, "bundle")
        if doc is not None:
            self._fetched_etag = hdrs.get("ETag") or hdrs.get("Etag")
        return doc

    def settled(self) -> None:
        self._etag = self._fetched_etag

    def deltas(self, since: int, sets: dict[str, int], bundle_version: int) -> list[SetDelta] | None:
        if self._pushed is not None and self._pushed[0] == since:
            docs, self._pushed = self._pushed[1], None
            return [delta_from_json(d) for d in docs]  # came with the wait's answer
        if self._pushed_bundle is not None:
            return None  # the wait answered with a bundle: deltas since ``since`` do not bridge
        self.fetches += 1
        status, _, body = self._call("deltas", f"since={since}", limit=self.max_bundle_bytes)
        if status in (404, 409):
            return None
        if status != 200:
            raise SourceError(f"deltas: HTTP {status}")
        resp = _answer(body, "deltas", deltas=list)
        return [delta_from_json(d) for d in resp["deltas"]]  # BundleError: the daemon refuses them

    def heartbeat(self, hb: Heartbeat) -> int | None:
        """A control plane older than the agent refuses ``agent_version`` (422 naming it: its
        heartbeat model forbids unknown fields). The heartbeat is sent again at once without it,
        the refusal logged and kept in status.json (``agent_version_refused``), and heartbeats go
        without it for AGENT_VERSION_RETRY_S, then try it again (the control plane may have been
        upgraded since). Control planes are upgraded before their agents (docs/agent.md)."""
        send = hb.agent_version is not None and time.monotonic() >= self._version_refused_until
        status, _, body = self._call("heartbeat", body=hb.to_json(with_agent_version=send))
        refused = _refused_field(body, "agent_version") if status == 422 and send else None
        if refused is not None:
            self._version_refused_until = time.monotonic() + AGENT_VERSION_RETRY_S
            older = "extra inputs" in refused.lower()  # pydantic's word for a field the model does not know
            log(
                f"heartbeat: the control plane refused agent_version ({refused}): "
                + (
                    "it is older than this agent (upgrade the control plane before its agents); "
                    if older
                    else f"it does not take {hb.agent_version!r}; "
                )
                + f"heartbeats go without it for {AGENT_VERSION_RETRY_S:.0f} s"
            )
            self.state.update_status(agent_version_refused={"detail": refused, "time": time.time()})
            self._version_refusal_shown = True
            status, _, body = self._call("heartbeat", body=hb.to_json(with_agent_version=False))
        elif status == 200 and send and self._version_refusal_shown:
            self._version_refusal_shown = False
            log("heartbeat: the control plane takes agent_version now")
            self.state.update_status(agent_version_refused=None)
        if status != 200:
            raise SourceError(f"heartbeat: HTTP {status}")
        latest: int | None = _answer(body, "heartbeat", latest_version=(int, None))["latest_version"]
        return latest

    def abort(self) -> None:
        self.http.abort()

    def report(self, batch: ReportBatch) -> None:
        status, _, body = self._call("reports", body=batch.to_json())
        if status not in (200, 202):
            raise SourceError(f"reports: HTTP {status} {body[:200]!r}")
