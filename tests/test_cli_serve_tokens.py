"""The admin tokens file as ``ringfence serve-token`` appends to it and ``ringfence serve`` reads it:
a hand-written last line without its newline never runs two entries together."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ringfence.serve import AdminTokens, token_hash
from tests.test_cli import BIN, rf

ALICE = "alice-secret-token-0123456789"


def test_serve_token_appends_on_a_line_of_its_own(tmp_path: Path) -> None:
    tokens = tmp_path / "admin-tokens"
    tokens.write_text(f"alice:{token_hash(ALICE)}:policy-author")  # no newline at the end
    bob = rf("serve-token", "bob", "--role", "reader", "--file", str(tokens)).stdout.splitlines()[-1]
    assert tokens.read_text().count("\n") == 2
    loaded = AdminTokens.load(tokens)
    assert loaded.principal(f"Bearer {ALICE}") == "alice"
    assert loaded.principal(f"Bearer {bob}") == "bob"
    # and on a file that does end in a newline, no blank line is added
    rf("serve-token", "carol", "--role", "reader", "--file", str(tokens))
    assert "\n\n" not in tokens.read_text()


def test_serve_refuses_a_line_where_two_entries_ran_together(tmp_path: Path) -> None:
    tokens = tmp_path / "admin-tokens"
    merged = f"alice:{token_hash(ALICE)}:policy-authorbob:{token_hash('bob-token')}:reader\n"
    tokens.write_text("# tokens\n" + merged)  # what serve-token appended to a line without its newline
    proc = subprocess.run(
        [str(BIN), "serve", "--port", "0", "--store", f"sqlite:{tmp_path / 'state.db'}", "--admin-tokens", str(tokens)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{tokens}:2: the principal 'alice' runs into another entry" in proc.stderr
