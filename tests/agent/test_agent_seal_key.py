"""The key of the nftables and iptables seals (``seal.key`` in the state directory): made once, 0600,
never read as present when it is not; and the record of the last whole apply's seal (``seal.last``)
that binds a seal to that apply. No kernel needed: the seals' use is tested in
tests/agent/test_attack_kernel_reads.py and tests/agent/test_attack_seal_replay.py."""

from __future__ import annotations

import stat
from pathlib import Path

from ringfence_agent.backends.sealkey import SEAL_KEY_FILE, SEAL_RECORD_FILE, SealKey

DIGEST = "ab" * 32
CONTEXT = b"test seal v1\n"


def test_the_key_is_made_by_the_first_seal_only_0600_and_shared_by_later_processes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert SealKey(state, CONTEXT).get() is None and not state.exists()  # reading never creates it
    first = SealKey(state, CONTEXT).get(create=True)
    assert first is not None and len(first) == 32
    path = state / SEAL_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in state.iterdir()] == [SEAL_KEY_FILE]  # no temporary file left
    later = SealKey(state, CONTEXT)  # another process: the same key, so the same seal
    assert later.get() == first and later.get(create=True) == first
    seal = later.new_seal(DIGEST)
    assert seal is not None and stat.S_IMODE((state / SEAL_RECORD_FILE).stat().st_mode) == 0o600
    assert SealKey(state, CONTEXT).sealed(DIGEST, seal)
    assert not SealKey(state, CONTEXT).sealed("cd" * 32, seal) and not SealKey(state, CONTEXT).sealed(DIGEST, DIGEST)


def test_no_key_or_a_broken_one_seals_nothing_and_the_next_seal_replaces_it(tmp_path: Path) -> None:
    key = SealKey(tmp_path, CONTEXT)
    old = key.get(create=True)
    assert old is not None
    seal = key.new_seal(DIGEST)
    assert SealKey(tmp_path, CONTEXT).sealed(DIGEST, seal)
    (tmp_path / SEAL_KEY_FILE).unlink()
    assert not SealKey(tmp_path, CONTEXT).sealed(DIGEST, seal)  # lost: nothing checks, nothing is intact
    (tmp_path / SEAL_KEY_FILE).write_text("not a key\n")
    assert SealKey(tmp_path, CONTEXT).get() is None and not SealKey(tmp_path, CONTEXT).sealed(DIGEST, seal)
    new = SealKey(tmp_path, CONTEXT).get(create=True)
    assert new is not None and new != old and SealKey(tmp_path, CONTEXT).get() == new


def test_a_state_directory_that_cannot_be_written_seals_with_this_process_key_only(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    key = SealKey(blocker / "state", CONTEXT)  # under a regular file: nothing can be made there
    made = key.get(create=True)
    assert made is not None and key.get() == made  # this process checks its own seals
    seal = key.new_seal(DIGEST)
    assert key.sealed(DIGEST, seal)
    assert not SealKey(blocker / "state", CONTEXT).sealed(DIGEST, seal)  # another process never reads it intact
    library = SealKey(None, CONTEXT)  # the backend used without a state directory: the same
    assert library.get() is None and library.get(create=True) == library.get()


def test_one_key_seals_differently_for_each_backend_and_to_the_length_asked(tmp_path: Path) -> None:
    """nftables and iptables share ``seal.key``; each MACs under its own context, so one's seal
    is never the other's, and iptables keeps 23 hex digits (a chain name holds 28 characters)."""
    nft, ipt = SealKey(tmp_path, b"a\n"), SealKey(tmp_path, b"b\n", 23)
    key = nft.get(create=True)
    assert key is not None and ipt.get() == key
    nft.new_seal(DIGEST)  # the last apply's record, which both check against
    assert len(ipt.seal(DIGEST, key)) == 23 and not nft.seal(DIGEST, key).startswith(ipt.seal(DIGEST, key))
    assert ipt.sealed(DIGEST, ipt.seal(DIGEST, key)) and not ipt.sealed(DIGEST, nft.seal(DIGEST, key)[:23])


def test_only_the_last_whole_applys_seal_is_accepted(tmp_path: Path) -> None:
    """The seal covers a nonce drawn for each whole apply and recorded in ``seal.last``: the seal
    of an earlier apply of the same content (a saved table put back) no longer checks, in this
    process or another, and without the record no seal does."""
    key = SealKey(tmp_path, CONTEXT)
    earlier, last = key.new_seal(DIGEST), key.new_seal(DIGEST)
    assert earlier is not None and last is not None and earlier != last
    for checker in (key, SealKey(tmp_path, CONTEXT)):
        assert checker.sealed(DIGEST, last) and not checker.sealed(DIGEST, earlier)
        assert checker.missing() is None
    key.forget()  # a whole apply that could not seal: the last one's seal is not accepted either
    assert not key.sealed(DIGEST, last) and not SealKey(tmp_path, CONTEXT).sealed(DIGEST, last)
    (tmp_path / SEAL_RECORD_FILE).unlink()
    other = SealKey(tmp_path, CONTEXT)
    assert not other.sealed(DIGEST, last) and not other.sealed(DIGEST, earlier)
    assert "record of the agent's last seal" in (other.missing() or "")
    (tmp_path / SEAL_RECORD_FILE).write_text("not a nonce\n")
    assert not SealKey(tmp_path, CONTEXT).sealed(DIGEST, last) and SealKey(tmp_path, CONTEXT).recorded() is None


def test_a_record_that_cannot_be_written_binds_this_process_seals_only(tmp_path: Path) -> None:
    """``seal.last`` cannot be replaced nor removed (here a directory stands in its place): the
    applying process keeps the nonce in memory and checks its own seal; any other process has no
    record it can read and takes no seal for intact (it re-applies)."""
    key = SealKey(tmp_path, CONTEXT)
    (tmp_path / SEAL_RECORD_FILE).mkdir(parents=True)
    seal = key.new_seal(DIGEST)
    assert seal is not None and key.sealed(DIGEST, seal)
    assert not SealKey(tmp_path, CONTEXT).sealed(DIGEST, seal)
    (tmp_path / SEAL_RECORD_FILE).rmdir()
    again = key.new_seal(DIGEST)  # written to the file once it can be: read from there by all
    assert again is not None and SealKey(tmp_path, CONTEXT).sealed(DIGEST, again) and key.sealed(DIGEST, again)
