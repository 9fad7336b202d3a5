"""Build the agent artifact: a wheel of ``ringfence_agent`` alone, with none of the control plane.

    python agent/packaging/build_artifact.py [OUT_DIR]     (make agent-artifact; default build/agent)

The wheel (distribution ``ringfence-agent``) holds the ``ringfence_agent`` package and the five
wire modules it shares with the control plane (``ringfence.enums``, ``agentwire``,
``bundlewire``, ``failsafewire``, ``staticlayout``: standard library only) and declares no dependencies, so it
installs with ``pip install --no-index --no-deps`` into an empty venv: no package index is
consulted, and nobody's package called ``ringfence`` on a public index is ever installed as root.
The agent's config is JSON (``/etc/ringfence/agent.json``, what install.sh writes); YAML configs
need PyYAML beside it. Signatures are checked with the system's libcrypto (``cryptography`` is
only a fallback).

Beside the wheel it writes ``<wheel>.sha256`` (``sha256sum -c`` format): install.sh refuses an
artifact whose digest is not the one it was given. Builds are reproducible: fixed
``SOURCE_DATE_EPOCH`` and file times, file modes normalised (0644, 0755 for executables) and the
build run under umask 022 (the wheel records modes), so the same source built with the same
setuptools and wheel gives the same bytes on any machine and under any umask or checkout.
The setuptools and wheel versions are part of the name (they change the bytes: the wheel records
the generator), so other build tooling gives another name rather than other bytes under one.

The version is ``<__version__>+<12 hex of the source's SHA-256>`` (a PEP 440 local label), so the
wheel's file name changes whenever its content does: a host pinned to an earlier digest keeps
finding its wheel under its own name after a newer one is published (``publish-agent`` refuses to
put other bytes under a name it has already published), and ``ringfence-agent status`` names the
build that runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WIRE_MODULES = (
    "__init__.py",
    "enums.py",
    "agentwire.py",
    "bundlewire.py",
    "enforced.py",
    "failsafewire.py",
    "staticlayout.py",
)
EPOCH = "315532800"  # 1980-01-01, the earliest a zip can say: same bytes from the same source

PYPROJECT = """\
[build-system]
requires = ["setuptools>=77", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "ringfence-agent"
version = "{version}"
description = "The Ringfence in-VM agent: verifies signed bundles and programs the host firewall."
requires-python = ">=3.11"
license = "Apache-2.0"
dependencies = []

[project.optional-dependencies]
yaml = ["pyyaml>=6.0"]
cryptography = ["cryptography>=42"]

[project.scripts]
ringfence-agent = "ringfence_agent.cli:main"

[tool.setuptools.packages.find]
include = ["ringfence", "ringfence_agent*"]

[tool.setuptools.package-data]
ringfence_agent = ["py.typed"]
"""


def release() -> str:
    for line in (ROOT / "layers/core/ringfence/__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise SystemExit("no __version__ in layers/core/ringfence/__init__.py")


def source_id(src: Path) -> str:
    """12 hex of the SHA-256 over the build tree (paths, modes and bytes, sorted) and the build
    tooling's versions: another source or tooling, another name."""
    h = hashlib.sha256()
    # the build runs with this interpreter's setuptools and wheel (--no-build-isolation)
    h.update(f"setuptools=={metadata.version('setuptools')} wheel=={metadata.version('wheel')}\0".encode())
    for p in sorted(q for q in src.rglob("*") if q.is_file()):
        h.update(p.relative_to(src).as_posix().encode() + b"\0")
        h.update(oct(stat.S_IMODE(p.stat().st_mode)).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:12]


def version(src: Path) -> str:
    return f"{release()}+{source_id(src)}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def normalise(src: Path) -> None:
    """Make what ends up in the zip besides the bytes the same everywhere: the wheel records each
    file's mode (a checkout under umask 002 has group-writable files) and time."""
    for p in src.rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
        else:
            p.chmod(0o755 if p.stat().st_mode & 0o111 else 0o644)
        os.utime(p, (int(EPOCH), int(EPOCH)))


def build(out: Path) -> Path:
    """Build the wheel into ``out``; returns its path (its ``.sha256`` beside it)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rf-agent-build-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(
            ROOT / "agent/ringfence_agent", src / "ringfence_agent", ignore=shutil.ignore_patterns("__pycache__")
        )
        (src / "ringfence").mkdir()
        for name in WIRE_MODULES:
            shutil.copy2(ROOT / "layers/core/ringfence" / name, src / "ringfence" / name)
        # the template itself is part of the source (its version line left as a placeholder)
        (src / "pyproject.toml").write_text(PYPROJECT)
        normalise(src)
        (src / "pyproject.toml").write_text(PYPROJECT.format(version=version(src)))
        normalise(src)
        env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "PIP_NO_INDEX": "1"}
        # the files setuptools writes (METADATA, RECORD, ...) get the umask's modes, recorded too
        old_umask = os.umask(0o022)
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp, str(src)],
                check=True,
                env=env,
                cwd=tmp,
            )
        finally:
            os.umask(old_umask)
        (wheel,) = Path(tmp).glob("ringfence_agent-*.whl")
        target = out / wheel.name
        shutil.copy2(wheel, target)
    (out / f"{target.name}.sha256").write_text(f"{sha256(target)}  {target.name}\n")
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    wheel = build(Path(args[0]) if args else ROOT / "build/agent")
    print(f"{wheel}\nsha256 {sha256(wheel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
