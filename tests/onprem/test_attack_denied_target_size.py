"""Over the real ``ringfence serve``: a refused request is audited (``admin.denied``) with a
bounded target. Before, a reader's refused request naming a 60,000-character path id wrote a
60 KB record: any token, even the least privileged, could grow the audit log without bound."""

from __future__ import annotations

import hashlib

from tests.onprem.conftest import Served

# ringfence.control.admin's DENIED_TARGET_MAX, DENIED_TARGET_PREFIX (written out: the test runs
# against trees without them too)
DENIED_TARGET_MAX, DENIED_TARGET_PREFIX = 128, 64


def test_attack_denied_target_is_bounded(served: Served) -> None:
    wid = "a" * 60000
    before = len(served.audit("admin.denied"))
    r = served.call("rita", "PUT", f"/admin/workloads/{wid}/mode", {"mode": "idle", "reason": "x"})
    assert r.status_code == 403, r.text[:200]
    denied = served.audit("admin.denied")[before:]
    assert len(denied) == 1
    rec = denied[0]
    assert len(rec.target) < 300, f"a {len(rec.target)}-character target recorded"
    assert len(rec.model_dump_json()) < 2000
    # its start, its length and the digest of the whole stand for it
    assert rec.target.startswith("a" * DENIED_TARGET_PREFIX)
    assert "60000 characters" in rec.target and hashlib.sha256(wid.encode()).hexdigest() in rec.target
    assert rec.detail["action"] == "workload.mode"


def test_denied_target_of_an_id_is_recorded_as_it_is(served: Served) -> None:
    wid = "x" * DENIED_TARGET_MAX
    before = len(served.audit("admin.denied"))
    assert served.call("rita", "PUT", f"/admin/workloads/{wid}/mode", {"mode": "idle"}).status_code == 403
    assert served.call("rita", "PUT", "/admin/workloads/dc1-web-1/mode", {"mode": "idle"}).status_code == 403
    assert [r.target for r in served.audit("admin.denied")[before:]] == [wid, "dc1-web-1"]
