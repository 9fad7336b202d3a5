"""Issue 10, control plane: the agent is installed from the stack's hash-pinned artifact, never
by ``pip install ringfence`` from a public index as root (the name is not ours).

The real build (``agent/packaging/build_artifact.py``, ``make agent-artifact``) and the real
artifact part of ``agent/packaging/install.sh``, run into a fresh venv in a temp dir."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALLER = ROOT / "agent" / "packaging" / "install.sh"


def install(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The installer's artifact steps alone (no root, no systemd): fetched or copied, its digest
    checked, then installed into ``tmp_path/venv``."""
    text = INSTALLER.read_text()
    blocks = "".join(
        "#" + text.split(f"# --- {step}", 1)[1].split(f"# --- end {step}", 1)[0] for step in ("artifact", "install")
    )
    assigns = "".join(f"{k}='{v}'\n" for k, v in env.items())
    script = f"set -eu\nARTIFACT_URL=''\nARTIFACT_FILE=''\nPREFIX='{tmp_path / 'venv'}'\n{assigns}{blocks}"
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=300)


def test_the_artifact_installs_offline_into_a_fresh_venv_and_runs(artifact: tuple[Path, str], tmp_path: Path) -> None:
    wheel, digest = artifact
    out = install(tmp_path, ARTIFACT_FILE=str(wheel), ARTIFACT_SHA256=digest)
    assert out.returncode == 0, out.stderr
    venv = tmp_path / "venv"
    run = subprocess.run([str(venv / "bin/ringfence-agent"), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "apply" in run.stdout, run.stderr
    # the agent alone: none of the control plane, none of its dependencies
    probe = (
        "import importlib.util as u; "
        "print([m for m in ('pydantic', 'boto3', 'yaml', 'ringfence.model', 'ringfence.cli', 'ringfence.engine') "
        "if u.find_spec(m)])"
    )
    found = subprocess.run([str(venv / "bin/python"), "-c", probe], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def test_the_artifact_build_is_reproducible(artifact: tuple[Path, str], tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "agent/packaging/build_artifact.py"), str(tmp_path)], check=True)
    (again,) = tmp_path.glob("*.sha256")
    assert again.read_text().split()[0] == artifact[1]


BUILD = ROOT / "agent/packaging/build_artifact.py"


def test_the_same_source_built_under_two_umasks_gives_the_same_bytes(tmp_path: Path) -> None:
    """Review r6-store finding 5: a checkout made under umask 002 has group-writable files, and the
    wheel records modes: it must still be the same bytes under the same name (publish-agent
    refuses other bytes under a published name)."""
    src = tmp_path / "src"
    for part in ("agent/ringfence_agent", "layers/core/ringfence"):
        (src / part).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-r", str(ROOT / part), str(src / part)], check=True)
    (src / "agent/packaging").mkdir()
    subprocess.run(["cp", str(BUILD), str(src / "agent/packaging/build_artifact.py")], check=True)
    build = src / "agent/packaging/build_artifact.py"
    built = {}
    for umask, chmod in (("022", "g-w"), ("002", "g+w")):
        out = tmp_path / f"out-{umask}"
        script = f"umask {umask}; find {src} -type f -exec chmod {chmod} {{}} +; {sys.executable} {build} {out}"
        subprocess.run(["sh", "-c", script], check=True, stdout=subprocess.DEVNULL)
        (wheel,) = out.glob("*.whl")
        built[umask] = (wheel.name, wheel.read_bytes())
    assert built["022"][0] == built["002"][0]
    assert built["022"][1] == built["002"][1]


def test_attack_tampered_artifact_is_refused_and_nothing_installed(artifact: tuple[Path, str], tmp_path: Path) -> None:
    wheel, digest = artifact
    evil = tmp_path / "evil" / wheel.name  # same name, one byte changed
    evil.parent.mkdir()
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01
    evil.write_bytes(bytes(data))
    out = install(tmp_path, ARTIFACT_FILE=str(evil), ARTIFACT_SHA256=digest)
    assert out.returncode == 3 and f"not {digest}: refused, nothing installed" in out.stderr, out.stderr
    assert not (tmp_path / "venv").exists()


def test_attack_artifact_without_its_digest_or_over_plain_http_is_refused(
    artifact: tuple[Path, str], tmp_path: Path
) -> None:
    wheel, digest = artifact
    out = install(tmp_path, ARTIFACT_FILE=str(wheel), ARTIFACT_SHA256="")
    assert out.returncode == 2 and "--artifact-sha256" in out.stderr
    out = install(tmp_path, ARTIFACT_URL=f"http://127.0.0.1:9/{wheel.name}", ARTIFACT_SHA256=digest)
    assert out.returncode == 2 and "must be https://" in out.stderr
    assert not (tmp_path / "venv").exists()


def test_nothing_tells_anyone_to_pip_install_ringfence_from_an_index() -> None:
    """Installers, user data and docs: the agent comes from the artifact, the control plane from
    a checkout or a pinned file, never by the bare name."""
    bare = re.compile(r"pip3? install\b[^\n]*?(?<![\w/@.-])ringfence(?:\[[^\]]*\])?(?=\s|$|\")")
    places = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "agent/packaging").iterdir()]
    places += [p for p in (ROOT / "infra").rglob("*") if p.is_file()] + [
        p for p in (ROOT / "examples").rglob("*") if p.is_file()
    ]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in places for m in bare.finditer(p.read_text(errors="ignore"))]
    assert hits == []
