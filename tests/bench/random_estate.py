"""A synthetic estate with random rules, written as files for timing the CLI as a user runs it.

Usage::

    .venv/bin/python -m tests.bench.random_estate OUT [--workloads 1000] [--rules 333] [--seed 1]
    time .venv/bin/ringfence connectivity --policy OUT/policy --inventory OUT/inventory.yaml --json >/dev/null

The workloads, labels, services and IP lists are :func:`ringfence.synth.generate`'s; the rules are
random: selectors over the estate's label values (``all()``, one value, a set, a conjunction) or IP
lists on one side (``any``, the synthetic internet / corp VPN / partners lists, and ``servers``,
a range holding most workload addresses, with one /24 excluded), every action (allow 70 %, deny
15 %, override-deny 15 %), one or two of the estate's services, ``same:`` none, app or env.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import yaml

from ringfence import synth


def generate(out: Path, workloads: int = 1000, rules: int = 333, seed: int = 1) -> None:
    estate = synth.generate(workloads, seed=seed)
    rng = random.Random(seed)
    policy_dir = out / "policy"
    policy_dir.mkdir(parents=True, exist_ok=True)
    services_doc = yaml.safe_load(estate.policy_texts["services.yaml"])
    services_doc["ip_lists"].append({"name": "servers", "cidrs": ["10.16.0.0/12"], "exclude": ["10.16.7.0/24"]})
    (policy_dir / "labels.yaml").write_text(estate.policy_texts["labels.yaml"])
    (policy_dir / "services.yaml").write_text(yaml.safe_dump(services_doc, sort_keys=False))
    values: dict[str, list[str]] = {}
    for w in estate.workloads:
        for key, value in w.tags.items():
            dim = key.removeprefix("ringfence:")
            if dim != key and value not in values.setdefault(dim, []):
                values[dim].append(value)
    dims = sorted(values)
    ip_lists = ["any", "internet", "corp-vpn", "partners", "servers"]
    service_names = [s["name"] for s in services_doc["services"]]

    def term() -> str:
        dim = rng.choice(dims)
        if rng.random() < 0.3:
            picked = rng.sample(values[dim], min(len(values[dim]), rng.randint(2, 3)))
            return f"{dim} in {{{', '.join(picked)}}}"
        return f"{dim} == {rng.choice(values[dim])}"

    def selector() -> str:
        r = rng.random()
        if r < 0.08:
            return "all()"
        if r < 0.6:
            return term()
        return f"{term()} && {term()}"

    out_rules = []
    for i in range(rules):
        side = rng.random()
        src: object = {"ip_list": rng.choice(ip_lists)} if side < 0.15 else selector()
        dst: object = {"ip_list": rng.choice(ip_lists)} if 0.15 <= side < 0.3 else selector()
        action = rng.choices(["allow", "deny", "override-deny"], weights=[70, 15, 15])[0]
        rule: dict[str, object] = {
            "name": f"r{i}",
            "from": src,
            "to": dst,
            "services": rng.sample(service_names, rng.randint(1, 2)),
            "action": action,
        }
        if side >= 0.3:
            rule["same"] = rng.choice([[], [], ["app"], ["env"]])
        out_rules.append(rule)
    doc = {"rulesets": [{"name": "random", "scope": "all()", "same": [], "rules": out_rules}]}
    (policy_dir / "random.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, width=200))
    (out / "inventory.yaml").write_text(
        yaml.safe_dump({"workloads": [w.model_dump(mode="json", exclude_defaults=True) for w in estate.workloads]})
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("out", type=Path)
    ap.add_argument("--workloads", type=int, default=1000)
    ap.add_argument("--rules", type=int, default=333)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    generate(args.out, args.workloads, args.rules, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
