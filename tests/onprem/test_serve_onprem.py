"""``ringfence serve --store sqlite:PATH`` as a process, with a real (dry-run) agent: workloads
registered and a pairing key minted through the admin API, the agent enrolled with it, the keys
it must refuse refused, a policy change pushed through the wait long-poll, and — after the server
is killed with SIGKILL and started again on the same state — the agent carries on with the token
it holds and follows the next change."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from tests.agentproc import POLL_INTERVAL, AgentProcess, wait_until
from tests.agentproc import agent_status as status
from tests.onprem.conftest import provision_estate
from tests.onprem.serveproc import Server


def test_pairing_push_and_a_restart_after_kill_9(server: Server, paired_agent: Callable[..., AgentProcess]) -> None:
    provision_estate(server)
    proc = "dc1-proc-1"

    # keys the server must refuse: used up, expired, issued for another workload
    once = server.admin("POST", "/admin/pairing-keys", {"workload_id": "dc1-db-1", "uses": 1, "ttl": 600}).json()
    assert server.enroll("dc1-db-1", once["pairing_key"]).status_code == 200
    used = server.enroll("dc1-db-1", once["pairing_key"])
    assert used.status_code == 401 and "used up" in used.json()["detail"], used.text
    foreign = server.enroll(proc, once["pairing_key"])
    assert foreign.status_code == 401, foreign.text
    # an expired key: the admin API's shortest ttl is a minute, so this one is written to the
    # server's store directly with one second (SQLite: another connection, as a second process)
    from ringfence.control.api import secret_hash
    from ringfence.store.sqlite import SqliteStore

    side = SqliteStore(server.db)
    side.put_pairing(secret_hash("short-lived-key"), proc, uses=5, ttl=1)
    time.sleep(1.5)
    expired = server.enroll(proc, "short-lived-key")
    assert expired.status_code == 401 and "expired" in expired.json()["detail"], expired.text

    agent = paired_agent(proc, wait_timeout=25)  # the server's longest: a SIGTERM must not wait it out
    state, log = agent.state, agent.log
    try:
        wait_until(lambda: status(state).get("applied_revision"), 30, "the first bundle", log)
        first = status(state)["applied_revision"]
        assert status(state)["workload_id"] == proc
        # the agent's status names the key the control plane bound (what a reset's next_agent_key names)
        from ringfence.control.credentials import agent_key_fingerprint, agent_key_id

        bound = side.agent_key(proc)
        assert bound is not None and status(state)["agent_key"] == agent_key_id(bound)
        assert status(state)["agent_key_fingerprint"] == agent_key_fingerprint(bound)
        time.sleep(1)  # in its long-poll now

        # a change (a new web server registered: a peer of the processing tier) is pushed
        web2 = {
            "id": "dc1-web-2",
            "ips": ["192.168.10.12"],
            "tags": {
                "ringfence:role": "web",
                "ringfence:app": "ordering",
                "ringfence:env": "prod",
                "ringfence:loc": "ca",
            },
        }
        changed = time.monotonic()
        assert server.admin("POST", "/admin/workloads", web2).status_code == 201
        wait_until(lambda: (status(state).get("applied_revision") or 0) > first, 15, "the pushed change", log)
        assert time.monotonic() - changed < 10 < POLL_INTERVAL
        second = status(state)["applied_revision"]

        # kill -9, restart on the same state: the agent's token still works (its key is used up, so
        # it could not enroll again), and the next change arrives
        server.kill9()
        time.sleep(1)
        server.start()
        changed = time.monotonic()
        r = server.admin("POST", f"/admin/workloads/{proc}/quarantine", {"reason": "after the restart"})
        assert r.status_code == 200, r.text
        wait_until(lambda: status(state).get("quarantined") is True, 30, "the change after the restart", log)
        assert status(state)["applied_revision"] > second
        assert time.monotonic() - changed < 20 < POLL_INTERVAL
        assert agent.poll() is None, log.read_text()

        # SIGTERM in the middle of a long-poll: it stops now (it used to answer the signal only
        # when the server answered the poll, up to wait_timeout later), saying what it enforces
        time.sleep(1)
        signalled = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0
        assert time.monotonic() - signalled < 3, log.read_text()
        assert "stopped; the firewall keeps enforcing revision" in log.read_text()
        assert status(state)["daemon"]["pid"] is None
    finally:
        agent.stop()
    # everything acknowledged before the SIGKILL is still there
    store = SqliteStore(server.db)
    actions = [(a.action, a.principal, a.target) for a in store.audit_log()]
    assert ("workload.quarantine", "carol", proc) in actions and store.get("dc1-web-2") is not None
    assert ("agent.enroll", f"agent:{proc}", proc) in actions, "the enrollment is audited"
    admin = {p for a, p, _ in actions if not a.startswith(("agent.", "token."))}
    assert admin == {"carol"}, "every change audited with the admin token's principal"
