"""SQLite's once-only claims (claim_once): a claim expired is cleared even when its key is never
claimed again (each finding, refresh and GCP identity token has a key of its own), so the table
holds the live claims only, not one row per finding ever counted."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ringfence.store.sqlite import CLAIM_PRUNE_EVERY, SqliteStore

MONTH = 30 * 24 * 3600


def rows(s: SqliteStore) -> int:
    return int(s._db().execute("SELECT COUNT(*) FROM claim").fetchone()[0])


def test_expired_claims_of_keys_never_claimed_again_are_cleared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = SqliteStore(tmp_path / "rf.db")
    for i in range(300):
        assert s.claim_once(f"counted#finding-{i}", MONTH)
    assert not s.claim_once("counted#finding-0", MONTH), "a live claim is claimed once"
    t0 = time.time()
    monkeypatch.setattr(time, "time", lambda: t0 + MONTH + 86400)  # every claim above expired
    assert s.claim_once("counted#later", MONTH)
    assert rows(s) == 1, "expired claims kept"
    assert not s.claimed("counted#finding-1") and s.claimed("counted#later")
    # cheap: the table is scanned at most once per CLAIM_PRUNE_EVERY; a key claimed again still
    # finds its own expired claim gone
    monkeypatch.setattr(time, "time", lambda: t0 + 2 * MONTH + 2 * 86400)
    assert s.claim_once("refresh:x", 60)  # the scan: counted#later expired
    assert rows(s) == 1
    monkeypatch.setattr(time, "time", lambda: t0 + 2 * MONTH + 2 * 86400 + CLAIM_PRUNE_EVERY / 2)
    assert s.claim_once("refresh:x", 60), "an expired claim of the same key is claimed again"
