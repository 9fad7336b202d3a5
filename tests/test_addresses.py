from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ringfence import addresses
from ringfence.addresses import AddressSet


def reference(addrs: set[tuple[int, int]]) -> list[tuple[int, int, int]]:
    out = []
    for fam in (4, 6):
        nets = [ipaddress.ip_network((v, 32 if fam == 4 else 128)) for f, v in addrs if f == fam]
        out += [(fam, int(n.network_address), n.prefixlen) for n in ipaddress.collapse_addresses(nets)]  # type: ignore[arg-type]
    return out


OPS = st.lists(st.tuples(st.booleans(), st.sampled_from([4, 6]), st.integers(min_value=0, max_value=40)), max_size=60)


@given(OPS)
def test_incremental_cover_deltas_track_the_canonical_cover(ops: list[tuple[bool, int, int]]) -> None:
    s = AddressSet()
    cover: set[tuple[int, int, int]] = set()
    counts: dict[tuple[int, int], int] = {}
    base = {4: int(ipaddress.ip_address("10.0.0.0")), 6: int(ipaddress.ip_address("fd00::"))}
    for add, fam, off in ops:
        addr = (fam, base[fam] + off)
        if add:
            added, removed = s.add(addr)
            counts[addr] = counts.get(addr, 0) + 1
        else:
            added, removed = s.remove(addr)
            if counts.get(addr):
                counts[addr] -= 1
                if not counts[addr]:
                    del counts[addr]
        assert set(removed) <= cover, "a delta removed an element that was not there"
        cover = (cover - set(removed)) | set(added)
        expected = reference(set(counts))
        assert sorted(cover) == sorted(expected) == sorted(s.elements())
        assert s.elements() == expected, "elements() is the canonical cover in canonical order"


def test_cover_of_a_run() -> None:
    addrs = [addresses.parse_address(f"10.0.0.{i}") for i in range(1, 7)]
    assert [addresses.format_prefix(p) for p in addresses.cover_of_addresses(addrs)] == [
        "10.0.0.1/32",
        "10.0.0.2/31",
        "10.0.0.4/31",
        "10.0.0.6/32",
    ]


def test_exclusions() -> None:
    result = addresses.exclude([addresses.parse_prefix("10.0.0.0/8")], [addresses.parse_prefix("10.1.0.0/16")])
    nets = [ipaddress.ip_network(addresses.format_prefix(p)) for p in result]
    assert ipaddress.ip_address("10.1.2.3") not in nets[0] and all(
        ipaddress.ip_address("10.1.2.3") not in n for n in nets
    )
    assert any(ipaddress.ip_address("10.2.0.1") in n for n in nets)
    assert sum(n.num_addresses for n in nets) == 2**24 - 2**16


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=0, max_value=32))
def test_format_v4_prefix_matches_ipaddress(value: int, length: int) -> None:
    assert addresses.format_prefix((4, value, length)) == f"{ipaddress.IPv4Address(value)}/{length}"


def _net(fam: int, n: int, length: int) -> Any:
    # the family's own class: ipaddress.ip_network((n, length)) reads a v6 ::/n with n < 2**32 as v4
    return (ipaddress.IPv4Network if fam == 4 else ipaddress.IPv6Network)((n, length))


def _reference_collapse(prefixes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """An ipaddress-based ``collapse``: the oracle for the integer version."""
    out = []
    for fam in (4, 6):
        nets = [_net(fam, n, length) for f, n, length in prefixes if f == fam]
        out += [(fam, int(c.network_address), c.prefixlen) for c in ipaddress.collapse_addresses(nets)]  # type: ignore[type-var]
    return out


def _reference_exclude(
    prefixes: list[tuple[int, int, int]], excluded: list[tuple[int, int, int]]
) -> list[tuple[int, int, int]]:
    """An ipaddress-based ``exclude``."""
    result = _reference_collapse(prefixes)
    for ex in _reference_collapse(excluded):
        ex_net = _net(*ex)
        nxt = []
        for p in result:
            net = _net(*p)
            if p[0] != ex[0] or not net.overlaps(ex_net):
                nxt.append(p)
            elif ex_net.subnet_of(net):  # type: ignore[arg-type]
                nxt += [(p[0], int(s.network_address), s.prefixlen) for s in net.address_exclude(ex_net)]  # type: ignore[arg-type]
        result = _reference_collapse(nxt)
    return result


@st.composite
def _prefixes(draw: st.DrawFn) -> list[tuple[int, int, int]]:
    """Prefixes packed into small windows of each family, so they overlap, nest and abut."""
    out = []
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        fam = draw(st.sampled_from([4, 6]))
        bits = 32 if fam == 4 else 128
        length = draw(st.sampled_from([0, 1, bits - 8, bits - 6, bits - 5, bits - 4, bits - 2, bits - 1, bits]))
        base = 0 if length < 2 else draw(st.sampled_from([0, (1 << bits) - 256, 10 << (bits - 8)]))
        net = (base + draw(st.integers(min_value=0, max_value=255))) >> (bits - length) << (bits - length)
        out.append((fam, net, length))
    return out


@given(_prefixes(), _prefixes())
@example([(4, 0, 25), (4, 128, 25), (6, 1 << 100, 128), (6, (1 << 100) + 1, 128)], [])  # abutting halves merge
@example([(6, 0xFFFFFF00, 24), (6, 3 << 30, 2)], [(6, 0xFFFFFF80, 25)])  # v6 read as v4 near 2**32
@example([(4, 10 << 24, 8), (6, 1 << 127, 1)], [(4, 10 << 24, 16), (4, 11 << 24, 8), (6, 1 << 127, 2)])
def test_integer_collapse_and_exclude_match_ipaddress(
    inc: list[tuple[int, int, int]], exc: list[tuple[int, int, int]]
) -> None:
    def outcome(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ValueError:
            return "raises"

    assert outcome(addresses.collapse, inc) == outcome(_reference_collapse, inc)
    assert outcome(addresses.exclude, inc, exc) == outcome(_reference_exclude, inc, exc)


def test_v6_exclusion_from_the_zero_prefix() -> None:
    # ipaddress.ip_network((0, 0)) is 0.0.0.0/0: the ipaddress-based cover kept ::/0 whole here
    result = addresses.exclude([addresses.parse_prefix("::/0")], [addresses.parse_prefix("fc00::/7")])
    assert addresses.parse_prefix("fc00::/7") not in result and len(result) == 7
    assert not any(addresses.prefix_contains(p, addresses.parse_address("fd00::1")) for p in result)
    assert any(addresses.prefix_contains(p, addresses.parse_address("2001:db8::1")) for p in result)
    both = addresses.collapse([addresses.parse_prefix("::/1"), addresses.parse_prefix("8000::/1")])
    assert both == [addresses.parse_prefix("::/0")]


def test_collapse_rejects_host_bits_like_ipaddress() -> None:
    for bad in [(4, 1, 24), (6, 1, 64), (4, 2**32, 32), (6, 1 << 100, 8)]:
        with pytest.raises(ValueError):
            _reference_collapse([bad])
        with pytest.raises(ValueError):
            addresses.collapse([bad])


def _ipaddress_prefix(text: str) -> object:
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return "raises"
    return (net.version, int(net.network_address), net.prefixlen)


def _our_prefix(text: str) -> object:
    try:
        return addresses.parse_prefix(text)
    except ValueError:
        return "raises"


_V4ISH = st.lists(
    st.sampled_from(
        ["0", "1", "9", "00", "01", "10", "25", "255", "256", "300", "1000", "٣", ".", ".", ".", "/", "/", " "]
    ),
    max_size=10,
).map("".join)


@given(
    st.one_of(
        _V4ISH,
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 40)).map(lambda t: f"{ipaddress.IPv4Address(t[0])}/{t[1]}"),
    )
)
@example("10.1.2.3/8")
@example(" 192.0.2.7 ")
@example("1.2.3.4/08")
@example("1.2.3.4/033")
@example("1.2.3.04/8")
@example("1.2.3.256")
@example("256.0.0.0/8")
def test_v4_fast_path_parses_like_ipaddress(text: str) -> None:
    assert _our_prefix(text) == _ipaddress_prefix(text)
