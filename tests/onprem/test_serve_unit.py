"""The systemd unit shipped for the control plane (``infra/onprem/ringfence-serve.service``): one
systemd accepts, whose command line the real CLI takes, and whose capability bounding set and
no-new-privileges are enough for ``serve --user`` and no more than it needs: the real CLI runs
under exactly them (``setpriv``, as systemd would start it), its signer signs, and it ends up as
the user."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from ringfence.cli import build_parser
from tests.agentproc import BIN
from tests.conftest import ROOT
from tests.onprem.conftest import ESTATE, policy_files
from tests.onprem.serveproc import Server
from tests.onprem.test_serve_signer import USER, key_in, python_for_other_users, state_dir, uids, wait_until
from tests.systemdunit import service, setpriv, verify

UNIT = ROOT / "infra" / "onprem" / "ringfence-serve.service"
__all__ = ["state_dir"]  # the fixture, used by name


def test_the_serve_unit_is_one_systemd_accepts_and_its_command_the_cli_takes(tmp_path: Path) -> None:
    exec_start = shlex.split(service(UNIT)["ExecStart"])
    assert exec_start[0].endswith("/ringfence") and exec_start[1] == "serve"
    args = build_parser().parse_args(exec_start[1:])
    assert args.user == "ringfence" and args.signing_key and args.store.startswith("sqlite:/var/lib/ringfence/")
    assert Path(args.signing_key).parent != Path(args.store.removeprefix("sqlite:")).parent
    verify(UNIT, BIN / "ringfence", tmp_path)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.slow
def test_serve_user_runs_within_the_units_capabilities_and_says_which_are_missing(
    tmp_path: Path, state_dir: Path
) -> None:
    capabilities = service(UNIT)["CapabilityBoundingSet"].split()
    assert service(UNIT)["NoNewPrivileges"] == "yes"
    path, key = key_in(tmp_path / "signer")
    (tmp_path / "root").mkdir()
    launcher = python_for_other_users(tmp_path / "root")
    db = state_dir / "state" / "state.db"  # missing: serve makes it for the user (CAP_CHOWN)
    server = Server(tmp_path, db=db, extra=["--user", USER, "--signing-key", str(path)])
    server.launcher = [*launcher, *setpriv(capabilities)]
    for policy in ("v1", "v2"):  # the first start makes the state directory, the second finds it (a restart)
        server.start()
        assert server.proc is not None
        try:
            for spec in ESTATE:
                assert server.admin("POST", "/admin/workloads", {**spec, "reason": "rack 1"}).status_code in (200, 201)
            files = {**policy_files(), "note.yaml": f"# {policy}\n"}
            assert server.admin("POST", "/admin/policies", {"files": files, "reason": policy}).status_code == 201
            wait_until(lambda: server.log.read_text().count("signer: signed") >= 1, 30, "a bundle signed", server.log)
            assert uids(server.proc.pid) == {pwd.getpwnam(USER).pw_uid}
            assert db.parent.stat().st_uid == pwd.getpwnam(USER).pw_uid
            assert key.key_id in server.log.read_text()
        finally:
            server.proc.terminate()
            server.proc.wait(15)
        server.log.write_text("")

    def start(capabilities: list[str]) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / "ringfence"), "serve", "--port", "0", "--store", f"sqlite:{db}", "--user", USER]
        cmd += ["--signing-key", str(path)]
        return subprocess.run([*launcher, *setpriv(capabilities), *cmd], capture_output=True, text=True, timeout=60)

    # without CAP_SETUID serve cannot become the user: it says so, and answers nothing as root
    out = start([c for c in capabilities if c != "CAP_SETUID"])
    assert out.returncode != 0 and "needs CAP_SETUID" in out.stderr, out.stderr
    assert "listening" not in out.stdout
    # a key copied into the user's state directory, which root so bounded cannot look into: found as the user
    (db.parent / "signing-key.pem").write_bytes(path.read_bytes())
    out = start(capabilities)
    assert out.returncode != 0 and "move it (do not copy it)" in out.stderr, out.stderr
    assert "listening" not in out.stdout
