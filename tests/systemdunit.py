"""Shipped systemd units, read and started as systemd would start them, for tests that run the
real programs under a unit's limits (tests/onprem/test_serve_unit.py, tests/agent/test_agent_unit_caps.py)."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest


def service(unit: Path) -> configparser.SectionProxy:
    """The unit's [Service] section."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(unit.read_text())
    return parser["Service"]


def setpriv(capabilities: list[str]) -> list[str]:
    """A command prefix starting a program as systemd starts the unit: root, bounded to
    ``capabilities`` (``CAP_…`` names), with no new privileges."""
    bounds = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in capabilities)])
    return ["setpriv", f"--bounding-set={bounds}", "--no-new-privs"]


def verify(unit: Path, program: Path, scratch: Path) -> None:
    """``systemd-analyze verify`` accepts the unit without a word, its command pointed at
    ``program`` (systemd checks that the command exists)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    local = scratch / unit.name
    local.write_text(unit.read_text().replace(shlex.split(service(unit)["ExecStart"])[0], str(program)))
    out = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
