"""Effective policy, checked: what each agent says its kernel holds against what was published.

The agent API records every heartbeat's claim (:class:`~ringfence.store.base.EnforcementReport`:
the revision the agent enforces, the digest of what it read back out of the kernel, and the
digest of the published bundle at that revision, :mod:`ringfence.enforced`). This module turns
the records into findings (``ringfence findings``, ``GET /admin/findings``):

- ``silent``: an enrolled agent sent no heartbeat within the bound;
- ``not-enforced``: the workload's newest published version is not the one its agent enforces,
  longer than the bound after it was published (counted from the bundle's ``published_at``, or,
  for a version moved on by set deltas, from the first heartbeat that found the agent behind);
- ``kernel-mismatch``: the agent enforces the newest version, but its kernel holds something
  else (a rule or an address removed, a chain flushed, the table gone).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from ringfence.store.base import BundlePointer, Store

DEFAULT_BOUND = 120.0  # seconds: two default heartbeats (60 s) and the publish → apply path

Kind = Literal["not-enforced", "kernel-mismatch", "silent"]


class Finding(BaseModel):
    kind: Kind
    workload_id: str
    detail: str
    since: float | None = Field(None, description="when the condition began, as far as the control plane knows")
    enforced_version: int | None = None
    latest_version: int | None = None


class FindingsResponse(BaseModel):
    bound: float = Field(description="seconds allowed after a publish, and between heartbeats")
    checked: int = Field(description="enrolled workloads checked")
    findings: list[Finding]


def latest_version(store: Store, ptr: BundlePointer) -> int:
    """The workload's newest version: its stored bundle's, moved on by set heads (the agent API's rule)."""
    heads = store.set_heads(list(ptr.sets))
    return max([ptr.version, ptr.rules_revision, *(max(v, heads.get(n, v)) for n, v in ptr.sets.items())])


def findings(store: Store, bound: float = DEFAULT_BOUND, now: float | None = None) -> FindingsResponse:
    now = time.time() if now is None else now
    out: list[Finding] = []
    checked = 0
    reports = {r.workload_id: r for r in store.enforcement_reports()}
    for rec in store.all_records():
        if not rec.active or not rec.enrolled:
            continue  # no agent to ask (yet), or the workload is gone
        ptr = store.bundle_pointer(rec.id)
        if ptr is None:
            continue  # nothing published: nothing to enforce
        checked += 1
        rep = reports.get(rec.id)
        latest = latest_version(store, ptr)
        last = rec.last_heartbeat if rep is None else max(rep.time, rec.last_heartbeat or 0)
        if last is None or now - last > bound:
            ago = "never" if last is None else f"{now - last:.0f} s ago"
            out.append(
                Finding(
                    kind="silent",
                    workload_id=rec.id,
                    detail=f"no heartbeat within {bound:.0f} s (last: {ago}); what its kernel holds is unknown",
                    since=last,
                    enforced_version=rep.version if rep else None,
                    latest_version=latest,
                )
            )
            continue
        enforced = rep.version if rep else None
        if enforced is None or enforced < latest:
            published = ptr.published_at if latest == ptr.version else None
            if published is None and rep is not None and rep.latest_version is not None and latest > rep.latest_version:
                continue  # published after the last heartbeat, when unknown: the next one starts the clock
            since = published or (rep.behind_since if rep else None) or (rep.time if rep else last)
            if now - since > bound:
                out.append(
                    Finding(
                        kind="not-enforced",
                        workload_id=rec.id,
                        detail=f"version {latest} published {now - since:.0f} s ago; the agent enforces "
                        + ("nothing" if enforced is None else f"version {enforced}"),
                        since=since,
                        enforced_version=enforced,
                        latest_version=latest,
                    )
                )
            continue
        if rep is not None and rep.expected_digest is not None and rep.kernel_digest != rep.expected_digest:
            out.append(
                Finding(
                    kind="kernel-mismatch",
                    workload_id=rec.id,
                    detail=(
                        f"the agent claims version {enforced}, but its kernel holds "
                        + ("nothing it could read back" if rep.kernel_digest is None else "other rules or addresses")
                        + f" (kernel {str(rep.kernel_digest)[:12]}, published {rep.expected_digest[:12]})"
                    ),
                    since=rep.time,
                    enforced_version=enforced,
                    latest_version=latest,
                )
            )
    return FindingsResponse(bound=bound, checked=checked, findings=out)
