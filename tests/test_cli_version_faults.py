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


def _under_fsize_limit(*args: str, size: int = 4096) -> subprocess.CompletedProcess[str]:
    """The real CLI with RLIMIT_FSIZE small: a write past ``size`` bytes of a file fails with EFBIG
    (Python ignores SIGXFSZ), as a write on a full disk would."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

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
        assert "nothing provisioned" in failed.stderr
        if mounted:  # the audit record, written first, does not fit: nothing is written
            assert "the audit record of policy version 2 could not be written" in failed.stderr
        else:  # the record fits, the version does not: a second record says it failed
            assert "policy version 2 could not be written" in failed.stderr
            assert "recorded as policy.provision.failed" in failed.stderr
        # no empty read-only 000002.json, no temporary file
        assert sorted(p.name for p in (disk / ".ringfence" / "versions").iterdir()) == ["000001.json"]
        if mounted:
            filler.unlink()
        listed = rf("policy", "versions", "--store", store)
        assert listed.stderr == "" and "v1" in listed.stdout
        assert "provisioned policy version 2" in rf(*args).stdout
        rev = rf("policy", "revert", "1", "--inventory", INVENTORY, "--store", store, "-m", "back")
        assert "provisioned policy version 3 with the content of version 1" in rev.stdout
        records = 3 if mounted else 5
        assert rf("audit", "verify", "--store", store).stdout.startswith(f"ok: {records} record(s)")


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


def _records(store: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (store / "audit.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("where", ["before its first byte", "in the middle of its line"])
def test_provision_whose_audit_record_cannot_be_appended_writes_no_version(tmp_path: Path, where: str) -> None:
    """The audit record is written before the version: when it cannot be (a full disk; here the
    log is past RLIMIT_FSIZE while a version file still fits, or the limit falls inside the
    record's line), no version is written, the log is as it was, and the next provision works."""
    store = tmp_path / "store"
    long = "x" * 30000  # kept in version 1 and its audit record: the log outgrows a version
    v1, v2 = _policy(tmp_path, "p1", "one"), _policy(tmp_path, "p2", "two")
    rf("policy", "provision", v1, "--inventory", INVENTORY, "--store", str(store), "-m", long)
    log = (store / "audit.jsonl").read_bytes()
    version_size = (store / "versions" / "000001.json").stat().st_size - len(long)
    limit = version_size + 2048 if where == "before its first byte" else len(log) + 100
    assert version_size + 1024 < limit < len(log) + 200  # version 2 fits, its record does not

    args = ("policy", "provision", v2, "--inventory", INVENTORY, "--store", str(store), "-m", "v2")
    failed = _under_fsize_limit(*args, size=limit)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr and failed.stdout == ""
    assert "the audit record of policy version 2 could not be written (File too large)" in failed.stderr
    assert "nothing provisioned (no version written)" in failed.stderr
    assert sorted(p.name for p in (store / "versions").iterdir()) == ["000001.json"]
    assert (store / "audit.jsonl").read_bytes() == log  # no torn line left
    assert not (store / "audit.head.tmp").exists()
    listed = rf("policy", "versions", "--store", str(store))
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["1"]
    assert rf("audit", "verify", "--store", str(store)).stdout.startswith("ok: 1 record(s) chained, the head matches")

    assert "provisioned policy version 2 by" in rf(*args).stdout
    assert [(r["action"], r["target"]) for r in _records(store)] == [
        ("policy.provision", "policy/1"),
        ("policy.provision", "policy/2"),
    ]
    assert rf("audit", "verify", "--store", str(store)).stdout.startswith("ok: 2 record(s) chained, the head matches")


@pytest.mark.parametrize("action", ["provision", "revert"])
def test_a_version_that_cannot_be_written_after_its_audit_record_is_recorded_as_failed(
    tmp_path: Path, action: str
) -> None:
    """The audit record names the version and its digest first; the version file then does not
    fit (RLIMIT_FSIZE below its size, the log's lines still fit): ``policy.<action>.failed``
    follows, naming the first record, the version is absent, and the CLI says so."""
    store = tmp_path / "store"
    v1, v2, v3 = (_policy(tmp_path, f"p{i}", f"c{i}") for i in (1, 2, 3))
    rf("policy", "provision", v1, "--inventory", INVENTORY, "--store", str(store), "-m", "v1")
    rf("policy", "provision", v2, "--inventory", INVENTORY, "--store", str(store), "-m", "v2")
    assert (store / "versions" / "000002.json").stat().st_size > 4096
    assert (store / "audit.jsonl").stat().st_size < 4096 - 2 * 1024
    if action == "provision":
        args: tuple[str, ...] = ("policy", "provision", v3, "--inventory", INVENTORY)
    else:
        args = ("policy", "revert", "1", "--inventory", INVENTORY)
    args = (*args, "--store", str(store), "-m", "three")
    failed = _under_fsize_limit(*args)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr and failed.stdout == ""
    assert "policy version 3 could not be written (File too large): nothing provisioned" in failed.stderr
    assert f"recorded as policy.{action}.failed" in failed.stderr
    assert sorted(p.name for p in (store / "versions").iterdir()) == ["000001.json", "000002.json"]

    records = _records(store)
    intent, after = records[2], records[3]
    assert (intent["action"], intent["target"]) == (f"policy.{action}", "policy/3")
    digest = intent["after"]
    assert isinstance(intent["detail"], dict) and intent["detail"]["digest"] == digest
    assert (after["action"], after["target"]) == (f"policy.{action}.failed", "policy/3")
    assert isinstance(after["detail"], dict)
    assert after["detail"]["audit_id"] == intent["id"] and after["detail"]["digest"] == digest
    assert "File too large" in str(after["detail"]["why"])
    assert len(records) == 4
    assert rf("audit", "verify", "--store", str(store)).stdout.startswith("ok: 4 record(s) chained, the head matches")
    listed = rf("policy", "versions", "--store", str(store))
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["1", "2"]

    done = rf(*args)  # with room again: version 3 (its number was never written)
    assert "provisioned policy version 3" in done.stdout
    assert [r["action"] for r in _records(store)][-1] == f"policy.{action}"
    assert rf("audit", "verify", "--store", str(store)).stdout.startswith("ok: 5 record(s)")
