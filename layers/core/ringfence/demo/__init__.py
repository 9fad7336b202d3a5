"""``ringfence demo``: the mission on one machine. Live by default (:mod:`ringfence.demo.live`:
embedded AWS, the real handlers, ``ringfence serve``, one agent per instance in network
namespaces); ``--offline`` keeps the in-process walkthrough (:mod:`ringfence.demo.offline`)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--example", help="example directory (default: examples/ordering of this checkout)")
    p.add_argument(
        "--out",
        help="where results go (live: out/summary.json and out/demo-live/; --offline: bundles and keys in out/demo)",
    )
    p.add_argument("--offline", action="store_true", help="the in-process walkthrough: compile, explain, no agents")
    p.add_argument(
        "--bench",
        action="store_true",
        help="live: time-to-policy benchmark (launch, tag change, quarantine, 10- and 50-instance scale-outs) "
        "instead of the walkthrough; writes out/summary.json",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="live loop without namespaces or nftables (what runs without root): dry-run agents, checks judged "
        "on the bundles they applied",
    )
    p.add_argument(
        "--steps",
        metavar="LIST",
        help="live: only these of steps 1-6, comma-separated, after the start (step 0, always run); a step "
        "brings the ones it builds on (4 needs 3's retag, 5 releases 4's quarantine and scales in what 2 "
        "launched). Default: all",
    )
    p.add_argument(
        "--instances",
        choices=("all", "used"),
        default="all",
        help="live: create all of the example's instances (default, 20), or only those the steps run probe "
        "or change (12 for all steps, 4 for --steps 6): a shorter start",
    )
    p.add_argument(
        "--agent-start",
        choices=("fork", "exec"),
        default="fork",
        help="live: fork each instance's agent from one process that has imported the agent (default; a VM "
        "starts its agent on its own CPU, the lab on two shared cores), or exec `ringfence-agent` for each "
        "(through `ip netns exec` with namespaces)",
    )
    p.add_argument("--repeat", type=int, default=5, help="--bench: samples per single-event kind (default 5)")
    p.add_argument(
        "--bench-only",
        metavar="KINDS",
        help="--bench: only these kinds, comma-separated, of launch, tag, quarantine, scale10, scale50 (default all)",
    )


def run(args: argparse.Namespace) -> int:
    if args.offline:
        from ringfence.demo import offline

        return offline.run(args)
    from ringfence.demo import live

    return live.run(args)
