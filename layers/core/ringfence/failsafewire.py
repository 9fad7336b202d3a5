"""How wide a fail-safe prefix may be: the bound both sides of the wire enforce.

Apart from :mod:`ringfence.bundlewire` (which re-exports it) so that loading a policy, which
checks its fail-safes, does not import the bundle format's classes, hashing and signing (a
third of ``ringfence connectivity``'s import time). Standard library only: the agent ships it.
"""

from __future__ import annotations

# The widest prefix a fail-safe address list (``admin_cidrs``, ``control_plane``) may hold, per
# address family. A fail-safe is what no bundle can remove: "everything" would make every bundle
# moot, and so would halves or quarters of it (0.0.0.0/1 + 128.0.0.0/1), so the bound is a prefix
# length, not a list of forbidden values. /8 still takes 10.0.0.0/8; /32 an IPv6 allocation.
FAILSAFE_WIDEST = {4: 8, 6: 32}


def failsafe_width_problem(version: int, prefixlen: int) -> str | None:
    """Why a fail-safe prefix of this family and length is refused, or None."""
    widest = FAILSAFE_WIDEST[version]
    if prefixlen >= widest:
        return None
    what = "every address" if prefixlen == 0 else f"a /{prefixlen}"
    return (
        f"a fail-safe may not open {what}: IPv{version} fail-safe prefixes must be /{widest} or longer "
        "(a fail-safe is what no policy rule can remove)"
    )


# What one fail-safe list may open in all, per family: four of the widest prefixes' worth. Without
# it the per-prefix bound falls to a list of many: the 256 /8s are 0.0.0.0/0. RFC 1918 in all
# (10/8, 172.16/12, 192.168/16) is ~1.07 of a /8.
FAILSAFE_MOST = {4: 4 << (32 - FAILSAFE_WIDEST[4]), 6: 4 << (128 - FAILSAFE_WIDEST[6])}


def failsafe_total_problem(version: int, prefixes: list[tuple[int, int]]) -> str | None:
    """Why one fail-safe list's prefixes of this family, ``(network as an integer, prefix
    length)``, open too much together (overlaps counted once), or None."""
    bits = 32 if version == 4 else 128
    spans = sorted(((net >> (bits - n)) << (bits - n), 1 << (bits - n)) for net, n in prefixes)
    total, end = 0, 0
    for lo, size in spans:
        hi = lo + size
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    most = FAILSAFE_MOST[version]
    if total <= most:
        return None
    widest = FAILSAFE_WIDEST[version]
    unit = 1 << (bits - widest)
    return (
        f"together these IPv{version} fail-safe prefixes open more than {most // unit} /{widest}s' worth of "
        f"addresses (about {total / unit:.0f}, overlaps counted once; a fail-safe is what no policy rule can remove)"
    )
