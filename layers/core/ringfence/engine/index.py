"""Label index: (dimension, value) → members as integer bitsets over workload slots."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from ringfence.selectors import BitsetIndex


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
