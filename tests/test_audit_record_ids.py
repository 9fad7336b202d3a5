"""Derived audit record ids (``ringfence.audit.derived_record_id``) are the ones earlier releases
wrote: an event redelivered across an upgrade, or a token revocation made again after it, must
find its record written (``AuditRecordExists``) rather than write a second one. The expected ids
are the uuid5 values the release before the shared helper derived for the same inputs."""

from __future__ import annotations

from ringfence.audit import derived_record_id
from ringfence.control.governance import _report_id


def test_a_token_revocations_record_id_is_the_one_earlier_releases_derived() -> None:
    assert derived_record_id("token.revoke:i-0abc:tok123") == "d379865534305bf0a80fec72aa0930ab"


def test_a_reports_record_id_is_the_one_earlier_releases_derived_and_one_per_event_and_decision() -> None:
    rid = _report_id("label.approve", "i-0abc", "evt-1", {"role": "jumpbox"})
    assert rid == "3f7f2910f3b05ba0bd2cace4074c738b"
    assert _report_id("label.approve", "i-0abc", "evt-2", {"role": "jumpbox"}) != rid
    assert _report_id("label.held", "i-0abc", "evt-1", {"role": "jumpbox"}) != rid


def test_a_report_no_event_names_gets_a_fresh_id_each_time() -> None:
    assert _report_id("label.approve", "i-0abc", "", {}) != _report_id("label.approve", "i-0abc", "", {})
