"""The CLI's human-readable output of tag values, ids and stored free text (the real command, as
a subprocess): a newline in such a string cannot forge a line, and no escape sequence in it
reaches the terminal (OSC 52 writes the clipboard, CSI moves the cursor and hides text); each is
shown visibly escaped. ``--json`` output is JSON's own escaping, unchanged."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.agentproc import BIN

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ordering"
# a value of a dimension with no `allowed:` list: any text (the reviewer's tag)
EVIL = "<!--<script>\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\rordering\ngrp\x9b31m\u2028x"
EVIL_ID = "i-0evil1\x1b]52;c;AA\x07\nforged"  # an offline inventory's id is any text
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # anything but the line ends of the output itself


def rf(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(BIN / "ringfence"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return proc


def open_estate(tmp_path: Path) -> tuple[Path, Path]:
    """The example policy with `app` left open (no allowed list) and its inventory plus one
    instance whose app tag is EVIL (its Name too)."""
    pol = tmp_path / "policy"
    shutil.copytree(EXAMPLE / "policy", pol)
    labels = (pol / "labels.yaml").read_text()
    opened = re.sub(r"\n\s*allowed: \[ordering, payroll, core, admin\]\n\s*privileged: \[admin\]", "", labels)
    assert opened != labels
    (pol / "labels.yaml").write_text(opened)
    inv = yaml.safe_load((EXAMPLE / "inventory.yaml").read_text())
    inv["workloads"].append(
        {
            "id": EVIL_ID,
            "ips": ["10.1.1.77"],
            "cloud": "aws",
            "region": "ca-central-1",
            "name": EVIL,
            "tags": {"Name": EVIL, "ringfence:app": EVIL, "ringfence:env": "prod", "ringfence:role": "web"},
        }
    )
    path = tmp_path / "inventory.json"
    path.write_text(json.dumps(inv))
    return pol, path


def test_attack_tag_values_in_inventory_and_connectivity_text_are_escaped(tmp_path: Path) -> None:
    pol, inv = open_estate(tmp_path)
    out = rf("inventory", "--policy", str(pol), "--inventory", str(inv)).stdout
    assert not RAW.search(out), repr(out)
    (evil,) = [x for x in out.splitlines() if "i-0evil1" in x]  # one line, whole
    # label values are lower-cased
    assert "app=<!--<script>\\x1b[2j\\x1b]52;c;cm0glxjmih4=\\x07\\rordering\\ngrp\\x9b31m\\u2028x" in evil
    assert len(out.splitlines()) == len(json.loads(inv.read_text())["workloads"])  # nothing forged
    for extra in ([], ["--workloads"]):
        text = rf("connectivity", "--policy", str(pol), "--inventory", str(inv), *extra).stdout
        assert not RAW.search(text), repr(text)
        # the group of i-0evil1 (its app) or its id, escaped
        assert ("i-0evil1\\x1b]52;c;AA\\x07\\nforged" if extra else "\\x1b]52;c;") in text
    data = rf("connectivity", "--policy", str(pol), "--inventory", str(inv), "--json").stdout
    assert not RAW.search(data) and "\\u001b]52;c;" in data  # --json: JSON's escapes, as before


def test_attack_policy_version_message_and_author_stay_on_their_line(tmp_path: Path) -> None:
    """A version's message and author are stored as given (the CLI's own store): `policy
    versions` and `audit list` show each version on one line."""
    store = tmp_path / "store"
    forged = "ok\n   2  2026-12-06T23:00:00Z  ciso             approved\x1b]52;c;Y3VybCBldmls\x07\x1b[8m"
    rf(
        "policy", "provision", str(EXAMPLE / "policy"), "--inventory", str(EXAMPLE / "inventory.yaml"),
        "--store", str(store), "--message", forged, "--author", "eve\rciso",
    )  # fmt: skip
    out = rf("policy", "versions", "--store", str(store)).stdout
    assert not RAW.search(out), repr(out)
    assert len(out.splitlines()) == 1 and "eve\\rciso" in out and "ok\\n   2" in out and "\\x1b]52" in out
    audit = rf("audit", "list", "--store", str(store)).stdout
    records = rf("audit", "list", "--store", str(store), "--json").stdout.splitlines()
    assert not RAW.search(audit), repr(audit)
    assert len(audit.splitlines()) == len(records) and "ok\\n" in audit
    assert forged in [json.loads(r).get("reason") for r in records]  # --json: as stored, JSON-escaped
