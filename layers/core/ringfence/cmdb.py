"""On-premise workloads from a CMDB export (CSV with a header row).

Columns: ``id`` and ``ips`` are required; ``name``, ``site`` and ``zone`` are the workload's
fields; ``label:<dimension>`` gives a label directly; ``tag:<key>`` or any other column is a tag
(CMDB attributes play the part of cloud tags and go through the policy's label mapping). ``ips``
holds one or more addresses separated by ``;``, ``|`` or spaces. Empty cells are absent values.

Every problem is reported as ``file:line:column: message`` (the column of the cell, counted in
characters from 1), all of them at once; a file with any problem yields no workload. An address
given to two rows is a problem, and so is one another workload holds (``held_by``): peers' sets
would give it one workload's access or the other's, whichever was written last.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ringfence.model import Workload

# fullmatch only: `$` also matches before a trailing newline, so "dc1-db-1\n" would be a second
# workload beside dc1-db-1, and a path naming it would reach dc1-db-1's routes
WORKLOAD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
# the ids clouds give their instances: an EC2 instance id, an Azure vmId (a GUID), a GCP instance
# id (a 64-bit number). An on-premise workload registered under one before the cloud's events
# name the instance would have its record taken over by the instance's, while the agent that
# paired as it kept its token and agent key: the instance's bundle, heartbeats and flow reports
# would be that agent's, and the instance's own agent could not enroll.
CLOUD_INSTANCE_ID = re.compile(
    r"i-[0-9a-f]{8,17}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9]{16,20}",
    re.IGNORECASE,
)
FIELDS = ("id", "name", "ips", "site", "zone")
MAX_ERRORS = 50
_SEPARATORS = re.compile(r"[;|\s]+")


class CmdbError(ValueError):
    """The file's problems, one ``file:line:column: message`` per line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def valid_workload_id(wid: str) -> str | None:
    """Why ``wid`` cannot name an on-premise workload, or None. Ids become parts of published
    keys and of agent URLs, so they are kept to letters, digits and ``_ . : -``; and none has
    the form of a cloud instance's id (:data:`CLOUD_INSTANCE_ID`), nor is ``import``."""
    if not WORKLOAD_ID.fullmatch(wid):
        return f"workload id {wid!r} must be 1-128 of A-Z a-z 0-9 _ . : - and start with a letter or digit"
    if wid == "import":  # /admin/workloads/import is the CMDB import: such a workload could not be deregistered
        return "workload id 'import' is reserved (the admin API's /admin/workloads/import)"
    if CLOUD_INSTANCE_ID.fullmatch(wid):
        return (
            f"workload id {wid!r} has the form of a cloud instance's id (EC2, an Azure vmId, GCP): "
            "cloud instances are observed, not registered; name the on-premise host otherwise"
        )
    return None


def parse_ips(cell: str) -> list[str]:
    out = []
    for part in _SEPARATORS.split(cell.strip()):
        if part:
            try:
                addr = ipaddress.ip_address(part)
            except ValueError:
                raise ValueError(f"not an IP address: {part!r}") from None
            if getattr(addr, "scope_id", None) is not None:
                # a zone index names a link, not another address: the firewall drops it, so
                # fe80::1%eth0 would pass the one-owner check as a second owner of fe80::1
                raise ValueError(f"{part!r}: an address with a zone index (%…) is not a workload address")
            out.append(str(addr))
    return out


class _Lines:
    """The physical lines the csv reader consumed, so each cell can be located."""

    def __init__(self, text: str) -> None:
        self._it = iter(io.StringIO(text, newline=""))
        self.lines: list[str] = []

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = next(self._it)
        self.lines.append(line)
        return line


def _cell_positions(raw: str, first_line: int) -> list[tuple[int, int]]:
    """(line, column) where each field of one CSV record starts (quotes respected)."""
    positions = [(first_line, 1)]
    line, col, quoted = first_line, 1, False
    for ch in raw:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            positions.append((line, col + 1))
        if ch == "\n":
            line, col = line + 1, 1
        else:
            col += 1
    return positions


@dataclass(frozen=True, slots=True)
class CmdbRow:
    """One workload of a CMDB export and where its row starts."""

    workload: Workload
    line: int


def parse_cmdb_csv(text: str, source: str = "cmdb.csv") -> list[Workload]:
    """The workloads of a CMDB export; :class:`CmdbError` with every problem if any row is bad."""
    return [r.workload for r in parse_cmdb_rows(text, source)]


def parse_cmdb_rows(text: str, source: str = "cmdb.csv", held_by: Mapping[str, str] | None = None) -> list[CmdbRow]:
    """The rows of a CMDB export; :class:`CmdbError` with every problem if any row is bad.
    ``held_by``: address → the workload holding it now; a row giving such an address to another
    workload is a problem unless the file also registers that holder (which then gives it up)."""
    text = text.removeprefix("\ufeff")  # spreadsheet exports often start with a BOM
    lines = _Lines(text)
    reader = csv.reader(lines, strict=True)
    errors: list[str] = []

    def err(line: int, col: int, msg: str) -> None:
        errors.append(f"{source}:{line}:{col}: {msg}")

    records: list[tuple[int, list[str], list[tuple[int, int]]]] = []
    consumed = 0
    try:
        for row in reader:
            start = consumed + 1
            consumed = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            raw = "".join(lines.lines[start - 1 : consumed])
            records.append((start, row, _cell_positions(raw, start)))
    except csv.Error as exc:
        raise CmdbError([f"{source}:{reader.line_num}:1: {exc}"]) from None
    if not records:
        raise CmdbError([f"{source}:1:1: no header row (expected at least id,ips)"])

    header_line, header, header_pos = records[0]
    columns = [h.strip() for h in header]
    seen_cols: dict[str, int] = {}
    seen_tags: dict[str, str] = {}  # tag key → the column giving it (``role`` and ``tag:role`` both give ``role``)
    for i, name in enumerate(columns):
        line, col = header_pos[i]
        # the tag key a column gives (None: an id, a field or a label)
        tag = None if name in FIELDS or name.startswith("label:") else name.removeprefix("tag:")
        if not name:
            err(line, col, f"column {i + 1} has no name")
        elif name in seen_cols:
            err(line, col, f"column {name!r} appears twice (first as column {seen_cols[name] + 1})")
        elif name.startswith("label:") and not name.removeprefix("label:"):
            err(line, col, "label: column without a dimension name")
        elif tag is not None and tag in seen_tags:
            # else the later column's value would silently win over the earlier's
            err(line, col, f"column {name!r} gives the tag of column {seen_tags[tag]!r} again")
        else:
            seen_cols[name] = i
            if tag is not None:
                seen_tags[tag] = name
    for required in ("id", "ips"):
        if required not in seen_cols:
            err(header_line, 1, f"no {required!r} column (the header has: {', '.join(columns)})")
    if errors:
        raise CmdbError(errors)

    out: list[CmdbRow] = []
    first_seen: dict[str, int] = {}
    address_rows: dict[str, tuple[str, int]] = {}  # address → (workload, line) that gives it first
    addressed: list[tuple[str, str, int, int]] = []  # (workload, address, line, column) in the file
    for line, row, pos in records[1:]:
        if len(errors) >= MAX_ERRORS:
            errors.append(f"{source}: more problems not shown (first {MAX_ERRORS} above)")
            break
        if len(row) != len(columns):
            err(line, 1, f"row has {len(row)} fields, the header has {len(columns)}")
            continue
        cells = {columns[i]: (row[i].strip(), pos[i]) for i in range(len(columns))}
        wid, (id_line, id_col) = cells["id"]
        problem = valid_workload_id(wid) if wid else "missing workload id"
        if problem:
            err(id_line, id_col, problem)
            continue
        if wid in first_seen:
            err(id_line, id_col, f"workload {wid} appears twice (first on line {first_seen[wid]})")
            continue
        first_seen[wid] = line
        ips_cell, (ip_line, ip_col) = cells["ips"]
        try:
            ips = parse_ips(ips_cell)
        except ValueError as exc:
            err(ip_line, ip_col, str(exc))
            continue
        if not ips:
            err(ip_line, ip_col, f"workload {wid} has no address")
            continue
        for ip in dict.fromkeys(ips):
            if ip in address_rows:
                other, other_line = address_rows[ip]
                err(ip_line, ip_col, f"address {ip} is also {other}'s (line {other_line})")
            else:
                address_rows[ip] = (wid, line)
                addressed.append((wid, ip, ip_line, ip_col))
        tags: dict[str, str] = {}
        labels: dict[str, str] = {}
        fields: dict[str, str] = {}
        for name, (value, _) in cells.items():
            if not value or name in ("id", "ips"):
                continue
            if name in FIELDS:
                fields[name] = value
            elif name.startswith("label:"):
                labels[name.removeprefix("label:")] = value
            else:
                tags[name.removeprefix("tag:")] = value
        out.append(
            CmdbRow(
                Workload(
                    id=wid,
                    ips=ips,
                    tags=tags,
                    labels=labels,
                    cloud="onprem",
                    name=fields.get("name"),
                    site=fields.get("site"),
                    zone=fields.get("zone"),
                ),
                line,
            )
        )
    for wid, ip, ip_line, ip_col in addressed:
        owner = (held_by or {}).get(ip)
        if owner is not None and owner != wid and owner not in first_seen and len(errors) < MAX_ERRORS:
            err(ip_line, ip_col, f"address {ip} is held by workload {owner} (deregister it or give it another first)")
    if errors:
        raise CmdbError(errors)
    return out
