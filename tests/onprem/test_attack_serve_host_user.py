"""A local user on the host running ``ringfence serve --user``: the user serve drops to (whoever
takes over the serving process is that user) and the files root's other commands write there.
Against the real CLI started as root; the attacker's steps are that user's own processes."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ringfence.serve import token_hash
from tests.agentproc import BIN
from tests.onprem.test_serve_signer import key_in, python_for_other_users

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="serve --user and another user's files need root")
USER = "nobody"
ALICE = "alice-token-0123456789abcdef"
MALLORY = "attacker-secret-token-0123456789abcdef"


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER!r} here")


@pytest.fixture
def shared() -> Iterator[Path]:
    """A root-owned directory USER can reach (pytest's own temporary directories are root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="rf-serveuser-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


def as_user(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by the system's Python as USER (stdlib only)."""
    return subprocess.run(
        ["runuser", "-u", USER, "--", "/usr/bin/python3", "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


class ServeUser:
    """``ringfence serve --user USER --admin-tokens TOKENS`` started as root; ``url`` once it listens."""

    def __init__(self, tmp_path: Path, shared: Path, tokens: Path) -> None:
        key, _ = key_in(tmp_path / "signer")
        (tmp_path / "root").mkdir()
        self.log = tmp_path / "serve.log"
        cmd = [
            *python_for_other_users(tmp_path / "root"),
            str(BIN / "ringfence"),
            "serve",
            "--port",
            "0",
            "--store",
            f"sqlite:{shared / 'state' / 'state.db'}",
            "--user",
            USER,
            "--signing-key",
            str(key),
            "--admin-tokens",
            str(tokens),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log.open("w"), text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.url = line.split("listening on ", 1)[1].split()[0] if "listening on " in line else None

    def status(self, token: str) -> int:
        return httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.log.read_text()


def tokens_in(shared: Path, uid: int, gid: int, mode: int) -> Path:
    d = shared / "etc"
    d.mkdir()
    tokens = d / "admin-tokens"
    tokens.write_text(f"alice:{token_hash(ALICE)}:reader\n")
    os.chown(tokens, uid, gid)
    tokens.chmod(mode)
    return tokens


# --- the tokens file and the --user user ----------------------------------------------------------------


def test_attack_serve_user_refuses_a_tokens_file_the_user_it_drops_to_owns(tmp_path: Path, shared: Path) -> None:
    """The tokens file is the --user user's (handed over "so that serve can read it"): whoever
    takes over serve, running as that user, could add an admin token of their own for the next
    read. serve does not start, naming the file and why."""
    pw = nobody()
    tokens = tokens_in(shared, pw.pw_uid, pw.pw_gid, 0o600)
    server = ServeUser(tmp_path, shared, tokens)
    log = server.stop()
    assert server.url is None, f"serve started on {server.url}"
    assert server.proc.returncode != 0
    assert f"--admin-tokens {tokens}: refused: {tokens} is owned by uid {pw.pw_uid}, the --user user" in log, log
    assert "Traceback" not in log


def test_attack_serve_user_refuses_every_admin_token_once_the_user_owns_the_tokens_file(
    tmp_path: Path, shared: Path
) -> None:
    """serve --user started on root's file (root:USER's group, 640: the serving user reads each
    change, so a revocation needs no restart). Later root hands the file to the user (to "let
    serve read it"), and the user (serve taken over) appends a token of their own: at the next
    admin request serve reads it again and refuses every admin token, theirs too, until the file
    is root's again."""
    pw = nobody()
    tokens = tokens_in(shared, 0, pw.pw_gid, 0o640)
    server = ServeUser(tmp_path, shared, tokens)
    try:
        assert server.url is not None, server.stop()
        assert (server.status(ALICE), server.status(MALLORY)) == (200, 401)
        os.chown(tokens, pw.pw_uid, pw.pw_gid)
        added = as_user(
            "import sys; open(sys.argv[1], 'a').write(sys.argv[2])",
            str(tokens),
            f"mallory:{token_hash(MALLORY)}:policy-author,onboarding,incident-responder\n",
        )
        assert added.returncode == 0, added.stderr
        assert (server.status(ALICE), server.status(MALLORY)) == (401, 401)
        assert "the --user user serve drops to" in server.log.read_text()
        os.chown(tokens, 0, pw.pw_gid)  # root takes it back (and mallory's line stays out of use)
        tokens.write_text(f"alice:{token_hash(ALICE)}:reader\n")
        assert (server.status(ALICE), server.status(MALLORY)) == (200, 401)
    finally:
        log = server.stop()
    assert "Traceback" not in log


# --- --out FILE -------------------------------------------------------------------------------------------


def test_attack_out_file_replaces_a_link_planted_at_its_name_never_writes_through_it(shared: Path) -> None:
    """Root writes ``ringfence policy schema --out FILE`` into a directory USER owns (a web root, a
    shared output directory); USER planted a link at FILE to a root-only file. The command
    replaces the link with its output and leaves the root-only file as it was."""
    pw = nobody()
    victim = shared / "victim"
    victim.write_text("precious root-only content\n")
    victim.chmod(0o600)
    out = shared / "theirs"
    out.mkdir()
    os.chown(out, pw.pw_uid, pw.pw_gid)
    planted = as_user("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(victim), str(out / "schema.json"))
    assert planted.returncode == 0, planted.stderr
    proc = subprocess.run(
        [str(BIN / "ringfence"), "policy", "schema", "--out", str(out / "schema.json")],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious root-only content\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    st = (out / "schema.json").lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644
    assert '"$schema"' in (out / "schema.json").read_text()


# --- keygen --out DIR -------------------------------------------------------------------------------------


def keygen(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ringfence"), "keygen", "--out", str(out)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("case", "owner", "mode", "says"),
    [
        ("writable by all", "root", 0o777, "writable by group or others (mode 777)"),
        ("writable by its group", "root", 0o775, "writable by group or others (mode 775)"),
        ("another user's", USER, 0o700, "owned by uid"),
    ],
)
def test_attack_keygen_refuses_an_out_directory_another_user_owns_or_may_write(
    shared: Path, case: str, owner: str, mode: int, says: str
) -> None:
    """root runs ``keygen --out DIR`` on an existing DIR that USER owns or may write: USER could
    swap the new private key for one of theirs before serve loads it, or had planted a link at its
    name. keygen refuses, naming DIR and why, and writes no key there."""
    pw = nobody()
    out = shared / "keys"
    out.mkdir()
    out.chmod(mode)
    if owner == USER:
        os.chown(out, pw.pw_uid, pw.pw_gid)
    proc = keygen(out)
    assert proc.returncode != 0, case
    assert f"--out {out}: " in proc.stderr and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


def test_keygen_takes_others_bits_off_an_out_directory_they_may_only_read(shared: Path) -> None:
    out = shared / "keys"
    out.mkdir()
    out.chmod(0o755)
    proc = keygen(out)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert "now mode 750" in proc.stderr
    assert stat.S_IMODE((out / "bundle-signing.pem").stat().st_mode) == 0o600


# --- publish-agent, then serve --user (docs/onprem.md, docs/serve.md) -------------------------------------


def publish_agent(state: Path, wheels: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ringfence"), "publish-agent", "--store", f"sqlite:{state / 'state.db'}", "--dir", str(wheels)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_publish_agent_as_root_then_serve_user_serves_the_artifact(tmp_path: Path, shared: Path) -> None:
    """The documented order: the state directory made for the user (``install -d -o NAME -m
    750``), ``publish-agent`` run as root, then ``serve --user`` started, and ``publish-agent``
    again (an upgrade) while it runs. What publish-agent writes is the state directory owner's,
    so the served user reads it: both builds are served, byte for byte."""
    pw = nobody()
    state, wheels = shared / "state", shared / "wheels"
    state.mkdir(mode=0o750)
    os.chown(state, pw.pw_uid, pw.pw_gid)
    wheels.mkdir()
    first = wheels / "ringfence_agent-9.9.1-py3-none-any.whl"
    first.write_bytes(b"PK the first build\n")
    done = publish_agent(state, wheels)
    assert done.returncode == 0, done.stderr
    for p in (state / "objects", *(state / "objects").rglob("*")):
        assert p.stat().st_uid == pw.pw_uid, p  # the served user's, not root's
    installer = done.stdout.split("installer /v1/agent/")[1].split()[0]

    tokens = tokens_in(shared, 0, 0, 0o600)
    server = ServeUser(tmp_path, shared, tokens)
    try:
        assert server.url is not None, server.stop()
        got = httpx.get(f"{server.url}/v1/agent/{first.name}", timeout=30)
        assert (got.status_code, got.content) == (200, b"PK the first build\n")
        assert httpx.get(f"{server.url}/v1/agent/{installer}", timeout=30).status_code == 200
        first.unlink()
        second = wheels / "ringfence_agent-9.9.2-py3-none-any.whl"
        second.write_bytes(b"PK the second build\n")
        again = publish_agent(state, wheels)
        assert again.returncode == 0, again.stderr
        got = httpx.get(f"{server.url}/v1/agent/{second.name}", timeout=30)
        assert (got.status_code, got.content) == (200, b"PK the second build\n")
    finally:
        log = server.stop()
    assert "Traceback" not in log
