"""Only the perimeter's role records a security group as Ringfence's (``sg#<account>#<region>``
state items, clouds/aws/sg.py GroupRecords). The admin and compute functions' state-table writes
are held by ``dynamodb:LeadingKeys`` to the partitions their code writes, in template.yaml and
infra/ alike: those writes are recorded from the real handlers over moto (the Recorder of
tests/aws/test_function_iam.py) and judged by the same evaluator."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from ringfence.local.lambdas import LambdaContext
from ringfence.store.base import agent_key_fingerprint_of
from tests.aws.conftest import LABEL_TESTS, POLICY_DIR, Env
from tests.aws.test_agent_api import enroll_pairing
from tests.aws.test_attack_nudge_connection import connect
from tests.aws.test_function_iam import (
    SAM,
    WRITES,
    Recorder,
    Request,
    _scheduled,
    allowed,
    refusals,
    sam_statements,
    terraform_statements,
)
from tests.aws.test_lifecycle_gate import heartbeat, launch
from tests.aws.test_pipeline import AgentKey, enroll_instance

DEPLOYMENTS = (("template.yaml", sam_statements), ("infra/", terraform_statements))

# (action, partition) of every state-table write each function's code makes (store/dynamodb.py;
# the admin's on-premise routes: clouds/onprem.py): what its role is granted, nothing else
ADMIN = {
    ("PutItem", "policy"),  # a provision: the active item and its history, in one transaction
    ("UpdateItem", "policy"),  # with the version counter
    ("PutItem", "quarantine"),
    ("DeleteItem", "quarantine"),  # a release: the administrator's alone
    ("PutItem", "pairing#"),
    ("PutItem", "pairingof#"),
    ("DeleteItem", "pairing#"),
    ("DeleteItem", "pairingof#"),
    ("PutItem", "nextkey#"),  # an agent-key reset: the next key named, or none
    ("DeleteItem", "nextkey#"),
    ("DeleteItem", "agentkey#"),
    ("DeleteItem", "token#"),
    ("DeleteItem", "tokenof#"),
    ("DeleteItem", "conn#"),
    ("PutItem", "addrowner#"),  # an on-premise workload's addresses claimed, released
    ("DeleteItem", "addrowner#"),
}
COMPUTE = {
    ("UpdateItem", "engine"),
    ("UpdateItem", "bundle#"),  # pending marks and, publishing inline (a launch), pointers
    ("UpdateItem", "sethead#"),
    ("PutItem", "delta#"),
    ("PutItem", "moved"),
    ("UpdateItem", "launch#"),  # its half of a launch hold: the action, its claim and outcome
    ("DeleteItem", "conn#"),  # a nudged connection gone (GoneException)
}


def partition(pk: str) -> str:
    """A state key's partition kind: ``bundle#i-1`` → ``bundle#``, ``engine`` → ``engine``."""
    return pk.split("#", 1)[0] + "#" if "#" in pk else pk


def state_writes(rec: Recorder, fn: str) -> set[tuple[str, str]]:
    return {
        ("PutItem" if a == "BatchWriteItem" else a, partition(c["dynamodb:LeadingKeys"][0]))
        for a, t, c in rec.calls.get(fn, [])
        if a in WRITES | {"ConditionCheckItem"} and t == "state"
    }


def _policy_files() -> dict[str, str]:
    files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
    return files | {"tests.yaml": LABEL_TESTS}


def _onprem(env: Env, rec: Recorder) -> str:
    """The admin's on-premise routes' code (clouds/onprem.py, as ``ringfence serve`` and the admin
    function route it): two hosts registered, one re-addressed; the id of one still registered."""
    from ringfence.clouds.aws.wiring import Wiring
    from ringfence.clouds.onprem import OnPremAdmin
    from ringfence.control.wiring import Config

    admin = OnPremAdmin(Wiring(Config.from_env()))
    rec.current = "admin"
    try:
        assert admin.register_workload("alice", {"id": "dc9-a", "ips": ["10.90.0.1"]}).status == 201
        assert admin.register_workload("alice", {"id": "dc9-b", "ips": ["10.90.0.1"]}).status == 409
        assert admin.register_workload("alice", {"id": "dc9-b", "ips": ["10.90.0.3"]}).status == 201
        assert admin.register_workload("alice", {"id": "dc9-a", "ips": ["10.90.0.2"]}).status == 200
        assert admin.deregister_workload("alice", "dc9-a").status == 200
    finally:
        rec.current = None
    return "dc9-b"


def test_every_state_write_admin_and_compute_make_is_granted_in_both_deployments(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launch (compute publishes it inline, its nudge finding the connection gone, and
    completes it once its agent enforces), a policy provisioned again, every admin route that
    writes (mode, binding, quarantine and release, pairing keys made, used and revoked, agent-key
    resets with and without a next key, findings, map, suggestions), an on-premise host
    registered, re-addressed and deregistered, and the scheduled reconcile: the partitions admin
    and compute write are exactly ADMIN and COMPUTE, each granted in both deployments."""
    monkeypatch.setenv("RINGFENCE_WEBSOCKET_ENDPOINT", env.url)  # moto's API Gateway management API
    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,pairing")
    env.load_functions()
    rec = Recorder(env)  # before the first call: the functions keep the clients they made

    def gone(params: dict[str, Any], **_: Any) -> None:  # every nudge finds its connection gone
        raise ClientError({"Error": {"Code": "GoneException", "Message": "gone"}}, "PostToConnection")

    env.hook("before-parameter-build.apigatewaymanagementapi.PostToConnection", gone)
    new = launch(env)
    token = enroll_instance(env, new)
    env.drain("lifecycle", "lifecycle")
    env.drain("ingest", "ingest")
    env.drain("perimeter", "perimeter")
    assert connect(env, token, "c-1") == 200
    env.pump()  # compute publishes the launch inline and nudges it: gone
    ptr = env.store.bundle_pointer(new)
    assert ptr is not None
    heartbeat(env, new, token, ptr.version)  # its agent enforces: compute completes the launch
    env.pump()
    assert connect(env, token, "c-2") == 200
    host = _onprem(env, rec)
    next_key = AgentKey()
    for method, path, body, query in (
        ("POST", "/admin/policies", {"files": _policy_files(), "reason": "again"}, None),
        ("PUT", f"/admin/workloads/{new}/mode", {"mode": "observe"}, None),
        ("PUT", f"/admin/workloads/{new}/labels", {"labels": {"role": "jumpbox"}, "reason": "CHG-1"}, None),
        ("POST", f"/admin/workloads/{new}/quarantine", {"reason": "ir-1"}, None),
        ("DELETE", f"/admin/workloads/{new}/quarantine", {"reason": "ir-1 closed"}, None),
        ("POST", "/admin/pairing-keys", {"workload_id": host, "uses": 2, "ttl": 600}, None),
        ("DELETE", f"/admin/workloads/{host}/pairing-keys", {"reason": "unused"}, None),
        ("DELETE", f"/admin/workloads/{new}/agent-key", {"reason": "rotated"}, None),
        (
            "DELETE",
            f"/admin/workloads/{new}/agent-key",
            {"reason": "rotated", "next_agent_key": agent_key_fingerprint_of(next_key.pem)},
            None,
        ),
        ("GET", "/admin/findings", None, None),
        ("GET", "/admin/map", None, None),
        ("GET", "/admin/suggest", None, {"app": "ordering"}),
    ):
        status, _, answer = env.rest("admin", method, path, body, query=query)
        assert status in (200, 201), (method, path, status, answer)
        if path == "/admin/pairing-keys":  # used once, so that its revocation finds a use left
            assert enroll_pairing(env, host, answer["pairing_key"])[0] == 200
        env.pump()
    env.fn["reconcile"].handler(_scheduled(), LambdaContext())
    env.pump()

    assert state_writes(rec, "admin") == ADMIN, sorted(state_writes(rec, "admin") ^ ADMIN)
    assert state_writes(rec, "compute") == COMPUTE, sorted(state_writes(rec, "compute") ^ COMPUTE)
    assert not refusals(rec, ("admin", "compute"))


def _sg_writes(fn: str) -> list[Request]:
    """Every form of writing a group record or an intent (clouds/aws/sg.py GroupRecords)."""
    pk = "sg#123456789012#ca-central-1"
    attrs = ["pk", "sk", "network", "name", "how"]
    return [
        (action, "state", {"dynamodb:LeadingKeys": [pk], "dynamodb:Attributes": attrs})
        for action in ("PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem")
    ]


@pytest.mark.parametrize("fn", ["admin", "compute"])
def test_attack_the_admin_and_compute_roles_cannot_record_a_security_group_as_ringfences(fn: str) -> None:
    """Code running as the admin or the compute function's role writes ``sg#`` items: a record
    of a look-alike group (which the perimeter would then attach as its own), an intent whose
    nonce a look-alike carries (taken back as a group of a stopped run), or a real record
    deleted (its group then refused as a look-alike). Before, both roles held unconditioned
    PutItem, UpdateItem and DeleteItem on the state table; now none of these is granted to them
    in either deployment, and among all functions only the perimeter's role may write them."""
    for where, statements_of in DEPLOYMENTS:
        granted = [w for w in _sg_writes(fn) if allowed(statements_of(fn), w)]
        assert not granted, (where, fn, granted)
        writers = {f for f in SAM if any(allowed(statements_of(f), w) for w in _sg_writes(f))}
        assert writers == {"perimeter"}, (where, writers)
