"""Addresses → workloads as of a flow's time.

An address can move between instances (one terminates, another launches with its address), so
a flow is resolved with the owner the address had *when the flow was seen*, not the owner it has
now. The inventory keeps only the present; the store keeps an address → workload interval record
(:class:`AddressOwner`, ``since`` each): every ingest run notes the inventory's current owners
(:func:`sync_addresses`), and a change of owner opens a new interval. A flow before the first
interval recorded for its address is resolved with that first owner (the record starts when
Ringfence first saw the address).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from ringfence.model import Workload

NOBODY = ""  # an interval in which no active workload held the address
STEP = 0.001  # a backdated interval opens at least this long after the one it follows (DynamoDB keys: µs)


class AddressOwner(BaseModel):
    """From ``since`` on (until the next interval), ``address`` was ``workload``'s (or nobody's)."""

    address: str
    since: float
    workload_id: str = NOBODY
    workload: Workload | None = None  # its effective record then (tags, operator mode, quarantine)


class AddressHistoryStore(Protocol):
    """What :class:`AddressBook` reads and :func:`sync_addresses` writes (both stores have it)."""

    def note_addresses(self, owners: list[AddressOwner]) -> None: ...
    def address_history(self, addresses: list[str]) -> dict[str, list[AddressOwner]]: ...


Handed = Callable[[AddressOwner, Workload], float | None]


def changed_owners(
    current: Mapping[str, Workload], latest: Mapping[str, AddressOwner], at: float, handed: Handed | None = None
) -> list[AddressOwner]:
    """The intervals to open at ``at``: addresses whose owner (or its record) differs from the
    latest interval, and addresses no active workload holds any more. An address that changed
    hands opens its new owner's interval at ``handed(latest interval, new owner)`` instead, when
    that is a time (when the inventory says the new owner held it and the old one no longer
    did) between the latest interval's start and ``at``."""
    out = []
    for addr, w in current.items():
        last = latest.get(addr)
        if last is None or last.workload_id != w.id or last.workload != w:
            since = at
            if last is not None and last.workload_id != w.id and handed is not None:
                t = handed(last, w)
                if t is not None and last.since + STEP <= t < at:
                    since = t
            out.append(AddressOwner(address=addr, since=since, workload_id=w.id, workload=w))
    for addr, last in latest.items():
        if addr not in current and last.workload_id != NOBODY:
            out.append(AddressOwner(address=addr, since=at))
    return out


def current_owners(workloads: Iterable[Workload]) -> dict[str, Workload]:
    out: dict[str, Workload] = {}
    for w in workloads:
        w = w.model_copy(update={"observed_at": 0.0})  # a new observation alone is no new interval
        for ip in w.ips:
            out[ip] = w
    return out


def sync_addresses(
    store: AddressHistoryStore,
    active: Iterable[Workload],
    released: Iterable[str],
    at: float,
    handed: Handed | None = None,
) -> int:
    """Note at ``at`` the owners that ``active`` (the running inventory, effective records) give
    their addresses, and that ``released`` addresses (of workloads gone) are nobody's unless an
    active one holds them (``handed``: :func:`changed_owners`); the number of intervals opened."""
    current = current_owners(active)
    latest = latest_owners(store, sorted(set(current) | set(released)))
    opened = changed_owners(current, latest, at, handed)
    if opened:
        store.note_addresses(opened)
    return len(opened)


def latest_owners(store: AddressHistoryStore, addresses: list[str]) -> dict[str, AddressOwner]:
    """The interval each of ``addresses`` is in now (those never recorded: absent)."""
    history = store.address_history(addresses)
    return {a: max(h, key=lambda o: o.since) for a, h in history.items() if h}


@dataclass(slots=True)
class AddressBook:
    """Owners by address, each list sorted by ``since``."""

    history: dict[str, list[AddressOwner]]
    _since: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for owners in self.history.values():
            owners.sort(key=lambda o: o.since)
        self._since = {a: [o.since for o in owners] for a, owners in self.history.items()}

    def add(self, history: dict[str, list[AddressOwner]]) -> None:
        """More addresses' histories (an object read in chunks looks up each chunk's new ones)."""
        for address, owners in history.items():
            owners.sort(key=lambda o: o.since)
            self.history[address] = owners
            self._since[address] = [o.since for o in owners]

    def clear(self) -> None:
        self.history.clear()
        self._since.clear()

    def interval(self, address: str, at: float) -> AddressOwner | None:
        """The interval holding ``at`` exactly (the owner then, or a nobody's interval); None for
        an address never recorded, or ``at`` before its first interval (not known then)."""
        owners = self.history.get(address)
        if not owners:
            return None
        i = bisect.bisect_right(self._since[address], at) - 1
        return owners[i] if i >= 0 else None

    def owner(self, address: str, at: float) -> AddressOwner | None:
        """The interval holding ``at``; before the first recorded one, that first one; None for
        an address never recorded or held by nobody then."""
        owners = self.history.get(address)
        if not owners:
            return None
        i = bisect.bisect_right(self._since[address], at) - 1
        o = owners[max(i, 0)]
        return o if o.workload is not None else None
