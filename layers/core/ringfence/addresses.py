"""IP addresses and CIDR covers as integers.

A set's elements are the *canonical cover* of its member addresses: the unique list of maximal
aligned prefixes (what ``ipaddress.collapse_addresses`` returns). Adding or removing one address
changes that cover only inside one aligned block, so :class:`AddressSet` computes element deltas in
O(prefix length × log n) instead of re-aggregating the whole set.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from dataclasses import dataclass, field

V4, V6 = 4, 6
_BITS = {V4: 32, V6: 128}

Address = tuple[int, int]
"""(family, integer address)."""

Prefix = tuple[int, int, int]
"""(family, network integer, prefix length)."""


def parse_address(text: str) -> Address:
    ip = ipaddress.ip_address(text.strip())
    return (ip.version, int(ip))


# Dotted-quad IPv4 with an optional one- or two-digit length: a subset of what ipaddress
# accepts (no leading zeros, ASCII digits), parsed without building ipaddress objects.
_V4 = re.compile(
    r"(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})(?:/([0-9]{1,2}))?"
)


def parse_prefix(text: str) -> Prefix:
    text = text.strip()
    m = _V4.fullmatch(text)
    if m is not None:
        a, b, c, d, length = m.groups()
        octets = (int(a), int(b), int(c), int(d))
        bits = 32 if length is None else int(length)
        if max(octets) <= 255 and bits <= 32:  # else ipaddress raises its own error below
            value = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
            return (V4, value >> (32 - bits) << (32 - bits), bits)
    net = ipaddress.ip_network(text, strict=False)
    return (net.version, int(net.network_address), net.prefixlen)


def format_prefix(prefix: Prefix) -> str:
    family, value, length = prefix
    if family == V4:  # the hot path of rendering sets: plain integer formatting, no ipaddress objects
        return f"{value >> 24}.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}/{length}"
    return f"{ipaddress.IPv6Address(value)}/{length}"


def format_address(addr: Address) -> str:
    family, value = addr
    return str(ipaddress.IPv4Address(value) if family == V4 else ipaddress.IPv6Address(value))


def prefix_contains(prefix: Prefix, addr: Address) -> bool:
    family, net, length = prefix
    if family != addr[0]:
        return False
    shift = _BITS[family] - length
    return (addr[1] >> shift) == (net >> shift)


def prefixes_meet(a: Prefix, b: Prefix) -> bool:
    """Whether two prefixes share an address (then one holds the other)."""
    if a[0] != b[0]:
        return False
    shift = _BITS[a[0]] - min(a[2], b[2])
    return (a[1] >> shift) == (b[1] >> shift)


def _spans(prefixes: list[Prefix], family: int) -> list[list[int]]:
    """Merged, sorted [lo, hi] address ranges of ``family``'s prefixes.

    Rejects what ``ipaddress.ip_network((network, length))`` rejects (host bits set, bad length),
    as the ipaddress-based version did.
    """
    bits = _BITS[family]
    ranges = []
    for f, n, length in prefixes:
        if f != family:
            continue
        if not 0 <= length <= bits or not 0 <= n < 1 << bits or n & ((1 << (bits - length)) - 1):
            raise ValueError(f"not a network: {n}/{length}")
        ranges.append((n, n + (1 << (bits - length)) - 1))
    ranges.sort()
    merged: list[list[int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            if hi > merged[-1][1]:
                merged[-1][1] = hi
        else:
            merged.append([lo, hi])
    return merged


def _split(family: int, lo: int, hi: int, out: list[Prefix]) -> None:
    """Append the maximal aligned blocks that tile [lo, hi], ascending (the canonical cover of a run)."""
    bits = _BITS[family]
    cur = lo
    while cur <= hi:
        size = (cur & -cur) if cur else 1 << bits
        while size > hi - cur + 1:
            size >>= 1
        out.append((family, cur, bits - size.bit_length() + 1))
        cur += size


# Integer ranges rather than ipaddress objects: ~10x less time (IP lists with exclusions were most
# of the non-YAML policy load of a small estate), and right for IPv6 prefixes whose network number
# is below 2**32: ``ipaddress.ip_network((n, length))`` reads those as IPv4, so the ipaddress-based
# version computed ``::/0`` minus ``fc00::/7`` as ``::/0`` (private IPv6 space left in "internet").
def collapse(prefixes: list[Prefix]) -> list[Prefix]:
    """Canonical cover of a list of prefixes (sorted, v4 before v6)."""
    out: list[Prefix] = []
    for family in (V4, V6):
        for lo, hi in _spans(prefixes, family):
            _split(family, lo, hi, out)
    return out


def exclude(prefixes: list[Prefix], excluded: list[Prefix]) -> list[Prefix]:
    """``prefixes`` minus ``excluded`` (IP lists with exclusions), as a canonical cover."""
    out: list[Prefix] = []
    for family in (V4, V6):
        cuts = _spans(excluded, family)
        k = 0
        for lo, hi in _spans(prefixes, family):
            while k < len(cuts) and cuts[k][1] < lo:  # cuts wholly before this range
                k += 1
            j = k
            while lo <= hi and j < len(cuts) and cuts[j][0] <= hi:
                if cuts[j][0] > lo:
                    _split(family, lo, cuts[j][0] - 1, out)
                lo = max(lo, cuts[j][1] + 1)
                j += 1
            if lo <= hi:
                _split(family, lo, hi, out)
    return out


def cover_of_addresses(addrs: list[Address]) -> list[Prefix]:
    """Canonical cover of host addresses; linear after sorting (no ipaddress objects)."""
    out: list[Prefix] = []
    for family in (V4, V6):
        values = sorted({v for f, v in addrs if f == family})
        i = 0
        while i < len(values):
            start = values[i]
            j = i
            while j + 1 < len(values) and values[j + 1] == values[j] + 1:
                j += 1
            _split(family, start, values[j], out)
            i = j + 1
    return out


@dataclass(slots=True)
class AddressSet:
    """Member addresses with reference counts and their canonical cover, kept incrementally.

    Two workloads may share an address (overlapping VPCs); the address stays while either does.
    """

    counts: dict[Address, int] = field(default_factory=dict)
    _sorted: dict[int, list[int]] = field(default_factory=lambda: {V4: [], V6: []})
    _cover: set[Prefix] = field(default_factory=set)
    """the canonical cover, kept by applying each add/remove delta (no re-aggregation)"""

    def elements(self) -> list[Prefix]:
        """The canonical cover: v4 before v6, ascending (disjoint prefixes sort by network)."""
        return sorted(self._cover)

    def __len__(self) -> int:
        return len(self.counts)

    def meets(self, prefix: Prefix) -> bool:
        """Whether some member address lies in ``prefix``."""
        family, net, length = prefix
        hi = net + (1 << (_BITS[family] - length)) - 1
        arr = self._sorted[family]
        i = bisect.bisect_left(arr, net)
        return i < len(arr) and arr[i] <= hi

    def _full(self, family: int, lo: int, hi: int) -> bool:
        arr = self._sorted[family]
        return bisect.bisect_right(arr, hi) - bisect.bisect_left(arr, lo) == hi - lo + 1

    def _block_len(self, family: int, value: int) -> int:
        """Shortest prefix length whose aligned block around ``value`` is fully present."""
        bits = _BITS[family]
        length = bits
        while length > 0:
            shift = bits - (length - 1)
            lo = (value >> shift) << shift
            if not self._full(family, lo, lo + (1 << shift) - 1):
                break
            length -= 1
        return length

    def _pieces(self, family: int, value: int, length: int) -> list[Prefix]:
        """Sibling blocks that, with ``value``/bits, tile the block of ``length`` around ``value``."""
        bits = _BITS[family]
        out: list[Prefix] = []
        for lvl in range(length + 1, bits + 1):
            shift = bits - lvl
            out.append((family, ((value >> shift) ^ 1) << shift, lvl))
        return out

    def add(self, addr: Address) -> tuple[list[Prefix], list[Prefix]]:
        """Add one reference; returns (elements added, elements removed) of the cover."""
        n = self.counts.get(addr, 0)
        self.counts[addr] = n + 1
        if n:
            return [], []
        family, value = addr
        bisect.insort(self._sorted[family], value)
        length = self._block_len(family, value)
        bits = _BITS[family]
        shift = bits - length
        block = (family, (value >> shift) << shift, length)
        pieces = self._pieces(family, value, length)
        self._cover.difference_update(pieces)
        self._cover.add(block)
        return [block], pieces

    def remove(self, addr: Address) -> tuple[list[Prefix], list[Prefix]]:
        """Drop one reference; returns (elements added, elements removed) of the cover."""
        n = self.counts.get(addr, 0)
        if n == 0:
            return [], []
        if n > 1:
            self.counts[addr] = n - 1
            return [], []
        del self.counts[addr]
        family, value = addr
        length = self._block_len(family, value)
        bits = _BITS[family]
        shift = bits - length
        block = (family, (value >> shift) << shift, length)
        arr = self._sorted[family]
        arr.pop(bisect.bisect_left(arr, value))
        pieces = self._pieces(family, value, length)
        self._cover.discard(block)
        self._cover.update(pieces)
        return pieces, [block]
