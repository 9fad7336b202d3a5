"""Two registrations racing for one address under ``ringfence serve`` (the real HTTP server, the
library's routes, LocalWiring over SQLite; ``tests/aws/test_attack_address_race.py`` runs the same
races over DynamoDB): the one-owner check was a read before the write, so both could pass it and
leave the address with two owners (peers' sets, flows and explain resolving it to either)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from ringfence.local.wiring import LocalWiring
from ringfence.store.base import Store

TAGS = {"ringfence:role": "web", "ringfence:app": "shop", "ringfence:env": "prod", "ringfence:loc": "ca"}
ROUNDS = 12


class Admin:
    """``ringfence serve`` with an onboarding token, over a LocalWiring (whichever store it holds)."""

    def __init__(self, url: str, token: str, store: Store) -> None:
        self.url, self.token, self.store = url, token, store

    def register(self, wid: str, ips: list[str]) -> httpx.Response:
        body = {"id": wid, "ips": ips, "tags": TAGS, "reason": "race"}
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.post(self.url + "/admin/workloads", json=body, headers=headers, timeout=60)


def serving(wiring: LocalWiring, tmp_path: Path) -> Iterator[Admin]:
    token, line = serve.new_admin_token("otto", ["onboarding"])
    path = tmp_path / "admin-tokens"
    path.write_text(line + "\n")
    app = serve.ServeApp.over(wiring, serve.AdminTokens.load(path))
    with serve.serving(app) as running:
        yield Admin(running.url, token, wiring.store)


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    w = LocalWiring(tmp_path / "state" / "state.db", start=False)
    try:
        yield from serving(w, tmp_path)
    finally:
        w.close()


def at_once(*calls: tuple[str, list[str], Any]) -> dict[str, httpx.Response]:
    """Each (workload, addresses, admin) registered from its own thread, released together."""
    barrier = threading.Barrier(len(calls))
    out: dict[str, httpx.Response] = {}

    def run(wid: str, ips: list[str], adm: Admin) -> None:
        barrier.wait()
        out[wid] = adm.register(wid, ips)

    threads = [threading.Thread(target=run, args=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def owners(store: Store, ip: str) -> list[str]:
    return sorted(r.id for r in store.all_records() if r.state in ("pending", "running") and ip in r.workload.ips)


def one_wins(got: dict[str, httpx.Response], ip: str, store: Store) -> None:
    """Exactly one registration landed; the other got the sequential check's 409, naming the
    address and the winner; the address has one owner."""
    ok = [w for w, r in got.items() if r.status_code in (200, 201)]
    refused = [w for w, r in got.items() if r.status_code == 409]
    assert len(ok) == 1 and len(refused) == 1, {w: (r.status_code, r.text) for w, r in got.items()}
    body = got[refused[0]].json()
    assert body == {
        "error": "address in use: nothing registered",
        "detail": f"{ip} is held by workload {ok[0]} (deregister it or give it another first)",
    }, body
    assert owners(store, ip) == ok, f"{ip} has owners {owners(store, ip)}"


def race_new_registrations(adm: Admin, other: Admin | None = None) -> None:
    """Round after round, two new workloads registered with one address at the same moment (from
    two admin clients: ``other``, a second server over the same store, or the same one)."""
    for i in range(ROUNDS):
        ip = f"10.77.{i}.1"
        one_wins(at_once((f"new-a-{i}", [ip], adm), (f"new-b-{i}", [ip], other or adm)), ip, adm.store)


def race_readdress(adm: Admin, other: Admin | None = None) -> None:
    """A registered workload given a new address (registered again with other ips) while another
    workload is registered with that address: one of them lands; the address it gave up is free."""
    for i in range(ROUNDS):
        old, new = f"10.78.{i}.1", f"10.78.{i}.2"
        assert adm.register(f"moving-{i}", [old]).status_code == 201
        got = at_once((f"moving-{i}", [new], adm), (f"newcomer-{i}", [new], other or adm))
        one_wins(got, new, adm.store)
        if got[f"moving-{i}"].status_code == 200:
            assert owners(adm.store, old) == [], "the address it moved from is free"
            assert adm.register(f"after-{i}", [old]).status_code == 201
        else:
            assert owners(adm.store, old) == [f"moving-{i}"]


def test_attack_two_registrations_racing_for_one_address_leave_one_owner(admin: Admin) -> None:
    """Two onboarding calls at once give two new workloads one address (a "web" host registered
    with the database's address as the database's own registration lands): one is registered, the
    other refused with the 409 a sequential registration gets, naming the address and the winner.
    Before: both passed the read and both were written, most rounds."""
    race_new_registrations(admin)


def test_attack_a_readdress_racing_a_registration_leaves_one_owner(admin: Admin) -> None:
    """A workload registered again with a new address while another is registered with that
    address: one lands, the other gets the 409; the address given up is free at once."""
    race_readdress(admin)
