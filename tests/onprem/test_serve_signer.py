"""``ringfence serve --user USER``: the bundle signing key in a signer process of its own. The
serving process, started as root, spawns the signer and drops to USER before it opens the store
or answers anything; it never loads the key. Against the real CLI, a real (dry-run) agent and the
kernel's own checks (file modes, another user's process memory)."""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from ringfence import bundle
from ringfence.bundlewire import MANIFEST_FORMAT, MAX_MANIFEST_BYTES, manifest_message
from ringfence.local.signer_process import SignerError, SignerProcess
from tests.agentproc import BIN, wait_until
from tests.agentproc import agent_status as status
from tests.onprem.conftest import ESTATE, policy_files
from tests.onprem.serveproc import Server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root-owned key and dropping to another user need root")
USER = "nobody"


def key_in(d: Path, mode: int = 0o700) -> tuple[Path, bundle.SigningKey]:
    d.mkdir(mode=mode)
    d.chmod(mode)
    key = bundle.SigningKey.generate()
    key.write(d / "signing.pem", d / "signing.pub.pem")
    return d / "signing.pem", key


def test_the_signer_signs_manifests_of_its_key_and_refuses_anything_else(tmp_path: Path) -> None:
    path, key = key_in(tmp_path / "signer")
    signer = SignerProcess.spawn(path)
    try:
        assert signer.key_id == key.key_id and signer.public_pem() == key.public_pem()
        verifier = bundle.Verifier.from_file(path.with_name("signing.pub.pem"))
        delta = bundle.sign(bundle.SetDelta(set="rf_web", from_version=1, to_version=2), signer)
        verifier.verify(delta)
        with pytest.raises(SignerError, match="refused"):
            signer.sign(b"GET /admin HTTP/1.1\r\n")  # any other protocol's message
        for size in (MAX_MANIFEST_BYTES + 1, 300_000):  # refused, and the signer reads on from the next request
            with pytest.raises(SignerError, match="refused"):
                signer.sign(b"x" * size)
        with pytest.raises(SignerError, match="refused"):  # JSON nested past Python's recursion limit
            signer.sign(b"%s\n%s%s" % (MANIFEST_FORMAT.encode(), b"[" * 2000, b"]" * 2000))
        other = bundle.SigningKey.generate().key_id
        with pytest.raises(SignerError, match="refused"):
            signer.sign(manifest_message("ringfence.delta/v2", other, {"set": "rf_web"}, b"x"))
        with pytest.raises(SignerError, match="refused"):  # another document kind under this key
            signer.sign(manifest_message("ringfence.token/v1", key.key_id, {"sub": "x"}, b"x"))
        # a bundle valid for ten years: what a taken-over serving process would stock up on
        doc = bundle.load_bundle((Path(__file__).parents[1] / "golden" / "bundle-ord-prod-db-1.json").read_text())
        with pytest.raises(SignerError, match="refused"):
            bundle.sign(doc, signer, expires_at=int(time.time()) + 10 * 365 * 86400)
        verifier.verify(bundle.sign(doc, signer, expires_at=int(time.time()) + 86400))
        verifier.verify(bundle.sign(bundle.SetDelta(set="rf_web", from_version=2, to_version=3), signer))
        os.kill(signer._proc.pid, signal.SIGINT)  # Ctrl-C in serve's terminal: serve shuts down, still signing
        time.sleep(0.2)
        verifier.verify(bundle.sign(bundle.SetDelta(set="rf_web", from_version=3, to_version=4), signer))
    finally:
        signer.close()
    assert signer._proc.poll() == 0, "the pipe closed: the signer exited"
    with pytest.raises(SignerError, match="gone"):
        signer.sign(bundle.manifest(delta, key.key_id))


def test_the_signer_imports_nothing_from_where_serve_was_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve started from a directory the user may write (the state directory, /tmp): a
    ``struct.py`` planted there must not run as root in the signer, nor one on PYTHONPATH."""
    path, _ = key_in(tmp_path / "signer")
    planted = tmp_path / "planted"
    planted.mkdir()
    marker = tmp_path / "ran-as-root"
    (planted / "struct.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    monkeypatch.chdir(planted)
    monkeypatch.setenv("PYTHONPATH", str(planted))
    signer = SignerProcess.spawn(Path("..") / path.parent.name / path.name)
    try:
        bundle.sign(bundle.SetDelta(set="rf_web", from_version=1, to_version=2), signer)
    finally:
        signer.close()
    assert not marker.exists()


def nobody() -> int:
    return pwd.getpwnam(USER).pw_uid


@pytest.mark.parametrize(
    ("why", "arrange", "says", "names"),
    [
        ("readable by others", lambda p: p.chmod(0o644), "mode 600", lambda p: p),
        ("a directory others may write", lambda p: p.parent.chmod(0o777), "writable by root only", lambda p: p.parent),
        ("a directory of another user", lambda p: os.chown(p.parent, nobody(), 0), "owned by root", lambda p: p.parent),
        ("missing", lambda p: p.unlink(), "ringfence keygen", lambda p: p.parent),
        (
            "a directory above of another user",
            lambda p: os.chown(p.parent.parent, nobody(), 0),
            "owned by root",
            lambda p: p.parent.parent,
        ),
        (
            "a directory above others may write",
            lambda p: p.parent.parent.chmod(0o777),
            "writable by root only",
            lambda p: p.parent.parent,
        ),
    ],
)
def test_a_signing_key_another_user_could_read_or_replace_is_refused(
    tmp_path: Path, why: str, arrange: Any, says: str, names: Any
) -> None:
    path, _ = key_in(tmp_path / "signer")
    arrange(path)
    with pytest.raises(SignerError, match=says) as err:
        SignerProcess.spawn(path)
    assert str(names(path)) in str(err.value), (why, err.value)


def test_a_signing_key_under_a_sticky_directory_or_through_roots_links_is_used(tmp_path: Path) -> None:
    """/tmp-like sticky directories above the key are fine (another user cannot rename root's
    entry there), and so is a symbolic link only root could change: the key is read where it is."""
    path, key = key_in(tmp_path / "signer")
    tmp_path.chmod(0o1777)
    (tmp_path / "link").symlink_to("signer")
    for given in (path, tmp_path / "link" / "signing.pem"):
        signer = SignerProcess.spawn(given)
        try:
            assert signer.key_id == key.key_id
        finally:
            signer.close()
    (tmp_path / "signer" / "alias.pem").symlink_to("signing.pem")
    with pytest.raises(SignerError, match="not a link"):
        SignerProcess.spawn(tmp_path / "signer" / "alias.pem")
    # a link another user owns in the sticky directory: they may point it elsewhere at any time
    os.lchown(tmp_path / "link", nobody(), 0)
    with pytest.raises(SignerError, match=rf"{re.escape(str(tmp_path / 'link'))} is a link owned by uid"):
        SignerProcess.spawn(tmp_path / "link" / "signing.pem")


def test_attack_signer_another_user_who_owns_a_directory_above_the_key_cannot_swap_in_another_key(
    state_dir: Path,
) -> None:
    """The key's own directory is root's, but one above it is USER's: USER moves root's directory
    aside and puts a link to another root-owned key in its place (here an old key, revoked, that
    root kept in a safe place). The signer must refuse the set-up, not load the key it is shown."""
    outer = state_dir / "outer"
    outer.mkdir(mode=0o755)
    os.chown(outer, nobody(), 0)
    path, _ = key_in(outer / "keys")
    _, old = key_in(state_dir / "old-keys")
    for cmd in (
        ["mv", str(outer / "keys"), str(outer / "moved")],
        ["ln", "-s", str(state_dir / "old-keys"), str(outer / "keys")],
    ):
        subprocess.run(cmd, user=USER, check=True, capture_output=True)
    assert bundle.SigningKey.from_file(path).key_id == old.key_id  # the swap worked: the path now leads there
    with pytest.raises(SignerError, match=rf"{re.escape(str(outer))} must be owned by root"):
        SignerProcess.spawn(path)


def uids(pid: int) -> set[int]:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:"))
    return {int(u) for u in line.split()[1:]}


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether the process's readable memory holds ``needle`` (read as root, through /proc)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except (OSError, OverflowError, ValueError):
                continue  # [vvar] and the like
    return False


def python_for_other_users(scratch: Path) -> list[str]:
    """A launcher under which other users can read this machine's Python. Here CPython lives under
    /root (mode 700), where no other user may look; a packaged Python lives under /usr. So the
    server starts in a mount namespace of its own where /root is an empty directory holding only
    that installation: the host is left as it is, and nothing else of root's home is shown."""
    prefix = Path(sys.base_prefix).resolve()
    if not prefix.is_relative_to("/root"):
        return []
    top = prefix.relative_to("/root").parts[0]
    script = (
        f"mount --bind /root {scratch} && mount -t tmpfs -o mode=755 tmpfs /root && "
        f'mkdir /root/{top} && mount --bind {scratch}/{top} /root/{top} && exec "$@"'
    )
    return ["unshare", "--mount", "bash", "-c", script, "ringfence-serve"]


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Somewhere USER can reach (pytest's own temporary directories are root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="rf-signer-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


def test_attack_serve_the_process_answering_requests_cannot_read_or_copy_the_signing_key(
    tmp_path: Path, state_dir: Path, agent_process: Any
) -> None:
    """Whoever takes over the process that answers agents and admins (a request-handling bug)
    goes after the bundle signing key, to sign bundles for any agent long after: the key file is
    root's, the signer is another user's process, and the key was never in this process."""
    try:
        nobody = pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER!r} here")
    path, key = key_in(tmp_path / "signer")
    server = Server(tmp_path, db=state_dir / "state" / "state.db", extra=["--user", USER, "--signing-key", str(path)])
    (tmp_path / "root").mkdir()
    server.launcher = python_for_other_users(tmp_path / "root")
    server.start()
    assert server.proc is not None
    try:
        for spec in ESTATE:
            assert server.admin("POST", "/admin/workloads", {**spec, "reason": "rack 1"}).status_code == 201
        assert server.admin("POST", "/admin/policies", {"files": policy_files(), "reason": "v1"}).status_code == 201
        wid = "dc1-proc-1"
        pairing = server.admin("POST", "/admin/pairing-keys", {"workload_id": wid, "uses": 1, "ttl": 600}).json()
        (tmp_path / "pairing-key").write_text(pairing["pairing_key"])
        (tmp_path / "agent").mkdir()
        agent = agent_process(
            tmp_path / "agent",
            workload_id=wid,
            public_key=path.with_name("signing.pub.pem"),  # the agent pins the signer's key
            api_url=server.url,
            enroll={"method": "pairing", "pairing_key_file": str(tmp_path / "pairing-key")},
            backoff_max=2,
            request_timeout=5,
        )
        wait_until(lambda: status(agent.state).get("applied_revision"), 30, "a bundle the signer signed", agent.log)

        serving = server.proc.pid
        assert uids(serving) == {nobody.pw_uid}, "the serving process runs as the user, every uid of it"
        [signer] = [c for c in children(serving) if b"signer_process" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert uids(signer) == {0}
        assert (state_dir / "state" / "state.db").stat().st_uid == nobody.pw_uid

        # as the serving process's user: neither the key file nor the signer's memory
        for target in (str(path), f"/proc/{signer}/mem"):
            took = subprocess.run(["head", "-c", "64", target], user=USER, capture_output=True, text=True)
            assert took.returncode != 0 and "Permission denied" in took.stderr, (target, took.stderr)

        # and the key was never loaded there: its raw bytes are in the signer's memory only
        seed = serialization.load_pem_private_key(path.read_bytes(), None).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        pem_body = re.sub(rb"-----[^-]+-----|\s", b"", path.read_bytes())
        assert memory_holds(signer, seed), "the scan finds the key where it is"
        assert not memory_holds(serving, seed) and not memory_holds(serving, pem_body[:40])
        assert key.key_id in Path(server.log).read_text(), "the signer logs what it signs, by key"
    finally:
        server.proc.terminate()
        server.proc.wait(15)

    def signer_gone() -> bool:  # exited (a zombie until reaped, or reaped)
        try:
            return Path(f"/proc/{signer}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    # it goes with the serving process; under load (CI beside other work) its exit takes a moment
    deadline = time.monotonic() + 15
    while not signer_gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert signer_gone(), "the signer outlived the serving process"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--user", USER], "--user needs --signing-key"),
        (["--user", "root", "--signing-key", "{key}"], "is root"),
        (["--user", "no-such-user-here", "--signing-key", "{key}"], "no such user"),
        (["--user", USER, "--signing-key", "{key}", "--store", "aws"], "--user is for --store sqlite:PATH"),
    ],
)
def test_serve_user_misused_says_what_and_starts_nothing(tmp_path: Path, args: list[str], says: str) -> None:
    path, _ = key_in(tmp_path / "signer")
    cmd = [str(BIN / "ringfence"), "serve", "--port", "0", "--store", f"sqlite:{tmp_path / 'state' / 'state.db'}"]
    out = subprocess.run([*cmd, *(a.format(key=path) for a in args)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and says in out.stderr, out.stderr
    assert "listening" not in out.stdout and not (tmp_path / "state").exists()


def test_serve_user_refuses_a_state_directory_still_holding_the_old_key(tmp_path: Path) -> None:
    """Moving to --user: a key left in the state directory (which the user will own) was
    copied, not moved; the user could read it."""
    path, _ = key_in(tmp_path / "signer")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "signing-key.pem").write_bytes(path.read_bytes())
    cmd = [str(BIN / "ringfence"), "serve", "--port", "0", "--store", f"sqlite:{tmp_path / 'state' / 'state.db'}"]
    out = subprocess.run([*cmd, "--user", USER, "--signing-key", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "move it (do not copy it)" in out.stderr, out.stderr


def test_serving_as_root_without_user_says_so(tmp_path: Path) -> None:
    server = Server(tmp_path)
    server.start()
    assert server.proc is not None
    try:
        assert "serving as root, the signing key in this process" in server.log.read_text()
    finally:
        server.proc.terminate()
        server.proc.wait(15)


def test_serve_user_refuses_a_key_reached_through_a_directory_the_user_owns(state_dir: Path) -> None:
    """The path is checked as the administrator gave it, not only where it leads today: a link in
    a directory the user owns could lead elsewhere at the next start."""
    outer = state_dir / "outer"
    outer.mkdir(mode=0o755)
    os.chown(outer, nobody(), 0)
    path, _ = key_in(state_dir / "keys")
    (outer / "keys").symlink_to(path.parent)
    db = state_dir / "state" / "state.db"
    cmd = [str(BIN / "ringfence"), "serve", "--port", "0", "--store", f"sqlite:{db}", "--user", USER]
    out = subprocess.run(
        [*cmd, "--signing-key", str(outer / "keys" / path.name)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and f"{outer} must be owned by root" in out.stderr, out.stderr
    assert "listening" not in out.stdout


def test_attack_serve_user_a_link_swapped_in_for_the_new_state_directory_is_not_handed_over(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user owns the state directory's parent: right after root makes the directory, the
    user moves it aside and puts a link to a directory of root's in its place. Root must not hand
    that directory to the user (the race is made certain by doing the swap inside mkdir)."""
    from ringfence import serve

    parent = state_dir / "home"
    parent.mkdir()
    os.chown(parent, nobody(), 0)
    victim = state_dir / "victim"
    victim.mkdir(mode=0o700)
    real_mkdir = os.mkdir

    def mkdir_then_the_user_swaps(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        script = f"mv {parent / 'state'} {parent / 'moved'} && ln -s {victim} {parent / 'state'}"
        subprocess.run(["sh", "-c", script], user=USER, check=True)

    monkeypatch.setattr(os, "mkdir", mkdir_then_the_user_swaps)
    with pytest.raises(serve.ServeError, match="replaced while it was being made"):
        serve.make_state_dir(parent / "state", nobody(), 0)
    assert victim.stat().st_uid == 0
