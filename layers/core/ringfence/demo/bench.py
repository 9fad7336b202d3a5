"""``ringfence demo --bench``: time to policy in the live lab (docs/benchmarks.md, "Time to policy").

After the live demo's start (estate, control plane, 20 agents), each kind of cloud change is made
``--repeat`` times and timed from the change to the last affected agent enforcing it
(:meth:`ringfence.demo.live.Live.measure`): a single launch (ASG +1; the new instance's agent
boots, enrolls and applies, peers apply the set delta), a tag change (``env`` of one instance,
flipping between an invalid and a valid value), a quarantine and its release (admin API); then a
10- and a 50-instance scale-out, each followed by the scale-in. Samples, p50/p95 and where the
time went go to ``out/summary.json``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ringfence.demo.live import Live
from ringfence.local.estate import ASG_NAME, TAGGER_ROLE


def _launch(d: Live, n: int, timeout: float) -> None:
    before = set(d.asg_states())
    target = len(before) + n

    published: set[str] = set()

    def ready() -> bool:
        # the pointers still missing, read together until they exist: the bench's own reads load
        # the same moto the pipeline it times is waiting on (read one by one every 0.2 s, they were
        # a third of moto's GetItems during a 50-instance scale-out)
        fresh = [i for i in d.asg_states() if i not in before]
        waiting = [i for i in fresh if i not in published]
        published.update(d.store.bundle_pointers(waiting) if waiting else ())
        return len(fresh) >= n and published.issuperset(fresh)

    kind = "launch" if n == 1 else f"scale_out_{n}"
    s = d.measure(kind, f"{ASG_NAME} +{n}", lambda: d.scale(target), ready, timeout=timeout)
    d.r.say(f"  {kind}: {s.seconds}s ({s.agents} agents)")


def _scale_in(d: Live, timeout: float) -> None:
    gone = list(d.asg_states())
    if not gone:
        return

    def done() -> bool:
        if d.asg_states():
            return False
        recs = d.store.get_many(gone)
        return all(r is None or not r.active for r in recs.values())

    s = d.measure("terminate", f"{ASG_NAME} -{len(gone)}", lambda: d.scale(0), done, tuple(gone), timeout=timeout)
    d.r.say(f"  terminate {len(gone)}: {s.seconds}s ({s.agents} agents)")


KINDS = ("launch", "tag", "quarantine", "scale10", "scale50")


def bench_kinds(only: str | None) -> list[str]:
    """The kinds ``--bench-only`` names (all by default), in the bench's order."""
    if not only:
        return list(KINDS)
    asked = [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in asked if k not in KINDS]
    if unknown:
        raise ValueError(f"--bench-only: unknown kind {', '.join(unknown)} (known: {', '.join(KINDS)})")
    return [k for k in KINDS if k in asked]


def bench(d: Live, args: argparse.Namespace) -> None:
    repeat = max(1, int(args.repeat))
    kinds = bench_kinds(getattr(args, "bench_only", None))
    ec2 = d.aws.client_as("ec2", TAGGER_ROLE)
    if "launch" in kinds:
        _bench_launch(d, repeat)
    if "tag" in kinds:
        _bench_tag(d, repeat, ec2)
    if "quarantine" in kinds:
        _bench_quarantine(d, repeat)
    for n, number in ((10, 4), (50, 5)):
        if f"scale{n}" in kinds:
            with d.r.step(number, f"scale-out of {n}, then scale-in"):
                t0 = time.time()
                _launch(d, n, 120 + 6 * n)  # a measuring window, not a target: 180 s for 10, 420 s for 50
                _scale_in(d, 120 + 6 * n)
                d.r.say(f"  round trip {time.time() - t0:.1f}s")


def _bench_launch(d: Live, repeat: int) -> None:
    with d.r.step(1, f"single launch ×{repeat}"):
        for _ in range(repeat):
            _launch(d, 1, 60)
        _scale_in(d, 60)


def _bench_tag(d: Live, repeat: int, ec2: Any) -> None:
    with d.r.step(2, f"tag change ×{repeat}"):
        iid = d.iid("ord-prod-web-9")
        for k in range(repeat):
            value = "prod" if k % 2 == 0 else "prdo"

            def seen(v: str = value) -> bool:
                rec = d.store.get(iid)
                return rec is not None and rec.workload.tags.get("ringfence:env") == v

            s = d.measure(
                "tag_change",
                f"ord-prod-web-9 env={value}",
                lambda v=value: ec2.create_tags(Resources=[iid], Tags=[{"Key": "ringfence:env", "Value": v}]),  # type: ignore[misc]
                seen,
                (iid,),
            )
            d.r.say(f"  env={value}: {s.seconds}s ({s.agents} agents)")


def _bench_quarantine(d: Live, repeat: int) -> None:
    with d.r.step(3, f"quarantine ×{repeat}"):
        victim = d.iid("ord-prod-web-1")
        for _ in range(repeat):
            s = d.measure(
                "quarantine",
                "ord-prod-web-1",
                lambda: d.admin("POST", f"/admin/workloads/{victim}/quarantine", {"reason": "bench"}),
                lambda: bool((rec := d.store.get(victim)) and rec.op_quarantined),
                (victim,),
                admin=True,
            )
            d.r.say(f"  quarantine: {s.seconds}s ({s.agents} agents)")
            d.measure(
                "release",
                "ord-prod-web-1",
                lambda: d.admin("DELETE", f"/admin/workloads/{victim}/quarantine", {"reason": "bench"}),
                lambda: bool((rec := d.store.get(victim)) and not rec.op_quarantined),
                (victim,),
                admin=True,
            )
