"""The CLI's version store when a write fails (a full disk) or an earlier release left a torn
version file: nothing half-written stays, and provision, revert, diff and versions go on working.
Through the real ``ringfence`` console script."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE
from tests.test_cli import BIN, INVENTORY, rf


def _policy(tmp_path: Path, name: str, comment: str) -> str:
    pol = tmp_path / name
    shutil.copytree(EXAMPLE / "policy", pol)
    (pol / "labels.yaml").write_text((pol / "labels.yaml").read_text() + f"# {comment}\n")
    return str(pol)


@contextlib.contextmanager
def _small_disk(where: Path) -> Iterator[Callable[[list[str]], subprocess.CompletedProcess[str]] | None]:
    """A 256 KiB tmpfs at ``where`` (None when it cannot be mounted: the caller limits file sizes)."""
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], check=False).returncode:
        yield None
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(where: Path) -> Path:
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)
    return filler


def _under_fsize_limit(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with RLIMIT_FSIZE small: a write past 4 KiB fails with EFBIG (Python ignores
    SIGXFSZ), as a version write on a full disk would."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=120, preexec_fn=limit)


def test_a_version_write_that_fails_leaves_nothing_and_provision_and_revert_go_on(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    with _small_disk(disk):
        mounted = os.path.ismount(disk)
        store = str(disk / ".ringfence")
        v1, v2 = _policy(tmp_path, "p1", "one"), _policy(tmp_path, "p2", "two")
        rf("policy", "provision", v1, "--inventory", INVENTORY, "--store", store, "-m", "v1")
        args = ("policy", "provision", v2, "--inventory", INVENTORY, "--store", store, "-m", "v2")
        if mounted:
            filler = _fill(disk)
            failed = rf(*args, ok=False)
        else:
            failed = _under_fsize_limit(*args)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "Traceback" not in failed.stderr
        assert "the version could not be written" in failed.stderr and "nothing provisioned" in failed.stderr
        # no empty read-only 000002.json, no temporary file
        assert sorted(p.name for p in (disk / ".ringfence" / "versions").iterdir()) == ["000001.json"]
        if mounted:
            filler.unlink()
        listed = rf("policy", "versions", "--store", store)
        assert listed.stderr == "" and "v1" in listed.stdout
        assert "provisioned policy version 2" in rf(*args).stdout
        rev = rf("policy", "revert", "1", "--inventory", INVENTORY, "--store", store, "-m", "back")
        assert "provisioned policy version 3 with the content of version 1" in rev.stdout
        assert rf("audit", "verify", "--store", store).stdout.startswith("ok: 3 record(s)")


def test_a_torn_version_an_earlier_release_left_is_skipped_and_named_never_reused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    v1, v2 = _policy(tmp_path, "p1", "one"), _policy(tmp_path, "p2", "two")
    rf("policy", "provision", v1, "--inventory", INVENTORY, "--store", str(store), "-m", "v1")
    torn = store / "versions" / "000002.json"  # what the earlier put left after ENOSPC: empty, 0444
    torn.touch(mode=0o444)

    listed = rf("policy", "versions", "--store", str(store))
    assert "v1" in listed.stdout and f"{torn}: not a policy version (empty)" in listed.stderr
    diff = rf("policy", "diff", v2, "--inventory", INVENTORY, "--store", str(store))
    assert "draft vs active version 1" in diff.stdout
    prov = rf("policy", "provision", v2, "--inventory", INVENTORY, "--store", str(store), "-m", "v2")
    assert "provisioned policy version 3" in prov.stdout  # past the torn file: 2 is never given out again
    rev = rf("policy", "revert", "1", "--inventory", INVENTORY, "--store", str(store), "-m", "back", "--force")
    assert "provisioned policy version 4 with the content of version 1" in rev.stdout
    bad = rf("policy", "revert", "2", "--inventory", INVENTORY, "--store", str(store), "-m", "to the torn", ok=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert f"{torn}: not a policy version (empty)" in bad.stderr and "cannot revert to it" in bad.stderr
    records = [json.loads(line) for line in (store / "audit.jsonl").read_text().splitlines()]
    assert [r["target"] for r in records] == ["policy/1", "policy/3", "policy/4"]
    assert str(torn) in records[1]["detail"]["skipped_unreadable_versions"][0]
    assert torn.exists()  # evidence stays until an operator sets it aside


@pytest.mark.parametrize("fault", ["fsync", "link"])
def test_put_unlinks_its_temporary_file_when_it_fails(
    tmp_path: Path, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ringfence.versions import FileVersionStore, PolicyVersion, digest_of

    files = {"p.yaml": "x"}
    store = FileVersionStore(tmp_path)

    def boom(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, fault, boom)
    with pytest.raises(OSError):
        store.put(PolicyVersion(number=1, author="a", digest=digest_of(files), files=files))
    assert list((tmp_path / "versions").iterdir()) == []
