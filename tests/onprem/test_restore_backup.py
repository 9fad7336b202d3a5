"""docs/onprem.md's backup (SQLite's online backup of ``state.db``, then ``objects/``), restored
after the estate moved on: the real ``ringfence serve`` and a real (dry-run) agent. The agent
already holds versions issued after the backup; what the restored control plane publishes next (a
quarantine) must be numbered above them, or the agent refuses it as a rollback and the quarantine
never takes effect."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from tests.agentproc import AgentProcess, wait_until
from tests.agentproc import agent_status as status
from tests.onprem.conftest import provision_estate, sqlite_backup
from tests.onprem.serveproc import Server

PROC = "dc1-proc-1"


def backup(db: Path, to: Path) -> None:
    """The documented backup: ``sqlite3 state.db ".backup backup.db"`` (this API), then ``objects/``."""
    to.mkdir()
    sqlite_backup(db, to / "state.db")
    shutil.copytree(db.parent / "objects", to / "objects")


def restore(frm: Path, db: Path) -> None:
    """The disk died: ``state.db`` (no -wal/-shm of the lost one beside it) and ``objects/`` put back."""
    shutil.rmtree(db.parent / "objects")
    shutil.copytree(frm / "objects", db.parent / "objects")
    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    shutil.copy(frm / "state.db", db)


def test_a_restored_backup_reaches_agents_that_moved_past_it(
    server: Server, tmp_path: Path, paired_agent: Callable[..., AgentProcess]
) -> None:
    provision_estate(server)
    agent = paired_agent(PROC)
    state, log = agent.state, agent.log
    try:
        at_backup = wait_until(lambda: status(state).get("applied_revision"), 30, "the first bundle", log)
        backup(server.db, tmp_path / "backup")

        # the estate moves on after the backup: quarantined and released a few times, each
        # applied, and quarantined at last (what the restore undoes)
        held = at_backup
        for n, on in enumerate((True, False, True, False, True)):
            method = "POST" if on else "DELETE"
            r = server.admin(method, f"/admin/workloads/{PROC}/quarantine", {"reason": f"drill {n}"})
            assert r.status_code == 200, r.text
            before = held
            held = wait_until(
                lambda b=before, q=on: (
                    (s := status(state)).get("quarantined") is q
                    and (s.get("applied_revision") or 0) > b
                    and s["applied_revision"]
                ),
                30,
                f"drill {n} ({'quarantine' if on else 'release'})",
                log,
            )
        assert held > at_backup

        # the disk dies: serve stopped, the backup restored as the docs say, serve started again
        server.stop()
        restore(tmp_path / "backup", server.db)
        server.start()

        # the restored state reaches the agent unasked (its heartbeat shows it holds a version
        # above what the restored store published): not quarantined, above what it held
        restored = wait_until(
            lambda: (
                (s := status(state)).get("quarantined") is False
                and (s.get("applied_revision") or 0) > held
                and s["applied_revision"]
            ),
            30,
            "the restored state (released)",
            log,
        )

        # a real incident: the quarantine must reach the host
        r = server.admin("POST", f"/admin/workloads/{PROC}/quarantine", {"reason": "real incident"})
        assert r.status_code == 200, r.text
        wait_until(lambda: status(state).get("quarantined") is True, 30, "the quarantine after the restore", log)
        assert status(state)["applied_revision"] > restored
        assert "rollback refused" not in log.read_text()
        assert agent.poll() is None, log.read_text()
    finally:
        agent.stop()
