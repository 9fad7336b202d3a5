"""Admin changes stored whose compute message fails (the queue refuses it: SQS 503): a policy
version, a mode, a quarantine and its release, an on-premise registration, a CMDB import and a deregistration are
each answered 503 naming what was stored and its audit record (``<done>; compute not queued:
send the request again``), not a bare 500, and counted (``ComputeNotQueued``). The change is in
the store but no bundle follows it, through compute passes too; the same request again is
answered as usual and queues compute, and the workload's bundle and its peers' sets follow.

Against the real admin function (moto server behind it) and ``ringfence serve`` over HTTP (the
AWS wiring over the same moto), the compute queue refusing in both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from ringfence.metrics import Counters
from tests.aws.conftest import Env, ip_of
from tests.aws.test_admin_bind import compute_queue_down
from tests.aws.test_handler_metrics import emitted
from tests.aws.test_pipeline import boot, in_set

RESPONDER = "arn:aws:iam::123456789012:user/ivy"  # incident-responder
AUTHOR = "arn:aws:iam::123456789012:user/pat"  # policy-author
OTTO = "arn:aws:iam::123456789012:user/otto"  # onboarding
DB = {
    "id": "dc1-db-1",
    "ips": ["192.168.10.5"],
    "site": "dc1",
    "tags": {"ringfence:role": "database", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"},
}
CSV = (
    "id,ips,ringfence:role,ringfence:app,ringfence:env,ringfence:loc\ndc1-db-2,192.168.10.6,database,ordering,prod,ca\n"
)


def refused_then_queued(env: Env, call: Any, done: str, action: str, target: str) -> Any:
    """``call()`` with the compute queue refusing once: 503 naming ``done`` and the audit record
    of ``action`` on ``target``, nothing queued. Returns that record."""
    down = compute_queue_down(env, 1)
    status, answer = call()
    assert status == 503, answer
    assert answer["error"] == f"{done}; compute not queued: send the request again", answer
    [rec] = [a for a in env.store.audit_log() if a.action == action and a.target == target][-1:]
    assert rec.id in answer["detail"] and "(ClientError: ServiceUnavailable)" in answer["detail"], answer
    assert "sqs 503" not in answer["detail"], "the error's text (it can name ARNs) is logged, not answered"
    assert "again queue" in answer["detail"], answer  # when the same request again queues compute
    assert down == [0] and env.count("compute") == 0
    return rec


def test_a_mode_quarantine_and_release_whose_compute_message_failed_are_answered_and_queued_again(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    est = boot(env)
    env.bind(RESPONDER, ["incident-responder"])
    env.bind(AUTHOR, ["policy-author"])
    web, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    web_ip = ip_of(env, web)
    assert env.bundle(web).mode.value == "enforce" and in_set(env.bundle(proc), web_ip)
    capsys.readouterr()

    def mode() -> tuple[int, Any]:
        body = {"mode": "observe", "reason": "CHG-30"}
        status, _, answer = env.rest("admin", "PUT", f"/admin/workloads/{web}/mode", body, principal=AUTHOR)
        return status, answer

    refused_then_queued(env, mode, "mode set to observe", "workload.mode", web)
    assert env.store.get(web).op_mode.value == "observe"
    env.pump()
    assert env.bundle(web).mode.value == "enforce", "stored, not enforced: compute was never asked"
    status, answer = mode()
    assert status == 200 and answer["mode"] == "observe", answer
    env.pump()
    assert env.bundle(web).mode.value == "observe"

    def quarantine(method: str) -> Any:
        def call() -> tuple[int, Any]:
            path = f"/admin/workloads/{web}/quarantine"
            status, _, answer = env.rest("admin", method, path, {"reason": "IR-9"}, principal=RESPONDER)
            return status, answer

        return call

    refused_then_queued(env, quarantine("POST"), "quarantined", "workload.quarantine", web)
    assert env.store.get(web).op_quarantined
    env.pump()
    assert not env.bundle(web).quarantined and in_set(env.bundle(proc), web_ip), "stored, not enforced"
    status, answer = quarantine("POST")()
    assert status == 200 and answer["quarantined"] is True, answer
    env.pump()
    assert env.bundle(web).quarantined and not in_set(env.bundle(proc), web_ip), "its peers cut it off"

    refused_then_queued(env, quarantine("DELETE"), "released", "workload.release", web)
    assert not env.store.get(web).op_quarantined
    env.pump()
    assert env.bundle(web).quarantined, "stored, not enforced"
    status, answer = quarantine("DELETE")()
    assert status == 200 and answer["quarantined"] is False, answer
    env.pump()
    assert not env.bundle(web).quarantined and in_set(env.bundle(proc), web_ip)
    # one per change stored whose compute message failed, from the admin function
    assert emitted(capsys.readouterr().out).get("ComputeNotQueued") == 3


def test_a_policy_provisioned_whose_compute_message_failed_is_answered_and_provisioned_again(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """The version is active but no bundle is rebuilt under it; the same files again, while it is
    the active version, create no new version (answered 200 naming it) and queue the rebuild."""
    from tests.aws.conftest import LABEL_TESTS, POLICY_DIR

    est = boot(env)
    web = est["ids"]["web"][0]
    first = env.bundle(web).policy_version
    files = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
    files["tests.yaml"] = LABEL_TESTS
    files[sorted(files)[0]] += "\n# CHG-35\n"  # not the booted version's files
    capsys.readouterr()

    def provision() -> tuple[int, Any]:
        status, _, answer = env.rest("admin", "POST", "/admin/policies", {"files": files, "reason": "CHG-35"})
        return status, answer

    refused_then_queued(env, provision, "provisioned", "policy.provision", f"policy/v{first + 1}")
    assert env.store.active_policy().number == first + 1
    env.pump()
    assert env.bundle(web).policy_version == first, "active, no bundle rebuilt under it"
    status, answer = provision()
    assert status == 200 and answer["version"] == first + 1 and answer["audit_id"] is None, answer
    assert env.store.active_policy().number == first + 1 and env.count("compute") >= 1
    assert env.store.next_policy_version() == first + 2, "no version number taken"
    env.pump()
    assert env.bundle(web).policy_version == first + 1
    assert emitted(capsys.readouterr().out).get("ComputeNotQueued") == 1


@pytest.fixture
def hybrid(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Env, dict[str, Any]]]:
    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,pairing")
    env.load_functions()
    env.bind(OTTO, ["onboarding"])
    yield env, boot(env)


def test_an_onprem_registration_import_and_deregistration_whose_compute_message_failed_are_queued_again(
    hybrid: tuple[Env, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A new registration's retry is an update (200, created false) and queues compute; a CMDB
    file imported again updates its rows; a deregistration sent again writes the tombstone again."""
    env, est = hybrid
    proc = est["ids"]["proc"][0]
    capsys.readouterr()

    def register() -> tuple[int, Any]:
        status, _, answer = env.rest("admin", "POST", "/admin/workloads", {**DB, "reason": "CHG-31"}, principal=OTTO)
        return status, answer

    refused_then_queued(env, register, "registered", "workload.register", "dc1-db-1")
    assert env.store.get("dc1-db-1").state == "running"
    env.pump()
    assert not in_set(env.bundle(proc), "192.168.10.5"), "stored, not in any peer's sets"
    status, answer = register()
    assert status == 200 and answer["created"] is False, answer
    env.pump()
    assert in_set(env.bundle(proc), "192.168.10.5")

    def cmdb() -> tuple[int, Any]:
        body = {"csv": CSV, "source": "dc1.csv", "reason": "CHG-32"}
        status, _, answer = env.rest("admin", "POST", "/admin/workloads/import", body, principal=OTTO)
        return status, answer

    refused_then_queued(env, cmdb, "imported (1 workloads)", "workload.import", "dc1.csv")
    assert env.store.get("dc1-db-2") is not None
    env.pump()
    assert not in_set(env.bundle(proc), "192.168.10.6"), "stored, not in any peer's sets"
    status, answer = cmdb()
    assert status == 200 and answer["updated"] == 1, answer
    env.pump()
    assert in_set(env.bundle(proc), "192.168.10.6")

    def deregister() -> tuple[int, Any]:
        status, _, answer = env.rest(
            "admin", "DELETE", "/admin/workloads/dc1-db-1", {"reason": "CHG-33"}, principal=OTTO
        )
        return status, answer

    refused_then_queued(env, deregister, "deregistered", "workload.deregister", "dc1-db-1")
    assert env.store.get("dc1-db-1").state == "terminated"
    env.pump()
    assert in_set(env.bundle(proc), "192.168.10.5"), "stored, still in its peers' sets"
    status, answer = deregister()
    assert status == 200, answer
    env.pump()
    assert not in_set(env.bundle(proc), "192.168.10.5"), "it left every peer's sets"
    assert emitted(capsys.readouterr().out).get("ComputeNotQueued") == 3


@pytest.fixture
def served(env: Env, tmp_path: Path) -> Iterator[tuple[str, dict[str, str], list[int]]]:
    """``ringfence serve`` over the AWS wiring (the same moto), its compute queue refusing the
    number of SendMessage calls the returned list holds (set it to refuse)."""
    from botocore.exceptions import ClientError

    left = [0]

    def down(params: dict[str, Any], **_: Any) -> None:
        if left[0] > 0 and params.get("QueueUrl") in (env.queues["compute"], env.queues["compute_priority"]):
            left[0] -= 1
            raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "sqs 503"}}, "SendMessage")

    env.hook("before-parameter-build.sqs.SendMessage", down)
    tokens, lines = {}, []
    for who, roles in {"ivan": ["incident-responder"], "otto": ["onboarding"]}.items():
        tokens[who], line = serve.new_admin_token(who, roles)
        lines.append(line)
    path = tmp_path / "admin-tokens"
    path.write_text("\n".join(lines) + "\n")
    counters = Counters()
    w = serve.build_wiring("aws", metric=counters)
    try:
        app = serve.ServeApp.over(w, serve.AdminTokens.load(path), metrics=counters)
        with serve.serving(app) as running:
            yield running.url, tokens, left
    finally:
        w.close()


def test_serve_answers_a_change_stored_whose_compute_message_failed_and_queues_it_again(
    env: Env, served: tuple[str, dict[str, str], list[int]]
) -> None:
    url, tok, down = served
    est = boot(env)
    web, proc = est["ids"]["web"][0], est["ids"]["proc"][0]
    web_ip = ip_of(env, web)

    def call(method: str, path: str, who: str, body: Any) -> httpx.Response:
        return httpx.request(method, url + path, json=body, headers={"Authorization": f"Bearer {tok[who]}"}, timeout=60)

    for method, path, who, body, done, check in (
        ("POST", f"/admin/workloads/{web}/quarantine", "ivan", {"reason": "IR-10"}, "quarantined", None),
        ("POST", "/admin/workloads", "otto", {**DB, "reason": "CHG-34"}, "registered", "192.168.10.5"),
    ):
        down[0] = 1
        r = call(method, path, who, body)
        answer = r.json()
        assert r.status_code == 503 and answer["error"] == f"{done}; compute not queued: send the request again"
        assert "audit record" in answer["detail"] and "(ClientError: ServiceUnavailable)" in answer["detail"], answer
        assert "sqs 503" not in answer["detail"], "the error's text (it can name ARNs) is logged, not answered"
        assert down == [0] and env.count("compute") == 0
        env.pump()
        if check is None:
            assert env.store.get(web).op_quarantined and in_set(env.bundle(proc), web_ip), "stored, not enforced"
        else:
            assert env.store.get("dc1-db-1") is not None and not in_set(env.bundle(proc), check)
        r = call(method, path, who, body)  # the same request again, the queue back
        assert r.status_code in (200, 201) and env.count("compute") >= 1, r.text
        env.pump()
        if check is None:
            assert env.bundle(web).quarantined and not in_set(env.bundle(proc), web_ip)
        else:
            assert r.json()["created"] is False and in_set(env.bundle(proc), check), r.text
    got = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {tok['ivan']}"}, timeout=30)
    assert "ringfence_compute_not_queued_total 2.0" in got.text, got.text


def answer_lost(env: Env, times: int) -> list[int]:
    """The next ``times`` TransactWriteItems calls that write an inventory record (an operator's
    change, with its audit record: Store.audit_with) land but their answer is lost (an error
    after the call), in a new admin container. The list returned holds the losses left."""
    from botocore.exceptions import ClientError

    from ringfence.local.lambdas import load_functions, retire_functions
    from tests.aws.conftest import ROOT

    left = [times]
    change = [False]

    def seen(params: dict[str, Any], **_: Any) -> None:
        change[0] = "rf-inventory" in json.dumps(params, default=str)  # other writes go through

    def lost(model: Any, **_: Any) -> None:
        if left[0] > 0 and change[0]:
            left[0] -= 1
            raise ClientError({"Error": {"Code": "InternalServerError", "Message": "answer lost"}}, model.name)

    env.hook("before-parameter-build.dynamodb.TransactWriteItems", seen)
    env.hook("after-call.dynamodb.TransactWriteItems", lost)
    retire_functions([env.fn["admin"]])
    env.fn["admin"] = load_functions(["admin"], ROOT / "functions", keep_clients=True)["admin"]
    return left


def test_a_mode_and_quarantine_in_force_though_the_store_raised_are_answered_as_stored_and_queued(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """The write (the change with its audit record, one transaction) landed, its answer was lost:
    the store reads the record's commit back, so the change is answered as stored and compute
    queued (or 503 NotQueued when the queue refuses too), never a bare 500 with nothing queued,
    and no ``.failed`` record follows."""
    est = boot(env)
    env.bind(AUTHOR, ["policy-author"])
    env.bind(RESPONDER, ["incident-responder"])
    web = est["ids"]["web"][0]
    lost = answer_lost(env, 1)
    before = env.count("compute")
    status, _, answer = env.rest(
        "admin", "PUT", f"/admin/workloads/{web}/mode", {"mode": "observe", "reason": "CHG-36"}, principal=AUTHOR
    )
    assert lost == [0] and status == 200 and answer["mode"] == "observe", answer
    assert env.store.get(web).op_mode.value == "observe" and env.count("compute") > before
    env.pump()
    assert env.bundle(web).mode.value == "observe", "compute was queued"
    assert [a.action for a in env.store.audit_log() if a.target == web][-1] == "workload.mode"
    assert [a.action for a in env.store.audit_log() if a.action == "workload.mode"] == ["workload.mode"], "once"
    # the answer lost and the queue refusing: 503 naming the change, counted
    capsys.readouterr()
    down = compute_queue_down(env, 1)
    lost = answer_lost(env, 1)
    status, _, answer = env.rest(
        "admin", "POST", f"/admin/workloads/{web}/quarantine", {"reason": "IR-11"}, principal=RESPONDER
    )
    assert lost == [0] and down == [0] and status == 503, answer
    assert answer["error"] == "quarantined; compute not queued: send the request again", answer
    assert env.store.get(web).op_quarantined
    assert emitted(capsys.readouterr().out).get("ComputeNotQueued") == 1


def test_a_provisioning_answered_503_says_to_send_it_again_only_while_its_version_is_active(env: Env) -> None:
    """A retry after another version was provisioned would roll that one back: the 503 names the
    version and the condition, and the same files as the active version's again create no version."""
    from tests.aws.conftest import LABEL_TESTS, POLICY_DIR

    boot(env)
    env.bind(AUTHOR, ["policy-author"])
    x = {p.name: p.read_text() for p in sorted(POLICY_DIR.glob("*.yaml")) if p.name != "tests.yaml"}
    x["tests.yaml"] = LABEL_TESTS
    x[sorted(x)[0]] += "\n# CHG-40\n"  # not the booted version's files
    y = {**x, sorted(x)[0]: x[sorted(x)[0]] + "\n# newer (CHG-41)\n"}
    compute_queue_down(env, 1)
    status, _, a = env.rest("admin", "POST", "/admin/policies", {"files": x, "reason": "CHG-40"}, principal=AUTHOR)
    va = env.store.active_policy().number
    assert status == 503 and f"while v{va} is the active version" in a["detail"], a
    assert "a later version provisioned queues the rebuild itself" in a["detail"], a
    status, _, b = env.rest("admin", "POST", "/admin/policies", {"files": y, "reason": "CHG-41"}, principal=AUTHOR)
    assert status == 201 and b["version"] == va + 1, b
    # the rebuild the 503 left undone is queued by the later version; y again is not a new version
    status, _, again = env.rest("admin", "POST", "/admin/policies", {"files": y, "reason": "CHG-41"}, principal=AUTHOR)
    assert status == 200 and again["version"] == va + 1 and env.store.active_policy().number == va + 1, again
