"""Scale-out storm benchmark: N instances launched into an ASG in moto, their events through the
whole pipeline, until every affected bundle and delta is published; then a cold start (which
adopts what is published) and a full recompile of the same estate for comparison.

    .venv/bin/python -m tests.aws.bench_storm --instances 500      (or: make bench-aws)

The phases run one after another (ingest drains, then compute, then the publish queue compute
fanned out to, on ``--publish-workers`` threads as Lambda runs several batches of a standard
queue at once), so that each phase's time is its own; in AWS they overlap.

Prints one JSON document with the figures (docs/benchmarks.md, "AWS control plane").
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ringfence.local.aws import EmbeddedAws


def run(instances: int, baseline: int = 0, publish_workers: int = 3, aws: EmbeddedAws | None = None) -> dict[str, Any]:
    """``aws``: an embedded AWS already started (the tests' session one: reset here, left
    running); None: one of its own, started and stopped."""
    from ringfence.local import aws as embedded
    from tests.aws import conftest as c

    own = aws is None
    if aws is None:
        aws = embedded.EmbeddedAws(region=c.REGION, account=c.ACCOUNT)
        aws.start(build=False)
    metrics_env = os.environ.get("POWERTOOLS_METRICS_DISABLED")
    os.environ["POWERTOOLS_METRICS_DISABLED"] = "true"
    env = c.Env(aws)
    try:
        env.build()
        env.provision_example_policy()
        est = env.estate()
        # a bystander estate the storm should not disturb: other apps and environments
        kinds = [
            ("web", "payroll", "prod"),
            ("database", "payroll", "prod"),
            ("web", "ordering", "dev"),
            ("processing", "ordering", "dev"),
            ("database", "ordering", "dev"),
            ("web", "payroll", "dev"),
        ]
        for i in range(baseline):
            role, app, env_ = kinds[i % len(kinds)]
            est["ids"].setdefault("other", []).extend(est["run"](role, est["subnets"]["app"], 1, env=env_, app=app))
        for ids in est["ids"].values():
            for iid in ids:
                env.put(env.state_event(iid, "running"))
        env.pump()
        compute = env.fn["compute"].service()
        pub = compute.w.publisher
        baseline_bundles = len(compute.engine.workloads)

        # --- the storm ---------------------------------------------------------------------------
        env.asg.set_desired_capacity(AutoScalingGroupName="rf-web-asg", DesiredCapacity=instances)
        new = env.asg_instances()
        assert len(new) == instances, len(new)
        sample = c.fixture("asg-launch-successful.json")
        stats: list[Any] = []
        orig_run = compute.run

        def counting_run(messages: list[dict[str, Any]]) -> Any:
            s = orig_run(messages)
            stats.append(s)
            return s

        compute.run = counting_run  # type: ignore[method-assign]
        worker = env.fn["publish"].service()
        pstats: list[Any] = []
        orig_publish = worker.run

        def counting_publish(jobs: Any, **kw: Any) -> Any:
            out = orig_publish(jobs, **kw)
            pstats.append(out[0])
            return out

        worker.run = counting_publish  # type: ignore[method-assign]
        pubw = worker.w.publisher
        pb0, po0 = pubw.bytes_published, pubw.objects_published
        describes: list[int] = []
        env.hook("before-call.ec2.DescribeInstances", lambda **kw: describes.append(1))
        b0, o0 = pub.bytes_published, pub.objects_published
        t0 = time.perf_counter()
        for i in range(0, len(new), 10):
            entries = []
            for iid in new[i : i + 10]:
                ev = copy.deepcopy(sample)
                ev["detail"].update({"EC2InstanceId": iid, "AutoScalingGroupName": "rf-web-asg"})
                entries.append(
                    {
                        "Source": ev["source"],
                        "DetailType": ev["detail-type"],
                        "Detail": json.dumps(ev["detail"]),
                        "Resources": [f"arn:aws:ec2:{c.REGION}:{c.ACCOUNT}:instance/{iid}"],
                    }
                )
            env.events.put_events(Entries=entries)
        t_events = time.perf_counter()
        env.drain("ingest", "ingest")
        t_ingest = time.perf_counter()
        env._drain("compute", "compute")
        t_computed = time.perf_counter()
        publish_messages = env.count("publish")
        drain_parallel(env, publish_workers)
        t_done = time.perf_counter()
        incr_bytes = pub.bytes_published - b0 + pubw.bytes_published - pb0
        incr_objects = pub.objects_published - o0 + pubw.objects_published - po0
        # agents that need a whole bundle (new, or missed deltas) make the agent API materialize it
        # from the last full bundle + deltas; measured separately
        api = env.fn["agentapi"].api()
        m_b0 = api.w.publisher.bytes_published
        t_m = time.perf_counter()
        for wid in sorted(compute.engine.workloads):
            cur = api.current(wid)
            assert isinstance(cur, tuple), cur
        materialize = {
            "seconds": round(time.perf_counter() - t_m, 2),
            "bytes_written": api.w.publisher.bytes_published - m_b0,
            "bundles": len(compute.engine.workloads),
        }
        incr = {
            "describe_instances_calls": len(describes),
            "compute_invocations": len(stats),
            "agents_nudged": sum(s.nudged for s in pstats),
            "sets_touched": sum(s.sets_touched for s in stats),
            "deltas_published": sum(s.deltas_published for s in stats),
            "bundles_published": sum(s.bundles_published for s in stats) + sum(s.bundles_published for s in pstats),
            "bundles_superseded": sum(s.superseded for s in pstats),
            "publish_messages": publish_messages,
            # where compute's time went, summed over its invocations (ComputeStats.seconds)
            "compute_seconds_by_phase": {
                k: round(sum(st.seconds.get(k, 0.0) for st in stats), 2)
                for k in sorted({k for st in stats for k in st.seconds})
            },
            "publish_invocations": len(pstats),
            "objects_published": incr_objects,
            "bytes_published": incr_bytes,
        }
        for iid in new:  # every new instance has its signed bundle
            assert env.store.bundle_pointer(iid) is not None, iid

        # --- a cold start: the engine rebuilt, what is published adopted --------------------------
        b1, o1 = pub.bytes_published + pubw.bytes_published, pub.objects_published + pubw.objects_published
        t1 = time.perf_counter()
        cold_stats = orig_run([{"ids": [], "rebuild": True}])
        drain_parallel(env, publish_workers)
        cold = {
            "seconds": round(time.perf_counter() - t1, 2),
            "bundles_adopted": cold_stats.bundles_adopted,
            "bundles_republished": cold_stats.bundles_queued + cold_stats.bundles_published,
            "objects_published": pub.objects_published + pubw.objects_published - o1,
        }
        # --- a full recompile of the same estate (adoption off: everything republished) ------------
        b1, o1 = pub.bytes_published + pubw.bytes_published, pub.objects_published + pubw.objects_published
        t1 = time.perf_counter()
        adopt = compute._adopt
        compute._adopt = lambda engine: set()  # type: ignore[method-assign]
        try:
            full_stats = orig_run([{"ids": [], "rebuild": True}])
        finally:
            compute._adopt = adopt  # type: ignore[method-assign]
        t_full_compute = time.perf_counter() - t1
        drain_parallel(env, publish_workers)
        t_full = time.perf_counter() - t1
        engine = compute.engine
        full = {
            "sets": len(engine.sets),
            "bundles_published": full_stats.bundles_queued + full_stats.bundles_published,
            "objects_published": pub.objects_published + pubw.objects_published - o1,
            "bytes_published": pub.bytes_published + pubw.bytes_published - b1,
            "seconds": round(t_full, 2),
            "seconds_compute": round(t_full_compute, 2),
        }
        # --- one ordinary event in the grown estate: a new web instance ------------------------
        one = est["run"]("web", est["subnets"]["web"], 1)[0]
        invocations = len(stats)
        stats.clear()
        pstats.clear()
        b2 = pub.bytes_published + pubw.bytes_published
        t2 = time.perf_counter()
        env.put(env.state_event(one, "running"))
        env.drain("ingest", "ingest")
        env.drain("compute", "compute")
        one_bytes = pub.bytes_published + pubw.bytes_published - b2
        single = {
            "seconds": round(time.perf_counter() - t2, 2),
            "sets_changed": sum(s.sets_touched for s in stats),
            "deltas_published": sum(s.deltas_published for s in stats),
            "bundles_published": sum(s.bundles_published for s in pstats),
            "agents_nudged": sum(s.nudged for s in pstats),
            "bytes_published": one_bytes,
            "bytes_ratio_vs_full_recompile": round(one_bytes / max(full["bytes_published"], 1), 4),
        }
        return {
            "one_more_instance_afterwards": single,
            "instances_launched": instances,
            "estate_before": baseline_bundles,
            "estate_after": len(engine.workloads),
            "seconds": {
                "put_events": round(t_events - t0, 2),
                "ingest": round(t_ingest - t_events, 2),
                "compute": round(t_computed - t_ingest, 2),
                "publish": round(t_done - t_computed, 2),
                "total_until_all_published": round(t_done - t0, 2),
            },
            "publish_workers": publish_workers,
            "cold_start_adopting": cold,
            "incremental": incr,
            "materialize_every_bundle_afterwards": materialize,
            "full_recompile": full,
            "ratios_incremental_over_full": {
                "sets_touched_vs_sets": round(incr["sets_touched"] / max(full["sets"], 1), 3),
                "sets_touched_per_invocation_vs_sets": round(
                    incr["sets_touched"] / max(incr["compute_invocations"], 1) / max(full["sets"], 1), 3
                ),
                "bytes": round(incr["bytes_published"] / max(full["bytes_published"], 1), 3),
                "bundles": round(incr["bundles_published"] / max(full["bundles_published"], 1), 3),
                "compute_publish_seconds": round((t_done - t_ingest) / max(t_full, 1e-9), 3),
            },
            "naive_full_recompile_per_compute_invocation": {
                "bytes": full["bytes_published"] * invocations,
                "bundles": full["bundles_published"] * invocations,
                "ratio_bytes_incremental_over_naive": round(
                    incr["bytes_published"] / max(full["bytes_published"] * invocations, 1), 4
                ),
            },
        }
    finally:
        env.retire()
        for client in (env.ec2, env.asg, env.sqs, env.s3, env.events, env.ddb.meta.client):
            client.close()
        if own:
            aws.stop()  # restores the environment
        elif metrics_env is None:
            os.environ.pop("POWERTOOLS_METRICS_DISABLED", None)
        else:
            os.environ["POWERTOOLS_METRICS_DISABLED"] = metrics_env
        from ringfence.clouds.aws import clients

        clients.reset()


def drain_parallel(env: Any, workers: int) -> None:
    """Deliver the publish queue to the publish handler on ``workers`` threads at once (each its
    own poller, as Lambda's scale out on a standard queue)."""
    import threading

    errors: list[BaseException] = []

    def one() -> None:
        try:
            env._drain("publish", "publish")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    env._drain("publish", "publish")  # what a retry made visible again


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--baseline", type=int, default=120, help="bystander workloads of other apps/envs")
    ap.add_argument("--publish-workers", type=int, default=3, help="publish batches delivered at once")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.instances, args.baseline, args.publish_workers), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
