"""``ringfence serve``'s per-address limit on the agent API's unauthenticated routes.

On AWS the agent API's web ACL limits each source address on ``GET /v1/nonce``, ``POST
/v1/enroll`` and the token route (a renewal by bearer left out) to
``AgentApiUnauthenticatedRequestsPerIp`` requests in 5 minutes, answering 429 with
``Retry-After``, before a function runs or a nonce is written. ``serve`` has no WAF in front of
it, so it keeps the same limit itself, as a token bucket per address: ``limit`` requests saved
up, refilled at ``limit`` per ``window`` (the WAF rule's average and burst). Only ``serve`` uses
this module: the routes, shared with the Lambda functions, know nothing of it.

The table is bounded: at most ``max_entries`` addresses, the least recently seen forgotten
first, and an IPv6 address is counted by its /64 (one host holds a whole /64, so counting each
address would give it 2^64 buckets and grow the table without end).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ringfence.control.wiring import Metric, no_metric

REQUESTS_PER_ADDRESS = 2000  # as AgentApiUnauthenticatedRequestsPerIp's default
WINDOW_SECONDS = 300.0  # WAF's rate-based rule's window (5 minutes)
ADDRESSES_TRACKED = 65536  # ~20 MB of table at most

# the paths' ends, as the web ACL's scope-down matches them (decoded, whatever precedes them)
_SCOPED = re.compile(r"/(nonce|enroll|token)/*$")
# a renewal by token, as the web ACL's renewal-by-token rule labels it: the control plane takes a
# token request carrying an Authorization header as that renewal or nothing (refused after one
# read, no nonce burnt, nothing written), so leaving it out is no way around the limit
_TOKEN_ROUTE = re.compile(r"/agents/[^/]+/token/*$")


def address_key(host: str) -> str:
    """What one client is counted as: its IPv4 address, an IPv6 address's /64 (an IPv4-mapped
    one as its IPv4 address: a dual-stack listener sees every IPv4 client so, and they would
    otherwise all share ``::ffff:0:0/64``), anything else as it is."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def limited(method: str, path: str, authorization: str | None) -> bool:
    """Whether a request to the agent API counts toward its address's limit: the nonce, enroll
    and token routes (``path`` decoded, slashes collapsed or not), but not a ``POST`` to the
    token route with ``Authorization: Bearer …`` (an agent renewing a token it holds)."""
    path = re.sub("/+", "/", path)
    if not _SCOPED.search(path):
        return False
    renewal = method == "POST" and _TOKEN_ROUTE.search(path) is not None
    return not (renewal and authorization is not None and authorization.startswith("Bearer "))


@dataclass
class AddressLimit:
    """A token bucket per client address (:func:`address_key`): ``limit`` requests saved up,
    ``limit`` more each ``window`` seconds; ``limit`` 0 turns it off. ``metric`` counts the
    refusals (``AgentRequestsOverAddressLimit``) and the addresses forgotten for room
    (``AddressLimitEvictions``)."""

    limit: int = REQUESTS_PER_ADDRESS
    window: float = WINDOW_SECONDS
    max_entries: int = ADDRESSES_TRACKED
    clock: Callable[[], float] = time.monotonic
    metric: Metric = no_metric
    # address key → (requests saved up, when), least recently seen first
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.limit < 0 or self.window <= 0 or self.max_entries < 1:
            raise ValueError(
                "RINGFENCE_UNAUTH_REQUESTS_PER_ADDRESS must be 0 (off) or more, RINGFENCE_UNAUTH_WINDOW_SECONDS "
                "positive and RINGFENCE_UNAUTH_ADDRESSES_TRACKED at least 1"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AddressLimit:
        """``RINGFENCE_UNAUTH_REQUESTS_PER_ADDRESS`` (default 2000; 0: off),
        ``RINGFENCE_UNAUTH_WINDOW_SECONDS`` (default 300) and ``RINGFENCE_UNAUTH_ADDRESSES_TRACKED``
        (default 65536)."""
        e = os.environ if env is None else env

        def read(name: str, default: float, kind: Callable[[str], float]) -> float:
            raw = e.get(name)
            try:
                return default if raw is None else kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r}: not a number") from None

        limit = read("RINGFENCE_UNAUTH_REQUESTS_PER_ADDRESS", REQUESTS_PER_ADDRESS, int)
        window = read("RINGFENCE_UNAUTH_WINDOW_SECONDS", WINDOW_SECONDS, float)
        entries = read("RINGFENCE_UNAUTH_ADDRESSES_TRACKED", ADDRESSES_TRACKED, int)
        return cls(int(limit), window, int(entries))

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, host: str) -> int | None:
        """Count one request from ``host``: None if its address may make it, else the whole
        seconds until it may make one (a refused request spends nothing)."""
        if self.limit == 0:
            return None
        key, now, rate = address_key(host), self.clock(), self.limit / self.window
        evicted = 0
        with self._lock:
            held = self._buckets.pop(key, None)
            if held is None:
                saved = float(self.limit)
                while len(self._buckets) >= self.max_entries:
                    # the least recently seen: an address quiet for a window is full again, as
                    # if never seen; one forgotten sooner starts again with a full bucket
                    self._buckets.popitem(last=False)
                    evicted += 1
            else:
                saved = min(float(self.limit), held[0] + (now - held[1]) * rate)
            ok = saved >= 1
            self._buckets[key] = (saved - 1 if ok else saved, now)
        if evicted:
            self.metric("AddressLimitEvictions", evicted)
        if ok:
            return None
        self.metric("AgentRequestsOverAddressLimit", 1)
        return max(1, math.ceil((1 - saved) / rate))
