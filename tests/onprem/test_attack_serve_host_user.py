"""A local user on the host running ``ringfence serve --user``: the user serve drops to (whoever
takes over the serving process is that user) and the files root's other commands write there.
Against the real CLI started as root; the attacker's steps are that user's own processes."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
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
# the address space root's commands get where a test plants something big: several times what they
# need (compile and publish-agent stay under 150 MB here), far below what an unbounded read takes
MEMORY_CAP = 400_000_000
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


def schema_out(out: Path) -> subprocess.CompletedProcess[str]:
    """root's ``ringfence policy schema --out OUT`` under umask 022."""
    return subprocess.run(
        [str(BIN / "ringfence"), "policy", "schema", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.umask(0o022),
    )


def test_attack_out_file_replaces_a_link_planted_at_its_name_never_writes_through_it(shared: Path) -> None:
    """Root writes ``ringfence policy schema --out FILE`` into a sticky directory anyone may write
    (as /tmp); USER planted a link at FILE to a root-only file. The command replaces the link with
    its output and leaves the root-only file as it was."""
    nobody()
    victim = shared / "victim"
    victim.write_text("precious root-only content\n")
    victim.chmod(0o600)
    out = shared / "sticky"
    out.mkdir()
    out.chmod(0o1777)
    planted = as_user("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(victim), str(out / "schema.json"))
    assert planted.returncode == 0, planted.stderr
    proc = schema_out(out / "schema.json")
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "precious root-only content\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    st = (out / "schema.json").lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644
    assert '"$schema"' in (out / "schema.json").read_text()


def test_attack_out_file_refuses_a_directory_on_its_path_another_user_owns(shared: Path) -> None:
    """FILE's directory is below one USER owns: USER swaps FILE's directory for a link to a
    root-only directory, so that root's ``--out`` would replace a same-named root-only file there.
    The command refuses, naming USER's directory; the root-only file is as it was."""
    pw = nobody()
    rootonly = shared / "rootonly"
    rootonly.mkdir(mode=0o700)
    victim = rootonly / "schema.json"
    victim.write_text("precious root-only content\n")
    victim.chmod(0o600)
    theirs = shared / "theirs"
    theirs.mkdir()
    os.chown(theirs, pw.pw_uid, pw.pw_gid)
    swapped = as_user("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(rootonly), str(theirs / "site"))
    assert swapped.returncode == 0, swapped.stderr
    proc = schema_out(theirs / "site" / "schema.json")
    assert proc.returncode != 0
    assert f"directory {theirs} must be owned by root" in proc.stderr and "nothing written" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert victim.read_text() == "precious root-only content\n"
    assert sorted(p.name for p in rootonly.iterdir()) == ["schema.json"]  # no temporary file left either


def test_attack_out_file_replacing_a_private_file_keeps_it_private(shared: Path) -> None:
    """Root's ``--out FILE`` over its own existing mode 600 file (under umask 022): the new content
    stays mode 600, never readable by USER."""
    nobody()
    private = shared / "private.json"
    private.write_text("x\n")
    private.chmod(0o600)
    proc = schema_out(private)
    assert proc.returncode == 0, proc.stderr
    assert '"$schema"' in private.read_text()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert as_user("import sys; open(sys.argv[1]).read()", str(private)).returncode != 0


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


def test_attack_keygen_out_link_neither_changes_nor_writes_its_target(shared: Path) -> None:
    """USER plants a link at the ``--out`` name root will use, in a sticky directory (as /tmp),
    pointing at a root-owned 755 directory (standing for /etc). keygen refuses the link: the
    target keeps mode 755 (USER can still read what is in it) and holds no key."""
    nobody()
    sticky = shared / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    etc = shared / "etc"
    etc.mkdir(mode=0o755)
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (etc / "passwd").chmod(0o644)
    planted = as_user("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(etc), str(sticky / "rf-keys"))
    assert planted.returncode == 0, planted.stderr
    proc = keygen(sticky / "rf-keys")
    assert proc.returncode != 0
    assert f"--out {sticky / 'rf-keys'}: a symbolic link: refused" in proc.stderr, proc.stderr
    assert stat.S_IMODE(etc.stat().st_mode) == 0o755
    assert sorted(p.name for p in etc.iterdir()) == ["passwd"]
    assert as_user("import sys; open(sys.argv[1]).read()", str(etc / "passwd")).returncode == 0


def test_attack_keygen_refuses_an_out_directory_inside_another_users_directory(shared: Path) -> None:
    """``--out DIR``: DIR is root's, mode 700, but the directory above is USER's, who could rename
    DIR away after keygen and put a directory with a key of theirs at its name for serve to load.
    keygen refuses, naming USER's directory, and writes no key."""
    pw = nobody()
    theirs = shared / "theirs"
    theirs.mkdir()
    os.chown(theirs, pw.pw_uid, pw.pw_gid)
    keys = theirs / "keys"
    keys.mkdir(mode=0o700)
    proc = keygen(keys)
    assert proc.returncode != 0
    assert f"directory {theirs} must be owned by root" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(keys.iterdir()) == []
    missing = keygen(theirs / "new" / "keys")  # nor is a missing DIR made inside USER's directory
    assert missing.returncode != 0 and f"directory {theirs} must be owned by root" in missing.stderr, missing.stderr
    assert not (theirs / "new").exists()


# --- publish-agent, then serve --user (docs/onprem.md, docs/serve.md) -------------------------------------


def publish_agent(state: Path, wheels: Path, limit_memory: bool = False) -> subprocess.CompletedProcess[str]:
    import resource

    def limits() -> None:
        if limit_memory:  # a runaway read fails here instead of hurting the host
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    return subprocess.run(
        [str(BIN / "ringfence"), "publish-agent", "--store", f"sqlite:{state / 'state.db'}", "--dir", str(wheels)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limits,
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


def test_attack_publish_agent_refuses_a_link_at_the_state_directory(shared: Path) -> None:
    """USER owns the directory above its state directory (``secure_state_dir`` allows that) and
    swaps the state directory for a link to a root-only directory: root's publish-agent, seeing a
    root-owned directory through the link, would write objects/agent/* there with root's rights.
    It refuses the link and writes nothing there."""
    pw = nobody()
    svc, wheels, rootonly = shared / "svc", shared / "wheels", shared / "rootonly"
    svc.mkdir()
    os.chown(svc, pw.pw_uid, pw.pw_gid)
    wheels.mkdir()
    (wheels / "ringfence_agent-9.9.1-py3-none-any.whl").write_bytes(b"PK a build\n")
    rootonly.mkdir(mode=0o700)
    planted = as_user("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(rootonly), str(svc / "state"))
    assert planted.returncode == 0, planted.stderr
    proc = publish_agent(svc / "state", wheels)
    assert proc.returncode != 0
    assert f"{svc / 'state'} is a symbolic link or not a directory: refused" in proc.stderr, proc.stderr
    assert list(rootonly.iterdir()) == []


def test_publish_agent_names_a_state_directory_its_owner_made_unwritable(shared: Path) -> None:
    """A state directory of USER's, mode 000: publish-agent, writing as USER, says what it could
    not write, without a traceback."""
    pw = nobody()
    state, wheels = shared / "state", shared / "wheels"
    state.mkdir()
    os.chown(state, pw.pw_uid, pw.pw_gid)
    state.chmod(0)
    wheels.mkdir()
    (wheels / "ringfence_agent-9.9.1-py3-none-any.whl").write_bytes(b"PK\n")
    proc = publish_agent(state, wheels)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert (
        f"{state / 'objects'}: Permission denied (written as its owner, uid {pw.pw_uid}): not published" in proc.stderr
    )


# --- review 4: modes kept, a missing state directory, made levels, a previous layout -----------------------


@pytest.mark.parametrize("mode", [0o666, 0o4777], ids=["666", "4777"])
def test_attack_out_file_keeps_no_mode_of_another_users_file_at_its_name(shared: Path, mode: int) -> None:
    """USER makes FILE first in a sticky directory (as /tmp), mode 666 (or setuid 4777), before
    root's ``--out FILE``: root's output is made under the umask (644), not at USER's mode, so USER
    cannot rewrite it afterwards."""
    nobody()
    sticky = shared / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    out = sticky / "schema.json"
    made = as_user(
        "import os, sys; os.umask(0); open(sys.argv[1], 'w').close(); os.chmod(sys.argv[1], int(sys.argv[2]))",
        str(out),
        str(mode),
    )
    assert made.returncode == 0, made.stderr
    proc = schema_out(out)
    assert proc.returncode == 0, proc.stderr
    st = out.lstat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)
    assert as_user("import sys; open(sys.argv[1], 'a').write('x')", str(out)).returncode != 0
    assert '"$schema"' in out.read_text()


def test_attack_out_file_over_a_hard_link_to_a_root_file_takes_not_its_mode(shared: Path) -> None:
    """USER hard-links a root file that is mode 666 (theirs to link: they may write it) at FILE's
    name in a sticky directory: root's ``--out FILE`` replaces the link (the root file keeps its
    content) and is made under the umask, not at the other file's 666."""
    nobody()
    sticky = shared / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    rootfile = shared / "rootfile"
    rootfile.write_text("root data\n")
    rootfile.chmod(0o666)
    out = sticky / "schema.json"
    linked = as_user("import os, sys; os.link(sys.argv[1], sys.argv[2])", str(rootfile), str(out))
    assert linked.returncode == 0, linked.stderr
    proc = schema_out(out)
    assert proc.returncode == 0, proc.stderr
    assert rootfile.read_text() == "root data\n"
    assert stat.S_IMODE(out.lstat().st_mode) == 0o644
    assert as_user("import sys; open(sys.argv[1], 'a').write('x')", str(out)).returncode != 0


def test_attack_publish_agent_refuses_to_make_a_state_directory_inside_another_users_directory(shared: Path) -> None:
    """The state directory is missing and the directory above is USER's: root's publish-agent
    would make it there as root (plain, root's rights) and USER could rename it away and plant a
    link to a root-only directory between root's writes. It refuses, naming USER's directory, and
    makes nothing."""
    pw = nobody()
    svc, wheels = shared / "svc", shared / "wheels"
    svc.mkdir()
    os.chown(svc, pw.pw_uid, pw.pw_gid)
    wheels.mkdir()
    (wheels / "ringfence_agent-9.9.1-py3-none-any.whl").write_bytes(b"PK a build\n")
    proc = publish_agent(svc / "state", wheels)
    assert proc.returncode != 0
    assert f"directory {svc} must be owned by root" in proc.stderr and "nothing published" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(svc.iterdir()) == []


# root's CLI with one hook: the first file written, the state directory is swapped for a link (what
# the reviewer's racing user did); prints what the root-only directory then holds
SWAP_DRIVER = """
import os, sys
from ringfence import cli, durable
state, rootonly = sys.argv[1], sys.argv[2]
real = durable._temporary_at
done = []
def swapping(*a, **k):
    if not done:
        done.append(1)
        os.rename(state, state + ".x")
        os.symlink(rootonly, state)
    return real(*a, **k)
durable._temporary_at = swapping
rc = cli.main(sys.argv[3:])
print("RC", rc, "ROOTONLY", sorted(os.listdir(rootonly)))
"""


def test_attack_publish_agent_writes_through_the_state_directory_it_checked(shared: Path) -> None:
    """root's own state directory (in root-only directories) is swapped for a link to another
    root-only directory after publish-agent's first write (deterministically, by a hook in root's
    process): every later write goes on through the directory descriptor publish-agent opened and
    checked, never by the path again, so nothing lands in the link's target."""
    nobody()
    base = shared / "base"
    base.mkdir(mode=0o700)
    state, wheels, rootonly = base / "state", shared / "wheels", shared / "rootonly"
    state.mkdir(mode=0o700)
    rootonly.mkdir(mode=0o700)
    wheels.mkdir()
    (wheels / "ringfence_agent-9.9.1-py3-none-any.whl").write_bytes(b"PK a build\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SWAP_DRIVER,
            str(state),
            str(rootonly),
            "publish-agent",
            "--store",
            f"sqlite:{state / 'state.db'}",
            "--dir",
            str(wheels),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "RC 0 ROOTONLY []" in proc.stdout, proc.stdout + proc.stderr
    assert list(rootonly.iterdir()) == []
    written = sorted(p.name for p in (base / "state.x" / "objects" / "agent").iterdir())
    assert any(n.endswith(".whl") for n in written), written


# root's keygen with one hook: a link to a root-only directory appears at the first missing level's
# name just before keygen makes it (what the reviewer's racing user did in a sticky directory)
MKDIR_DRIVER = """
import os, sys
from ringfence import cli
level, rootonly, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
real = os.mkdir
done = []
def racing(path, *a, **k):
    if not done:
        done.append(1)
        os.symlink(rootonly, level)
        os.lchown(level, uid, uid)
    return real(path, *a, **k)
os.mkdir = racing
try:
    rc = cli.main(sys.argv[4:])
except SystemExit as exc:
    rc = exc.code
print("RC", rc, "ROOTONLY", sorted(os.listdir(rootonly)))
"""


def test_attack_keygen_makes_no_directory_through_a_link_raced_in_at_a_missing_level(shared: Path) -> None:
    """``keygen --out STICKY/a/b/keys`` with ``a`` missing in a sticky directory: USER puts a link
    at ``a`` (to a root-only directory) just before keygen makes it (forced by a hook in root's
    process). keygen refuses the link and makes nothing in its target."""
    pw = nobody()
    sticky, rootonly = shared / "tmp", shared / "rootonly"
    sticky.mkdir()
    sticky.chmod(0o1777)
    rootonly.mkdir(mode=0o700)
    out = sticky / "a" / "b" / "keys"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            MKDIR_DRIVER,
            str(sticky / "a"),
            str(rootonly),
            str(pw.pw_uid),
            "keygen",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ROOTONLY []" in proc.stdout, proc.stdout + proc.stderr
    assert "RC 0" not in proc.stdout
    assert f"{sticky / 'a'} is a symbolic link or not a directory: refused" in proc.stderr, proc.stderr
    assert list(rootonly.iterdir()) == []


def compile_out(site: Path, limit_memory: bool = False) -> subprocess.CompletedProcess[str]:
    """root's ``ringfence compile --out SITE`` of the ordering example (unsigned)."""
    import resource

    def limits() -> None:
        if limit_memory:  # a runaway read fails here instead of hurting the host
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    example = Path(__file__).resolve().parents[2] / "examples" / "ordering"
    return subprocess.run(
        [
            str(BIN / "ringfence"),
            "compile",
            "--policy",
            str(example / "policy"),
            "--inventory",
            str(example / "inventory.yaml"),
            "--out",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        preexec_fn=limits,
    )


@pytest.mark.parametrize("plant", ["fifo", "link to /dev/zero", "oversized file"])
def test_attack_compile_out_reads_no_fifo_device_or_huge_file_another_user_planted(shared: Path, plant: str) -> None:
    """``compile --out SITE``, SITE the web server account's (USER here): root reads the previous
    layout back. USER plants a FIFO (the read would block forever), a link to /dev/zero (read until
    memory runs out) or a 17 MiB sparse file of theirs. compile skips it, naming it, and finishes."""
    pw = nobody()
    site = shared / "site"
    site.mkdir()
    first = compile_out(site)
    assert first.returncode == 0, first.stderr
    subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(site)], check=True)
    # at a workload's own name: the only files read back
    target = site / ("bundles" if plant == "fifo" else "heads") / "ord-prod-lb-1.json"
    script = (
        "import os, sys; os.unlink(sys.argv[1]); "
        + {
            "fifo": "os.mkfifo(sys.argv[1])",
            "link to /dev/zero": "os.symlink('/dev/zero', sys.argv[1])",
            "oversized file": "f = open(sys.argv[1], 'wb'); f.truncate(17 * 1024 * 1024)",
        }[plant]
    )
    planted = as_user(script, str(target))
    assert planted.returncode == 0, planted.stderr
    try:
        proc = compile_out(site, limit_memory=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"compile blocked on the planted {plant}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    why = {"fifo": "not a regular file", "link to /dev/zero": "a symbolic link", "oversized file": "over 16777216"}
    assert f"ignoring {target}: " in proc.stderr and why[plant] in proc.stderr, proc.stderr[-2000:]


# --- review 5: what root reads back is bounded by what it would write ------------------------------------


def test_attack_publish_agent_reads_no_more_of_a_file_planted_at_the_installers_name_than_it_would_write(
    shared: Path,
) -> None:
    """USER, owning the state directory (``install -d -o NAME -m 750``), plants a 4 GiB sparse file
    at the installer's predictable name (``objects/agent/install-<16 hex of its SHA-256>.sh``).
    root's publish-agent finds the name taken and compares: it reads no more than its own
    installer's size (under a 400 MB address-space cap), refuses the other bytes, and leaves them."""
    import hashlib

    pw = nobody()
    svc, wheels = shared / "svc", shared / "wheels"
    svc.mkdir()
    state = svc / "state"
    state.mkdir(mode=0o750)
    os.chown(state, pw.pw_uid, pw.pw_gid)
    wheels.mkdir()
    (wheels / "ringfence_agent-9.9.1-py3-none-any.whl").write_bytes(b"PK a build\n")
    installer = Path(__file__).resolve().parents[2] / "agent" / "packaging" / "install.sh"
    name = f"install-{hashlib.sha256(installer.read_bytes()).hexdigest()[:16]}.sh"
    planted = as_user(
        "import os, sys; os.makedirs(os.path.dirname(sys.argv[1])); f = open(sys.argv[1], 'wb'); f.truncate(4 << 30)",
        str(state / "objects" / "agent" / name),
    )
    assert planted.returncode == 0, planted.stderr
    try:
        proc = publish_agent(state, wheels, limit_memory=True)
    except subprocess.TimeoutExpired:
        pytest.fail("publish-agent did not finish reading the planted file")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr[-2000:]
    assert f"agent/{name} is already published with other bytes" in proc.stderr, proc.stderr[-2000:]
    assert (state / "objects" / "agent" / name).stat().st_size == 4 << 30


# N valid bundles of just under 16 MiB each (a ~850k-address set), workload ids no inventory holds
PAD_BUNDLES = """
import json, os, sys
bundles, n = sys.argv[1], int(sys.argv[2])
d = json.load(open(os.path.join(bundles, "ord-prod-lb-1.json")))
k = next(iter(d["sets"]))
d["sets"][k]["v4"] = [f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}/32" for i in range(850_000)]
d["workload_id"] = "zz-pad-XXXXXX"
body = json.dumps(d).encode()
for j in range(n):
    with open(os.path.join(bundles, f"zz-pad-{j:06d}.json"), "wb") as f:
        f.write(body.replace(b'"zz-pad-XXXXXX"', f'"zz-pad-{j:06d}"'.encode()))
"""


def test_attack_compile_out_reads_back_only_its_own_workloads_files(shared: Path) -> None:
    """``compile --out SITE``, SITE the web server account's (USER here): USER adds 8 valid bundles
    of 15.6 MB each for workload ids the inventory does not hold (each would be parsed and kept
    for the whole compile, ~60 MB apiece). compile reads back only its own workloads' files, by
    name, so it finishes under a 400 MB address-space cap, and leaves USER's files as they are."""
    pw = nobody()
    site = shared / "site"
    site.mkdir()
    first = compile_out(site)
    assert first.returncode == 0, first.stderr
    subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(site)], check=True)
    planted = as_user(PAD_BUNDLES, str(site / "bundles"), "8")
    assert planted.returncode == 0, planted.stderr
    try:
        proc = compile_out(site, limit_memory=True)
    except subprocess.TimeoutExpired:
        pytest.fail("compile did not finish")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 0 new or changed" in proc.stdout, proc.stdout  # its own previous bundles were read back
    assert "zz-pad" not in proc.stderr, proc.stderr[-2000:]
    assert len(list((site / "bundles").glob("zz-pad-*.json"))) == 8
