"""Renewing a token that is still valid without a server nonce (docs/agent-api.md, "Tokens"): the
bearer is the workload's current token and the agent key signs that token's SHA-256 and the time.
GET /v1/nonce is unauthenticated, so a flood of it can make it unavailable; a working agent must
renew all the same. Performed against the real agent-API handler over moto, and with the real
agent's API client (ringfence_agent.sources.ApiSource) against the same routes served by
``ringfence serve`` over the moto-backed AWS wiring."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from ringfence.agentwire import token_proof_message
from ringfence.control.agents import REFRESH_WINDOW
from ringfence.control.api import secret_hash
from tests.aws.conftest import Env
from tests.aws.test_agent_api import auth, register_onprem
from tests.aws.test_attack_enroll import audits, bundle_status, refresh
from tests.aws.test_pipeline import AgentKey, agent_key, boot, enroll_iid
from tests.tokenage import DUE, TOKEN_TTL, age

WID = "dc1-db-1"


def renew(env: Env, wid: str, key: AgentKey, token: str, at: int | None = None, bearer: str | None = None) -> Any:
    """The nonce-free renewal through the real handler: ``key``'s proof over ``token`` at ``at``,
    sent with ``bearer`` (default ``token``) as the bearer."""
    at = int(time.time()) if at is None else at
    sig = base64.b64encode(key.private.sign(token_proof_message(wid, token, at))).decode()
    body = json.dumps({"time": at, "signature": sig})
    return env.rest("agentapi", "POST", f"/v1/agents/{wid}/token", body, headers=auth(bearer or token))


def enrolled(env: Env) -> tuple[str, str]:
    est = boot(env)
    web = est["ids"]["web"][0]
    status, body = enroll_iid(env, web)
    assert status == 200, body
    return web, str(body["token"])


def test_a_valid_token_renews_without_a_nonce_and_the_previous_one_is_revoked(env: Env) -> None:
    web, token = enrolled(env)
    age(env.store, web, token)
    status, _, body = renew(env, web, agent_key(web), token)
    assert status == 200, body
    assert body["workload_id"] == web and body["token"] != token
    assert bundle_status(env, web, token) == 401, "the renewal revoked the token it renewed"
    assert bundle_status(env, web, body["token"]) == 200
    (rec,) = audits(env, "token.refresh", web)
    assert rec.detail.get("proof") == "token", rec.detail
    # the proof's claim is kept only past the window either side of the proof's time
    item = env.ddb.Table("rf-state").get_item(Key={"pk": f"once#refresh:{secret_hash(token)}", "sk": "once"})["Item"]
    assert 0 < int(item["ttl"]) - time.time() <= 2 * REFRESH_WINDOW + 60
    # a body with both proofs, or neither, is no request
    both = {"time": int(time.time()), "nonce": "n", "signature": "x"}
    assert env.rest("agentapi", "POST", f"/v1/agents/{web}/token", both, headers=auth(body["token"]))[0] == 422


def test_attack_a_replayed_renewal_proof_is_refused(env: Env) -> None:
    """A captured renewal (proof and bearer) replayed: refused, the renewed token stays the one.
    Also while the token it was made over is still the current one: a proof refused once it was
    claimed (its workload stopped then) is not good again once the workload runs."""
    web, token = enrolled(env)
    age(env.store, web, token)
    at = int(time.time())
    env.ec2.stop_instances(InstanceIds=[web])
    env.put(env.state_event(web, "stopped"))
    env.pump()
    status, _, body = renew(env, web, agent_key(web), token, at)
    assert status == 401 and "stopped" in body["detail"], body
    env.ec2.start_instances(InstanceIds=[web])
    env.put(env.state_event(web, "running"))
    env.pump()
    assert bundle_status(env, web, token) == 200, "the token is the current one again"
    status, _, body = renew(env, web, agent_key(web), token, at)
    assert status == 401 and "already" in body["detail"], body
    status, fresh = refresh(env, web, agent_key(web))  # the nonce path renews it
    assert status == 200, fresh
    age(env.store, web, fresh["token"])
    status, _, first = renew(env, web, agent_key(web), fresh["token"], at)
    assert status == 200, first
    status, _, body = renew(env, web, agent_key(web), fresh["token"], at)
    assert status == 401, body
    assert bundle_status(env, web, first["token"]) == 200
    assert len(audits(env, "token.refresh", web)) == 2


def test_attack_a_renewal_proof_over_another_token_is_refused(env: Env) -> None:
    """A proof signed over one token, presented with another as the bearer (the agent key's
    signature over an old token, or over another workload's): refused."""
    est = boot(env)
    web, db = est["ids"]["web"][0], est["ids"]["db"][0]
    old = enroll_iid(env, web)[1]["token"]
    status, current = refresh(env, web, agent_key(web))  # over a nonce: `old` is revoked
    assert status == 200, current
    status, _, body = renew(env, web, agent_key(web), old, bearer=current["token"])
    assert status == 401 and "does not verify" in body["detail"], body
    # another workload's current token as the bearer, for web's route
    other = enroll_iid(env, db)[1]["token"]
    assert renew(env, web, agent_key(web), other)[0] == 401
    assert renew(env, web, agent_key(db), other)[0] == 401
    # the honest renewal goes through
    age(env.store, web, current["token"])
    status, _, body = renew(env, web, agent_key(web), current["token"])
    assert status == 200, body


def test_attack_a_renewal_proof_outside_the_time_window_is_refused(env: Env) -> None:
    """A proof made long before (kept to be used later) or dated ahead: refused; one within the
    window goes through."""
    web, token = enrolled(env)
    now = int(time.time())
    for at in (now - REFRESH_WINDOW - 30, now + REFRESH_WINDOW + 30):
        status, _, body = renew(env, web, agent_key(web), token, at)
        assert status == 401 and "off this clock" in body["detail"], body
    age(env.store, web, token)
    status, _, body = renew(env, web, agent_key(web), token, now - REFRESH_WINDOW + 60)
    assert status == 200, body


def test_attack_a_revoked_or_expired_token_cannot_renew_without_a_nonce(env: Env) -> None:
    """A token replaced by a re-enrollment, one expired and one of a terminated workload: each
    renews over a nonce only (the nonce path is refused for the terminated one too)."""
    est = boot(env)
    web, app = est["ids"]["web"][0], est["ids"]["db"][0]
    old = enroll_iid(env, web)[1]["token"]
    current = enroll_iid(env, web)[1]["token"]  # re-enrolled: `old` is revoked
    status, _, body = renew(env, web, agent_key(web), old)
    assert status == 401 and "not the current token" in body["detail"], body
    # expired: its items' TTL passed (DynamoDB deletes them lazily)
    state = env.ddb.Table("rf-state")
    for pk in (f"token#{secret_hash(current)}", f"tokenof#{web}"):
        state.update_item(
            Key={"pk": pk, "sk": "token"},
            UpdateExpression="SET #t = :t",
            ExpressionAttributeNames={"#t": "ttl"},
            ExpressionAttributeValues={":t": int(time.time()) - 1},
        )
    assert renew(env, web, agent_key(web), current)[0] == 401
    status, fresh = refresh(env, web, agent_key(web))  # the nonce path renews it
    assert status == 200, fresh
    age(env.store, web, fresh["token"])
    assert renew(env, web, agent_key(web), fresh["token"])[0] == 200
    # a terminated workload's token
    token = enroll_iid(env, app)[1]["token"]
    env.ec2.terminate_instances(InstanceIds=[app])
    env.put(env.state_event(app, "terminated"))
    env.pump()
    assert renew(env, app, agent_key(app), token)[0] == 401
    assert refresh(env, app, agent_key(app))[0] == 401


# --- the real agent ------------------------------------------------------------------------------


@pytest.fixture
def nonce_flood(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Pairing on (an on-premise host's agent enrolls with its own key, as the real agent does);
    when the event is set, every nonce write is refused (throttled), as a flood of anonymous
    GET /v1/nonce leaves the route: the hook is registered before the serve wiring is built, so
    its clients carry it."""
    from botocore.exceptions import ClientError

    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,aws-sts,pairing")
    env.load_functions()
    flood = threading.Event()

    def refuse(params: dict[str, Any], **_: Any) -> None:
        if flood.is_set() and str(params.get("Item", {}).get("pk", "")).startswith("nonce#"):
            raise ClientError(
                {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "throttled"}}, "PutItem"
            )

    env.hook("before-parameter-build.dynamodb.PutItem", refuse)
    yield flood


def test_attack_a_nonce_flood_does_not_stop_a_valid_tokens_renewal(
    env: Env, nonce_flood: threading.Event, aws_wiring: Callable[[], Any], tmp_path: Path
) -> None:
    """GET /v1/nonce made unavailable: the real agent, its token still valid and due for
    renewal, renews it all the same (signing the token and the time). Only once its token no
    longer works does it need a nonce, and then the flood holds it off (the remaining risk,
    docs/threat-model.md)."""
    from ringfence_agent import enroll
    from ringfence_agent.sources import ApiSource, SourceError, Unreachable
    from ringfence_agent.state import StateDir

    register_onprem(env, WID, "192.168.10.5")
    status, _, key = env.rest("admin", "POST", "/admin/pairing-keys", {"workload_id": WID, "uses": 1, "ttl": 600})
    assert status == 201, key
    admin = tmp_path / "admin-tokens"
    admin.write_text(serve.new_admin_token("a", ["reader"])[1] + "\n")
    with serve.serving(serve.ServeApp.over(aws_wiring(), serve.AdminTokens.load(admin))) as running:
        src = ApiSource(running.url, WID, enroll.pairing(WID, key["pairing_key"]), StateDir(tmp_path / "st"), 10, 10)
        src.bundle()  # enrolls (a nonce), then asks for its bundle
        first = src.token
        assert first is not None and env.store.token_workload(secret_hash(first)) == WID

        nonce_flood.set()
        assert httpx.get(f"{running.url}/v1/nonce", timeout=10).status_code >= 500, "no nonce to be had"
        age(env.store, WID, first)
        src.renew_at = time.time() - 1  # 4/5 of its lifetime went by: due for renewal, still valid
        src.bundle()
        assert src.token != first, "renewed during the flood"
        assert env.store.token_workload(secret_hash(first)) is None
        assert env.store.token_workload(secret_hash(src.token or "")) == WID
        (rec,) = [r for r in audits(env, "token.refresh", WID)]
        assert rec.detail.get("proof") == "token"

        # its token revoked (401): it renews over a nonce, which the flood still withholds
        env.store.revoke_tokens(WID)
        with pytest.raises((SourceError, Unreachable), match="nonce"):
            src.bundle()
        nonce_flood.clear()
        src.bundle()  # the flood over: the nonce path renews it
        assert env.store.token_workload(secret_hash(src.token or "")) == WID
        assert len(audits(env, "token.refresh", WID)) == 2


def test_attack_a_throttled_token_route_neither_stops_calls_with_a_valid_token_nor_the_nonce_path(
    env: Env,
    nonce_flood: threading.Event,
    aws_wiring: Callable[[], Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """POST /v1/agents/{id}/token needs no credential to reach: a flood of it from many addresses
    (each under the WAF's per-address limit) makes the stage's per-method throttle answer 429 to
    the renewal too. Before, the agent took that 429 for unreachable: no fallback to the nonce
    path, and the call that found its token due (a bundle, a heartbeat) failed although the token
    held had a fifth of its life left. Now the nonce path follows a refused or throttled nonce-free
    renewal, and when both are throttled the call goes on with the token it holds."""
    from ringfence.control.agents import AgentApi
    from ringfence.control.api import error
    from ringfence_agent import enroll
    from ringfence_agent.sources import ApiSource
    from ringfence_agent.state import StateDir

    register_onprem(env, WID, "192.168.10.5")
    status, _, key = env.rest("admin", "POST", "/admin/pairing-keys", {"workload_id": WID, "uses": 1, "ttl": 600})
    assert status == 201, key
    admin = tmp_path / "admin-tokens"
    admin.write_text(serve.new_admin_token("a", ["reader"])[1] + "\n")
    tries = {"by_token": 0}

    def throttled(*_: Any) -> Any:  # what the stage's throttle answers, in the real route's place
        tries["by_token"] += 1
        return error(429, "Too Many Requests", "throttled")

    with serve.serving(serve.ServeApp.over(aws_wiring(), serve.AdminTokens.load(admin))) as running:
        src = ApiSource(running.url, WID, enroll.pairing(WID, key["pairing_key"]), StateDir(tmp_path / "st"), 10, 10)
        src.bundle()
        first = src.token
        monkeypatch.setattr(AgentApi, "_refresh_by_token", throttled)
        src.renew_at = time.time() - 1  # due, still valid
        src.bundle()  # the nonce-free renewal throttled: renewed over a nonce
        assert tries["by_token"] == 1 and src.token != first
        second = src.token
        assert env.store.token_workload(secret_hash(second or "")) == WID

        nonce_flood.set()  # both forms throttled now
        src.renew_at = time.time() - 1
        src.bundle()  # no Unreachable: the call went on with the token held
        assert src.token == second and env.store.token_workload(secret_hash(second or "")) == WID


def _written(env: Env) -> tuple[int, int]:
    """The state table's token items and renewal claims (what each renewal by token writes)."""
    items = env.ddb.Table("rf-state").scan(ProjectionExpression="pk")["Items"]
    tokens = sum(str(i["pk"]).startswith("token#") for i in items)
    return tokens, sum(str(i["pk"]).startswith("once#refresh:") for i in items)


def test_attack_a_workload_cannot_loop_token_renewals(
    env: Env, nonce_flood: threading.Event, aws_wiring: Callable[[], Any], tmp_path: Path
) -> None:
    """A host holding its agent key and a token renews by token back to back. That renewal is
    left out of the per-address limits (the web ACL's rule, serve's), and each one issues a fresh
    token, so the once-per-token claim never stopped the next: 50 renewals in 5 s from one
    address, each writing a token, a claim and a ``token.refresh`` audit record (a link of the
    one audit chain, a SIEM event). Now a token less than half its lifetime old is refused 429
    with Retry-After (the seconds until it may renew) before any write; the real agent renews
    at four fifths of the lifetime and is never refused. The real agent's client against the
    real routes (``ringfence serve`` over the moto-backed AWS wiring)."""
    from ringfence_agent import enroll
    from ringfence_agent.sources import ApiSource
    from ringfence_agent.state import StateDir

    register_onprem(env, WID, "192.168.10.5")
    status, _, key = env.rest("admin", "POST", "/admin/pairing-keys", {"workload_id": WID, "uses": 1, "ttl": 600})
    assert status == 201, key
    admin = tmp_path / "admin-tokens"
    admin.write_text(serve.new_admin_token("a", ["reader"])[1] + "\n")
    with serve.serving(serve.ServeApp.over(aws_wiring(), serve.AdminTokens.load(admin))) as running:
        src = ApiSource(running.url, WID, enroll.pairing(WID, key["pairing_key"]), StateDir(tmp_path / "st"), 10, 10)
        src.bundle()  # enrolls
        enrolled_token = src.token or ""

        def by_token(token: str) -> httpx.Response:  # what the agent's own renewal sends
            at = int(time.time())
            sig = src.key.prove_token(WID, token, at)
            return httpx.post(
                f"{running.url}/v1/agents/{WID}/token",
                json={"time": at, "signature": sig},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )

        # right after enrolling: too early, nothing written, the token held still works
        before, audited = _written(env), len(env.store.audit_log())
        refused = by_token(enrolled_token)
        assert refused.status_code == 429, refused.text
        assert TOKEN_TTL // 2 - 60 <= int(refused.headers["Retry-After"]) <= TOKEN_TTL // 2, refused.headers
        assert not src._refresh_by_token(enrolled_token), "the agent's own renewal call is refused too"
        assert _written(env) == before and len(env.store.audit_log()) == audited
        assert not env.store.claimed(f"refresh:{secret_hash(enrolled_token)}")
        assert src.token == enrolled_token and env.store.token_workload(secret_hash(enrolled_token)) == WID

        # the honest renewal, due at four fifths of the lifetime: by token, as before
        age(env.store, WID, enrolled_token, DUE)
        src.renew_at = time.time() - 1
        src.bundle()
        renewed = src.token or ""
        assert renewed != enrolled_token and env.store.token_workload(secret_hash(renewed)) == WID
        assert [r.detail.get("proof") for r in audits(env, "token.refresh", WID)] == ["token"]

        # then back to back with the fresh token: every one refused, before any write
        before, audited = _written(env), len(env.store.audit_log())
        answers = [by_token(renewed) for _ in range(20)]
        assert {a.status_code for a in answers} == {429}, {a.status_code for a in answers}
        assert all(int(a.headers["Retry-After"]) > TOKEN_TTL // 2 - 60 for a in answers)
        assert not any(src._refresh_by_token(renewed) for _ in range(5))
        assert _written(env) == before, "no token item and no claim written"
        assert len(env.store.audit_log()) == audited, "no audit record"
        assert len(audits(env, "token.refresh", WID)) == 1
        assert env.store.token_workload(secret_hash(renewed)) == WID, "the token held goes on working"
        src.bundle()
        assert src.token == renewed
