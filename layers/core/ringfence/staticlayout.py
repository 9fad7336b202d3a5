"""The static source layout: what ``ringfence compile`` writes and ``ringfence-agent run`` reads
from a directory or a plain HTTP base URL (no control plane, no AWS). See docs/agent.md::

    <base>/bundles/<id>.json          a workload's signed bundle (the whole truth)
    <base>/heads/<id>.json            its head: the bundle's version, when the workload's own rules
                                      last changed, and the version of each set it holds
    <base>/deltas/<set>/<from>.json   the signed delta that moves <set> on from version <from>

A set's versions form a single line (one version, one content), so exactly one delta leaves each
version: an agent finds the chain by name, without listing a directory. Heads are unsigned: they
only say what to fetch, and everything applied is verified. Writers put deltas first, bundles
next and heads last, so whatever a head announces is already there.

The agent imports this module: standard library only.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import TypeGuard

HEAD_FORMAT = "ringfence.head/v1"


class HeadError(ValueError):
    """A head document that cannot be used (the agent then falls back to the whole bundle)."""


@dataclass(frozen=True, slots=True)
class Head:
    workload_id: str
    version: int  # the bundle's version
    rules_version: int  # when this workload's rules, mode or fail-safes last changed (≤ version)
    sets: dict[str, int] = field(default_factory=dict)  # set name → its version in the bundle

    def dumps(self) -> str:
        doc = {
            "format": HEAD_FORMAT,
            "workload_id": self.workload_id,
            "version": self.version,
            "rules_version": self.rules_version,
            "sets": dict(sorted(self.sets.items())),
        }
        return json.dumps(doc, indent=1) + "\n"


def load_head(raw: str | bytes) -> Head:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HeadError(f"head is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != HEAD_FORMAT:
        raise HeadError(f"head format must be {HEAD_FORMAT!r}")
    wid, version, rules, sets = (doc.get(k) for k in ("workload_id", "version", "rules_version", "sets"))
    if not isinstance(wid, str) or not _is_int(version) or not _is_int(rules) or not isinstance(sets, dict):
        raise HeadError("head needs workload_id (string), version, rules_version (integers) and sets (object)")
    if not all(isinstance(k, str) and _is_int(v) and v <= version for k, v in sets.items()) or rules > version:
        raise HeadError("head versions must be integers no newer than its version")
    return Head(wid, version, rules, dict(sets))


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def file_name(workload_id: str) -> str:
    """Workload ids are data (Azure ids hold '/'), never path syntax."""
    return urllib.parse.quote(workload_id, safe="-_.:@") + ".json"


def bundle_path(workload_id: str) -> str:
    return f"bundles/{file_name(workload_id)}"


def head_path(workload_id: str) -> str:
    return f"heads/{file_name(workload_id)}"


def delta_path(set_name: str, from_version: int) -> str:
    return f"deltas/{urllib.parse.quote(set_name, safe='-_.')}/{from_version}.json"
