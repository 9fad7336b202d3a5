"""Admin bindings through the admin API: ``PUT /admin/workloads/{id}/labels`` grants privileged
label values to one workload (``ringfence.control.governance.bind_labels``), audited as
``label.bind`` and open to policy authors only; ``DELETE`` on the same path takes grants back
(``unbind_labels``), audited as ``label.unbind``, policy authors only too.

Against the real admin function (moto server behind it, API Gateway's IAM caller in the event)
and against ``ringfence serve`` over HTTP with role-carrying admin tokens: the same routes. A
developer's retag into ``role=jumpbox, app=admin`` is held (tests/aws/test_governance.py); a
binding is how an administrator approves it when no tagger made the change."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.aws.conftest import OPERATOR, Env, ip_of
from tests.aws.test_admin_authz import served_roles
from tests.aws.test_governance import DEVELOPER, ESCALATION, TAGGER_ROLE, governed_estate, retag, ssh_peers
from tests.aws.test_pipeline import _ctx, _scheduled

__all__ = ["served_roles"]  # the fixture, used by name

AUTHORS = "arn:aws:iam::123456789012:role/PolicyAuthors"
PAT = "arn:aws:sts::123456789012:assumed-role/PolicyAuthors/pat"  # a session of that role
RESPONDERS = "arn:aws:iam::123456789012:role/IncidentResponders"
JANE = "arn:aws:sts::123456789012:assumed-role/IncidentResponders/jane"
READER = "arn:aws:iam::123456789012:user/rita"
ONBOARDER = "arn:aws:iam::123456789012:user/otto"
PREVIOUS = {"role": "web", "app": "ordering", "env": "dev", "loc": "ca"}
GRANT = {"role": "jumpbox", "app": "admin"}


def held_estate(env: Env) -> dict[str, Any]:
    """The example estate, and a dev box its developer retagged into role=jumpbox, app=admin:
    held (its previous labels in force), in no production host's SSH peer set, compute quiet."""
    est = governed_estate(env)
    retag(env, est["dev"], ESCALATION, DEVELOPER)
    rec = env.store.get(est["dev"])
    assert rec.workload.held_labels is not None and rec.labels == PREVIOUS
    assert not any(ssh_peers(env, est).values())
    assert env.count("compute") == 0
    return est


def bind(env: Env, wid: str, body: Any, principal: str = PAT) -> tuple[int, Any]:
    status, _, answer = env.rest("admin", "PUT", f"/admin/workloads/{wid}/labels", body, principal=principal)
    return status, answer


def bindings(env: Env) -> list[Any]:
    return [a for a in env.store.audit_log() if a.action == "label.bind"]


def unbind(env: Env, wid: str, body: Any, principal: str = PAT) -> tuple[int, Any]:
    status, _, answer = env.rest("admin", "DELETE", f"/admin/workloads/{wid}/labels", body, principal=principal)
    return status, answer


def revocations(env: Env) -> list[Any]:
    return [a for a in env.store.audit_log() if a.action == "label.unbind"]


def ssh_out(env: Env, est: dict[str, Any]) -> bool:
    """``est["dev"]``'s own bundle lets it open SSH (tcp/22) to a production host."""
    prod = {ipaddress.ip_address(ip_of(env, i)) for i in (*est["ids"]["web"], *est["ids"]["proc"], *est["ids"]["db"])}
    doc = env.bundle(est["dev"])
    for rule in doc.outbound:
        if rule.action != "allow":
            continue
        entries = [(m.set, m.services) for m in rule.members] if rule.members else [(rule.set, rule.services)]
        for name, services in entries:
            ssh = any(
                s.proto in ("tcp", "any") and (s.ports is None or s.ports[0] <= 22 <= s.ports[1]) for s in services
            )
            if ssh and name is not None:
                cidrs = [ipaddress.ip_network(c) for c in doc.sets[name].v4]
                if any(ip in c for ip in prod for c in cidrs):
                    return True
    return False


def bound_jumpbox(env: Env) -> dict[str, Any]:
    """held_estate's dev box bound role=jumpbox, app=admin by a policy author, computed: every
    production host's SSH peer, and its own bundle opens SSH to them."""
    est = held_estate(env)
    env.bind(AUTHORS, ["policy-author"])
    status, body = bind(env, est["dev"], {"labels": GRANT, "reason": "CHG-7 bastion"})
    assert status == 200 and body["held"] is False, body
    env.pump()
    assert all(ssh_peers(env, est).values()) and ssh_out(env, est)
    return est


def test_policy_author_binding_lifts_the_hold_audits_and_recomputes(env: Env) -> None:
    est = held_estate(env)
    dev = est["dev"]
    env.bind(AUTHORS, ["policy-author"])

    # one of the two values: the other move is still held, so nothing in force changes yet
    status, body = bind(env, dev, {"labels": {"role": "jumpbox"}, "reason": "CHG-7 bastion"})
    assert status == 200, body
    assert body["held"] is True and body["labels"] == PREVIOUS and body["label_grants"] == {"role": "jumpbox"}
    assert env.store.get(dev).labels == PREVIOUS

    status, body = bind(env, dev, {"labels": {"app": "admin"}, "reason": "CHG-7 bastion"})
    assert status == 200, body
    assert body["held"] is False and body["label_grants"] == GRANT
    assert body["labels"] == {"role": "jumpbox", "app": "admin", "env": "shared", "loc": "ca"}
    rec = env.store.get(dev)
    assert rec.workload.held_labels is None and rec.workload.label_grants == GRANT
    assert rec.labels == body["labels"]

    audited = bindings(env)
    assert [(a.principal, a.target, a.reason) for a in audited] == [(PAT, dev, "CHG-7 bastion")] * 2
    assert audited[-1].id == body["audit_id"] and audited[-1].detail["labels"] == GRANT
    assert env.count("compute") >= 1, "the binding is queued for compute"
    env.pump()
    assert all(ssh_peers(env, est).values()), "the bound jumpbox is every production host's SSH peer"


def test_a_taggers_approval_that_comes_in_force_with_a_binding_is_named_in_its_record(env: Env) -> None:
    """The tagging role approves app=admin while the developer's role=jumpbox is held: stored, not
    in force, not audited as approved. A binding of role alone then brings app=admin in force too:
    the binding's record names that approval and the tagger's event, so no privileged value comes
    in force without a record saying why."""
    dev = held_estate(env)["dev"]
    env.bind(AUTHORS, ["policy-author"])
    # a second later: in the developer's second a tagger's call never outranks it (fail closed)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    retag(env, dev, {"ringfence:app": "admin"}, TAGGER_ROLE, version=7, at=later)
    rec = env.store.get(dev)
    assert rec.labels == PREVIOUS and rec.label_writes["app"].by == "tagger", "the approval is stored, not in force"
    assert not [a for a in env.store.audit_log() if a.action == "label.approve"]
    status, answer = bind(env, dev, {"labels": {"role": "jumpbox"}, "reason": "CHG-9"})
    assert status == 200, answer
    rec = env.store.get(dev)
    assert rec.labels["app"] == "admin" and rec.labels["role"] == "jumpbox"
    [record] = bindings(env)
    approval = rec.label_writes["app"]
    assert approval.by == "tagger" and approval.at >= later.replace(microsecond=0).timestamp()
    assert record.detail["approved"] == {"app": {"value": "admin", "approved_at": approval.at}}, record.detail
    assert record.detail["labels"] == {"role": "jumpbox"}


def test_attack_only_policy_authors_may_bind(env: Env) -> None:
    est = held_estate(env)
    dev = est["dev"]
    before = env.store.get(dev)
    env.bind(RESPONDERS, ["incident-responder"])
    env.bind(READER, ["reader"])
    env.bind(ONBOARDER, ["onboarding"])
    for who in (READER, JANE, ONBOARDER):
        status, body = bind(env, dev, {"labels": GRANT, "reason": "let me in"}, principal=who)
        assert status == 403 and "label.bind" in body["detail"], body
    assert env.store.get(dev) == before and not bindings(env) and env.count("compute") == 0
    denied = [(a.principal, a.target, a.detail["action"]) for a in env.store.audit_log() if a.action == "admin.denied"]
    assert denied == [(READER, dev, "label.bind"), (JANE, dev, "label.bind"), (ONBOARDER, dev, "label.bind")]
    env.pump()
    assert not any(ssh_peers(env, est).values())


def test_bad_bindings_are_refused_and_change_nothing(env: Env) -> None:
    est = held_estate(env)
    dev = est["dev"]
    env.bind(AUTHORS, ["policy-author"])
    [gone] = est["run"]("web", est["subnets"]["web"], 1, env="dev")
    env.put(env.state_event(gone, "running"))
    env.pump()
    env.ec2.terminate_instances(InstanceIds=[gone])
    env.put(env.state_event(gone, "terminated"))
    env.pump()
    assert env.store.get(gone).state == "terminated" and env.count("compute") == 0
    before = env.store.get(dev)
    reason = "CHG-7"
    cases: list[tuple[str, Any, int, str]] = [
        (dev, {"labels": {"rank": "admin"}, "reason": reason}, 400, "unknown label dimension 'rank'"),
        (dev, {"labels": {"role": "superuser"}, "reason": reason}, 400, "role='superuser' is not a privileged value"),
        (dev, {"labels": {"role": "web"}, "reason": reason}, 400, "role='web' is not a privileged value"),
        # one bad value refuses the whole binding
        (dev, {"labels": {"role": "jumpbox", "app": "payroll"}, "reason": reason}, 400, "app='payroll'"),
        (dev, {"labels": GRANT, "reason": "   "}, 400, "needs a reason"),
        (dev, {"labels": GRANT}, 422, "body.reason"),
        (dev, {"labels": {}, "reason": reason}, 422, "body.labels"),
        ("i-0123456789abcdef0", {"labels": GRANT, "reason": reason}, 404, "i-0123456789abcdef0"),
        (gone, {"labels": GRANT, "reason": reason}, 404, gone),
    ]
    for wid, body, want, says in cases:
        status, answer = bind(env, wid, body)
        assert (status, says in answer["detail"]) == (want, True), (body, answer)
    # the 400s say what the policy would grant
    _, answer = bind(env, dev, {"labels": {"role": "superuser"}, "reason": reason})
    assert "privileged values: role: jumpbox; app: admin" in answer["detail"]
    assert env.store.get(dev) == before and env.store.get(gone).workload.label_grants == {}
    assert not bindings(env) and env.count("compute") == 0


def test_no_active_policy_refuses_a_binding(env: Env) -> None:
    est = env.estate()
    web = est["ids"]["web"][0]
    env.put(env.state_event(web, "running"))
    env.pump()
    before = env.store.get(web)
    assert before is not None and env.store.active_policy() is None
    status, body = bind(env, web, {"labels": {"role": "jumpbox"}, "reason": "CHG-7"}, principal=OPERATOR)
    assert status == 400 and "no active policy" in body["detail"], body
    assert env.store.get(web) == before and not bindings(env) and env.count("compute") == 0


# --- ringfence serve: the same route, roles on admin tokens ---------------------------------------


def test_serve_binds_for_a_policy_author_token_only(env: Env, served_roles: tuple[str, dict[str, str]]) -> None:
    url, tok = served_roles
    est = held_estate(env)
    dev = est["dev"]
    before = env.store.get(dev)

    def put(who: str, body: Any) -> httpx.Response:
        return httpx.put(
            f"{url}/admin/workloads/{dev}/labels", json=body, headers={"Authorization": f"Bearer {tok[who]}"}
        )

    for who in ("rita", "ivan"):
        r = put(who, {"labels": GRANT, "reason": "let me in"})
        assert r.status_code == 403 and "label.bind" in r.json()["detail"], r.text
    assert put("ann", {"labels": {"role": "nope"}, "reason": "CHG-9"}).status_code == 400
    assert env.store.get(dev) == before and not bindings(env) and env.count("compute") == 0

    r = put("ann", {"labels": GRANT, "reason": "CHG-9"})
    assert r.status_code == 200 and r.json()["held"] is False, r.text
    [bound] = bindings(env)
    assert (bound.principal, bound.reason, bound.id) == ("ann", "CHG-9", r.json()["audit_id"])
    env.pump()
    assert env.store.get(dev).labels["role"] == "jumpbox"
    assert all(ssh_peers(env, est).values())


@pytest.mark.slow
def test_a_binding_racing_newer_observations_is_reapplied_or_refused_never_lost(env: Env) -> None:
    """An observation that lands between the binding's read and its write wins the conditional
    write: the binding reads the record again and re-applies itself; when newer observations keep
    landing it answers 409, records that its audited binding failed (label.bind.failed) and leaves
    the hold, rather than answering a binding that was never stored."""
    est = held_estate(env)
    dev = est["dev"]
    env.bind(AUTHORS, ["policy-author"])
    budget, inside = [1], [False]

    def newer_observation_first(params: dict[str, Any], **_: Any) -> None:
        key = params.get("Key", {}).get("id")
        if inside[0] or budget[0] <= 0 or params.get("TableName") != "rf-inventory" or key not in (dev, {"S": dev}):
            return
        if "workload = :w" not in str(params.get("UpdateExpression")):
            return
        budget[0] -= 1
        inside[0] = True
        try:  # ingest, meanwhile, records a newer observation (no grants: it read before the binding)
            rec = env.store.get(dev)
            env.store.observe(rec.model_copy(update={"observed_at": rec.observed_at + 1}))
        finally:
            inside[0] = False

    env.load_functions()  # cold starts: the handlers' clients, made after the hook, carry it
    env.hook("before-parameter-build.dynamodb.UpdateItem", newer_observation_first)
    status, body = bind(env, dev, {"labels": {"role": "jumpbox"}, "reason": "CHG-8"})
    assert status == 200 and body["label_grants"] == {"role": "jumpbox"}, body
    assert env.store.get(dev).workload.label_grants == {"role": "jumpbox"}, "stored, not just answered"
    assert budget[0] == 0, "the race happened"

    budget[0] = 100  # a newer observation before every attempt
    audited = len(bindings(env))
    status, body = bind(env, dev, {"labels": {"app": "admin"}, "reason": "CHG-9"})
    assert status == 409, body
    # the binding was audited before its first write (a grant is never in force without its
    # record); the record of one that never landed is followed by one that says so
    assert len(bindings(env)) == audited + 1
    (failed,) = [a for a in env.store.audit_log() if a.action == "label.bind.failed"]
    assert failed.detail["audit_id"] == bindings(env)[-1].id and "ConflictError" in failed.detail["why"]
    rec = env.store.get(dev)
    assert rec.workload.label_grants == {"role": "jumpbox"} and rec.workload.held_labels is not None


@pytest.mark.parametrize("writer", ["ingest", "reconcile"])
@pytest.mark.slow
def test_a_binding_landing_while_ingest_or_reconcile_decides_is_kept(env: Env, writer: str) -> None:
    """The opposite order: ingest (an instance event) or a reconcile pass reads the held record,
    an administrator's binding lands, then the function writes its newer observation, decided
    without the grant. That write is refused (the record's governance moved), read again and
    decided again: the grant stays, the hold it cleared stays lifted, and compute gives the
    bound jumpbox its SSH access. Before, the observation overwrote the grant and the hold came
    back, with the binding audited and answered as done."""
    est = held_estate(env)
    dev = est["dev"]
    env.bind(AUTHORS, ["policy-author"])
    # the function has read the record and decided: now the administrator binds
    answers = _between_read_and_write(
        env, dev, writer, lambda: bind(env, dev, {"labels": GRANT, "reason": "CHG-10 bastion"})
    )
    assert [status for status, _ in answers] == [200], answers
    rec = env.store.get(dev)
    assert rec.workload.label_grants == GRANT, "the grant survived the observation"
    assert rec.workload.held_labels is None
    assert rec.labels == {"role": "jumpbox", "app": "admin", "env": "shared", "loc": "ca"}
    env.pump()
    assert all(ssh_peers(env, est).values()), "the bound jumpbox is every production host's SSH peer"


def test_attack_a_label_bind_whose_audit_write_fails_changes_nothing(env: Env) -> None:
    """The audit table refuses the binding's record (throttled): the grant was stored, and a
    jumpbox in force, before the write was tried. Now the record comes first: no record, no
    grant, the hold stands and the function fails (its error alarm)."""
    from botocore.exceptions import ClientError

    est = held_estate(env)
    dev = est["dev"]
    env.bind(AUTHORS, ["policy-author"])
    before, log = env.store.get(dev), env.store.audit_log()
    refused = env.refuse_audit_writes()
    with pytest.raises(ClientError, match="throttled"):
        bind(env, dev, {"labels": GRANT, "reason": "CHG-10 bastion"})
    assert refused
    assert env.store.get(dev) == before, "no grant in force without its record"
    assert env.store.get(dev).workload.held_labels is not None
    assert env.store.audit_log() == log and env.count("compute") == 0


# --- revoking a grant: DELETE /admin/workloads/{id}/labels ------------------------------------------


@pytest.mark.slow
def test_policy_author_revokes_a_grant_the_value_is_held_again_audited_and_recomputed(env: Env) -> None:
    est = bound_jumpbox(env)
    dev = est["dev"]
    assert env.count("compute") == 0

    # one dimension: app=admin stays granted, role=jumpbox (still in the tags) is held, role unset
    status, body = unbind(env, dev, {"dimensions": ["role"], "reason": "CHG-11 bastion retired"})
    assert status == 200, body
    assert body["revoked"] == {"role": "jumpbox"} and body["label_grants"] == {"app": "admin"}
    assert body["held"] is True and body["labels"] == {"app": "admin", "env": "shared", "loc": "ca"}
    rec = env.store.get(dev)
    assert rec.workload.label_grants == {"app": "admin"} and rec.labels == body["labels"]
    assert rec.workload.tags["ringfence:role"] == "jumpbox", "the tags are the cloud's: untouched"
    [revoked] = revocations(env)
    assert (revoked.principal, revoked.target, revoked.reason, revoked.id) == (
        PAT,
        dev,
        "CHG-11 bastion retired",
        body["audit_id"],
    )
    assert revoked.detail["revoked"] == {"role": "jumpbox"} and revoked.detail["labels"] == {"app": "admin"}
    assert env.count("compute") >= 1, "the revocation is queued for compute"
    env.pump()
    assert not any(ssh_peers(env, est).values()), "no production host lets the box in over SSH any more"
    assert not ssh_out(env, est), "its own bundle no longer opens SSH to them"

    # the rest: nothing granted, nothing privileged in force
    status, body = unbind(env, dev, {"dimensions": ["app"], "reason": "CHG-11 bastion retired"})
    assert status == 200 and body["label_grants"] == {} and body["labels"] == {"env": "shared", "loc": "ca"}, body
    env.pump()
    rec = env.store.get(dev)
    assert rec.workload.label_grants == {} and rec.workload.held_labels == {"env": "shared", "loc": "ca"}
    assert not any(ssh_peers(env, est).values()) and not ssh_out(env, est)

    # a later observation (a reconcile pass, an unrelated instance event) keeps the value held: the
    # revocation is the dimension's last write, and no earlier approval comes back
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    env.put(env.state_event(dev, "running"))
    env.pump()
    rec = env.store.get(dev)
    assert rec.workload.held_labels is not None and "role" not in rec.labels and rec.workload.label_grants == {}
    assert not any(ssh_peers(env, est).values())

    # and binding again is how an administrator puts it back
    status, body = bind(env, dev, {"labels": GRANT, "reason": "CHG-12 bastion back"})
    assert status == 200 and body["held"] is False, body
    env.pump()
    assert all(ssh_peers(env, est).values()) and ssh_out(env, est)


def test_a_revocation_of_a_grant_the_tags_no_longer_ask_for_changes_nothing_in_force(env: Env) -> None:
    """Granted ahead of any tag change (``role=jumpbox`` while the tags say ``web``): the labels in
    force are the tags'; taking the grant back leaves them so, and the move it would have allowed
    is then held like any other non-tagger's."""
    est = governed_estate(env)
    dev = est["dev"]
    env.bind(AUTHORS, ["policy-author"])
    status, body = bind(env, dev, {"labels": {"role": "jumpbox"}, "reason": "CHG-13 ahead of the retag"})
    assert status == 200 and body["labels"] == PREVIOUS and body["held"] is False, body
    status, body = unbind(env, dev, {"dimensions": ["role"], "reason": "CHG-13 cancelled"})
    assert status == 200 and body["labels"] == PREVIOUS and body["held"] is False and body["label_grants"] == {}, body
    retag(env, dev, ESCALATION, DEVELOPER)
    rec = env.store.get(dev)
    assert rec.workload.held_labels is not None and rec.labels == PREVIOUS
    assert not any(ssh_peers(env, est).values())


@pytest.mark.slow
def test_bad_revocations_are_refused_and_change_nothing(env: Env) -> None:
    est = bound_jumpbox(env)
    dev = est["dev"]
    before, audited = env.store.get(dev), len(env.store.audit_log())
    reason = "CHG-11"
    cases: list[tuple[str, Any, int, str]] = [
        (dev, {"dimensions": ["rank"], "reason": reason}, 400, "unknown label dimension 'rank'"),
        (dev, {"dimensions": ["role"], "reason": "  "}, 400, "needs a reason"),
        (dev, {"dimensions": ["role"]}, 422, "body.reason"),
        (dev, {"dimensions": [], "reason": reason}, 422, "body.dimensions"),
        # a dimension with no grant refuses the whole revocation (all or none), naming what is granted
        (dev, {"dimensions": ["role", "env"], "reason": reason}, 409, "no grant of env"),
        ("i-0123456789abcdef0", {"dimensions": ["role"], "reason": reason}, 404, "i-0123456789abcdef0"),
    ]
    for wid, body, want, says in cases:
        status, answer = unbind(env, wid, body)
        assert (status, says in answer["detail"]) == (want, True), (body, answer)
    _, answer = unbind(env, dev, {"dimensions": ["env"], "reason": reason})
    assert "the workload's grants: app=admin, role=jumpbox" in answer["detail"]
    assert env.store.get(dev) == before and len(env.store.audit_log()) == audited
    # a 409 for no grant still queues compute (a retry of a revocation whose compute message
    # failed: tests below); it computes the record as stored, the grant in force
    env.pump()
    assert all(ssh_peers(env, est).values()) and ssh_out(env, est)
    # revoked once, the second revocation is a 409, not a second record
    assert unbind(env, dev, {"dimensions": ["role", "app"], "reason": reason})[0] == 200
    status, answer = unbind(env, dev, {"dimensions": ["role"], "reason": reason})
    assert status == 409 and "no grant of role" in answer["detail"] and len(revocations(env)) == 1, answer


def test_attack_only_policy_authors_may_revoke_a_grant(env: Env) -> None:
    """Taking a grant back changes who reaches what as much as granting it: an incident
    responder, an onboarding operator, a reader and a principal bound to no role are each refused
    with the audited 403 (a body that does not validate too: the role is checked first), and the
    grant, the labels in force and the peers' sets stay as they were."""
    est = bound_jumpbox(env)
    dev = est["dev"]
    before = env.store.get(dev)
    env.bind(RESPONDERS, ["incident-responder"])
    env.bind(READER, ["reader"])
    env.bind(ONBOARDER, ["onboarding"])
    nobody = "arn:aws:iam::123456789012:user/mallory"
    callers = (JANE, ONBOARDER, READER, nobody)
    for who in callers:
        for body in ({"dimensions": ["role", "app"], "reason": "revoke it"}, {"dimensions": []}):
            status, answer = unbind(env, dev, body, principal=who)
            assert status == 403 and "label.unbind" in answer["detail"], (who, answer)
    assert env.store.get(dev) == before and not revocations(env) and env.count("compute") == 0
    denied = [(a.principal, a.target, a.detail["action"]) for a in env.store.audit_log() if a.action == "admin.denied"]
    assert denied == [(who, dev, "label.unbind") for who in callers for _ in range(2)]
    env.pump()
    assert all(ssh_peers(env, est).values()) and ssh_out(env, est), "the grant stands"


def test_serve_revokes_for_a_policy_author_token_only(env: Env, served_roles: tuple[str, dict[str, str]]) -> None:
    url, tok = served_roles
    est = bound_jumpbox(env)
    dev = est["dev"]
    before = env.store.get(dev)

    def delete(who: str, body: Any) -> httpx.Response:
        return httpx.request(
            "DELETE", f"{url}/admin/workloads/{dev}/labels", json=body, headers={"Authorization": f"Bearer {tok[who]}"}
        )

    for who in ("rita", "ivan"):
        r = delete(who, {"dimensions": ["role"], "reason": "revoke it"})
        assert r.status_code == 403 and "label.unbind" in r.json()["detail"], r.text
    assert env.store.get(dev) == before and not revocations(env)

    r = delete("ann", {"dimensions": ["role", "app"], "reason": "CHG-14"})
    assert r.status_code == 200 and r.json()["revoked"] == GRANT and r.json()["held"] is True, r.text
    [revoked] = revocations(env)
    assert (revoked.principal, revoked.reason, revoked.id) == ("ann", "CHG-14", r.json()["audit_id"])
    env.pump()
    assert not any(ssh_peers(env, est).values()) and not ssh_out(env, est)


@pytest.mark.parametrize("writer", ["ingest", "reconcile"])
@pytest.mark.slow
def test_a_revocation_landing_while_ingest_or_reconcile_decides_is_kept(env: Env, writer: str) -> None:
    """Ingest (an instance event) or a reconcile pass reads the bound record, a policy author's
    revocation lands, then the function writes its newer observation, decided with the grant.
    That write is refused (the record's governance moved), read again and decided again: the
    grant does not come back, and compute takes the jumpbox's SSH access away."""
    est = bound_jumpbox(env)
    dev = est["dev"]
    # the function has read the record and decided: now the policy author revokes
    revoke = {"dimensions": ["role", "app"], "reason": "CHG-15 retired"}
    answers = _between_read_and_write(env, dev, writer, lambda: unbind(env, dev, revoke))
    assert [status for status, _ in answers] == [200], answers
    rec = env.store.get(dev)
    assert rec.workload.label_grants == {}, "the observation did not put the grant back"
    assert rec.workload.held_labels is not None and "role" not in rec.labels
    env.pump()
    assert not any(ssh_peers(env, est).values()) and not ssh_out(env, est)


def test_a_revocation_whose_audit_write_fails_takes_nothing_back(env: Env) -> None:
    """As a binding: the record comes first. The audit table refuses it (throttled): the call
    fails (the function's error alarm, the caller retries), nothing is written, the grant stands
    as it was and nothing is queued for compute."""
    from botocore.exceptions import ClientError

    est = bound_jumpbox(env)
    dev = est["dev"]
    before, log = env.store.get(dev), env.store.audit_log()
    refused = env.refuse_audit_writes()
    with pytest.raises(ClientError, match="throttled"):
        unbind(env, dev, {"dimensions": ["role", "app"], "reason": "CHG-16"})
    assert refused
    assert env.store.get(dev) == before and env.store.audit_log() == log and env.count("compute") == 0


def compute_queue_down(env: Env, times: int) -> list[int]:
    """The next ``times`` SendMessage calls to the compute queue fail (SQS 503), in a new admin
    container (its clients carry the hook); compute stays warm, as in AWS, holding the records it
    took last. The list returned holds the refusals left: set it to refuse more."""
    from botocore.exceptions import ClientError

    from ringfence.local.lambdas import load_functions, retire_functions
    from tests.aws.conftest import ROOT

    left = [times]

    def down(params: dict[str, Any], **_: Any) -> None:
        if left[0] > 0 and params.get("QueueUrl") in (env.queues["compute"], env.queues["compute_priority"]):
            left[0] -= 1
            raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "sqs 503"}}, "SendMessage")

    env.hook("before-parameter-build.sqs.SendMessage", down)
    retire_functions([env.fn["admin"]])
    env.fn["admin"] = load_functions(["admin"], ROOT / "functions", keep_clients=True)["admin"]
    return left


@pytest.mark.slow
def test_attack_a_revocation_whose_compute_message_failed_is_enforced_on_retry(env: Env) -> None:
    """The bastion is compromised; a policy author revokes its grants. The revocation is stored
    and audited, then the compute message fails (SQS 503): a warm compute keeps the record with
    the grant, and every production host still admits the box over SSH, through reconcile passes
    too (nothing changed in the cloud). The answer says so (503: revoked, compute not queued),
    not a bare 500, and the operator's retry — refused as there is no grant left (409), nothing
    recorded twice — queues compute all the same: the box loses its SSH admission. A retry whose
    own compute message fails says so too (503), and the next one enforces."""
    est = bound_jumpbox(env)
    dev = est["dev"]
    down = compute_queue_down(env, 1)
    body = {"dimensions": ["role", "app"], "reason": "CHG-20 bastion compromised"}

    status, answer = unbind(env, dev, body)
    [revoked] = revocations(env)
    assert status == 503 and answer["error"] == "revoked; compute not queued: send the request again", answer
    assert revoked.id in answer["detail"] and "(ClientError: ServiceUnavailable)" in answer["detail"], answer
    assert "sqs 503" not in answer["detail"], "the error's text (it can name ARNs) is logged, not answered"
    assert env.store.get(dev).workload.label_grants == {} and env.count("compute") == 0 and down == [0]
    env.fn["reconcile"].handler(_scheduled(), _ctx())
    env.pump()
    assert all(ssh_peers(env, est).values()) and ssh_out(env, est), "stored, not enforced: the hole a retry closes"

    down[0] = 1
    status, answer = unbind(env, dev, body)  # the retry, its compute message refused as well
    assert status == 503 and answer["error"] == "compute not queued: send the request again", answer
    assert "no such grant" in answer["detail"] and down == [0], answer

    status, answer = unbind(env, dev, body)  # and again, the queue back
    assert status == 409 and "no grant of role, app" in answer["detail"], answer
    assert "compute is queued" in answer["detail"] and len(revocations(env)) == 1, answer
    assert env.count("compute") >= 1
    env.pump()
    assert not any(ssh_peers(env, est).values()), "no production host admits the revoked box over SSH"
    assert not ssh_out(env, est)


def test_a_binding_whose_compute_message_failed_is_answered_and_queued_again(env: Env) -> None:
    """The same hole on the other side: a binding stored whose compute message fails is answered
    503 (bound, compute not queued, its record named), not a bare 500; binding again stores the
    same grants (a second record) and queues compute, and the box gets what it was granted."""
    est = held_estate(env)
    dev = est["dev"]
    env.bind(AUTHORS, ["policy-author"])
    compute_queue_down(env, 1)
    body = {"labels": GRANT, "reason": "CHG-21 bastion"}
    status, answer = bind(env, dev, body)
    [bound] = bindings(env)
    assert status == 503 and answer["error"] == "bound; compute not queued: send the request again", answer
    assert bound.id in answer["detail"] and env.store.get(dev).workload.label_grants == GRANT
    env.pump()
    assert not any(ssh_peers(env, est).values()), "stored, not enforced yet"
    status, answer = bind(env, dev, body)
    assert status == 200 and answer["label_grants"] == GRANT and answer["held"] is False, answer
    assert len(bindings(env)) == 2 and env.count("compute") >= 1
    env.pump()
    assert all(ssh_peers(env, est).values()) and ssh_out(env, est)


def _between_read_and_write(
    env: Env, dev: str, writer: str, act: Callable[[], tuple[int, Any]]
) -> list[tuple[int, Any]]:
    """Run ``writer`` (ingest of an instance event, or a reconcile pass) on ``dev`` and call ``act``
    once, between its read of the record and its write of the observation; ``act``'s answers."""
    answers: list[tuple[int, Any]] = []
    inside = [False]

    def act_first(params: dict[str, Any], **_: Any) -> None:
        key = params.get("Key", {}).get("id")
        if inside[0] or answers or params.get("TableName") != "rf-inventory" or key not in (dev, {"S": dev}):
            return
        if "workload = :w" not in str(params.get("UpdateExpression")):
            return
        inside[0] = True
        try:
            answers.append(act())
        finally:
            inside[0] = False

    env.load_functions()  # cold starts: the handlers' clients, made after the hook, carry it
    env.hook("before-parameter-build.dynamodb.UpdateItem", act_first)
    if writer == "ingest":
        env.put(env.state_event(dev, "running"))
        env.drain("ingest", "ingest")
    else:
        env.fn["reconcile"].handler(_scheduled(), _ctx())
    return answers
