from __future__ import annotations

import ipaddress

from hypothesis import given
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
