"""A Lambda function's log is one JSON object per line (Powertools), read in CloudWatch Logs and by
whatever tails it. JSON escapes C0 controls, but Powertools' default serializer writes C1
controls (``\\x85``, NEL: a line break to some readers), DEL and the Unicode line and paragraph
separators raw. Every function's logger now writes its records ASCII-only
(ringfence.textsafe.json_line), so a tag value, a caller's id or an error text that a library log
line carries cannot break a line or drive a terminal there."""

from __future__ import annotations

import io
import json

import pytest

from ringfence.local.lambdas import load_functions, retire_functions
from tests.aws.conftest import ROOT, Env

HOSTILE = "web\u2028FORGED\u2029x\x85NEL\x1b]52;c;cHduZWQ=\x07\x7f\u202etxt"
NAMES = sorted(p.parent.name for p in (ROOT / "functions").glob("*/app.py"))


@pytest.mark.parametrize("name", NAMES)
def test_attack_every_lambda_functions_log_keeps_hostile_text_on_one_ascii_line(
    env: Env, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Each deployed function's own logger, as its cold start configures it (the library's records reach
    it under the service's name), writes a message carrying separators, C1 and escape characters as one
    ASCII line whose JSON still decodes to the text as it was."""
    monkeypatch.setenv("RINGFENCE_GCP_TAG_PARENTS", "organizations/100")  # the GCP function's start requires it
    # a service name of its own: Powertools configures a service's logger once per process, and
    # this one must be configured by this function's import, as at its cold start
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", f"ringfence-logtest-{name}")
    loaded = load_functions([name], ROOT / "functions")
    try:
        handler = loaded[name].logger.registered_handler
        out = io.StringIO()
        handler.setStream(out)
        loaded[name].logger.warning("label value %s refused", HOSTILE)
    finally:
        retire_functions(loaded.values())
    lines = out.getvalue().rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].isascii(), out.getvalue()
    assert all(c not in lines[0] for c in "\x7f\x1b\x07"), out.getvalue()
    assert json.loads(lines[0])["message"] == f"label value {HOSTILE} refused", out.getvalue()
