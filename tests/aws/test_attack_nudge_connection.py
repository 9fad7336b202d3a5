"""Races on the WebSocket nudge connection (``conn#<workload>``), each run through the real
wsconnect, agent-API, ingest and publish handlers over moto server: a ``$connect`` that checked its
token just before a refresh or a termination revoked it, and a gone connection's cleanup landing
after its agent connected again (review ws F3, F4)."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.aws.conftest import Env
from tests.aws.test_attack_enroll import refresh
from tests.aws.test_function_iam import Recorder, refusals
from tests.aws.test_pipeline import _ctx, agent_key, boot, enroll_iid


def connect(env: Env, token: str, conn: str) -> int:
    event = {
        "requestContext": {"routeKey": "$connect", "connectionId": conn, "eventType": "CONNECT", "stage": "v1"},
        "queryStringParameters": None,
        "headers": {"Authorization": f"Bearer {token}"},
        "isBase64Encoded": False,
    }
    return int(env.fn["wsconnect"].handler(event, _ctx())["statusCode"])


def between_check_and_write(env: Env, monkeypatch: pytest.MonkeyPatch, step: Any) -> dict[str, bool]:
    """Run ``step`` once, inside wsconnect's next ``$connect``, after it checked the token and the
    workload (its read of the current connection, just before its write)."""
    store = env.fn["wsconnect"]._svc["api"].w.store
    real = type(store).connection
    fired: dict[str, bool] = {}

    def connection(self: Any, wid: str) -> Any:
        if self is store and not fired:
            fired["step"] = True
            step()
        return real(self, wid)

    monkeypatch.setattr(type(store), "connection", connection)
    return fired


def test_attack_a_connect_racing_a_token_refresh_leaves_no_connection_of_the_revoked_token(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder renews while a ``$connect`` with its old token is between its check and its
    write: the refresh drops the connection before that write, so the old token's connection used
    to stay the workload's (for its 2 h TTL), breaking "a new token drops the connection opened
    with the old one". The write now checks the token in the same transaction: refused."""
    web = boot(env)["ids"]["web"][0]
    old = enroll_iid(env, web)[1]["token"]
    assert connect(env, old, "conn-warm") == 200  # the container, warm
    new: dict[str, str] = {}

    def renew() -> None:
        status, body = refresh(env, web, agent_key(web))
        assert status == 200, body
        new["token"] = body["token"]

    fired = between_check_and_write(env, monkeypatch, renew)
    assert connect(env, old, "conn-old-token") == 401
    assert fired and new
    assert env.store.connection(web) is None
    assert connect(env, new["token"], "conn-new-token") == 200
    assert env.store.connection(web) == "conn-new-token"


def test_attack_a_connect_racing_a_termination_leaves_no_connection_of_the_terminated_workload(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance terminates (ingest revokes its token and drops its connection) while a
    ``$connect`` with its token is between its check and its write: refused, no connection left."""
    web = boot(env)["ids"]["web"][0]
    token = enroll_iid(env, web)[1]["token"]
    assert connect(env, token, "conn-warm") == 200

    def terminate() -> None:
        env.ec2.terminate_instances(InstanceIds=[web])
        env.put(env.state_event(web, "terminated"))
        env.pump()
        assert env.store.connection(web) is None  # ingest retired it

    fired = between_check_and_write(env, monkeypatch, terminate)
    assert connect(env, token, "conn-retired") == 401
    assert fired
    assert env.store.connection(web) is None


def test_attack_a_gone_connections_cleanup_keeps_the_agents_new_connection(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publish nudges the agent's old connection; while that post is in flight the agent connects
    again, then the post fails ``GoneException``: the cleanup used to delete ``conn#`` whatever it
    held, the new connection's item with it (no nudges until the agent reconnects). It now deletes
    only the gone connection; the conditional delete is granted to publish in both deployments."""
    monkeypatch.setenv("RINGFENCE_WEBSOCKET_ENDPOINT", env.url)  # moto's API Gateway management API
    env.load_functions()
    rec = Recorder(env)
    posted: list[str] = []
    token = ""

    def gone(params: dict[str, Any], **_: Any) -> None:
        posted.append(params["ConnectionId"])
        if params["ConnectionId"] == "conn-A":
            publishing = rec.current
            assert connect(env, token, "conn-B") == 200  # the agent reconnects meanwhile
            rec.current = publishing  # the recorder's: back in publish
            raise ClientError({"Error": {"Code": "GoneException", "Message": "gone"}}, "PostToConnection")

    # before any function makes its client: clients copy the session's handlers when made
    env.hook("before-parameter-build.apigatewaymanagementapi.PostToConnection", gone)
    web = boot(env)["ids"]["web"][0]
    token = enroll_iid(env, web)[1]["token"]
    assert connect(env, token, "conn-A") == 200
    status, _, body = env.rest("admin", "PUT", f"/admin/workloads/{web}/mode", {"mode": "observe"})
    assert status == 200, body
    env.pump()  # compute, then publish nudges web
    assert "conn-A" in posted
    assert env.store.connection(web) == "conn-B"
    drops = [
        c for a, _, c in rec.calls["publish"] if a == "DeleteItem" and c["dynamodb:LeadingKeys"] == [f"conn#{web}"]
    ]
    assert drops and not refusals(rec, ("publish", "wsconnect"))
