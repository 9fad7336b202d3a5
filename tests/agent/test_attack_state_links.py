"""The state directory's writers themselves never follow a link planted under a name they use, nor
change a file by its name that may be another file by then (security review r14, F1, F2, F4, F5;
defence in depth: root's CLI no longer writes in a directory another user owns, see
test_attack_root_cli_as_owner.py, but a process's own directory may still be raced by whoever
else can write there). In-process, on a scratch directory; the victims are files of the test's."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from ringfence.agentwire import ReportBatch
from ringfence.bundlewire import load_bundle, load_delta
from ringfence_agent.reports import Spool
from ringfence_agent.state import StateDir, atomic_write
from tests.agent.bundles import GOLDEN

SECRET = "root:SECRETHASH:19000:0:99999:7:::\n" * 4


def _victim(where: Path) -> Path:
    path = where / "victim"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


def _unchanged(victim: Path) -> None:
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600 and victim.read_text() == SECRET


def test_attack_a_dangling_lock_link_is_not_created(tmp_path: Path) -> None:
    """F1: ``.lock`` a link to where no file is: opening it with O_CREAT made that file."""
    state = tmp_path / "state"
    state.mkdir()
    target = tmp_path / "new-cron"
    (state / ".lock").symlink_to(target)
    StateDir(state).lock()  # the directory itself is locked instead
    assert not target.exists()


def test_attack_spool_links_are_not_followed(tmp_path: Path) -> None:
    """F2: ``spool.jsonl`` a link: appended through; ``spool.tmp`` a link: the trim truncated
    and rewrote its target."""
    victim = _victim(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / "spool.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        Spool(state / "spool.jsonl", 1 << 20).append(ReportBatch(dropped_records=1))
    _unchanged(victim)

    (state / "spool.jsonl").unlink()
    (state / "spool.tmp").symlink_to(victim)
    spool = Spool(state / "spool.jsonl", 200)
    for _ in range(6):  # past max_bytes: trimmed
        spool.append(ReportBatch(dropped_records=123))
    _unchanged(victim)
    assert 0 < (state / "spool.jsonl").stat().st_size <= 200
    assert (state / "spool.tmp").is_symlink()


def test_attack_a_temp_file_swapped_for_a_link_is_not_chmodded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """F4: the temporary file was chmodded by name after it was written: swapped for a link in
    between, its target was made 0644 (a reason file in rejected/)."""
    victim = _victim(tmp_path)
    real = tempfile.mkstemp

    def raced(*args: object, **kwargs: object) -> tuple[int, str]:
        fd, name = real(*args, **kwargs)  # type: ignore[call-overload]
        os.rename(name, name + ".moved")  # the racer wins: the name is a link now
        os.symlink(victim, name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", raced)  # as state._staged calls it
    atomic_write(tmp_path / "reason.txt", "why\n", mode=0o644)
    _unchanged(victim)


def test_attack_a_journal_swapped_for_a_link_after_it_was_read_is_not_written(tmp_path: Path) -> None:
    """F5: the journal opened for the append without O_NOFOLLOW: swapped for a link between the
    read and the append, its target was truncated to the journal's length and written."""
    victim = _victim(tmp_path)
    state = StateDir(tmp_path / "state")
    bundle = load_bundle((GOLDEN / "bundle-ord-prod-proc-1.json").read_bytes())
    delta = load_delta((GOLDEN / "delta-ord-prod-proc-1-scale-out.json").read_bytes())
    state.save_applied(bundle, [])
    assert state.load_deltas(bundle) == []
    state.journal_path.unlink()
    state.journal_path.symlink_to(victim)
    with pytest.raises(OSError):
        state.append_delta(bundle, [delta])
    _unchanged(victim)
