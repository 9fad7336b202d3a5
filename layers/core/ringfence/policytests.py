"""Run a policy's ``tests:`` block: each expectation against the explain evaluator."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ringfence.addresses import format_address
from ringfence.engine.compiler import WorkloadState
from ringfence.engine.explain import (
    Decision,
    Endpoint,
    EndpointError,
    decide,
    format_decision,
    ip_endpoint,
    labels_endpoint,
    workload_endpoint,
)
from ringfence.model import TestEndpoint
from ringfence.policy import CompiledTest, Policy


@dataclass(slots=True)
class TestResult:
    test: CompiledTest
    passed: bool
    decision: Decision | None
    error: str | None = None

    def report(self) -> str:
        t = self.test
        if self.error:
            return f"ERROR {t.name} ({t.location}): {self.error}"
        d = self.decision
        assert d is not None
        allowing = _pairs(d, "allow")
        if self.passed:
            if t.spec.expect == "allow" and len(allowing) < len(d.pairs):  # some address pairs denied
                return f"ok    {t.name} (allowed for {', '.join(allowing)} only)"
            return f"ok    {t.name}"
        got: str = d.policy_verdict
        if d.pairs:
            got += f" for {', '.join(allowing)}" if got == "allow" else " for every address pair"
        return f"FAIL  {t.name} ({t.location})\n      expected {t.spec.expect}, policy says {got}\n" + "\n".join(
            "      " + line for line in format_decision(d).splitlines()
        )


def _pairs(d: Decision, verdict: str) -> list[str]:
    return [
        f"{format_address(sa) if sa is not None else d.source.name} → "
        f"{format_address(da) if da is not None else d.destination.name}"
        for sa, da, p in d.pairs
        if p.policy_verdict == verdict
    ]


def _endpoint(spec: TestEndpoint, policy: Policy, workloads: Mapping[str, WorkloadState]) -> Endpoint:
    if spec.workload is not None:
        if spec.workload not in workloads:
            raise EndpointError(f"workload {spec.workload!r} is not in the inventory (pass --inventory)")
        return workload_endpoint(workloads[spec.workload])
    if spec.labels is not None:
        return labels_endpoint(policy, spec.labels)
    assert spec.ip is not None
    return ip_endpoint(spec.ip, workloads)


def run_tests(policy: Policy, workloads: Mapping[str, WorkloadState]) -> list[TestResult]:
    """Tests assert *policy*: a side in observe or idle mode still counts as denying.

    A packet carries one address of each end, so with several addresses every (source address,
    destination address) pair of one family is decided: ``expect: deny`` holds only when every
    pair is denied (a boundary no address gets across), ``expect: allow`` when some pair is
    allowed (the source can reach the destination, as the connectivity matrix says); a test
    that must hold for one address names it (``from: {ip: ...}``)."""
    results = []
    for t in policy.tests:
        try:
            src = _endpoint(t.spec.from_, policy, workloads)
            dst = _endpoint(t.spec.to, policy, workloads)
        except EndpointError as exc:
            results.append(TestResult(t, False, None, str(exc)))
            continue
        d = decide(policy, src, dst, t.proto, t.port)
        if not d.sides:
            results.append(TestResult(t, False, d, "neither endpoint is a managed workload"))
            continue
        results.append(TestResult(t, d.policy_verdict == t.spec.expect, d))
    return results
