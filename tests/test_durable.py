"""ringfence.durable: the control plane's files written whole or not at all (published objects,
the signing key's PEM files)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ringfence import durable


def test_replace_writes_over_with_the_mode_asked_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "key.pub.pem"
    path.write_bytes(b"old")
    old = os.umask(0o077)
    try:
        durable.replace(path, b"new", 0o644)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o644
    durable.replace(path, b"unsynced", 0o600, sync=False)
    assert path.read_bytes() == b"unsynced" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key.pub.pem"]  # no temporary file left


def test_create_writes_only_where_no_file_is(tmp_path: Path) -> None:
    path = tmp_path / "object"
    assert durable.create(path, b"first", 0o600) is True
    assert durable.create(path, b"second", 0o600) is False
    assert path.read_bytes() == b"first" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["object"]


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        durable.replace(tmp_path / "d", b"x", 0o600)  # a directory cannot be renamed over
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # nor is the temporary file left
