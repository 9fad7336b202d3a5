"""Label index: (dimension, value) → members as integer bitsets over workload slots."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from ringfence.selectors import And, BitsetIndex, In, Node

T = TypeVar("T")


class LabelIndex(BitsetIndex):
    """Members per label value, per dimension, and the universe of selectable workloads.

    Quarantined workloads are not in the universe: no selector can match them, so every peer
    drops them from its sets at once.
    """

    __slots__ = ("_by_dim", "_by_value", "_universe")

    def __init__(self) -> None:
        self._by_value: dict[tuple[str, str], int] = {}
        self._by_dim: dict[str, int] = {}
        self._universe = 0

    def universe(self) -> int:
        return self._universe

    def members(self, dim: str, value: str) -> int:
        return self._by_value.get((dim, value), 0)

    def having(self, dim: str) -> int:
        return self._by_dim.get(dim, 0)

    def lacking(self, dim: str) -> int:
        return self._universe & ~self._by_dim.get(dim, 0)

    def add(self, slot: int, labels: Mapping[str, str]) -> None:
        bit = 1 << slot
        self._universe |= bit
        for dim, value in labels.items():
            key = (dim, value)
            self._by_value[key] = self._by_value.get(key, 0) | bit
            self._by_dim[dim] = self._by_dim.get(dim, 0) | bit

    def remove(self, slot: int, labels: Mapping[str, str]) -> None:
        bit = 1 << slot
        self._universe &= ~bit
        for dim, value in labels.items():
            key = (dim, value)
            left = self._by_value.get(key, 0) & ~bit
            if left:
                self._by_value[key] = left
            else:
                self._by_value.pop(key, None)
            self._by_dim[dim] = self._by_dim.get(dim, 0) & ~bit


def iter_bits(bits: int) -> Iterator[int]:
    """Slots set in ``bits``, ascending: by lowest bit for sparse sets, by bytes for dense ones."""
    if not bits:
        return
    if bits.bit_count() < 32:
        while bits:
            low = bits & -bits
            yield low.bit_length() - 1
            bits ^= low
        return
    data = bits.to_bytes((bits.bit_length() + 7) // 8, "little")
    for i, byte in enumerate(data):
        if byte:
            base = i << 3
            for j in _BYTE_BITS[byte]:
                yield base + j


_BYTE_BITS: list[tuple[int, ...]] = [tuple(j for j in range(8) if b >> j & 1) for b in range(256)]


def required_values(node: Node) -> list[tuple[str, frozenset[str]]]:
    """``dim in values`` conditions every workload matching ``node`` satisfies (its positive conjuncts)."""
    if isinstance(node, In) and not node.negate:
        return [(node.dim, node.values)]
    if isinstance(node, And):
        return [r for p in node.parts for r in required_values(p)]
    return []


class RestrictionIndex(Generic[T]):
    """Selectors indexed by one label restriction each, so a workload is tested against candidates only.

    Like Calico's label-restriction index: a selector with a positive conjunct ``dim == v`` (or
    ``dim in {…}``) can only match workloads carrying one of those values, so it is filed under
    them; a selector without one is a candidate for every workload. Of several conjuncts, the
    one over the dimension with the most distinct values across all selectors is used (``app``
    rather than ``role``): it splits the candidates finest. ``candidates`` is a superset of the
    matches; callers still evaluate the selector.
    """

    __slots__ = ("_by_value", "_dims", "_unrestricted")

    def __init__(self, items: Iterable[tuple[T, Node]]) -> None:
        pending = [(item, required_values(node)) for item, node in items]
        spread: dict[str, set[str]] = {}
        for _, reqs in pending:
            for dim, values in reqs:
                spread.setdefault(dim, set()).update(values)
        self._by_value: dict[tuple[str, str], list[T]] = {}
        self._unrestricted: list[T] = []
        dims: set[str] = set()
        for item, reqs in pending:
            if not reqs:
                self._unrestricted.append(item)
                continue
            dim, values = max(reqs, key=lambda r: (len(spread[r[0]]), -len(r[1]), r[0]))
            dims.add(dim)
            for v in values:
                self._by_value.setdefault((dim, v), []).append(item)
        self._dims = tuple(sorted(dims))

    def candidates(self, labels: Mapping[str, str]) -> list[T]:
        out = list(self._unrestricted)
        for dim in self._dims:
            value = labels.get(dim)
            if value is not None:
                out.extend(self._by_value.get((dim, value), ()))
        return out
