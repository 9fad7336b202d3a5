"""An unprivileged local user on the host where root runs ``ringfence serve`` (no ``--user``, as
docs/serve.md first shows it): the state directory is one they can neither read nor write,
whatever the umask serve was started under; serve refuses one they own or could write, never
follows a link in it, and loads no signing key of theirs. Each attack is the user's own process
(uid ``nobody``) against the real ``ringfence serve`` started as root, or the real wiring and
publisher code where a process adds nothing."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ringfence import serve
from ringfence.bundle import BundleError, SigningKey
from ringfence.local.publish import FilePublisher
from ringfence.local.statedir import StateRefused
from ringfence.local.wiring import LocalWiring
from tests.agentproc import BIN

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root's serve against another user's process needs root")
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user can reach (pytest's own are root's alone), as /var/lib or /srv are."""
    base = Path(tempfile.mkdtemp(prefix="rf-statedir-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


def as_nobody(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by sh as the unprivileged user: the attacker's own process."""
    return subprocess.run(
        ["sh", "-c", script],
        user=NOBODY.pw_uid,
        group=NOBODY.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
    )


class Serve:
    """``ringfence serve --port 0`` started as root under ``umask``; ``url`` once it listens."""

    def __init__(self, db: Path | None, umask: int, cwd: Path | None = None, extra: tuple[str, ...] = ()) -> None:
        cmd = [str(BIN / "ringfence"), "serve", "--port", "0", *extra]
        if db is not None:
            cmd += ["--store", f"sqlite:{db}"]
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.umask(umask),  # the umask root started it under
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.url = line.split("listening on ", 1)[1].split()[0] if "listening on " in line else None

    def stop(self) -> str:
        """SIGTERM, wait; its stderr."""
        if self.proc.poll() is None:
            self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err


def started(db: Path | None, umask: int, cwd: Path | None = None) -> Serve:
    s = Serve(db, umask, cwd)
    if s.url is None:
        pytest.fail(f"serve did not start: {s.stop()}")
    return s


def refused(db: Path | None, cwd: Path | None = None, extra: tuple[str, ...] = ()) -> str:
    """serve's refusal to start (its stderr); fails the test when it starts."""
    s = Serve(db, 0o022, cwd, extra)
    err = s.stop()
    assert s.url is None, f"serve started on {s.url}"
    assert s.proc.returncode != 0
    return err


def test_attack_serve_host_under_umask_000_a_local_user_cannot_have_serve_hand_out_its_signing_key(
    shared: Path,
) -> None:
    state = shared / "state"
    s = started(state / "state.db", 0o000)
    try:
        key = (state / "signing-key.pem").read_bytes()
        attack = as_nobody(
            f"cat {state}/signing-key.pem; mkdir -p {state}/objects/agent && "
            f"ln -s {state}/signing-key.pem {state}/objects/agent/install.sh"
        )
        assert b"PRIVATE KEY" not in attack.stdout.encode()
        r = httpx.get(f"{s.url}/v1/agent/install.sh", timeout=30)  # the route needs no token
        assert key not in r.content
        assert b"PRIVATE KEY" not in r.content
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "objects").stat().st_mode) == 0o700
    finally:
        s.stop()


def test_attack_serve_host_a_link_in_objects_is_never_followed(tmp_path: Path) -> None:
    """Whatever put it there: a link as a published file, or as a directory on its way, is not
    published, so root never hands out the file it points at."""
    secret = tmp_path / "signing-key.pem"
    secret.write_bytes(b"-----BEGIN PRIVATE KEY-----\nroot's\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "install.sh").symlink_to(secret)
    (outside / "plain.sh").write_bytes(b"not published here")
    pub = FilePublisher(tmp_path / "objects")
    (tmp_path / "objects" / "agent").mkdir()
    (tmp_path / "objects" / "agent" / "install.sh").symlink_to(secret)
    (tmp_path / "objects" / "lnk").symlink_to(outside)
    for key in ("agent/install.sh", "lnk/plain.sh", "lnk/install.sh"):
        with pytest.raises(FileNotFoundError):
            pub.get(key)
    (tmp_path / "objects" / "agent" / "real.sh").write_bytes(b"#!/bin/sh\n")
    assert pub.get("agent/real.sh") == b"#!/bin/sh\n"


def test_attack_serve_host_under_umask_000_a_local_user_cannot_redirect_the_lock(shared: Path) -> None:
    state, victim = shared / "state", shared / "victim"
    victim.write_text("root:$6$precious-hash:19000:0:99999:7:::\n")
    victim.chmod(0o600)
    started(state / "state.db", 0o000).stop()
    as_nobody(f"rm -f {state}/lock; ln -s {victim} {state}/lock")
    started(state / "state.db", 0o022).stop()
    assert victim.read_text() == "root:$6$precious-hash:19000:0:99999:7:::\n"
    assert not (state / "lock").is_symlink()
    assert stat.S_IMODE((state / "lock").stat().st_mode) == 0o600


def test_a_link_as_the_lock_is_refused_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "lock").symlink_to(victim)
    with pytest.raises(StateRefused, match="lock"):
        LocalWiring(state / "state.db", start=False)
    assert victim.read_text() == "precious\n"


def test_attack_serve_host_under_umask_000_a_local_user_cannot_swap_in_their_signing_key(shared: Path) -> None:
    state = shared / "state"
    mallory = SigningKey.generate()
    mallory.write(shared / "mallory.pem", shared / "mallory.pub.pem")
    (shared / "mallory.pem").chmod(0o644)
    started(state / "state.db", 0o000).stop()
    as_nobody(f"cp {shared}/mallory.pem {state}/.k && mv -f {state}/.k {state}/signing-key.pem")
    s = Serve(state / "state.db", 0o022)
    s.stop()
    assert (state / "signing-key.pub.pem").read_bytes() != mallory.public_pem()
    assert (state / "signing-key.pem").stat().st_uid == 0


def test_attack_serve_host_a_signing_key_another_user_owns_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "state" / "state.db"
    LocalWiring(db, start=False).close()
    os.chown(db.parent / "signing-key.pem", NOBODY.pw_uid, NOBODY.pw_gid)  # theirs: they may rewrite it
    with pytest.raises(BundleError, match="owned by uid 65534"):
        LocalWiring(db, start=False)
    given = tmp_path / "given.pem"
    SigningKey.generate().write(given, tmp_path / "given.pub.pem")
    os.chown(given, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(BundleError, match="owned by uid 65534"):
        LocalWiring(tmp_path / "other" / "state.db", signing_key=given, start=False)


def test_attack_serve_host_a_signing_key_in_another_users_directory_is_refused_not_swapped(shared: Path) -> None:
    """``serve --signing-key FILE`` (no ``--user``), FILE root's, in a directory another user owns:
    that user swaps it for a link to another root-owned key (one retired, kept root-only). serve
    refuses to start, naming the directory, and pins no key: it never signs with the retired one."""
    keys, vault, state = shared / "keys", shared / "vault", shared / "state"
    keys.mkdir()
    os.chown(keys, NOBODY.pw_uid, NOBODY.pw_gid)
    vault.mkdir(mode=0o700)
    retired = SigningKey.generate()
    retired.write(vault / "retired.pem", vault / "retired.pub.pem")
    SigningKey.generate().write(keys / "key.pem", shared / "key.pub.pem")
    os.chmod(keys / "key.pem", 0o600)
    swap = as_nobody(f"mv {keys}/key.pem {keys}/key.old && ln -s {vault}/retired.pem {keys}/key.pem")
    assert swap.returncode == 0, swap.stderr
    err = refused(state / "state.db", extra=("--signing-key", str(keys / "key.pem")))
    assert f"{keys} must be owned by root" in err
    pinned = state / "signing-key.pub.pem"
    assert not pinned.exists() or pinned.read_bytes() != retired.public_pem()


@pytest.mark.parametrize("planted", ["objects", "objects/agent"])
def test_attack_serve_host_publish_agent_as_root_follows_no_link_in_the_service_users_state_dir(
    shared: Path, planted: str
) -> None:
    """``serve --user``'s state directory is the service user's. That user (serve taken over)
    plants ``objects`` or ``objects/agent`` as a link to a root-only directory; root's
    ``publish-agent --store sqlite:…`` then refuses, naming the link, and writes nothing there."""
    state, vault, wheels = shared / "state", shared / "vault", shared / "wheels"
    state.mkdir(mode=0o750)
    os.chown(state, NOBODY.pw_uid, NOBODY.pw_gid)
    vault.mkdir(mode=0o700)
    wheels.mkdir()
    (wheels / "ringfence_agent-9.9.9-py3-none-any.whl").write_bytes(b"PK not really a wheel\n")
    parent = f"mkdir -m 700 {state}/objects && " if planted != "objects" else ""
    plant = as_nobody(f"{parent}ln -s {vault} {state}/{planted}")
    assert plant.returncode == 0, plant.stderr
    proc = subprocess.run(
        [str(BIN / "ringfence"), "publish-agent", "--store", f"sqlite:{state}/state.db", "--dir", str(wheels)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert f"{state}/{planted}: a symbolic link" in proc.stderr
    assert list(vault.iterdir()) == []


def test_attack_serve_host_a_state_directory_another_user_made_first_is_refused(shared: Path) -> None:
    """serve's default store, ``ringfence-state/state.db``, is relative: started from a shared
    directory (sticky, as /tmp), a user who made ``ringfence-state/`` first owns it."""
    shared.chmod(0o1777)
    victim = shared / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    made = as_nobody(f"mkdir {shared}/ringfence-state && ln -s {victim} {shared}/ringfence-state/lock")
    assert made.returncode == 0, made.stderr
    err = refused(None, cwd=shared)
    assert "ringfence-state" in err and f"owned by uid {NOBODY.pw_uid}" in err, err
    assert victim.read_text() == "precious\n"
    assert not (shared / "ringfence-state" / "signing-key.pem").exists()


def test_attack_serve_host_a_local_user_cannot_hold_the_lock_and_keep_serve_from_restarting(shared: Path) -> None:
    state = shared / "state"
    started(state / "state.db", 0o022).stop()
    holder = subprocess.Popen(
        ["flock", "-x", "-n", str(state / "lock"), "sleep", "60"],
        user=NOBODY.pw_uid,
        group=NOBODY.pw_gid,
        extra_groups=[],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        s = Serve(state / "state.db", 0o022)
        err = s.stop()
        assert s.url is not None, err
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()


def test_attack_serve_host_a_local_user_cannot_read_the_store(shared: Path) -> None:
    state = shared / "state"
    s = started(state / "state.db", 0o022)
    try:
        files = [state / n for n in ("state.db", "state.db-wal", "state.db-shm") if (state / n).exists()]
        assert state / "state.db" in files
        for f in files:
            read = as_nobody(f"cat {f} > /dev/null")
            assert read.returncode != 0, f"{f} was read by another user"
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert as_nobody(f"ls {state}").returncode != 0
    finally:
        s.stop()


def test_serve_refuses_a_state_directory_others_may_write_or_under_one_they_may(shared: Path) -> None:
    state = shared / "state"
    state.mkdir()
    state.chmod(0o777)  # what an earlier serve under umask 000 made
    err = refused(state / "state.db")
    assert str(state) in err and "writable by group or others (mode 777)" in err, err
    state.chmod(0o700)
    os.chown(shared, NOBODY.pw_uid, NOBODY.pw_gid)  # they may rename the state directory away
    err = refused(state / "state.db")
    assert str(state) in err and f"owner uid {NOBODY.pw_uid}" in err, err
    os.chown(shared, 0, 0)
    shared.chmod(0o777)
    err = refused(state / "state.db")
    assert "mode 777" in err, err
    assert not (state / "signing-key.pem").exists()


def test_an_earlier_state_directory_others_could_read_is_closed_to_them(shared: Path) -> None:
    state = shared / "state"
    started(state / "state.db", 0o022).stop()
    state.chmod(0o755)  # as serve made it before
    (state / "state.db").chmod(0o644)
    (state / "lock").chmod(0o644)
    started(state / "state.db", 0o022).stop()
    assert stat.S_IMODE(state.stat().st_mode) == 0o750
    assert stat.S_IMODE((state / "state.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "lock").stat().st_mode) == 0o600


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_serve_user_makes_its_state_directory_and_parents_whatever_the_umask(shared: Path, umask: int) -> None:
    state = shared / "var" / "lib" / "ringfence"
    old = os.umask(umask)
    try:
        serve.make_state_dir(state, NOBODY.pw_uid, NOBODY.pw_gid)
    finally:
        os.umask(old)
    for d in (shared / "var", shared / "var" / "lib"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d  # never 777, never closed to the user
        assert d.stat().st_uid == 0
    st = state.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o750, NOBODY.pw_uid)


def test_attack_serve_host_serve_user_makes_no_state_directory_through_the_service_users_link(shared: Path) -> None:
    """``serve --user``, its state directory and parent missing, the directory above them the
    service user's: that user puts a link where the parent will be, to a root-owned directory.
    ``serve --user`` does not start and hands the user no directory in root's (it used to mkdir
    and chown through the link; the same walk closes the race of a link swapped in mid-way)."""
    home, vault, keys = shared / "home", shared / "vault", shared / "keys"
    home.mkdir()
    os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
    vault.mkdir(mode=0o755)
    keys.mkdir(mode=0o700)
    SigningKey.generate().write(keys / "key.pem", keys / "key.pub.pem")
    os.chmod(keys / "key.pem", 0o600)
    plant = as_nobody(f"ln -s {vault} {home}/data")
    assert plant.returncode == 0, plant.stderr
    err = refused(
        home / "data" / "ringfence" / "state.db", extra=("--signing-key", str(keys / "key.pem"), "--user", "nobody")
    )
    assert f"{home}/data: a link owned by uid {NOBODY.pw_uid}" in err
    assert list(vault.iterdir()) == []


def test_serve_user_makes_its_state_directory_through_roots_own_link(shared: Path) -> None:
    """A link root made on the path (``/var/lib`` to another disk) is followed."""
    (shared / "disk").mkdir(mode=0o755)
    (shared / "lib").symlink_to(shared / "disk")
    serve.make_state_dir(shared / "lib" / "ringfence", NOBODY.pw_uid, NOBODY.pw_gid)
    st = (shared / "disk" / "ringfence").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o750, NOBODY.pw_uid)


def test_a_link_as_the_state_directorys_signing_key_is_refused_not_followed(tmp_path: Path) -> None:
    db = tmp_path / "state" / "state.db"
    LocalWiring(db, start=False).close()
    key = db.parent / "signing-key.pem"
    key.rename(tmp_path / "elsewhere.pem")
    key.symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(BundleError, match="symbolic link"):
        LocalWiring(db, start=False)
