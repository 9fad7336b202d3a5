"""Run the real agent/packaging/install.sh (or a bootstrap that runs it) as root without touching
the host: a fresh mount and network namespace where /etc, /opt, /var/lib and /root are overlays
on a private tmpfs (what the installer writes vanishes with the namespace), and ``systemctl``
(and, when asked, ``apt-get``) are shims on PATH that log what they were asked into
``<scratch>/log``. The test's own temp dir stays the real one, so fixtures and results cross.
Nothing here changes a ruleset: the agent is never started (systemctl is the shim).

``python3`` is the interpreter the tests run on, started as a host starts it (its own binary, not
through a version manager's shell shim: pyenv's runs bash and its helpers on each of the
installer's python3 calls, up to nine a run) and the one whose ensurepip a test hides."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

OVERLAID = ("etc", "opt", "var/lib", "root")
# the tests' interpreter itself (a venv's base, as POSIX installs name it)
PYTHON = Path(sys.base_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")

SETUP = """set -e
ip link set lo up
mount -t tmpfs tmpfs "$RF_SB"
for d in {dirs}; do
  n=$(echo "$d" | tr / _); mkdir -p "$RF_SB/$n.up" "$RF_SB/$n.wk"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$RF_SB/$n.up,workdir=$RF_SB/$n.wk" "/$d"
done
set +e
exec sh -c "$RF_SCRIPT"
"""

SHIM = """#!/bin/sh
echo "$(basename "$0") $*" >> {log}
{extra}
exit 0
"""


def available() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (a private mount and network namespace)")


def run(
    script: str,
    scratch: Path,
    *,
    env: dict[str, str] | None = None,
    apt_get: str | None = None,
    systemctl: str = "",
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``script`` (sh) in a fresh sandbox; ``apt_get``: also shim apt-get, running this sh after
    logging; ``systemctl``: sh the systemctl shim runs after logging (its arguments in "$@")."""
    available()
    scratch.mkdir(parents=True, exist_ok=True)
    shims = scratch / "shim"
    shims.mkdir(exist_ok=True)
    log = scratch / "log"
    for name, extra in (("systemctl", systemctl), ("apt-get", apt_get)):
        if extra is None:
            continue
        (shims / name).write_text(SHIM.format(log=log, extra=extra))
        (shims / name).chmod(0o755)
    if PYTHON.is_file():
        (shims / "python3").write_text(f'#!/bin/sh\nexec {shlex.quote(str(PYTHON))} "$@"\n')
        (shims / "python3").chmod(0o755)
    (scratch / "sb").mkdir(exist_ok=True)
    full = {
        **os.environ,
        **(env or {}),
        "PATH": f"{shims}:{os.environ.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin",
        "RF_SB": str(scratch / "sb"),
        "RF_SCRIPT": script,
    }
    return subprocess.run(
        ["unshare", "-m", "-n", "--propagation", "private", "sh", "-c", SETUP.format(dirs=" ".join(OVERLAID))],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full,
    )


def asked(scratch: Path) -> list[str]:
    """What the shims were asked, in order."""
    log = scratch / "log"
    return log.read_text().splitlines() if log.exists() else []
