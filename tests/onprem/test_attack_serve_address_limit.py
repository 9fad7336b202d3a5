"""What one client address can do to a real ``ringfence serve`` (uvicorn, LocalWiring over SQLite)
on the agent API's unauthenticated routes (``GET /v1/nonce``, ``POST /v1/enroll``, the token
route over a nonce), over HTTP: past its limit it is answered 429 with ``Retry-After``, as the AWS
web ACL answers it, while every other address enrolls and a renewal by token goes through.

The clients take distinct source addresses on loopback (127.0.0.0/8 is all local); the IPv6 ones
are taken in a network namespace of the test's own, where 2001:db8::/32 is routed to ``lo``."""

from __future__ import annotations

import base64
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ringfence import serve
from ringfence.addresslimit import AddressLimit
from ringfence.agentwire import token_proof_message
from ringfence.clouds.onprem import OnPremAdmin
from ringfence.local.lab import in_netns
from ringfence.local.wiring import LocalWiring
from tests.aws.test_pipeline import AgentKey
from tests.onprem.conftest import boot, signing_key_file
from tests.onprem.serveproc import TOKEN, Server
from tests.onprem.test_serve_metrics import counts
from tests.tokenage import age

WEB, DB = "dc1-web-1", "dc1-db-1"
ADMIN = "admin-token-0123456789abcdef0123"
LIMIT = 20  # requests an address saves up
WINDOW = 3600  # LIMIT more each WINDOW seconds: one each 180 s, none while a test runs


# one TLS context for every client: httpx loads the CA bundle into a new one per transport
# (~30 ms), which was most of a test making 300 clients (they speak plain HTTP anyway)
_TLS = ssl.create_default_context()


def client(address: str) -> httpx.Client:
    """A client whose connections leave from ``address``."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address, verify=_TLS), timeout=30)


@dataclass
class Plane:
    url: str
    w: LocalWiring
    admin: OnPremAdmin
    app: serve.ServeApp

    def enroll(self, via: httpx.Client, wid: str) -> tuple[AgentKey, httpx.Response]:
        """Enroll ``wid`` with a pairing key, from ``via``'s address: its key and the answer."""
        key = AgentKey()
        r = self.admin.pairing_key("alice", wid, 1, 600, "test")
        assert r.status == 201, r.body
        got = via.get(f"{self.url}/v1/nonce")
        if got.status_code != 200:
            return key, got
        nonce = got.json()["nonce"]
        req = {"method": "pairing", "nonce": nonce, "workload_id": wid, "pairing_key": r.body["pairing_key"]}
        req.update(key.enroll_fields(wid, nonce))
        return key, via.post(f"{self.url}/v1/enroll", json=req)

    def counted(self) -> dict[str, float]:
        got = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
        assert got.status_code == 200, got.text
        return counts(got.text)


def renew_by_token(plane: Plane, via: httpx.Client, wid: str, key: AgentKey, token: str) -> httpx.Response:
    """What the agent sends while its token is valid: no nonce, a proof over the token and its clock."""
    at = int(time.time())
    sig = base64.b64encode(key.private.sign(token_proof_message(wid, token, at))).decode()
    return via.post(
        f"{plane.url}/v1/agents/{wid}/token",
        json={"time": at, "signature": sig},
        headers={"Authorization": f"Bearer {token}"},
    )


@contextmanager
def plane_over(tmp_path: Path, limit: AddressLimit) -> Iterator[tuple[LocalWiring, OnPremAdmin, serve.ServeApp]]:
    w = LocalWiring(tmp_path / "state" / "state.db", signing_key=signing_key_file(tmp_path))
    admin = boot(w)
    tokfile = tmp_path / "admin-tokens"
    tokfile.write_text(f"alice:{serve.token_hash(ADMIN)}:onboarding\n")
    app = serve.ServeApp.over(w, serve.AdminTokens.load(tokfile), threads=16, address_limit=limit)
    try:
        yield w, admin, app
    finally:
        w.close()


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    with plane_over(tmp_path, AddressLimit(LIMIT, WINDOW)) as (w, admin, app), serve.serving(app) as running:
        yield Plane(running.url, w, admin, app)


def test_attack_a_nonce_flood_from_one_address_does_not_stop_others_enrolling(plane: Plane) -> None:
    """One host on the data-centre network (127.0.0.3, an address another enrolled host shares
    behind a NAT) floods ``GET /v1/nonce``, each a store write. Before: every one was answered and
    written, however many, and honest enrollments waited behind them for the enrollment threads.
    Now the address is answered 429 with Retry-After past its limit, on nonce, enroll and the
    nonce path of the token route, before anything is written; another address still takes a
    nonce and enrolls with a pairing key, and the host behind the flooded address still renews
    its valid token by bearer."""
    flooded, other = client("127.0.0.3"), client("127.0.0.4")
    web_key, got = plane.enroll(flooded, WEB)  # the honest host behind the shared address, first
    assert got.status_code == 200, got.text
    web_token = got.json()["token"]
    nonces_before = plane.w.store._db().execute("SELECT COUNT(*) FROM nonce").fetchone()[0]

    answers = [flooded.get(f"{plane.url}/v1/nonce") for _ in range(LIMIT * 3)]
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(ok) == LIMIT - 2, "the address's limit, less the enrollment's nonce and enroll"
    assert len(refused) == len(answers) - len(ok), {r.status_code for r in answers}
    retry = int(refused[-1].headers["Retry-After"])
    assert 1 <= retry <= WINDOW // LIMIT + 1, retry
    nonces = plane.w.store._db().execute("SELECT COUNT(*) FROM nonce").fetchone()[0]
    assert nonces - nonces_before == len(ok), "a refused request writes no nonce"

    # the other unauthenticated routes from that address are refused too, before any route runs
    assert flooded.post(f"{plane.url}/v1/enroll", json={}).status_code == 429
    body = {"nonce": "n" * 32, "signature": web_key.prove("token", WEB, "n" * 32)}
    assert flooded.post(f"{plane.url}/v1/agents/{WEB}/token", json=body).status_code == 429

    # another address is untouched: a nonce, and a whole enrollment with a pairing key
    _, enrolled = plane.enroll(other, DB)
    assert enrolled.status_code == 200, enrolled.text

    # the host behind the flooded address renews its valid token by bearer, and uses the new one
    age(plane.w.store, WEB, web_token)  # due for renewal: a younger token is refused renewal by token
    renewed = renew_by_token(plane, flooded, WEB, web_key, web_token)
    assert renewed.status_code == 200, renewed.text
    bearer = {"Authorization": f"Bearer {renewed.json()['token']}"}
    assert flooded.get(f"{plane.url}/v1/agents/{WEB}/bundle", headers=bearer).status_code == 200

    c = plane.counted()
    assert c["ringfence_agent_requests_over_address_limit_total"] == len(refused) + 2


def test_attack_a_bearer_header_does_not_take_nonces_or_enrollments_past_the_limit(plane: Plane) -> None:
    """Only a POST to the token route with a bearer is left out (the control plane takes it as a
    renewal by token or nothing, writing nothing): a bearer of any value on the nonce or enroll
    route, or the token route taken with GET, is counted like any other request."""
    flooded = client("127.0.0.5")
    bearer = {"Authorization": "Bearer made-up"}
    answers = [flooded.get(f"{plane.url}/v1/nonce", headers=bearer) for _ in range(LIMIT + 5)]
    assert [r.status_code for r in answers].count(200) == LIMIT
    assert flooded.post(f"{plane.url}/v1/enroll", json={}, headers=bearer).status_code == 429
    assert flooded.get(f"{plane.url}/v1/agents/{WEB}/token", headers=bearer).status_code == 429
    # nor does another spelling of a path the routes answer escape it
    for path in ("/v1/nonce/", "/v1//nonce", "/v1/%6eonce"):
        assert flooded.get(f"{plane.url}{path}").status_code == 429, path
    # the renewal by token is not limited, and a made-up bearer there is refused by the route
    made_up = flooded.post(f"{plane.url}/v1/agents/{WEB}/token", json={"time": 1, "signature": "x"}, headers=bearer)
    assert made_up.status_code == 401, made_up.text


def test_attack_x_forwarded_for_does_not_escape_the_address_limit(plane: Plane) -> None:
    """A process on the control plane's own host (loopback, which uvicorn trusted for
    ``X-Forwarded-For`` by default) names a new address in each request's ``X-Forwarded-For``.
    Before: uvicorn took each for the client, so every request was a new address and none was
    ever limited. Now the client is the TCP peer, whatever the headers say."""
    local = client("127.0.0.1")
    codes = [
        local.get(f"{plane.url}/v1/nonce", headers={"X-Forwarded-For": f"10.9.{n // 250}.{n % 250 + 1}"}).status_code
        for n in range(LIMIT + 10)
    ]
    assert codes.count(200) == LIMIT, codes
    assert codes.count(429) == 10, codes


def test_the_address_table_stays_bounded_under_many_addresses(tmp_path: Path) -> None:
    """Requests from 300 addresses into a table of 50: it never holds more than 50, the least
    recently seen are forgotten (counted), and the address seen last is still limited."""
    limit = AddressLimit(LIMIT, WINDOW, max_entries=50)
    with plane_over(tmp_path, limit) as (w, admin, app), serve.serving(app) as running:
        plane = Plane(running.url, w, admin, app)
        for n in range(300):
            with client(f"127.1.{n // 200}.{n % 200 + 1}") as c:
                assert c.get(f"{plane.url}/v1/nonce").status_code == 200
            assert len(limit) <= 50
        assert len(limit) == 50
        last = client("127.1.1.100")  # the 300th: still in the table, its limit still counted
        codes = [last.get(f"{plane.url}/v1/nonce").status_code for _ in range(LIMIT)]
        assert codes.count(200) == LIMIT - 1 and codes[-1] == 429, codes
        assert plane.counted()["ringfence_address_limit_evictions_total"] == 250


# --- IPv6 (and IPv4 on a dual-stack listener), in a namespace of the test's own -------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def v6ns() -> Iterator[str]:
    """A network namespace where any 2001:db8::/32 address may be a local source (AnyIP)."""
    name = f"rfal{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "-6", "route", "add", "local", "2001:db8::/32", "dev", "lo")
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1"],
            check=True,
            capture_output=True,
        )
        yield name
    finally:
        _ip("netns", "del", name)


def test_attack_addresses_of_one_ipv6_64_share_one_limit(tmp_path: Path, v6ns: str) -> None:
    """A host holds a whole /64 (2^64 addresses): taking a new one for each request, before, each
    was a new client with a limit of its own and a row in the table. Now a /64 is one client:
    past the limit every address in it is refused, while another /64, and IPv4 clients of the
    same dual-stack listener (each its own address, not all one ::ffff:0:0/64), are answered."""
    with in_netns(v6ns):
        sock = serve.listen("::", 0)  # dual-stack: IPv4 clients arrive as ::ffff:a.b.c.d
    limit = AddressLimit(LIMIT, WINDOW)
    with plane_over(tmp_path, limit) as (_, _, app), serve.serving(app, sock=sock) as running:
        port = running.url.rsplit(":", 1)[1]
        url6, url4 = f"http://[2001:db8:ffff::1]:{port}", f"http://127.0.0.1:{port}"
        with in_netns(v6ns):  # this thread's sockets from here on are the namespace's
            codes = []
            for n in range(LIMIT + 10):
                with client(f"2001:db8:0:1::{n + 1:x}") as c:
                    codes.append(c.get(f"{url6}/v1/nonce").status_code)
            assert codes.count(200) == LIMIT and codes[-1] == 429, codes
            assert len(limit) == 1
            with client("2001:db8:0:2::1") as c:
                assert c.get(f"{url6}/v1/nonce").status_code == 200
            v4 = []
            for n in range(2 * LIMIT):
                with client(f"127.0.0.{n + 2}") as c:
                    v4.append(c.get(f"{url4}/v1/nonce").status_code)
            assert v4 == [200] * (2 * LIMIT), v4
            assert "127.0.0.2" in limit._buckets


def test_serve_reads_its_address_limit_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI process with RINGFENCE_UNAUTH_REQUESTS_PER_ADDRESS=5: the sixth nonce of an address
    is 429, counted in /metrics; a bad setting stops the start, naming it."""
    monkeypatch.setenv("RINGFENCE_UNAUTH_REQUESTS_PER_ADDRESS", "5")
    s = Server(tmp_path)
    s.start()
    try:
        codes = [httpx.get(f"{s.url}/v1/nonce").status_code for _ in range(7)]
        assert codes == [200] * 5 + [429] * 2, codes
        got = httpx.get(f"{s.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert counts(got.text)["ringfence_agent_requests_over_address_limit_total"] == 2
    finally:
        assert s.proc is not None
        s.proc.terminate()
        s.proc.wait(15)
    monkeypatch.setenv("RINGFENCE_UNAUTH_REQUESTS_PER_ADDRESS", "lots")
    bad = Server(tmp_path, db=tmp_path / "other" / "state.db")
    with pytest.raises(AssertionError):
        bad.start()
    assert "RINGFENCE_UNAUTH_REQUESTS_PER_ADDRESS='lots': not a number" in bad.log.read_text()
    assert not (tmp_path / "other").exists(), "refused before the store was opened"
