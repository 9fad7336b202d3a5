"""What one enrolled host can do to a real ``ringfence serve`` (uvicorn, LocalWiring over SQLite)
with its own agent token, over HTTP: nothing that keeps other agents, enrollment or the admin
API from being answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ringfence import serve
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.wiring import LocalWiring
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import boot, signing_key_file

WEB, DB = "dc1-web-1", "dc1-db-1"
ADMIN = "admin-token-0123456789abcdef0123"
PROMPT = 8.0  # seconds: generous; before the fix these timed out (10 s) behind the attacker's waits


@dataclass
class Plane:
    url: str
    w: LocalWiring
    admin: OnPremAdmin
    app: serve.ServeApp

    keys: dict[str, AgentKey]

    def enroll(self, wid: str) -> dict[str, str]:
        key = self.keys[wid] = AgentKey()
        r = self.admin.pairing_key("alice", wid, 1, 600, "test")
        assert r.status == 201, r.body
        nonce = httpx.get(f"{self.url}/v1/nonce").json()["nonce"]
        req = {"method": "pairing", "nonce": nonce, "workload_id": wid, "pairing_key": r.body["pairing_key"]}
        req.update(key.enroll_fields(wid, nonce))
        got = httpx.post(f"{self.url}/v1/enroll", json=req)
        assert got.status_code == 200, got.text
        return {"Authorization": f"Bearer {got.json()['token']}"}

    def renew(self, wid: str) -> dict[str, str]:
        """A fresh token signed for by the workload's agent key (the previous one is revoked)."""
        nonce = httpx.get(f"{self.url}/v1/nonce").json()["nonce"]
        body = {"nonce": nonce, "signature": self.keys[wid].prove("token", wid, nonce)}
        got = httpx.post(f"{self.url}/v1/agents/{wid}/token", json=body)
        assert got.status_code == 200, got.text
        return {"Authorization": f"Bearer {got.json()['token']}"}


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path))
    admin = boot(w)
    tokfile = tmp_path / "admin-tokens"
    tokfile.write_text(f"alice:{serve.token_hash(ADMIN)}:incident-responder,onboarding\n")
    app = serve.ServeApp.over(w, serve.AdminTokens.load(tokfile), threads=32)  # few: the attack is cheap to run
    with serve.serving(app) as running:
        yield Plane(running.url, w, admin, app, {})
    w.close()


def test_attack_one_token_opening_many_long_polls_starves_no_one(plane: Plane) -> None:
    """Root on one enrolled host opens three times as many long-polls as serve has wait threads,
    with its own token. Before: every thread was held for the whole wait, and GET /v1/nonce and
    another agent's heartbeat timed out behind them. Now a token keeps WAITS_PER_TOKEN waits
    open (the rest are 429 at once, no thread taken), and waits, other agent requests,
    enrollment and the admin API each have threads of their own."""
    url = plane.url
    evil = plane.enroll(WEB)
    good = plane.enroll(DB)
    latest = httpx.get(f"{url}/v1/agents/{WEB}/bundle", headers=evil).json()["version"]
    n = plane.app.threads * 3
    wait_paths = [f"/v1/agents/{WEB}/wait?version={latest}&timeout=6"] * n

    async def attack() -> None:
        limits = httpx.Limits(max_connections=n + 50, max_keepalive_connections=n + 50)
        async with httpx.AsyncClient(limits=limits, timeout=60) as c:
            waits = [asyncio.create_task(c.get(url + p, headers=evil)) for p in wait_paths]
            await asyncio.sleep(2)  # the attacker's waits are in by now
            t0 = time.monotonic()
            nonce = await c.get(f"{url}/v1/nonce", timeout=PROMPT)
            assert nonce.status_code == 200 and nonce.json()["nonce"]
            hb = await c.post(
                f"{url}/v1/agents/{DB}/heartbeat", headers=good, json={"applied_version": None, "mode": None}
            )
            assert hb.status_code == 200, hb.text
            # the other agent's own long-poll is served too (it times out: nothing new)
            other = await c.get(f"{url}/v1/agents/{DB}/wait?version={latest + 100}&timeout=0", headers=good)
            assert other.status_code == 200, other.text
            q = await c.post(
                f"{url}/admin/workloads/{WEB}/quarantine",
                headers={"Authorization": f"Bearer {ADMIN}"},
                json={"reason": "incident"},
                timeout=PROMPT,
            )
            assert q.status_code == 200, q.text
            assert time.monotonic() - t0 < 3 * PROMPT
            done = await asyncio.gather(*waits)
            statuses = [r.status_code for r in done]
            # at most WAITS_PER_TOKEN of them held a thread; the rest were told to come back later
            assert statuses.count(429) >= n - serve.WAITS_PER_TOKEN, sorted(set(statuses))
            assert set(statuses) <= {200, 401, 429}  # 401: the quarantine ended the attacker's token
            refused = next(r for r in done if r.status_code == 429)
            assert refused.headers["Retry-After"] == str(serve.WAIT_RETRY_AFTER)

    asyncio.run(attack())
    assert plane.w.store.get(WEB).op_quarantined  # type: ignore[union-attr]


def test_wait_limit_is_per_token_and_not_fooled_by_path_variants(plane: Plane) -> None:
    """Another agent's waits are not counted against the attacker's limit, and spellings of the
    wait route that the resolver routes the same way are counted as waits."""
    url = plane.url
    evil = plane.enroll(WEB)
    good = plane.enroll(DB)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            held = [
                asyncio.create_task(
                    c.get(f"{url}/v1/agents/{WEB}/wait?version=9999999999999999&timeout=4", headers=evil)
                )
                for _ in range(serve.WAITS_PER_TOKEN)
            ]
            await asyncio.sleep(1)
            for path in (f"/v1/agents/{WEB}/wait", f"/v1/agents/{WEB}/wait/", f"/v1//agents/{WEB}/wait"):
                r = await c.get(f"{url}{path}?version=9999999999999999&timeout=4", headers=evil)
                assert r.status_code in (404, 429), (path, r.status_code, r.text)
            # the same token spelled with other spacing is the same token
            token = evil["Authorization"].removeprefix("Bearer ")
            for spelled in (f"Bearer  {token}", f"Bearer \t{token}"):
                r = await c.get(
                    f"{url}/v1/agents/{WEB}/wait?version=9999999999999999&timeout=4", headers={"Authorization": spelled}
                )
                assert r.status_code == 429, (spelled, r.status_code, r.text)
            r = await c.get(f"{url}/v1/agents/{DB}/wait?version=9999999999999999&timeout=0", headers=good)
            assert r.status_code == 200, r.text
            assert {x.status_code for x in await asyncio.gather(*held)} == {200}
            # answered: the token may wait again
            r = await c.get(f"{url}/v1/agents/{WEB}/wait?version=9999999999999999&timeout=0", headers=evil)
            assert r.status_code == 200, r.text

    asyncio.run(run())


def test_malformed_bodies_are_400_and_a_bearer_route_checks_the_token_before_the_body(
    plane: Plane, capfd: pytest.CaptureFixture[str]
) -> None:
    """JSON nested deeper than the parser recurses and a body that is not UTF-8 were 500s with a
    traceback on stderr; a bearer route answered 422 about the body of a caller without a token."""
    url = plane.url
    deep = b"[" * 200_000 + b"]" * 200_000
    json_type = {"Content-Type": "application/json"}
    for body in (deep, b"\xff\xfe\x00"):
        r = httpx.post(f"{url}/v1/enroll", content=body, headers=json_type, timeout=30)
        assert r.status_code == 400 and r.json()["error"] == "invalid request", r.text
    # without a token: 401 whatever the body or query holds
    for method, path, body in (
        ("POST", f"/v1/agents/{DB}/heartbeat", deep),
        ("POST", f"/v1/agents/{DB}/heartbeat", b"\xff"),
        ("POST", f"/v1/agents/{DB}/heartbeat", b'{"applied_version": "x"}'),
        ("POST", f"/v1/agents/{DB}/reports", b'{"flows": [{"x": 1}]}'),
        ("GET", f"/v1/agents/{DB}/wait?version=abc", b""),
        ("GET", f"/v1/agents/{DB}/deltas?since=" + "9" * 5000, b""),
    ):
        r = httpx.request(method, url + path, content=body, headers=json_type, timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text)
    # another workload's token: 403 before the body too
    web = plane.enroll(WEB)
    r = httpx.post(f"{url}/v1/agents/{DB}/heartbeat", json={"applied_version": "x"}, headers=web)
    assert r.status_code == 403, r.text
    # with the workload's own token the body is judged as before: 422 naming the field, 400 for the rest
    r = httpx.post(f"{url}/v1/agents/{WEB}/heartbeat", json={"applied_version": "x", "mode": None}, headers=web)
    assert r.status_code == 422 and "body.applied_version" in r.json()["detail"], r.text
    r = httpx.post(f"{url}/v1/agents/{WEB}/heartbeat", content=deep, headers={**web, **json_type}, timeout=30)
    assert r.status_code == 400, r.text
    err = capfd.readouterr().err
    assert "Traceback" not in err and "RecursionError" not in err and "UnicodeDecodeError" not in err


def _archived(w: LocalWiring) -> list[Path]:
    root = w.state_dir / "objects" / "reports"
    return [p for p in root.rglob("*.json")] if root.exists() else []


def _drop(src: str, dst: str) -> dict[str, object]:
    return {
        "time": time.time(),
        "direction": "inbound",
        "src": src,
        "dst": dst,
        "proto": "tcp",
        "sport": 40000,
        "dport": 443,
        "rule_id": "x" * 40,
        "action": "drop",
        "count": 1,
    }


def test_attack_one_token_cannot_fill_the_disk_with_report_batches(plane: Plane) -> None:
    """Root on one enrolled host posts report batches as fast as it can (before: each archived,
    foreign records and all, ~200 GB a day from one connection, kept forever). Records with
    neither end its address are not archived; what it may write is a byte quota per workload
    (429 with Retry-After once spent), and the retention sweep deletes batches past 90 days."""
    from ringfence.local.retention import ReportQuota

    url, w = plane.url, plane.w
    web = plane.enroll(WEB)
    foreign = {"flows": [], "drops": [_drop("203.0.113.9", "203.0.113.10")] * 1000, "dropped_records": 0}
    for _ in range(5):
        r = httpx.post(f"{url}/v1/agents/{WEB}/reports", headers=web, json=foreign)
        assert r.status_code == 202 and r.json()["accepted"] == 0, r.text
    assert _archived(w) == []
    # its own address at one end: archived, until its quota is spent (a small one here)
    w.report_quota = ReportQuota(rate=16 * 1024, burst=1024 * 1024)
    own = {"flows": [], "drops": [_drop("203.0.113.9", "192.168.10.11")] * 1000, "dropped_records": 0}
    statuses = []
    with httpx.Client(timeout=30) as c:
        for _ in range(30):
            r = c.post(f"{url}/v1/agents/{WEB}/reports", headers=web, json=own)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                break
    assert statuses[0] == 202 and statuses[-1] == 429, statuses
    size = sum(p.stat().st_size for p in _archived(w))
    assert 0 < size <= 1024 * 1024 + 300 * 1024  # the burst, and at most one batch's worth more
    # another workload's quota is its own
    db = plane.enroll(DB)
    mine = {"flows": [], "drops": [_drop("192.168.10.31", "192.168.10.11")] * 10, "dropped_records": 0}
    assert httpx.post(f"{url}/v1/agents/{DB}/reports", headers=db, json=mine).status_code == 202
    # retention: batches of days older than RINGFENCE_REPORT_RETENTION_DAYS (90) go
    old = w.state_dir / "objects" / "reports" / WEB / "2020" / "01" / "02" / "x.json"
    old.parent.mkdir(parents=True)
    old.write_text("{}")
    kept = len(_archived(w))
    assert w.sweep_reports() == 1
    assert not old.exists() and not (w.state_dir / "objects" / "reports" / WEB / "2020").exists()
    assert len(_archived(w)) == kept - 1
    assert w.sweep_reports(now=time.time() + 91 * 86400) == kept - 1


def test_a_batch_larger_than_the_burst_is_taken_once_the_bucket_is_full_then_waits_its_debt(plane: Plane) -> None:
    """An operator sets RINGFENCE_REPORT_BURST_BYTES below one batch (the route takes up to 256
    KiB): before, such a batch was answered 429 with Retry-After 1 forever and the agent's spool
    never drained. Now a full bucket takes it, and the next batch waits until the debt is paid."""
    from ringfence.local.retention import ReportQuota

    url, w = plane.url, plane.w
    web = plane.enroll(WEB)
    w.report_quota = ReportQuota(rate=1024, burst=10 * 1024)
    own = {"flows": [], "drops": [_drop("203.0.113.9", "192.168.10.11")] * 300, "dropped_records": 0}
    with httpx.Client(timeout=30) as c:
        first = c.post(f"{url}/v1/agents/{WEB}/reports", headers=web, json=own)
        assert first.status_code == 202, first.text
        size = len(first.request.content)
        assert size > 5 * 10 * 1024
        second = c.post(f"{url}/v1/agents/{WEB}/reports", headers=web, json=own)
    assert second.status_code == 429
    # the bucket refills from about size - burst below zero up to the burst at 1 KiB/s (the
    # route counts the batch as it stores it, a little larger than the request's JSON)
    assert size / 1024 - 2 <= int(second.headers["Retry-After"]) <= 2 * size / 1024, (second.headers, size)
    assert len(_archived(w)) == 1


@pytest.mark.slow
def test_an_honest_agents_reports_fit_the_default_quota(plane: Plane) -> None:
    """The agent's defaults at their worst: both buffers full (10,000 drops and 10,000 flows, in
    batches of 500 + 500) every 30 s, with a full 4 MiB spool flushed at once after an outage."""
    from ringfence.local.retention import ReportQuota

    url, w = plane.url, plane.w
    clock = [0.0]
    w.report_quota = ReportQuota(clock=lambda: clock[0])
    web = plane.enroll(WEB)
    flow = {
        "start": time.time(),
        "end": time.time(),
        "src": "192.168.10.11",
        "dst": "2001:db8:1234:5678:9abc:def0:1234:5678",
        "proto": "tcp",
        "sport": 54321,
        "dport": 5432,
        "packets": 123456,
        "bytes": 123456789,
        "direction": "outbound",
    }
    batch = {"flows": [flow] * 500, "drops": [_drop("2001:db8:1234:5678:9abc:def0:1234:5679", "192.168.10.11")] * 500}
    sent = [0, 0]  # bytes posted in each interval
    # two intervals: the first from a full bucket with a spool flush on top, the second after 30 s
    # of refill; every later one starts as the second did, the refill covering an interval's
    # bytes (asserted below), so more intervals only repeated the second (six did, and with a
    # zero rate they passed all the same: the burst alone held six)
    with httpx.Client(timeout=30) as c:
        for interval in range(2):
            clock[0] = interval * 30.0
            for _ in range(20 + (10 if interval == 0 else 0)):  # the first: a spool flush on top
                r = c.post(f"{url}/v1/agents/{WEB}/reports", headers=web, json=batch)
                assert r.status_code == 202 and r.json()["accepted"] == 1000, (interval, r.status_code, r.text)
                sent[interval] += len(r.request.content)
    assert w.report_quota.rate * 30.0 >= sent[1], f"{sent[1]} bytes a 30 s interval outrun the sustained rate"


def _pair(url: str, wid: str, pairing_key: str, key: AgentKey | None = None) -> httpx.Response:
    key = key or AgentKey()
    nonce = httpx.get(f"{url}/v1/nonce").json()["nonce"]
    body = {"method": "pairing", "nonce": nonce, "workload_id": wid, "pairing_key": pairing_key}
    return httpx.post(f"{url}/v1/enroll", json={**body, **key.enroll_fields(wid, nonce)})


def test_attack_pairing_without_a_valid_key_learns_nothing_and_writes_no_audit_record(plane: Plane) -> None:
    """Without a valid pairing key, an enrollment told whether the id was registered, of which
    cloud, and whether an agent-key reset was pending; while one was, each try wrote an audit
    record. Now every such refusal is the same 401 and writes nothing; a valid key for another
    agent key than the reset named is still refused and audited."""
    from ringfence.control.credentials import agent_key_fingerprint

    url, w = plane.url, plane.w
    named = AgentKey()
    w.store.expect_agent_key(DB, agent_key_fingerprint(named.pem))  # an operator's reset names the next key
    before = len(w.store.audit_log())
    details = set()
    for wid in (WEB, "dc9-nope-1", DB):
        for _ in range(3):
            r = _pair(url, wid, "no-such-key")
            assert r.status_code == 401, r.text
            details.add(r.json()["detail"].replace(wid, "<id>"))
    assert details == {"pairing key is unknown, expired, used up, revoked or not issued for <id>"}
    assert len(w.store.audit_log()) == before
    # a valid key shown with another key than the one named: refused, audited, the key not spent
    good = plane.admin.pairing_key("alice", DB, 1, 600, "reinstall").body["pairing_key"]
    after_mint = len(w.store.audit_log())
    r = _pair(url, DB, good)
    assert r.status_code == 401 and "reset for another key" in r.json()["detail"], r.text
    assert w.store.audit_log()[-1].action == "agent.enroll.refused" and len(w.store.audit_log()) == after_mint + 1
    assert _pair(url, DB, good, named).status_code == 200  # the named key, with the same key: bound


def test_attack_a_heartbeat_claiming_a_version_never_published_is_a_finding(plane: Plane) -> None:
    """A heartbeat claiming a version far above the newest cleared the agent's not-enforced
    finding; a negative one was taken too. Now a negative version is 422 and one never published
    is a not-enforced finding at once."""
    from ringfence.control.findings import findings

    url, w = plane.url, plane.w
    web = plane.enroll(WEB)
    latest = httpx.get(f"{url}/v1/agents/{WEB}/bundle", headers=web).json()["version"]
    r = httpx.post(f"{url}/v1/agents/{WEB}/heartbeat", headers=web, json={"applied_version": -42, "mode": "enforce"})
    assert r.status_code == 422 and "body.applied_version" in r.json()["detail"], r.text

    def mine() -> list[tuple[str, str]]:
        return [(f.kind, f.detail) for f in findings(w.store, bound=100).findings if f.workload_id == WEB]

    body = {"applied_version": latest + 10**9, "mode": "enforce", "kernel_digest": "0" * 64}
    r = httpx.post(f"{url}/v1/agents/{WEB}/heartbeat", headers=web, json=body)
    assert r.status_code == 200 and r.json()["latest_version"] == latest, r.text
    assert mine() == [
        ("not-enforced", f"the agent claims version {latest + 10**9}, which was never published (newest {latest})")
    ]
    # the version it was given: no finding
    r = httpx.post(f"{url}/v1/agents/{WEB}/heartbeat", headers=web, json={"applied_version": latest, "mode": "enforce"})
    assert r.status_code == 200 and mine() == []


HELD_S = 8  # how long the attack's waits are held open (their timeout)


def test_attack_renewing_the_token_between_long_polls_opens_no_more_of_them(plane: Plane) -> None:
    """Root on the host holds the agent key: it renews its token as often as it likes, and each
    new token was a fresh per-token limit while the waits opened with the revoked ones went on.
    A workload keeps WAITS_PER_WORKLOAD waits open, whatever tokens they came with."""
    from ringfence.control import agents

    url = plane.url
    plane.enroll(WEB)
    good = plane.enroll(DB)
    rounds = plane.app.threads

    async def run() -> None:
        limits = httpx.Limits(max_connections=3 * rounds + 50, max_keepalive_connections=3 * rounds + 50)
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            held = []
            started = time.monotonic()
            for _ in range(rounds):
                auth = await asyncio.to_thread(plane.renew, WEB)
                for _ in range(2):
                    get = c.get(f"{url}/v1/agents/{WEB}/wait?version=9999999999999999&timeout={HELD_S}", headers=auth)
                    held.append(asyncio.create_task(get))
                await asyncio.sleep(0.01)
            # a wait admitted first ends after HELD_S and frees its place: on a loaded machine
            # whose renewals took longer than that, later ones are rightly admitted after it
            generations = 1 + int((time.monotonic() - started) // HELD_S)
            await asyncio.sleep(1)
            hb = await c.post(
                f"{url}/v1/agents/{DB}/heartbeat", headers=good, json={"applied_version": None, "mode": None}
            )
            assert hb.status_code == 200, hb.text
            other = await c.get(
                f"{url}/v1/agents/{DB}/wait?version=9999999999999999&timeout=0", headers=good, timeout=PROMPT
            )
            assert other.status_code == 200, other.text
            statuses = [r.status_code for r in await asyncio.gather(*held)]
            # 401: a wait whose token was renewed before it was read
            assert statuses.count(200) <= agents.WAITS_PER_WORKLOAD * generations, (generations, statuses)
            assert statuses.count(429) >= rounds, statuses

    asyncio.run(run())


def test_attack_three_agents_false_claims_do_not_reissue_one_anothers_bundles_forever(plane: Plane) -> None:
    """A claim above the newest published version but below the head had the workload re-issued a
    bundle (meant for agents holding versions issued before a restore); each re-issue moved the
    head, making the next colluding host's false claim valid again: three tokens made a new bundle
    (a rendered, signed, stored object and a burnt version) per heartbeat, forever. Now only a
    claim below the revision the engine was rebuilt from is re-issued: once per workload."""
    from ringfence.model import Mode

    url, w, admin = plane.url, plane.w, plane.admin
    web2 = "dc1-web-2"
    tags = {"ringfence:role": "web", "ringfence:app": "ordering", "ringfence:env": "prod", "ringfence:loc": "ca"}
    assert admin.register_workload("alice", {"id": web2, "ips": ["192.168.10.12"], "tags": tags}).status == 201
    w.settle(30)
    auth = {wid: plane.enroll(wid) for wid in (WEB, DB, web2)}
    w.settle(30)
    for m in (Mode.OBSERVE, Mode.ENFORCE, Mode.OBSERVE):  # a third host's changes: the head moves past theirs
        assert admin.set_mode("alice", "dc1-proc-1", m, "ops").status in (200, 201, 202)
        w.settle(30)
    head0 = w.store.head().revision
    with httpx.Client(timeout=10) as c:
        for _ in range(10):
            for wid, h in auth.items():
                hb = f"{url}/v1/agents/{wid}/heartbeat"
                latest = c.post(hb, headers=h, json={"applied_version": None, "mode": None}).json()["latest_version"]
                r = c.post(hb, headers=h, json={"applied_version": latest + 1, "mode": None})
                assert r.status_code == 200, r.text
                w.settle(30)
    # before: +30 (one re-issue per false claim), and it went on as long as they kept claiming
    assert w.store.head().revision - head0 <= len(auth)
