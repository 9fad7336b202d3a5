"""Where the time goes between a change in the embedded AWS and compute having published for it.

    .venv/bin/python -m tests.bench.router_latency [--samples 5] [--estate 5 50 200] [--scale 10]

For each estate size (instances besides the example estate): the router's watch tick (one
DescribeInstances + DescribeAutoScalingGroups look and its diff), then per kind of change — one
instance launched, one tag changed, an ASG scale-out with a launch hook — the time from the boto3
call returning to: the watcher seeing the change (``detect``), ``PutEvents`` returning (``put``), the
ingest/lifecycle handler done (``ingested``) and the compute handler done (``computed``); for the
scale-out, also to the instance being seen ``InService`` (compute completed the lifecycle action).
Prints one JSON document (seconds; p50 / p95 / max over the samples).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from typing import Any


def _summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:
        return {}
    return {
        "n": len(xs),
        "p50": round(statistics.median(xs), 4),
        "p95": round(xs[min(int(len(xs) * 0.95), len(xs) - 1)], 4),
        "max": round(xs[-1], 4),
    }


def run(samples: int, estates: list[int], scale: int, watch_interval: float) -> dict[str, Any]:
    from ringfence.local import router as rt
    from ringfence.local.aws import EmbeddedAws
    from ringfence.local.router import EventRouter, TimelineEntry
    from tests.aws.conftest import Env

    logging.getLogger("ringfence").setLevel(logging.ERROR)
    out: dict[str, Any] = {"watch_interval": watch_interval, "estates": []}
    with EmbeddedAws(metrics=False, lifecycle_hook_names=("rf-hook",)) as aws:  # its launch hook's name
        for extra in estates:
            env = Env(aws)
            env.build()
            env.provision_example_policy()
            r = EventRouter(aws, functions=env.fn, watch_interval=watch_interval)
            r.start()
            try:
                est = env.estate()
                for i in range(extra):
                    est["run"]("processing", est["subnets"]["app"], 1, env="dev" if i % 2 else "prod")
                assert r.wait_idle(600), "the estate never settled"
                r._ticks.clear()  # measure the tick at this size only
                time.sleep(3)
                result: dict[str, Any] = {"instances": len(r._look.instances), "watch_tick": r.watch_stats()}

                def stages(changes: list[tuple[float, list[TimelineEntry]]]) -> dict[str, Any]:
                    """Per change: the first of its events to be seen, put, ingested and computed
                    (one change often comes as several events; the first carries it)."""

                    def first(es: list[TimelineEntry], stage: str) -> float | None:
                        ts = [getattr(e, stage) for e in es if getattr(e, stage) is not None]
                        return min(ts) if ts else None

                    out: dict[str, Any] = {}
                    for stage, name in (
                        ("changed", "detect"),
                        ("put", "put"),
                        ("ingested", "ingested"),
                        ("computed", "computed"),
                    ):
                        xs = [f - t for t, es in changes if (f := first(es, stage)) is not None]
                        out[name] = _summary(xs)
                    return out

                def wait_for(iid: str, kinds: tuple[str, ...], since: float, r: EventRouter = r) -> list[TimelineEntry]:
                    def ours(x: TimelineEntry) -> bool:
                        return iid in x.instance_ids and x.detail_type in kinds and x.changed >= since

                    e = r.timeline.wait(lambda x: ours(x) and x.computed is not None, 60)
                    if e is None:
                        failed = [(d.queue, d.error, d.result) for d in r.deliveries if d.failed]
                        raise AssertionError(
                            f"{kinds} for {iid} not computed in 60 s: {r.timeline.for_instance(iid)} "
                            f"failed deliveries {failed[-5:]} pending {r.pending()} errors {r.errors}"
                        )
                    return [x for x in r.timeline.entries() if ours(x)]

                launches = []
                for _ in range(samples):
                    t = time.time()
                    (iid,) = est["run"]("processing", est["subnets"]["app"], 1, env="prdo")
                    launches.append((t, wait_for(iid, (rt.STATE_CHANGE, rt.API_CALL), t)))
                    r.wait_idle(60)
                result["launch"] = stages(launches)

                tags = []
                for _, es in launches:
                    (iid,) = es[0].instance_ids
                    t = time.time()
                    env.ec2.create_tags(Resources=[iid], Tags=[{"Key": "ringfence:env", "Value": "prod"}])
                    tags.append((t, wait_for(iid, (rt.TAG_CHANGE, rt.API_CALL), t)))
                    r.wait_idle(60)
                result["tag_change"] = stages(tags)

                env.asg.put_lifecycle_hook(
                    AutoScalingGroupName="rf-web-asg",
                    LifecycleHookName="rf-hook",
                    LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
                    HeartbeatTimeout=300,
                    DefaultResult="ABANDON",
                )
                t = time.time()
                env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=scale)
                new = env.asg_instances()
                actions, in_service = [], []
                for iid in new:
                    actions.append((t, wait_for(iid, (rt.LAUNCH_ACTION,), t)))
                    ok = r.timeline.wait(lambda x, i=iid: i in x.instance_ids and x.detail_type == rt.LAUNCH_OK, 60)
                    assert ok is not None, iid
                    in_service.append(ok.changed - t)
                result["scale_out"] = {"instances": len(new), **stages(actions), "in_service": _summary(in_service)}
                assert r.wait_idle(60)
                result["router_errors"] = list(r.errors)
            finally:
                r.stop()
            out["estates"].append(result)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--samples", type=int, default=5, help="launches and tag changes per estate size")
    ap.add_argument("--estate", type=int, nargs="+", default=[0, 50, 200], help="extra instances in the estate")
    ap.add_argument("--scale", type=int, default=10, help="instances in the scale-out")
    ap.add_argument("--watch-interval", type=float, default=0.15)
    a = ap.parse_args(argv)
    print(json.dumps(run(a.samples, a.estate, a.scale, a.watch_interval), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
