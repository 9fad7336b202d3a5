"""Shipped systemd units, read and started as systemd would start them, for tests that run the
real programs under a unit's limits (tests/onprem/test_serve_unit.py, tests/agent/test_agent_unit_caps.py)."""

from __future__ import annotations

import configparser
import contextlib
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence_agent.asowner import setpriv_command


def service(unit: Path) -> configparser.SectionProxy:
    """The unit's [Service] section."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(unit.read_text())
    return parser["Service"]


# The unit's User= does not exist on a test host: a uid and gid no account has stand in for it
STAND_IN_UID = STAND_IN_GID = 61_000
RESTRICTNS = Path(__file__).resolve().parent / "restrictns.py"


@contextlib.contextmanager
def reachable_dir(prefix: str) -> Iterator[Path]:
    """A scratch directory outside pytest's root-only temp tree (mode 0711), removed after: the
    unit's user must reach the bundles, keys, config and state the tests put in it."""
    made = Path(tempfile.mkdtemp(prefix=prefix))
    made.chmod(0o711)
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def setpriv(capabilities: list[str], user: tuple[int, int] | None = None) -> list[str]:
    """A command prefix starting a program as systemd starts the unit: bounded to
    ``capabilities`` (``CAP_…`` names), with no new privileges; as root, or with ``user``
    (uid, gid) as that user with no supplementary groups and ``capabilities`` raised as ambient
    ones (the unit's ``User=`` with ``AmbientCapabilities=``). The agent's own definition, which
    root's CLI uses to become a state directory's owner (agent/ringfence_agent/asowner.py)."""
    return setpriv_command(capabilities, user)


def unit_user(unit: Path) -> tuple[int, int] | None:
    """The (uid, gid) standing in for the unit's ``User=``/``Group=`` (None: it runs as root)."""
    section = service(unit)
    if section.get("User", "root") in ("root", "0"):
        return None
    return STAND_IN_UID, STAND_IN_GID


def restrict_namespaces(setting: str) -> list[str]:
    """A command prefix loading the seccomp filter of ``RestrictNamespaces=setting``
    (tests/restrictns.py), then executing the program."""
    return [sys.executable, str(RESTRICTNS), setting, "--"]


def as_the_unit(unit: Path) -> list[str]:
    """A command prefix starting a program as the unit starts it: its user (stand-in ids), its
    capabilities (bounding and ambient), no new privileges, its RestrictNamespaces= filter. The
    filter is loaded first, as root (inherited through setpriv's exec): setpriv executes the
    program while it still holds root's capabilities, so an interpreter under /root (pyenv) stays
    reachable, where /opt/ringfence-agent's is anyway."""
    section = service(unit)
    caps = section["CapabilityBoundingSet"].split()
    assert section.get("AmbientCapabilities", "").split() == caps or unit_user(unit) is None
    return [*restrict_namespaces(section.get("RestrictNamespaces", "no")), *setpriv(caps, unit_user(unit))]


def verify(unit: Path, program: Path, scratch: Path) -> None:
    """``systemd-analyze verify`` accepts the unit without a word, its command pointed at
    ``program`` (systemd checks that the command exists)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    local = scratch / unit.name
    local.write_text(unit.read_text().replace(shlex.split(service(unit)["ExecStart"])[0], str(program)))
    out = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
