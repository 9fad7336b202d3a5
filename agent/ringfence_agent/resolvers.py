"""The name servers this host resolves through, read from ``/etc/resolv.conf`` (at start and before every sync): the
agent admits them (udp/tcp 53, outbound only) beside the configured ``dns_resolvers``, so that it
can keep resolving its control plane's host name (API Gateway's) under a bundle that admits
nothing — without the operator listing the VPC resolver by hand.

A stub resolver on loopback (systemd-resolved's 127.0.0.53) needs no fail-safe (loopback always
passes), but the servers it forwards to do: those are in systemd-resolved's own resolv.conf."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from ringfence.bundlewire import failsafe_width_problem

RESOLV_CONF = Path("/etc/resolv.conf")
# systemd-resolved: the upstream servers its stub forwards to (the file lists them, no stub)
RESOLVED_UPSTREAM = Path("/run/systemd/resolve/resolv.conf")
MAX_RESOLVERS = 8  # glibc uses 3; a resolv.conf naming dozens is no reason to admit dozens


def nameservers(path: Path) -> tuple[list[str], bool]:
    """(the non-loopback name server addresses ``path`` lists, whether it lists a loopback one).
    Unreadable: none. A line that is not an address is skipped (the C library skips it too); an
    IPv6 scope id is dropped (a firewall address has none)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return [], False
    out: list[str] = []
    loopback = False
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            ip = ipaddress.ip_address(words[1].partition("%")[0])
        except ValueError:
            continue
        if ip.is_loopback:
            loopback = True
        elif ip.is_unspecified or ip.is_multicast:
            continue
        else:
            out.append(str(ip))
    return out, loopback


def system_resolvers(resolv_conf: Path = RESOLV_CONF, upstream: Path = RESOLVED_UPSTREAM) -> tuple[str, ...]:
    """The name servers the host's resolver sends queries to (host addresses, each within the
    fail-safe width rule by construction), at most :data:`MAX_RESOLVERS`."""
    found, stub = nameservers(resolv_conf)
    if stub:
        found += nameservers(upstream)[0]
    out = []
    for addr in dict.fromkeys(found):
        ip = ipaddress.ip_address(addr)
        if failsafe_width_problem(ip.version, ip.max_prefixlen) is None:  # a host: always within
            out.append(addr)
    return tuple(out[:MAX_RESOLVERS])
