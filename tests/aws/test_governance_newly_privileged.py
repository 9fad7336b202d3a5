"""A value that becomes privileged (a new policy version adds it, or turns governance on) stays
with the workloads already holding it (docs/policy.md), through the real admin API, ingest and
reconcile on moto: the rule by last write (label_writes) had taken it off them."""

from __future__ import annotations

from collections.abc import Callable

from tests.aws.conftest import LABEL_TESTS, POLICY_DIR, Env
from tests.aws.test_pipeline import _ctx, _scheduled, boot


def test_existing_holder_keeps_a_value_that_becomes_privileged(env: Env) -> None:
    est = boot(env)
    db = est["ids"]["db"][0]
    assert env.store.get(db).labels.get("role") == "database"
    files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
    files["labels.yaml"] = files["labels.yaml"].replace("privileged: [jumpbox]", "privileged: [jumpbox, database]")
    files["tests.yaml"] = LABEL_TESTS
    status, _, body = env.rest("admin", "POST", "/admin/policies", {"files": files, "reason": "db privileged"})
    assert status == 201, body
    env.pump()
    # nothing changed on the instance: a reconcile pass (or any state event) observes it again
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    env.pump()
    rec = env.store.get(db)
    assert rec.labels.get("role") == "database", (
        "an existing database host lost its role when the value became privileged"
    )


def _provision(env: Env, labels_edit: Callable[[str], str], reason: str) -> None:
    files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
    files["labels.yaml"] = labels_edit(files["labels.yaml"])
    files["tests.yaml"] = LABEL_TESTS
    status, _, body = env.rest("admin", "POST", "/admin/policies", {"files": files, "reason": reason})
    assert status == 201, body
    env.pump()


def test_turning_governance_on_keeps_values_already_held(env: Env) -> None:
    """The estate runs under a policy with no privileged values; governance is then turned on
    for role: [database]. The database host already holds it."""
    _provision(
        env,
        lambda t: t.replace("      privileged: [jumpbox]\n", "").replace("      privileged: [admin]\n", ""),
        "ungoverned",
    )
    est = env.estate()
    for ids in est["ids"].values():
        for iid in ids:
            env.put(env.state_event(iid, "running"))
    env.pump()
    db = est["ids"]["db"][0]
    assert env.store.get(db).labels.get("role") == "database"
    _provision(
        env, lambda t: t.replace("      privileged: [jumpbox]\n", "      privileged: [jumpbox, database]\n"), "govern"
    )
    env.put(env.state_event(db, "running"))
    env.pump()
    rec = env.store.get(db)
    assert rec.labels.get("role") == "database", "turning governance on took the role off a host already holding it"
