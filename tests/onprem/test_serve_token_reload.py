"""The real ``ringfence serve`` reads its ``--admin-tokens`` file again when it changes: a line
removed revokes that token at the next request, without a restart; a file that no longer reads
refuses every admin token (never the old set) until it reads again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from ringfence.serve import token_hash
from tests.test_cli import BIN

ALICE, IVAN = "alice-token-0123456789abcdef", "ivan-token-0123456789abcdef"


def test_removing_a_line_revokes_that_token_without_a_restart(tmp_path: Path) -> None:
    tokens = tmp_path / "admin-tokens"
    alice = f"alice:{token_hash(ALICE)}:reader\n"
    tokens.write_text(alice + f"ivan:{token_hash(IVAN)}:incident-responder\n")
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [str(BIN), "serve", "--port", "0", "--store", f"sqlite:{tmp_path / 'state' / 'state.db'}",
         "--admin-tokens", str(tokens)],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, log.read_text()
        url = line.split("listening on ")[1].split()[0]

        def status(token: str) -> int:
            return httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code

        assert (status(ALICE), status(IVAN)) == (200, 200)
        tokens.write_text(alice)  # ivan's line removed, in place
        assert (status(ALICE), status(IVAN)) == (200, 401)
        tokens.write_text(alice.rstrip("\n") + "oops:not-a-hash\n")  # a bad edit: nobody, not the old set
        assert (status(ALICE), status(IVAN)) == (401, 401)
        assert "every admin token is refused until the file reads again" in log.read_text()
        tokens.write_text(alice)
        assert status(ALICE) == 200
        # a line removed while a byte that is not UTF-8 came in (a Latin-1 comment): the reload
        # raised what it did not catch, its stamp already taken, and the revoked token worked on
        tokens.write_text(alice + f"ivan:{token_hash(IVAN)}:incident-responder\n")
        assert status(IVAN) == 200
        tokens.write_bytes(alice.encode() + b"# ivan revoked (d\xe9part)\n")
        assert [status(IVAN) for _ in range(3)] == [401] * 3 and status(ALICE) == 401
        assert "not UTF-8" in log.read_text()
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(15)
