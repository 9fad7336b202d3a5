"""How many nftables rules and set elements the agent programs per bundle, grouped rules vs the
same bundles with every grouped rule expanded into its members (what bundles were before).

    .venv/bin/python -m tests.bench.nft_rules --workloads 10000 --sample 500

Counts the rules of the two chains the nftables backend renders (fail-safes and defaults
included, they are the same on both sides) for a random sample of the synthetic estate's
bundles, and the elements of the sets it declares. Nothing is applied to a kernel.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from typing import Any

from ringfence import synth
from ringfence.bundle import Bundle
from ringfence.engine import Engine
from ringfence.policy import load_policy_texts
from ringfence_agent.backends.nft import NftRenderer
from ringfence_agent.plan import LocalFailsafes, compile_plan


def policy_services(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Rule id → its services as a plain bundle rule carries them (a member's may be cut)."""
    return {
        r.id: [{"proto": p.proto, "ports": None, "icmp_type": None, **p.to_json()} for p in r.services]
        for r in engine.rules
    }


def expanded(doc: dict[str, Any], services: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The bundle with each grouped rule replaced by one plain allow rule per member, with the
    policy rule's own services (not the pieces a group cut them into): the bundle before grouping."""
    out = dict(doc)
    for direction in ("inbound", "outbound"):
        rules: list[dict[str, Any]] = []
        for r in doc[direction]:
            if "members" in r:
                rules.extend(
                    {"id": m["id"], "action": "allow", "set": m["set"], "services": services[m["id"]]}
                    for m in r["members"]
                )
            else:
                rules.append(r)
        out[direction] = rules
    return out


def nft_counts(doc: dict[str, Any]) -> tuple[int, int]:
    """(rules in the input and output chains, elements over all declared sets) for one bundle."""
    text = NftRenderer().render(compile_plan(Bundle.model_validate_json(json.dumps(doc)), LocalFailsafes()))
    rules = elements = 0
    in_chain = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("chain "):
            in_chain = True
        elif in_chain and stripped == "}":
            in_chain = False
        elif in_chain and not stripped.startswith("type filter hook"):
            rules += 1
        elif stripped.startswith("set ") and "elements = {" in stripped:
            elements += stripped.split("elements = {", 1)[1].count(",") + 1
    return rules, elements


def run(workloads: int, sample: int, seed: int = 1) -> dict[str, Any]:
    estate = synth.generate(workloads, seed=seed)
    engine = Engine(load_policy_texts(estate.policy_texts), policy_version=1)
    engine.load(estate.workloads)
    wids = random.Random(seed).sample(sorted(engine.workloads), min(sample, len(engine.workloads)))
    grouped: list[tuple[int, int]] = []
    plain: list[tuple[int, int]] = []
    bundle_rules: list[tuple[int, int]] = []
    services = policy_services(engine)
    for wid in wids:
        doc = engine.render(wid)
        flat = expanded(doc, services)
        grouped.append(nft_counts(doc))
        plain.append(nft_counts(flat))
        bundle_rules.append((len(doc["inbound"]) + len(doc["outbound"]), len(flat["inbound"]) + len(flat["outbound"])))  # type: ignore[arg-type]

    def stats(values: list[int]) -> dict[str, float]:
        return {"mean": round(statistics.mean(values), 1), "median": statistics.median(values), "max": max(values)}

    return {
        "workloads": workloads,
        "sample": len(wids),
        "bundle_rules_grouped": stats([g for g, _ in bundle_rules]),
        "bundle_rules_expanded": stats([p for _, p in bundle_rules]),
        "nft_rules_grouped": stats([r for r, _ in grouped]),
        "nft_rules_expanded": stats([r for r, _ in plain]),
        "nft_set_elements_grouped": stats([e for _, e in grouped]),
        "nft_set_elements_expanded": stats([e for _, e in plain]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", type=int, default=10000)
    ap.add_argument("--sample", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(json.dumps(run(args.workloads, args.sample, args.seed), indent=1))


if __name__ == "__main__":
    main()
