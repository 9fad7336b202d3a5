"""The agent's version in heartbeats on AWS (docs/visibility.md): the agent API function (against
moto) records it with the enforcement report in DynamoDB, and GET /admin/findings shows it per
workload; a heartbeat without it is taken, a version that is not one refused 422 naming the field,
and a report stored before the field (no ``agent_version`` in its document) still loads."""

from __future__ import annotations

import json

from tests.aws.conftest import Env
from tests.aws.test_agent_api import auth
from tests.aws.test_pipeline import boot, enroll_instance


def test_heartbeats_carry_the_agents_version_to_the_findings(env: Env) -> None:
    est = boot(env)
    proc = est["ids"]["proc"][0]
    tok = enroll_instance(env, proc)
    reader = "arn:aws:iam::123456789012:role/Readers"
    env.bind(reader, ["reader"])
    url = f"/v1/agents/{proc}/heartbeat"

    def seen() -> dict[str, object]:
        status, _, found = env.rest("admin", "GET", "/admin/findings", principal=reader, query={"agents": "true"})
        assert status == 200, found
        return {a["workload_id"]: a["agent_version"] for a in found["agents"]}

    # a report stored by a control plane before the field: its document has no agent_version
    env.store._put("enforcement", proc, doc=json.dumps({"workload_id": proc, "time": 1.0, "version": None}))
    rep = env.store.enforcement(proc)
    assert rep is not None and rep.agent_version is None
    assert seen()[proc] is None

    hb = {"applied_version": None, "mode": None}  # an agent older than the field
    status, _, body = env.rest("agentapi", "POST", url, hb, headers=auth(tok))
    assert status == 200, body
    assert seen()[proc] is None

    status, _, body = env.rest(
        "agentapi", "POST", url, {**hb, "agent_version": "0.1.0+3f2a9c1b0d4e"}, headers=auth(tok)
    )
    assert status == 200, body
    rep = env.store.enforcement(proc)
    assert rep is not None and rep.agent_version == "0.1.0+3f2a9c1b0d4e"
    assert seen()[proc] == "0.1.0+3f2a9c1b0d4e"
    # one entry per workload: listed only when asked for (a fleet's answer must fit Lambda's 6 MB)
    status, _, found = env.rest("admin", "GET", "/admin/findings", principal=reader)
    assert status == 200 and found["agents"] == [], found

    for bad in ("not-a-version", "1.0 beta", "9" * 65):
        status, _, body = env.rest("agentapi", "POST", url, {**hb, "agent_version": bad}, headers=auth(tok))
        assert status == 422, (bad, body)
        detail = (body if isinstance(body, dict) else json.loads(body))["detail"]
        assert detail.startswith("body.agent_version:"), detail
    assert seen()[proc] == "0.1.0+3f2a9c1b0d4e", "a refused heartbeat records nothing"
