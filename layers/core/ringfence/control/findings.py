"""Effective policy, checked: what each agent says its kernel holds against what was published.

The agent API records every heartbeat's claim (:class:`~ringfence.store.base.EnforcementReport`:
the revision the agent enforces, the digest of what it read back out of the kernel, and the
digest of the published bundle at that revision, :mod:`ringfence.enforced`). This module turns
the records into findings (``ringfence findings``, ``GET /admin/findings``):

- ``silent``: an enrolled agent sent no heartbeat within the bound;
- ``not-enforced``: the workload's newest published version is not the one its agent enforces,
  longer than the bound after it was published (counted from the bundle's ``published_at``, or,
  for a version moved on by set deltas, from the first heartbeat that found the agent behind);
  at once when the agent claims a version never published for the workload;
- ``kernel-mismatch``: the agent enforces the newest version, but its kernel holds something
  else (a rule or an address removed, a chain flushed, the table gone);
- ``tampered``: the agent found its rules or sets changed by another tool and re-applied them
  (its ``tamper_reapplied`` heartbeat counter rose), within :data:`TAMPER_WINDOW` of the last
  rise. A repaired tamper leaves the kernel digest matching, so without this the control plane
  would never hear of it; it is reported alongside any other finding of the workload.

Each finding names the version the workload's agent last said it runs (``agent_version``), and the
response lists every enrolled workload's agent (``agents``: its version, last heartbeat, the
revision it enforces) when asked for (``agents_listed``: one entry per workload, ~150 bytes each,
which would take a 100,000-workload fleet's answer past Lambda's 6 MB), as a PCE lists its VENs'
versions. No finding is raised for an old agent:
there is no minimum version to compare with, and "older than the newest seen" would flag every
workload in the middle of a rolling upgrade.

A heartbeat without a kernel digest is no finding: backends that cannot read the kernel back
(dry-run, windows-plan) and a read racing an apply send none. Nor is the digest a check against
root on the host, who can compute the expected one from its own bundle: it catches drift and
tamper by anything short of that.

:func:`announce` sends each finding to the SIEM once, as an OCSF Detection Finding, when a
scheduled pass first sees it (the AWS reconcile function; ``ringfence serve`` every
``RINGFENCE_FINDINGS_INTERVAL`` seconds).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from ringfence.siem import ocsf
from ringfence.store.base import BundlePointer, EnforcementReport, Store

from .wiring import BaseWiring

DEFAULT_BOUND = 120.0  # seconds: two default heartbeats (60 s) and the publish → apply path
ANNOUNCED_TTL = 30 * 24 * 3600  # an announced finding is not announced again for this long
TAMPER_WINDOW = 24 * 3600.0  # a repaired tamper stays a finding this long after the last one seen
MAX_COUNTER = 2**53

Kind = Literal["not-enforced", "kernel-mismatch", "silent", "tampered"]


class Finding(BaseModel):
    kind: Kind
    workload_id: str
    detail: str
    since: float | None = Field(
        None,
        description="when the condition began, as far as the control plane knows (tampered: the last repair seen)",
    )
    enforced_version: int | None = None
    latest_version: int | None = None
    repairs: int | None = Field(
        None, description="tampered: re-applies the control plane counted since the window opened"
    )
    agent_version: str | None = Field(
        None, description="the version the workload's agent said it runs at its last heartbeat (null: it said none)"
    )


class AgentState(BaseModel):
    """One enrolled workload's agent as its last heartbeat described it (the enforcement report)."""

    workload_id: str
    agent_version: str | None = Field(
        description="the agent's installed version (0.1.0+3f2a9c1b0d4e); null: no heartbeat recorded yet, an "
        "agent older than the field, or one run from a checkout"
    )
    last_heartbeat: float | None = Field(description="epoch seconds; null: none since it enrolled")
    enforced_version: int | None = Field(description="the revision it said it enforces")
    latest_version: int | None = Field(description="the newest published for it; null: nothing published yet")


class FindingsResponse(BaseModel):
    bound: float = Field(description="seconds allowed after a publish, and between heartbeats")
    tamper_window: float = Field(
        TAMPER_WINDOW, description="seconds a repaired tamper stays a finding after the last one seen"
    )
    checked: int = Field(description="enrolled workloads checked")
    findings: list[Finding]
    agents: list[AgentState] = Field(
        default_factory=list,
        description="every enrolled active workload's agent (its version, last heartbeat, what it enforces), by id; "
        "only when asked for (agents=true): empty otherwise",
    )


def latest_version(store: Store, ptr: BundlePointer) -> int:
    """The workload's newest version: its stored bundle's, moved on by set heads (the agent API's rule)."""
    heads = store.set_heads(list(ptr.sets))
    return max([ptr.version, ptr.rules_revision, *(max(v, heads.get(n, v)) for n, v in ptr.sets.items())])


def tamper_progress(
    before: EnforcementReport | None, counters: Mapping[str, int], now: float, window: float = TAMPER_WINDOW
) -> dict[str, Any]:
    """The tamper fields of the report a heartbeat writes (``EnforcementReport``), from the agent's
    ``tamper_reapplied`` counter and the workload's previous report. The agent keeps its counters
    in ``status.json`` in its state dir, so they survive daemon restarts and reboots; it counts a
    re-apply after finding its rules or sets changed (drift check, heartbeat set check, an apply
    that found the kernel no longer held the bundle).

    - a rise since the previous heartbeat: a repaired tamper, seen now (``tampered_at``), its
      increase added to ``tamper_repairs`` (restarted from 0 when the last one is older than the
      window: a new episode);
    - a fall: the agent's state dir was reset (a reinstall, a wiped disk): a new baseline, not a
      tamper; a tamper seen before stays a finding until the window ends;
    - no counter: 0 (an agent sends it once it has counted one; an agent too old to count repairs
      never rises); no previous report, or one written before the control plane kept the counter:
      a baseline only (what it counted before is history this control plane did not see)."""
    counter = min(max(int(counters.get("tamper_reapplied", 0)), 0), MAX_COUNTER)
    at = before.tampered_at if before is not None else None
    repairs = before.tamper_repairs if before is not None else 0
    prev = before.tamper_reapplied if before is not None else None
    if prev is not None and counter > prev:
        if at is None or now - at > window:
            repairs = 0
        repairs = min(repairs + counter - prev, MAX_COUNTER)
        at = now
    return {"tamper_reapplied": counter, "tampered_at": at, "tamper_repairs": repairs}


def _tampered(rec_id: str, rep: EnforcementReport | None, latest: int, now: float, window: float) -> Finding | None:
    if rep is None or rep.tampered_at is None or now - rep.tampered_at > window:
        return None
    at = datetime.fromtimestamp(rep.tampered_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    n = rep.tamper_repairs
    return Finding(
        kind="tampered",
        workload_id=rec_id,
        detail=(
            "the agent found its rules or sets changed by another tool and re-applied them "
            f"{n} time{'s' if n != 1 else ''} within {window / 3600:g} h; last seen at {at}"
        ),
        since=rep.tampered_at,
        enforced_version=rep.version,
        latest_version=latest,
        repairs=n,
    )


def findings(
    store: Store,
    bound: float = DEFAULT_BOUND,
    now: float | None = None,
    tamper_window: float = TAMPER_WINDOW,
    agents_listed: bool = False,
) -> FindingsResponse:
    now = time.time() if now is None else now
    out: list[Finding] = []
    checked = 0
    reports = {r.workload_id: r for r in store.enforcement_reports()}
    agents: list[AgentState] = []
    for rec in store.all_records():
        if not rec.active or not rec.enrolled:
            continue  # no agent to ask (yet), or the workload is gone
        ptr = store.bundle_pointer(rec.id)
        rep = reports.get(rec.id)
        latest = latest_version(store, ptr) if ptr is not None else None
        agents.append(
            AgentState(
                workload_id=rec.id,
                agent_version=rep.agent_version if rep else None,
                last_heartbeat=rec.last_heartbeat if rep is None else max(rep.time, rec.last_heartbeat or 0),
                enforced_version=rep.version if rep else None,
                latest_version=latest,
            )
        )
        if ptr is None or latest is None:
            continue  # nothing published: nothing to enforce
        checked += 1
        tampered = _tampered(rec.id, rep, latest, now, tamper_window)
        if tampered is not None:
            out.append(tampered)  # whatever holds now: the kernel was changed by someone else
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
        if rep is not None and enforced is not None and enforced > latest:
            # a version never published for this workload: whatever it enforces, not the policy
            out.append(
                Finding(
                    kind="not-enforced",
                    workload_id=rec.id,
                    detail=f"the agent claims version {enforced}, which was never published (newest {latest})",
                    since=rep.time,
                    enforced_version=enforced,
                    latest_version=latest,
                )
            )
            continue
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
                        f"the agent claims version {enforced}, but its kernel holds other rules or addresses"
                        f" (kernel {str(rep.kernel_digest)[:12]}, published {rep.expected_digest[:12]})"
                    ),
                    since=rep.time,
                    enforced_version=enforced,
                    latest_version=latest,
                )
            )
    versions = {a.workload_id: a.agent_version for a in agents}
    for f in out:
        f.agent_version = versions.get(f.workload_id)
    agents.sort(key=lambda a: a.workload_id)
    return FindingsResponse(
        bound=bound, checked=checked, findings=out, tamper_window=tamper_window, agents=agents if agents_listed else []
    )


_SEVERITY = {"kernel-mismatch": ocsf.HIGH, "not-enforced": ocsf.MEDIUM, "silent": ocsf.MEDIUM, "tampered": ocsf.HIGH}
_TITLE = {
    "kernel-mismatch": "Kernel does not hold the published policy",
    "tampered": "Firewall changed by another tool on the host (repaired by the agent)",
    "not-enforced": "Published policy not enforced in time",
    "silent": "Agent silent",
}


def finding_uid(f: Finding, rep_digests: tuple[str | None, str | None] = (None, None)) -> str:
    """One uid per condition, the same in every pass while it lasts: a silent agent by its last
    heartbeat, a version not enforced by that version, a kernel mismatch by what the kernel and
    the bundle hold (a new mismatch, or one that came back, is a new finding), a tamper by the
    heartbeat that saw the counter rise (each rise is a new finding)."""
    if f.kind == "silent":
        mark = "never" if f.since is None else f"{f.since:.0f}"
    elif f.kind == "tampered":
        mark = f"{f.since or 0:.3f}"
    elif f.kind == "not-enforced":
        mark = f"v{f.latest_version}"
    else:
        mark = f"{rep_digests[0] or 'none'}-{rep_digests[1] or 'none'}"
    return f"drift:{f.kind}:{f.workload_id}:{mark}"


def announce_policy(w: BaseWiring, now: float | None = None) -> list[dict[str, str]]:
    """The active policy's warnings over the estate as it is now (a selector that matches no
    workload, a rule that pairs none: :func:`ringfence.policywarnings.estate_warnings`), each not
    announced before for this policy version sent to the SIEM as a Detection Finding: what
    provisioning warned of, and what the estate changing under the policy makes moot later.
    Returns the warnings announced now (their ``doc()``)."""
    from ringfence.policywarnings import estate_warnings

    active = w.active_policy() if w.siem is not None else None
    if active is None:
        return []
    pv, policy = active
    now = time.time() if now is None else now
    workloads = [r.effective() for r in w.store.all_records() if r.active]
    out: list[dict[str, str]] = []
    for warning in estate_warnings(policy, workloads):
        doc = warning.doc()
        if _send_once(
            w,
            f"policy/{doc['kind']}:{doc['rule']}@{doc['location']}:v{pv.number}",
            title=f"policy/{doc['kind']}: {doc['rule']}",
            time=now,
            severity_id=ocsf.LOW,
            resource=f"{doc['rule']}@{doc['location']}",
            analytic=f"policy/{doc['kind']}",
            message=f"{doc['location']}: {doc['message']} (policy version {pv.number})",
            detail={**doc, "policy_version": pv.number},
        ):
            out.append(doc)
    return out


def announce(w: BaseWiring, bound: float = DEFAULT_BOUND, now: float | None = None) -> list[Finding]:
    """Send every finding not announced before to the SIEM as an OCSF Detection Finding (once per
    condition across passes and processes: the store's ``claim_once``), the policy's warnings over
    the estate too (:func:`announce_policy`). Nothing without a SIEM. Returns the effective-policy
    findings announced now."""
    if w.siem is None:
        return []
    now = time.time() if now is None else now
    announce_policy(w, now)
    res = findings(w.store, bound, now)
    out: list[Finding] = []
    for f in res.findings:
        rep = w.store.enforcement(f.workload_id) if f.kind == "kernel-mismatch" else None
        if _send_once(
            w,
            finding_uid(f, (rep.kernel_digest, rep.expected_digest) if rep else (None, None)),
            title=f"{_TITLE[f.kind]}: {f.workload_id}",
            time=now,
            severity_id=_SEVERITY[f.kind],
            resource=f.workload_id,
            analytic=f"effective-policy/{f.kind}",
            message=f"{f.workload_id}: {f.detail}",
            detail={
                "since": f.since,
                "enforced_version": f.enforced_version,
                "latest_version": f.latest_version,
                "bound_s": bound,
                **({"repairs": f.repairs} if f.repairs is not None else {}),
                **({"agent_version": f.agent_version} if f.agent_version is not None else {}),
            },
        ):
            out.append(f)
    return out


def _send_once(w: BaseWiring, uid: str, **finding: Any) -> bool:
    """The Detection Finding ``uid`` to the SIEM unless it was sent before (a store claim, so
    once across passes and processes); True if sent now."""
    if w.siem is None or not w.store.claim_once(f"announced#{uid}", ANNOUNCED_TTL):
        return False
    w.siem.finding(ocsf.detection_finding(uid, **finding))
    return True
