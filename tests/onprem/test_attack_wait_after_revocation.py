"""A long-poll (GET /v1/agents/{id}/wait) opened with a token that is revoked while it waits:
the next wake-up answers 401, never the workload's next signed bundle or deltas — neither after
an agent-key reset nor, after deregistration, the bundle of the new host given the same id. An
honest agent's wait across an ordinary change still answers with the new bundle. The real
``ringfence serve`` over HTTP (tests/onprem/conftest.py's ``served``)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from ringfence_agent.enroll import pairing
from ringfence_agent.sources import ApiSource
from ringfence_agent.state import StateDir
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import Served, served, wiring

__all__ = ["served", "wiring"]  # the fixtures, used by name

WID = "dc1-db-1"
DB_TAGS = {"ringfence:role": "database", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}


def pair(s: Served) -> str:
    """A fresh agent key enrolled for WID with a pairing key: its token."""
    r = s.call("otto", "POST", "/admin/pairing-keys", {"workload_id": WID, "uses": 1, "ttl": 600})
    assert r.status_code == 201, r.text
    key = AgentKey()
    n = httpx.get(s.url + "/v1/nonce").json()["nonce"]
    body = {"method": "pairing", "nonce": n, "workload_id": WID, "pairing_key": r.json()["pairing_key"]}
    r = httpx.post(s.url + "/v1/enroll", json={**body, **key.enroll_fields(WID, n)})
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def latest(s: Served, token: str) -> int:
    r = httpx.get(s.url + f"/v1/agents/{WID}/wait", params={"version": -1, "timeout": 0}, headers=bearer(token))
    assert r.status_code == 200, r.text
    return int(r.json()["latest_version"])


def open_wait(s: Served, token: str, version: int, out: dict[str, Any]) -> threading.Thread:
    """The agent's long-poll, asking for the bundle and deltas to come with the answer; open
    (authorized) when this returns."""

    def run() -> None:
        r = httpx.get(
            s.url + f"/v1/agents/{WID}/wait",
            params={"version": version, "timeout": 25, "bundle": "true", "deltas": "true"},
            headers=bearer(token),
            timeout=60,
        )
        out["status"], out["text"], out["at"] = r.status_code, r.text, time.monotonic()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.0)
    assert "status" not in out, out  # current: it waits
    return t


def relabel(s: Served, ip: str, **tags: str) -> float:
    """The workload registered again with other labels (a new bundle is signed); when."""
    r = s.call("otto", "POST", "/admin/workloads", {"id": WID, "ips": [ip], "tags": {**DB_TAGS, **tags}})
    assert r.status_code in (200, 201), r.text
    at = time.monotonic()
    assert s.wiring.settle(60)
    return at


def refused(out: dict[str, Any]) -> None:
    assert out["status"] == 401, f"the revoked token's open wait answered {out['status']}: {out['text'][:300]}"
    assert '"bundle"' not in out["text"] and '"deltas"' not in out["text"], out["text"][:300]


def test_attack_an_open_wait_is_refused_after_an_agent_key_reset(served: Served) -> None:
    s = served
    assert s.wiring.settle(60)
    thief = pair(s)  # the token a thief copied with the agent key
    out: dict[str, Any] = {}
    t = open_wait(s, thief, latest(s, thief), out)
    r = s.call("otto", "DELETE", f"/admin/workloads/{WID}/agent-key", {"reason": "key stolen"})
    assert r.status_code == 200 and r.json()["token_revoked"], r.text
    assert httpx.get(s.url + f"/v1/agents/{WID}/bundle", headers=bearer(thief)).status_code == 401
    changed = relabel(s, "192.168.10.31", **{"ringfence:env": "staging"})  # a new bundle after the reset
    t.join(40)
    assert not t.is_alive()
    refused(out)
    assert out["at"] - changed < 15, "refused on the wake-up the change caused, not at the timeout"


def test_attack_an_open_wait_of_a_deregistered_host_never_gets_the_new_hosts_bundle(served: Served) -> None:
    s = served
    assert s.wiring.settle(60)
    old_host = pair(s)
    out: dict[str, Any] = {}
    t = open_wait(s, old_host, latest(s, old_host), out)
    r = s.call("otto", "DELETE", f"/admin/workloads/{WID}", {"reason": "decommissioned"})
    assert r.status_code == 200, r.text
    assert s.wiring.settle(60)
    # the id registered again for another host (new address, another role)
    relabel(s, "192.168.10.99", **{"ringfence:role": "web"})
    t.join(40)
    assert not t.is_alive()
    refused(out)
    # the new host's own enrollment gets its bundle: the old host's token still does not
    new_host = pair(s)
    assert httpx.get(s.url + f"/v1/agents/{WID}/bundle", headers=bearer(new_host)).status_code == 200
    assert httpx.get(s.url + f"/v1/agents/{WID}/bundle", headers=bearer(old_host)).status_code == 401


def test_an_honest_agents_open_wait_answers_a_label_change_with_the_new_bundle(served: Served) -> None:
    s = served
    assert s.wiring.settle(60)
    token = pair(s)
    v = latest(s, token)
    out: dict[str, Any] = {}
    t = open_wait(s, token, v, out)
    changed = relabel(s, "192.168.10.31", **{"ringfence:env": "staging"})
    t.join(40)
    assert not t.is_alive()
    assert out["status"] == 200, out["text"][:300]
    assert out["at"] - changed < 15, "answered on the change, not at the timeout"
    body = json.loads(out["text"])
    assert body["latest_version"] > v and "bundle" in body, sorted(body)
    mine = httpx.get(s.url + f"/v1/agents/{WID}/bundle", headers=bearer(token))
    assert mine.status_code == 200 and mine.text == body["bundle"], "the stored bundle, byte for byte"
    assert json.loads(body["bundle"])["version"] > v


def test_the_agent_renews_its_token_before_a_wait_that_would_outlast_its_renewal_point(
    served: Served, tmp_path: Path
) -> None:
    """The server authorizes a wait again when it ends, so the real agent client renews a token
    whose renewal point falls within the wait before opening it, not after: else the wait is
    answered 401 at its end and the agent renews over a nonce and waits again (twice as long)."""
    s = served
    r = s.call("otto", "POST", "/admin/pairing-keys", {"workload_id": WID, "uses": 1, "ttl": 600})
    assert r.status_code == 201, r.text
    d = tmp_path / "agent"
    d.mkdir()
    src = ApiSource(s.url, WID, pairing(WID, r.json()["pairing_key"]), StateDir(d), timeout=10, wait_timeout=25)
    stop = threading.Event()
    v = src.wait(None, 0, stop)  # enrolls: a token, its renewal point far ahead
    first = src.token
    src.renew_at = time.time() + 1.0  # as if it were nearly due: due within the wait below
    t0 = time.monotonic()
    assert src.wait(v, 2, stop) == v
    assert src.token != first, "renewed before the wait, which would have outlasted the renewal point"
    assert src.renew_at > time.time() + 60
    assert time.monotonic() - t0 < 2 + 5, "one wait, not a 401 and a second"
