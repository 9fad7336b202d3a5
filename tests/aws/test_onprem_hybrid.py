"""On-premise hosts joining the AWS control plane: one control plane, one policy, for EC2 instances
and data-centre hosts. Registered through the real admin function (moto server behind it, the IAM
caller bound to ``onboarding``), the host's real agent (its daemon and API client, the dry-run
backend) enrolls with a pairing key through the real agent-API function, gets a bundle naming its
EC2 peers, and the EC2 instances' bundles name the host's address; reconcile leaves it alone;
a deregistration takes it out of every peer's sets and its token stops working."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringfence import serve
from ringfence.control.api import secret_hash
from tests.aws.conftest import Env, LambdaContext, ip_of
from tests.aws.test_attack_enroll import audits
from tests.aws.test_pipeline import _scheduled, boot, in_set

OTTO = "arn:aws:iam::123456789012:user/otto"  # onboarding only
DB_TAGS = {"ringfence:role": "database", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}
DB = {"id": "dc1-db-1", "ips": ["192.168.10.5"], "site": "dc1", "tags": DB_TAGS}


@pytest.fixture
def hybrid(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Env, dict[str, Any]]]:
    """The EC2 estate booted (policy, instances, bundles), pairing on beside aws-iid (parameter
    EnrollMethods), and OTTO bound to ``onboarding``."""
    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,pairing")
    env.load_functions()
    env.bind(OTTO, ["onboarding"])
    yield env, boot(env)


class Gateway:
    """API Gateway in front of a function: each HTTP request, turned into the proxy event API
    Gateway builds (``ringfence serve``'s builder), is handed to the real Lambda handler."""

    def __init__(self, env: Env, fn: str) -> None:
        self.env, self.fn = env, fn

    def resolve(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        out: dict[str, Any] = self.env.fn[self.fn].handler(event, LambdaContext())
        return out


def agent_api(env: Env) -> serve.ServeApp:
    """The agent API as AWS serves it (the agentapi function), over HTTP for the real agent."""
    return serve.ServeApp(serve.ResolverPool(lambda: Gateway(env, "agentapi")), None, None)


def daemon_for(env: Env, url: str, wid: str, key: str, tmp: Path) -> Any:
    """The host's agent: its daemon (dry-run backend: renders the nftables ruleset, programs
    nothing) pinned to the stack's signing key, enrolling with ``key`` (method pairing)."""
    from ringfence_agent.config import AgentConfig, Enrollment
    from ringfence_agent.daemon import Daemon

    pub = tmp / "signing-key.pub.pem"
    pub.write_bytes(env.signing_key.public_pem())
    cfg = AgentConfig(
        workload_id=wid,
        public_key=pub,
        state_dir=tmp / "agent",
        backend="dry-run",
        api_url=url,
        enroll=Enrollment(method="pairing", pairing_key=key),
        system_resolvers=False,
    )
    daemon = Daemon(cfg)
    daemon.backend.out = io.StringIO()  # type: ignore[attr-defined]
    return daemon


def enforced(daemon: Any) -> set[str]:
    """Every address element of the sets the agent enforces."""
    eff = daemon.agent.effective()
    assert eff is not None, "the agent enforces no bundle"
    return {p for s in eff.sets.values() for p in s.v4}


def covers(elements: set[str], ip: str) -> bool:
    import ipaddress

    return any(ipaddress.ip_address(ip) in ipaddress.ip_network(e) for e in elements)


def register(env: Env, body: dict[str, Any], principal: str = OTTO) -> tuple[int, Any]:
    status, _, answer = env.rest("admin", "POST", "/admin/workloads", {**body, "reason": "CHG-7"}, principal=principal)
    return status, answer


def test_an_onprem_host_registered_on_aws_enrolls_with_pairing_and_joins_the_ec2_estate(
    hybrid: tuple[Env, dict[str, Any]], tmp_path: Path
) -> None:
    env, est = hybrid
    procs = est["ids"]["proc"]
    proc_ips = [ip_of(env, p) for p in procs]
    status, answer = register(env, DB)
    assert status == 201 and answer["created"] and "held" not in answer, answer
    (rec,) = audits(env, "workload.register", "dc1-db-1")
    assert rec.principal == OTTO and rec.reason == "CHG-7"
    status, _, key = env.rest(
        "admin", "POST", "/admin/pairing-keys", {"workload_id": "dc1-db-1", "uses": 1, "ttl": 600}, principal=OTTO
    )
    assert status == 201, key
    env.pump()  # the registration queued compute: the host's bundle, and its peers' sets

    # the EC2 processing instances may reach the on-premise database (their bundles name it)
    for p in procs:
        assert in_set(env.bundle(p), "192.168.10.5"), p
    # the web tier may not: its bundle does not
    assert not in_set(env.bundle(est["ids"]["web"][0]), "192.168.10.5")

    with serve.serving(agent_api(env)) as running:
        daemon = daemon_for(env, running.url, "dc1-db-1", key["pairing_key"], tmp_path)
        daemon.sync(None)  # enrolls with the pairing key (a nonce), fetches and applies its bundle
        assert daemon.agent.revision is not None
        held = enforced(daemon)
        assert all(covers(held, ip) for ip in proc_ips), (proc_ips, held)
        # and the ruleset it would program holds them (a set's cover may merge neighbours)
        peers = {e for e in held if any(covers({e}, ip) for ip in proc_ips)}
        assert peers and all(e in daemon.backend.out.getvalue() for e in peers), peers
        daemon.heartbeat()
        stored = env.store.get("dc1-db-1")
        assert stored is not None and stored.enrolled and stored.workload.cloud == "onprem"
        (enrolled,) = audits(env, "agent.enroll", "dc1-db-1")
        assert enrolled.detail.get("method") == "pairing", enrolled.detail

        # reconcile lists EC2: an on-premise record is none of its instances, never taken for gone
        out = env.fn["reconcile"].handler(_scheduled(), LambdaContext())
        assert "dc1-db-1" not in out["gone"], out
        env.pump()
        assert (now := env.store.get("dc1-db-1")) is not None and now.state == "running"
        assert in_set(env.bundle(procs[0]), "192.168.10.5")

        # an EC2 instance that scales in leaves the host's sets, as any peer does
        env.ec2.terminate_instances(InstanceIds=[procs[1]])
        env.put(env.state_event(procs[1], "terminated"))
        env.pump()
        daemon.sync(None)
        held = enforced(daemon)
        assert covers(held, proc_ips[0]) and not covers(held, proc_ips[1]), held

        # deregistered: out of every peer's sets, its token refused
        token = daemon.source.token
        status, _, answer = env.rest(
            "admin", "DELETE", "/admin/workloads/dc1-db-1", {"reason": "decommissioned"}, principal=OTTO
        )
        assert status == 200, answer
        env.pump()
        assert not in_set(env.bundle(procs[0]), "192.168.10.5")
        assert env.store.token_workload(secret_hash(token)) is None
    (gone,) = audits(env, "workload.deregister", "dc1-db-1")
    assert gone.principal == OTTO


def test_a_cmdb_file_imported_on_aws_lands_whole_in_the_ec2_bundles(hybrid: tuple[Env, dict[str, Any]]) -> None:
    """POST /admin/workloads/import through the admin function: every row registered (address
    claims in DynamoDB, one transaction per record), audited once, peers' sets updated; a file
    with a row holding an EC2 instance's address is refused whole (file:line:column)."""
    env, est = hybrid
    proc = est["ids"]["proc"][0]
    header = "id,ips,site,ringfence:role,ringfence:app,ringfence:env,ringfence:loc\n"
    csv = (
        header
        + "dc1-db-2,192.168.10.6,dc1,database,ordering,prod,ca\ndc1-db-3,192.168.10.7,dc1,database,ordering,prod,ca\n"
    )
    status, _, answer = env.rest(
        "admin", "POST", "/admin/workloads/import", {"csv": csv, "source": "dc1.csv", "reason": "CHG-8"}, principal=OTTO
    )
    assert status == 200 and answer["imported"] == 2 and answer["created"] == 2, answer
    (rec,) = audits(env, "workload.import", "dc1.csv")
    assert rec.principal == OTTO and rec.detail["created"] == ["dc1-db-2", "dc1-db-3"]
    env.pump()
    doc = env.bundle(proc)
    assert in_set(doc, "192.168.10.6") and in_set(doc, "192.168.10.7")

    taken = ip_of(env, est["ids"]["db"][0])  # the EC2 database's address
    bad = (
        header
        + f"dc1-db-4,192.168.10.8,dc1,database,ordering,prod,ca\ndc1-db-5,{taken},dc1,database,ordering,prod,ca\n"
    )
    status, _, answer = env.rest(
        "admin", "POST", "/admin/workloads/import", {"csv": bad, "source": "bad.csv"}, principal=OTTO
    )
    assert status == 400 and "bad.csv:3:" in answer["detail"] and taken in answer["detail"], answer
    assert env.store.get("dc1-db-4") is None, "nothing imported"
    # more rows than one request of the admin function can write within its time: refused whole,
    # before anything is written or audited (an import ended part-way would leave part of it)
    rows = "".join(f"dc2-{i},10.200.{i // 250}.{i % 250 + 1},dc2,database,ordering,prod,ca\n" for i in range(501))
    status, _, answer = env.rest(
        "admin", "POST", "/admin/workloads/import", {"csv": header + rows, "source": "big.csv"}, principal=OTTO
    )
    assert status == 400 and "big.csv: 501 workloads" in answer["detail"] and "(500)" in answer["detail"], answer
    assert env.store.get("dc2-0") is None and not audits(env, "workload.import", "big.csv")
    # an EC2 instance's id is never taken over by a registration: refused for its form (f1b57e8)
    status, answer = register(env, {**DB, "id": proc})
    assert status == 422 and "cloud instance" in answer["detail"], answer


def test_the_admin_functions_onprem_calls_are_granted_in_both_deployments(hybrid: tuple[Env, dict[str, Any]]) -> None:
    """Every DynamoDB call the admin function makes to register (address claims, in one
    transaction with the record), re-address, import, mint a pairing key and deregister (claims
    released, credentials dropped) is granted to its role in template.yaml and infra/ alike; the
    claims are written by no role but the administrators' (its state-table writes are held to the
    partitions its code writes, ``addrowner#`` among them: tests/aws/test_sg_record_writers.py)."""
    from tests.aws.test_function_iam import WRITES, Recorder, refusals

    env, _ = hybrid
    env.load_functions()  # cold containers: their clients carry the recorder's hook
    rec = Recorder(env)
    assert register(env, DB)[0] == 201
    assert register(env, {**DB, "ips": ["192.168.10.9"]})[0] == 200  # re-addressed: the old claim released
    assert register(env, {**DB, "id": "dc1-db-9", "ips": ["192.168.10.9"]})[0] == 409  # held by dc1-db-1
    header = "id,ips,ringfence:role,ringfence:app,ringfence:env,ringfence:loc\n"
    csv = header + "dc1-db-2,192.168.10.6,database,ordering,prod,ca\n"
    status, _, answer = env.rest("admin", "POST", "/admin/workloads/import", {"csv": csv}, principal=OTTO)
    assert status == 200, answer
    body = {"workload_id": "dc1-db-1", "uses": 1, "ttl": 600}
    assert env.rest("admin", "POST", "/admin/pairing-keys", body, principal=OTTO)[0] == 201
    assert env.rest("admin", "DELETE", "/admin/workloads/dc1-db-1", {"reason": "gone"}, principal=OTTO)[0] == 200
    writes = {(a, t, c["dynamodb:LeadingKeys"][0].split("#")[0]) for a, t, c in rec.calls["admin"] if a in WRITES}
    for expected in (
        ("PutItem", "state", "addrowner"),  # a claim, in the registration's transaction
        ("DeleteItem", "state", "addrowner"),  # released
        ("UpdateItem", "inventory", "dc1-db-1"),
        ("UpdateItem", "inventory", "dc1-db-2"),
        ("PutItem", "state", "pairing"),
        ("DeleteItem", "state", "pairing"),  # the deregistered host's keys dropped
    ):
        assert expected in writes, (expected, sorted(writes))
    assert not refusals(rec, ("admin",))
