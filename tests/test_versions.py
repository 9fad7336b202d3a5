"""The one policy-version model: inline files (CLI) or published keys (control-plane stores)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ringfence.audit import AuditRecord
from ringfence.versions import FileVersionStore, PolicyVersion, digest_of


def test_inline_and_published_versions_give_the_same_texts() -> None:
    files = {"policy.yaml": "rules: []\n"}
    inline = PolicyVersion(number=1, author="alice", message="m", digest=digest_of(files), files=files)
    published = PolicyVersion(
        number=1, author="alice", digest=digest_of(files), keys={"policy.yaml": "policies/v000001/policy.yaml"}
    )
    objects = {"policies/v000001/policy.yaml": files["policy.yaml"].encode()}
    assert inline.texts() == published.texts(objects.__getitem__) == files
    with pytest.raises(ValueError, match="need a reader"):
        published.texts()


def test_a_version_is_inline_or_published_not_both() -> None:
    with pytest.raises(ValidationError, match="not both"):
        PolicyVersion(number=1, author="a", digest="d", files={"a": "x"}, keys={"a": "k"})


def test_documents_the_aws_store_wrote_before_the_models_merged_still_read() -> None:
    old = '{"version": 7, "keys": {"p.yaml": "policies/v000007/p.yaml"}, "digest": "ab", "created_by": "arn:x", "comment": "why"}'
    pv = PolicyVersion.model_validate_json(old)
    assert (pv.number, pv.author, pv.message, pv.keys) == (7, "arn:x", "why", {"p.yaml": "policies/v000007/p.yaml"})


# --- record_version: the audit record before the version ------------------------------------------


def _store_with_v1(tmp_path: Path) -> FileVersionStore:
    from ringfence.versions import record_version

    store = FileVersionStore(tmp_path)
    record_version(store, {"p.yaml": "one"}, "alice", "v1", "policy.provision", {})
    return store


def test_record_version_that_loses_its_race_is_followed_by_an_abandoned_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone else's version takes the number between the record and the put: put's exclusive
    link refuses, and ``policy.provision.abandoned`` follows the record (as the control plane's
    provision that lost its race); the winner's version stands."""
    from ringfence.versions import VersionConflict, VersionNotWritten, record_version

    store = _store_with_v1(tmp_path)
    put = FileVersionStore.put
    winner = PolicyVersion(number=2, author="bob", digest=digest_of({"p.yaml": "bob"}), files={"p.yaml": "bob"})

    def racing_put(self: FileVersionStore, version: PolicyVersion) -> None:
        put(self, winner)  # bob's provision lands first
        put(self, version)

    monkeypatch.setattr(FileVersionStore, "put", racing_put)
    with pytest.raises(VersionNotWritten) as info:
        record_version(store, {"p.yaml": "two"}, "alice", "v2", "policy.provision", {})
    assert info.value.outcome == "abandoned" and info.value.followed
    assert isinstance(info.value.cause, VersionConflict)
    log = store.audit_log()
    assert [(r.action, r.target) for r in log] == [
        ("policy.provision", "policy/1"),
        ("policy.provision", "policy/2"),
        ("policy.provision.abandoned", "policy/2"),
    ]
    assert log[2].detail["audit_id"] == log[1].id and log[2].detail["digest"] == digest_of({"p.yaml": "two"})
    assert store.latest() == winner


def test_record_version_whose_put_raised_but_landed_stands_with_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version file linked, then the directory's fsync raised: the store holds this version,
    so its record is true and stands (no .failed), and the caller is warned."""
    from ringfence.versions import record_version

    store = _store_with_v1(tmp_path)
    put = FileVersionStore.put

    def put_then_raise(self: FileVersionStore, version: PolicyVersion) -> None:
        put(self, version)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(FileVersionStore, "put", put_then_raise)
    warned: list[str] = []
    v = record_version(store, {"p.yaml": "two"}, "alice", "v2", "policy.provision", {}, warn=warned.append)
    assert v.number == 2 and store.latest() == v
    assert [r.action for r in store.audit_log()] == ["policy.provision", "policy.provision"]
    assert len(warned) == 1 and "it is active" in warned[0]


def test_record_version_that_cannot_tell_is_unconfirmed_and_a_lost_followup_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ringfence.versions import VersionNotWritten, record_version

    store = _store_with_v1(tmp_path)

    def failing_put(self: FileVersionStore, version: PolicyVersion) -> None:
        raise OSError(28, "No space left on device")

    def unreadable(self: FileVersionStore, number: int) -> PolicyVersion:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(FileVersionStore, "put", failing_put)
    monkeypatch.setattr(FileVersionStore, "get", unreadable)
    with pytest.raises(VersionNotWritten) as info:
        record_version(store, {"p.yaml": "two"}, "alice", "v2", "policy.provision", {})
    assert info.value.outcome == "unconfirmed" and info.value.followed
    assert store.audit_log()[-1].action == "policy.provision.unconfirmed"

    # the version absent, and the record saying so cannot be appended either: the caller is told
    monkeypatch.undo()
    monkeypatch.setattr(FileVersionStore, "put", failing_put)
    audit = FileVersionStore.audit
    calls: list[str] = []

    def first_audit_only(self: FileVersionStore, record: AuditRecord) -> AuditRecord:
        calls.append(record.action)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return audit(self, record)

    monkeypatch.setattr(FileVersionStore, "audit", first_audit_only)
    with pytest.raises(VersionNotWritten) as info:
        record_version(store, {"p.yaml": "two"}, "alice", "v2", "policy.provision", {})
    assert info.value.outcome == "failed" and not info.value.followed
    assert calls == ["policy.provision", "policy.provision.failed"]
    assert store.highest_number() == 1
