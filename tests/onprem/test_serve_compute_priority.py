"""``ringfence serve``'s compute worker takes urgent work first: an onboarding caller (a CMDB sync,
or whoever holds that token) floods registration updates, and an incident responder's quarantine
is computed next, not after the flood's backlog (docs/threat-model.md). The real HTTP server and
routes over a LocalWiring; the worker's computations are recorded in order."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ringfence import serve
from ringfence.local.wiring import LocalWiring
from tests.onprem.conftest import ESTATE, policy_files

FLOOD = 250  # registration updates queued behind one running computation (2.5 batches of 100)
DEV = [f"dev-web-{i}" for i in range(25)]


def _dev(i: int, role: str) -> dict[str, Any]:
    return {
        "id": DEV[i],
        "ips": [f"192.168.20.{i + 10}"],
        "reason": "sync",
        "tags": {"ringfence:role": role, "ringfence:app": "ordering", "ringfence:env": "dev", "ringfence:loc": "ca"},
    }


class Held:
    """Compute's runs, recorded; the first one after :meth:`arm` waits for :meth:`release`."""

    def __init__(self, w: LocalWiring) -> None:
        self.runs: list[list[dict[str, Any]]] = []
        self.armed = False
        self.running = threading.Event()
        self.go = threading.Event()
        compute = w.worker.compute
        run = compute.run

        def held(messages: list[dict[str, Any]]) -> Any:
            self.runs.append(messages)
            if self.armed:
                self.armed = False
                self.running.set()
                assert self.go.wait(60)
            return run(messages)

        compute.run = held  # type: ignore[method-assign]

    def arm(self) -> None:
        self.runs.clear()
        self.armed = True

    def release(self) -> None:
        self.go.set()


@pytest.fixture
def app(wiring: LocalWiring, tmp_path: Path) -> Iterator[tuple[str, dict[str, dict[str, str]]]]:
    tokens, lines = {}, []
    for who, roles in {"otto": ["onboarding"], "paula": ["policy-author"], "ivy": ["incident-responder"]}.items():
        tokens[who], line = serve.new_admin_token(who, roles)
        lines.append(line)
    (tmp_path / "admin-tokens").write_text("\n".join(lines) + "\n")
    with serve.serving(serve.ServeApp.over(wiring, serve.AdminTokens.load(tmp_path / "admin-tokens"))) as running:
        yield running.url, {who: {"Authorization": f"Bearer {t}"} for who, t in tokens.items()}


def test_attack_a_registration_flood_does_not_delay_a_quarantine_in_serve(
    wiring: LocalWiring, app: tuple[str, dict[str, dict[str, str]]]
) -> None:
    url, auth = app
    with httpx.Client(base_url=url, timeout=60) as c:
        for spec in [*ESTATE, *(_dev(i, "web") for i in range(len(DEV)))]:
            assert (
                c.post("/admin/workloads", json={**spec, "reason": "rack 1"}, headers=auth["otto"]).status_code == 201
            )
        r = c.post("/admin/policies", json={"files": policy_files(), "reason": "v1"}, headers=auth["paula"])
        assert r.status_code == 201, r.text
    assert wiring.settle(60)
    held = Held(wiring)
    held.arm()

    def flood(k: int, n: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for j in range(n):
                i = (k + 4 * j) % len(DEV)
                body = _dev(i, "processing" if j % 2 else "web")
                # two threads registering one id at once: the one overtaken answers 409 "workload
                # changed meanwhile: nothing registered", and is sent again (docs/onprem.md)
                for _ in range(5):
                    status = c.post("/admin/workloads", json=body, headers=auth["otto"]).status_code
                    if status != 409:
                        break
                assert status in (200, 201)

    flood(0, 1)  # the computation under way when the flood comes
    assert held.running.wait(30)
    threads = [threading.Thread(target=flood, args=(k, FLOOD // 5)) for k in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert wiring.worker.queue.qsize() >= FLOOD - 5, "the flood is not queued behind the held computation"
    r = httpx.post(f"{url}/admin/workloads/dc1-web-1/quarantine", json={"reason": "IR-7"}, headers=auth["ivy"])
    assert r.status_code == 200, r.text
    held.release()
    assert wiring.settle(120)

    def names_victim(run: list[dict[str, Any]]) -> bool:
        return any("dc1-web-1" in m.get("ids", []) for m in run)

    at = next(n for n, run in enumerate(held.runs) if names_victim(run))
    # before: the flood's messages were computed first (three batches of 100), the quarantine last
    assert at == 1, f"the quarantine was computed in run {at} of {len(held.runs)}"
    # computed before the flood's backlog drained, and alone (not merged with a batch of it)
    assert any(set(m.get("ids", [])) & set(DEV) for run in held.runs[at + 1 :] for m in run)
    assert all(set(m.get("ids", [])) <= {"dc1-web-1"} for m in held.runs[at]), "urgent work is computed alone"
    ptr = wiring.store.bundle_pointer("dc1-web-1")
    assert ptr is not None and json.loads((wiring.state_dir / "objects" / ptr.key).read_text())["quarantined"]
