"""``ringfence demo --offline``: the main job on the shipped example, compiled in this process
(no event, no handler, no agent; the live loop is :mod:`ringfence.demo.live`).

validate → test → label hygiene → compile and sign bundles → explain flows → scale out
(set deltas, not rebuilds) → quarantine a host → the connectivity summary.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

from ringfence import bundle
from ringfence.addresses import format_prefix
from ringfence.engine import Engine
from ringfence.engine.connectivity import compute, group_name
from ringfence.engine.explain import decide, parse_endpoint
from ringfence.inventory import load_inventory
from ringfence.policy import load_policy
from ringfence.policytests import run_tests
from ringfence.publish import signed_bundle


def example_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    here = Path(str(resources.files("ringfence"))).resolve()
    for parent in here.parents:
        candidate = parent / "examples" / "ordering"
        if candidate.is_dir():
            try:
                return candidate.relative_to(Path.cwd())
            except ValueError:
                return candidate
    raise FileNotFoundError("examples/ordering not found; pass --example DIR")


def _step(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def run(args: argparse.Namespace) -> int:
    example = example_dir(args.example)
    out = Path(args.out or "out/demo")
    _step("1. validate the policy (YAML in git)")
    policy = load_policy(example / "policy")
    print(f"{len(policy.sources)} files, {len(policy.rules)} rules, {len(policy.tests)} tests: valid")

    _step("2. load the estate: tags → labels")
    workloads = load_inventory(example / "inventory.yaml")
    engine = Engine(policy, policy_version=1)
    t0 = time.perf_counter()
    engine.load(workloads)
    full_s = time.perf_counter() - t0
    print(
        f"{len(engine.workloads)} workloads, {len(engine.sets)} shared address sets, compiled in {full_s * 1000:.1f} ms"
    )
    for ws in engine.workloads.values():
        for p in ws.problems:
            flag = "UNLABELED" if ws.unlabeled else "warning"
            print(f"  hygiene: {ws.id}: {flag}: {p.message} → gets mode {ws.mode.value}, label left unset")

    _step("3. policy tests must pass before provisioning")
    results = run_tests(policy, engine.workloads)
    for r in results:
        print("  " + r.report().splitlines()[0])
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    if failed:
        return 1

    _step("4. compile and sign one bundle per workload")
    keys = out / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    if not (keys / "bundle-signing.pem").exists():
        bundle.SigningKey.generate().write(keys / "bundle-signing.pem", keys / "bundle-signing.pub.pem")
    signer = bundle.SigningKey.from_file(keys / "bundle-signing.pem")
    verifier = bundle.Verifier.from_file(keys / "bundle-signing.pub.pem")
    (out / "bundles").mkdir(parents=True, exist_ok=True)
    total = 0
    for wid in sorted(engine.workloads):
        doc = signed_bundle(engine, wid, signer)
        verifier.verify(doc)
        text = bundle.dumps(doc)
        total += len(text)
        (out / "bundles" / f"{wid}.json").write_text(text)
    print(
        f"wrote {len(engine.workloads)} signed bundles ({total / 1024:.1f} KiB) to {out / 'bundles'}, key {signer.key_id}"
    )

    _step("5. explain: what is allowed, and why")
    for src, dst, port in (
        ("ord-prod-proc-1", "ord-prod-db-1", "tcp/5432"),
        ("ord-prod-web-1", "ord-prod-db-1", "tcp/5432"),
        ("ord-dev-proc-1", "ord-prod-db-1", "tcp/5432"),
        ("203.0.113.10", "ord-prod-lb-1", "tcp/443"),
        ("pay-dev-web-1", "ord-prod-web-1", "tcp/8080"),
    ):
        proto, _, num = port.partition("/")
        d = decide(
            policy,
            parse_endpoint(src, policy, engine.workloads),
            parse_endpoint(dst, policy, engine.workloads),
            proto,
            int(num),
        )
        why = next(
            (
                f"{s.direction} {s.deciding.id} ({s.deciding.location})"
                for s in d.sides
                if s.deciding and (s.decision == "deny" or d.verdict == "allow")
            ),
            "default deny",
        )
        print(f"  {src:>16} → {dst:<16} {port:<9} {d.verdict.upper():<10} {why}")

    _step("6. autoscaling: a third prod web server launches")
    template = next(w for w in workloads if w.id == "ord-prod-web-2")
    t0 = time.perf_counter()
    upd = engine.upsert(template.model_copy(update={"id": "ord-prod-web-3", "ips": ["10.1.1.12"]}))
    inc_s = time.perf_counter() - t0
    print(f"incremental update in {inc_s * 1000:.2f} ms (full compile took {full_s * 1000:.1f} ms)")
    print(f"  new bundle for: {', '.join(sorted(upd.rebuilt))}")
    for name, (from_v, added, removed) in sorted(upd.set_deltas.items()):
        holders = sorted(engine.sets_by_name[name].held)
        print(
            f"  set delta {name} v{from_v}→v{upd.revision}: +{[format_prefix(p) for p in added]} "
            f"-{[format_prefix(p) for p in removed]} → {len(holders)} agents ({', '.join(holders)})"
        )
    print(f"  {len(upd.notify)} of {len(engine.workloads)} agents nudged; nobody else hears about it")

    _step("7. quarantine ord-prod-web-1 (suspected compromise)")
    victim = next(w for w in workloads if w.id == "ord-prod-web-1")
    upd = engine.upsert(victim.model_copy(update={"quarantined": True}))
    own = bundle.Bundle.model_validate(engine.render("ord-prod-web-1"))
    print(
        f"  its own bundle: mode={own.mode.value}, {len(own.inbound)} inbound / {len(own.outbound)} outbound rules "
        "(fail-safes only)"
    )
    for name, (_, added, removed) in sorted(upd.set_deltas.items()):
        print(
            f"  peers drop it: set {name}: -{[format_prefix(p) for p in removed]} +{[format_prefix(p) for p in added]}"
        )
    d = decide(
        policy,
        parse_endpoint("ord-prod-web-1", policy, engine.workloads),
        parse_endpoint("ord-prod-proc-1", policy, engine.workloads),
        "tcp",
        8443,
    )
    print(f"  ord-prod-web-1 → ord-prod-proc-1 tcp/8443 is now {d.verdict.upper()}")

    _step("8. connectivity at app-group level")
    m = compute(policy, engine.workloads.values())
    shown = 0
    for (s, dd), e in sorted(m.edges.items()):
        if dict(s).get("app") == "ordering" and dict(s).get("env") == "prod":
            print(f"  {group_name(s)} → {group_name(dd)}: {', '.join(str(x) for x in e.services)}")
            shown += 1
    print(f"  ({shown} of {len(m.edges)} allowed group pairs shown; {m.allowed_pair_count()} workload pairs in all)")
    print(
        f"\nDone. Bundles in {out / 'bundles'}; try: .venv/bin/ringfence explain --policy {example / 'policy'} "
        f"--inventory {example / 'inventory.yaml'} --from ord-prod-web-1 --to ord-prod-db-1 --port tcp/5432"
    )
    return 0
