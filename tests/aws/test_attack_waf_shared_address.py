"""Hosts behind one NAT share an address: one unprivileged process on any of them flooding
``GET /v1/nonce`` past the agent API web ACL's per-address limit keeps that address blocked on the
routes without a bearer token. The agents behind it must keep renewing their still-valid tokens:
the web ACL leaves a renewal by token out of its rate rule and answers what it blocks 429 with
Retry-After, the control plane takes a token request carrying a bearer as that renewal or
nothing, and the agent goes on with the token it holds when a gateway blocks its renewal.

WAF cannot run here: the web ACL both deployments ship is judged statement by statement
(tests/aws/webacl.py), and stands in front of the real routes (``ringfence serve`` over the
moto-backed AWS wiring) that the real agent's API client calls."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from ringfence.agentwire import token_proof_message
from ringfence.control.api import secret_hash
from tests.aws.conftest import Env
from tests.aws.test_agent_api import auth, register_onprem
from tests.aws.test_attack_enroll import audits, nonce
from tests.aws.test_attack_token_renewal import enrolled
from tests.aws.test_pipeline import agent_key
from tests.aws.webacl import Request, WebAcl, WebAclStandIn, cfn_web_acl, tf_web_acl
from tests.tokenage import age

WID = "dc1-db-1"
LIMIT = 10  # the parameter's least value (MinValue), so the flood stays small
NAT = "198.51.100.7"  # an address as a key of the judged rules only: nothing is sent to it
BEARER = (("Authorization", "Bearer some-token"),)


@pytest.fixture
def agents_behind(
    env: Env, aws_wiring: Callable[[], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[dict[str, Any]], Any]]:
    """An on-premise workload with a pairing key (used up by its agent's enrollment), and
    ``ringfence serve`` behind the web ACL given (judged per client address: every request here
    comes from 127.0.0.1, the shared address); yields a function that starts it and returns
    (url, the stand-in, the real agent's API client)."""
    from ringfence_agent import enroll
    from ringfence_agent.sources import ApiSource
    from ringfence_agent.state import StateDir

    monkeypatch.setenv("RINGFENCE_ENROLL_METHODS", "aws-iid,aws-sts,pairing")
    env.load_functions()
    register_onprem(env, WID, "192.168.10.5")
    status, _, key = env.rest("admin", "POST", "/admin/pairing-keys", {"workload_id": WID, "uses": 1, "ttl": 600})
    assert status == 201, key
    admin = tmp_path / "admin-tokens"
    admin.write_text(serve.new_admin_token("a", ["reader"])[1] + "\n")
    with contextlib.ExitStack() as stack:

        def start(acl: dict[str, Any]) -> Any:
            app = serve.ServeApp.over(aws_wiring(), serve.AdminTokens.load(admin))
            app.asgi = waf = WebAclStandIn(app.asgi, WebAcl(acl, LIMIT))
            url = stack.enter_context(serve.serving(app)).url
            src = ApiSource(url, WID, enroll.pairing(WID, key["pairing_key"]), StateDir(tmp_path / "st"), 10, 10)
            return url, waf, src

        yield start


def flood(url: str) -> httpx.Response:
    """The unprivileged process: GET /v1/nonce until the address is blocked (bounded)."""
    for _ in range(LIMIT + 5):
        r = httpx.get(f"{url}/v1/nonce", timeout=10)
        if r.status_code != 200:
            return r
    raise AssertionError("the web ACL never blocked the flood")


def test_attack_a_nonce_flood_behind_a_shared_address_does_not_stop_valid_tokens(
    env: Env, agents_behind: Callable[[dict[str, Any]], Any]
) -> None:
    """Judged as shipped (SAM and Terraform alike): past the limit, the flooding address is
    answered 429 with Retry-After on the nonce, enroll and nonce-path token routes, a bearer on
    the nonce or enroll route or on a token request that is not a POST spares nothing, and a
    renewal by token (POST .../token with a bearer) is neither counted nor blocked. Then the real
    agent behind the flooded address, its token due for renewal three times over while the flood
    goes on, renews it each time by token and its calls go on; only a token that no longer works
    (revoked) needs the nonce the flood withholds, and that answer is throttling (Unreachable),
    the remaining risk (docs/threat-model.md). Before, the rule blocked the renewal by token too,
    with a 403 the agent took for an error: every call failed from the moment renewal was due,
    and the token lapsed."""
    from ringfence_agent.sources import Unreachable

    for shipped in (cfn_web_acl(), tf_web_acl()):
        acl = WebAcl(shipped, LIMIT)
        renewal = Request(NAT, "POST", "/v1/agents/i-0abc/token", BEARER)
        for _ in range(LIMIT):
            assert acl.answer(Request(NAT, "GET", "/v1/nonce")) is None
        assert acl.answer(renewal) is None, "not counted"
        assert acl.answer(Request(NAT, "GET", "/v1/nonce")) == (429, {"Retry-After": "300"})
        for blocked in (
            Request(NAT, "GET", "/v1/nonce", BEARER),
            Request(NAT, "POST", "/v1/enroll", BEARER),
            Request(NAT, "POST", "/v1/agents/i-0abc/token"),
            Request(NAT, "POST", "/v1/agents/i-0abc/token", (("Authorization", "Basic eDp5"),)),
            Request(NAT, "GET", "/v1/agents/i-0abc/token", BEARER),
            Request(NAT, "POST", "/v1/agents/a%2Fb/token", BEARER),
        ):
            assert acl.answer(blocked) == (429, {"Retry-After": "300"}), blocked
        for spared in (renewal, Request(NAT, "GET", "/v1/agents/i-0abc/bundle", BEARER)):
            assert acl.answer(spared) is None, spared
        assert acl.answer(Request("203.0.113.9", "GET", "/v1/nonce")) is None, "another address"

    url, waf, src = agents_behind(cfn_web_acl())
    src.bundle()  # enrolls (nonce, enroll: 2 of the address's requests), then its bundle
    first = src.token
    assert first is not None and env.store.token_workload(secret_hash(first)) == WID

    blocked = flood(url)
    assert blocked.status_code == 429 and blocked.headers["retry-after"] == "300"
    held = first
    for _ in range(3):
        age(env.store, WID, held)  # 4/5 of its lifetime went by: due, still valid
        src.renew_at = time.time() - 1
        src.bundle()
        assert src.token != held, "renewed behind the blocked address"
        assert env.store.token_workload(secret_hash(held)) is None
        assert env.store.token_workload(secret_hash(src.token or "")) == WID
        held = src.token or ""
        assert flood(url).status_code == 429, "the address is still blocked"
    assert [r.detail.get("proof") for r in audits(env, "token.refresh", WID)] == ["token"] * 3
    assert ("POST", f"/v1/agents/{WID}/token", 429) not in waf.answered

    # a token that no longer works renews over a nonce only: the flood withholds it (throttling)
    env.store.revoke_tokens(WID)
    with pytest.raises(Unreachable, match="nonce: HTTP 429"):
        src.bundle()


def test_attack_a_bearer_on_the_token_route_never_burns_a_nonce_nor_writes(env: Env) -> None:
    """The web ACL leaves a token request carrying a bearer out of its rate rule: such a request
    must not be a way around it. Through the real handler: with a nonce it is refused and the
    nonce stays unspent (whatever the header: another's token, the workload's own current one, a
    header of another scheme, an empty one, a lower-case name), and with a proof over a token
    that is not the workload's current one it is refused; none of them writes anything. Before,
    a nonce in the body took the nonce path whatever the header, burning the nonce and issuing a
    token."""
    writes: list[str] = []

    def record(model: Any, **_: Any) -> None:
        if not model.name.startswith(("Get", "Query", "BatchGet", "Scan", "Describe")):
            writes.append(model.name)

    env.hook("before-call.dynamodb", record)  # before the first call: the wiring keeps its clients
    web, token = enrolled(env)
    key = agent_key(web)
    writes.clear()
    n = nonce(env)
    assert writes == ["PutItem"], writes  # the hook sees the handler's writes: the nonce's
    body = {"nonce": n, "signature": key.prove("token", web, n)}
    for headers in (
        auth("not-a-token"),
        auth(token),
        {"authorization": f"Bearer {token}"},
        {"Authorization": "Basic eDp5"},
        {"Authorization": ""},
    ):
        writes.clear()
        status, _, out = env.rest("agentapi", "POST", f"/v1/agents/{web}/token", body, headers=headers)
        assert status == 401 and "no Authorization" in out["detail"], (headers, out)
        assert writes == [], (headers, writes)

    at = int(time.time())
    forged = base64.b64encode(key.private.sign(token_proof_message(web, "not-a-token", at))).decode()
    writes.clear()
    status, _, out = env.rest(
        "agentapi", "POST", f"/v1/agents/{web}/token", {"time": at, "signature": forged}, headers=auth("not-a-token")
    )
    assert status == 401 and "not the current token" in out["detail"], out
    assert writes == []

    # the nonce is still good, on the path that carries no bearer
    status, _, out = env.rest("agentapi", "POST", f"/v1/agents/{web}/token", json.dumps(body))
    assert status == 200 and out["token"] != token, out


@pytest.mark.parametrize("paths", ["/(nonce|enroll|token)/*$", "/token/*$"])
def test_attack_a_plain_403_on_the_renewal_routes_does_not_stop_calls_with_a_valid_token(
    env: Env, agents_behind: Callable[[dict[str, Any]], Any], paths: str
) -> None:
    """A web ACL of the operator's own (or the one shipped before) blocking the routes without a
    bearer token with WAF's plain 403, the nonce route too or the token route alone: the real
    agent, its renewal due and its token valid, goes on calling with that token instead of
    failing (or enrolling again, which its used-up pairing key would not allow). A 401 still
    means the token is gone: renewing then fails while the block lasts. Before, the 403 failed
    every call from the moment renewal was due."""
    from ringfence_agent.sources import SourceError

    operators = {
        "DefaultAction": {"Allow": {}},
        "Rules": [
            {
                "Name": "no-unauthenticated-routes",
                "Priority": 0,
                "Action": {"Block": {}},
                "Statement": {
                    "RegexMatchStatement": {
                        "RegexString": paths,
                        "FieldToMatch": {"UriPath": {}},
                        "TextTransformations": [{"Priority": 0, "Type": "NONE"}],
                    }
                },
            }
        ],
    }
    _, waf, src = agents_behind({"DefaultAction": {"Allow": {}}, "Rules": []})
    src.bundle()  # enrolled, through no rule yet
    held = src.token
    waf.acl = WebAcl(operators, LIMIT)
    src.renew_at = time.time() - 1
    src.bundle()  # no error: the call went on with the token held
    assert src.token == held and env.store.token_workload(secret_hash(held or "")) == WID
    assert ("POST", f"/v1/agents/{WID}/token", 403) in waf.answered

    env.store.revoke_tokens(WID)
    with pytest.raises(SourceError):
        src.bundle()
