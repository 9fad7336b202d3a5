"""Regenerate the golden bundle files from the shipped example.

    .venv/bin/python tests/golden/regen.py

The engine tests assert the engine still produces exactly these files; the agent tests consume
them. Ed25519 signatures are deterministic, so the files are stable. ``test-key.pem`` is a
TEST-ONLY key committed on purpose; never deploy it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ringfence import bundle
from ringfence.engine import Engine
from ringfence.inventory import load_inventory
from ringfence.policy import load_policy
from ringfence.publish import delta_documents, signed_bundle

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent
EXAMPLE = ROOT / "examples" / "ordering"
# a fixed expiry keeps the files stable; far off, so agent tests can apply them (2100-01-01)
EXPIRES_AT = 4102444800


def key() -> bundle.SigningKey:
    return bundle.SigningKey.from_file(GOLDEN / "test-key.pem")


def build() -> dict[str, str]:
    """File name → content, exactly as the engine and signer produce them."""
    policy = load_policy(EXAMPLE / "policy")
    workloads = load_inventory(EXAMPLE / "inventory.yaml")
    # every deny in every bundle it scopes: the agent tests need the boundary's override-deny in
    # them (the default engine leaves it out where no allow overlaps it; tests/test_engine*.py)
    engine = Engine(policy, policy_version=1, all_denies=True)
    engine.load(workloads)
    signer = key()
    out: dict[str, str] = {}

    def emit_bundle(name: str, wid: str) -> None:
        out[name] = bundle.dumps(signed_bundle(engine, wid, signer, expires_at=EXPIRES_AT))

    emit_bundle("bundle-ord-prod-db-1.json", "ord-prod-db-1")
    emit_bundle("bundle-ord-prod-proc-1.json", "ord-prod-proc-1")
    emit_bundle("bundle-pay-dev-web-1-observe.json", "pay-dev-web-1")

    # scale out: a third prod web server → one delta for the set processing accepts from
    by_id = {w.id: w for w in workloads}
    web3 = by_id["ord-prod-web-2"].model_copy(update={"id": "ord-prod-web-3", "ips": ["10.1.1.12"]})
    upd = engine.upsert(web3)
    held = signed_bundle(engine, "ord-prod-proc-1", None).sets
    deltas = [d for d in delta_documents(upd, signer) if d.set in held]
    assert len(deltas) == 1, deltas
    out["delta-ord-prod-proc-1-scale-out.json"] = bundle.dumps(deltas[0])
    emit_bundle("bundle-ord-prod-proc-1-after-scale-out.json", "ord-prod-proc-1")

    # quarantine ord-prod-web-1: its own bundle is empty, and it leaves every peer's sets
    engine.upsert(by_id["ord-prod-web-1"].model_copy(update={"quarantined": True}))
    emit_bundle("bundle-ord-prod-web-1-quarantined.json", "ord-prod-web-1")
    out["bundle.schema.json"] = json.dumps(bundle.bundle_schema(), indent=1, sort_keys=True) + "\n"
    out["delta.schema.json"] = json.dumps(bundle.delta_schema(), indent=1, sort_keys=True) + "\n"
    return out


if __name__ == "__main__":
    if not (GOLDEN / "test-key.pem").exists():
        bundle.SigningKey.generate().write(GOLDEN / "test-key.pem", GOLDEN / "test-key.pub.pem")
    for name, text in build().items():
        (GOLDEN / name).write_text(text)
        print("wrote", GOLDEN / name)
