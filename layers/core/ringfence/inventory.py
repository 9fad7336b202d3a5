"""Inventory files for offline use and on-premise estates: JSON, YAML, or a CMDB-style CSV.

CSV columns: ``id`` (required), ``ips`` (separated by ``;``, ``,`` or spaces), optional ``name``,
``cloud``, ``region``, ``zone``, ``site``, ``account``, ``vpc``, ``subnet``, ``mode``,
``quarantined``, and labels or tags either as one column (``labels``/``tags`` holding
``key=value;key=value``) or one column each (``label:role``, ``tag:Name``).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ringfence import yamlpos
from ringfence.model import Workload


@dataclass(frozen=True, slots=True)
class InventoryProblem:
    file: str
    line: int
    column: str | int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class InventoryError(ValueError):
    def __init__(self, problems: list[InventoryProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


_BOOLEANS = {
    "": False,
    "0": False,
    "false": False,
    "no": False,
    "n": False,
    "1": True,
    "true": True,
    "yes": True,
    "y": True,
}
_SCALARS = ("id", "name", "cloud", "account", "region", "zone", "vpc", "subnet", "site", "mode")


def load_inventory(path: Path) -> list[Workload]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheet exports often start with a BOM
    except UnicodeDecodeError as exc:
        raise InventoryError([InventoryProblem(str(path), 1, 1, f"not UTF-8 text ({exc.reason})")]) from None
    if path.suffix.lower() == ".csv":
        return parse_csv(text, str(path))
    return parse_document(text, str(path))


def parse_document(text: str, file: str) -> list[Workload]:
    try:
        located = yamlpos.load(text)  # YAML is a superset of JSON: one loader, positions for both
    except yamlpos.YamlError as exc:
        raise InventoryError([InventoryProblem(file, exc.line, exc.column, exc.message)]) from None
    data = located.data
    items: Any = data.get("workloads") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise InventoryError([InventoryProblem(file, 1, 1, "expected a list of workloads or {workloads: [...]}")])
    prefix: tuple[str | int, ...] = ("workloads",) if isinstance(data, dict) else ()
    problems: list[InventoryProblem] = []
    out: list[Workload] = []
    for i, item in enumerate(items):
        try:
            out.append(Workload.model_validate(item))
        except ValidationError as exc:
            for err in exc.errors():
                path = (*prefix, i, *err["loc"])
                pos = located.position(path)
                field = ".".join(str(p) for p in err["loc"]) or "workload"
                problems.append(InventoryProblem(file, pos.line, pos.column, f"{field}: {err['msg']}"))
    _check_duplicates(out, problems, file, lambda k: located.position((*prefix, k, "id")).line)
    if problems:
        raise InventoryError(problems)
    return out


def _pairs(cell: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in cell.replace("\n", ";").split(";"):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {part.strip()!r}")
        out[key.strip()] = value.strip()
    return out


def parse_csv(text: str, file: str) -> list[Workload]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip().lstrip("\ufeff") for h in next(reader)]
    except StopIteration:
        raise InventoryError([InventoryProblem(file, 1, 1, "empty CSV file")]) from None
    if "id" not in header:
        raise InventoryError([InventoryProblem(file, 1, 1, "CSV needs an 'id' column")])
    problems: list[InventoryProblem] = []
    out: list[Workload] = []
    rows: dict[int, int] = {}
    for row_no, row in enumerate(reader, start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            problems.append(
                InventoryProblem(file, row_no, len(row), f"row has {len(row)} cells, header has {len(header)}")
            )
            continue
        record: dict[str, Any] = {"tags": {}, "labels": {}}
        bad = False
        for col_no, (name, cell) in enumerate(zip(header, row, strict=True), start=1):
            cell = cell.strip()
            try:
                if name in _SCALARS:
                    if cell:
                        record[name] = cell
                elif name == "ips":
                    record["ips"] = [p for p in cell.replace(",", " ").replace(";", " ").split() if p]
                elif name == "quarantined":
                    if cell.lower() not in _BOOLEANS:
                        raise ValueError(f"expected true/false, yes/no or 1/0, got {cell!r}")
                    record["quarantined"] = _BOOLEANS[cell.lower()]
                elif name in ("tags", "labels"):
                    record[name].update(_pairs(cell))
                elif name.startswith(("tag:", "label:")):
                    kind, _, key = name.partition(":")
                    if cell:
                        record[kind + "s"][key] = cell
                elif name:
                    raise ValueError(f"unknown column {name!r} (use tag:KEY or label:DIM for extra columns)")
            except ValueError as exc:
                problems.append(InventoryProblem(file, row_no, f"{col_no} ({name})", str(exc)))
                bad = True
        if bad:
            continue
        try:
            out.append(Workload.model_validate(record))
            rows[len(out) - 1] = row_no
        except ValidationError as exc:
            for err in exc.errors():
                col = str(err["loc"][0]) if err["loc"] else "?"
                col_ref = f"{header.index(col) + 1} ({col})" if col in header else col
                problems.append(InventoryProblem(file, row_no, col_ref, err["msg"]))
    _check_duplicates(out, problems, file, lambda k: rows.get(k, 0))
    if problems:
        raise InventoryError(problems)
    return out


def _check_duplicates(items: list[Workload], problems: list[InventoryProblem], file: str, line_of: Any) -> None:
    seen: dict[str, int] = {}
    for k, w in enumerate(items):
        if w.id in seen:
            problems.append(
                InventoryProblem(
                    file,
                    line_of(k),
                    "id",
                    f"duplicate workload id {w.id!r} (first at line {line_of(seen[w.id])})",
                )
            )
        else:
            seen[w.id] = k


def dump_inventory(workloads: list[Workload]) -> str:
    return (
        json.dumps({"workloads": [w.model_dump(mode="json", exclude_defaults=True) for w in workloads]}, indent=1)
        + "\n"
    )
