"""An unprivileged local user on the host where root runs ``ringfence compile``, ``serve-token``,
``keygen`` and ``serve``: the files those commands write or trust are ones that user cannot
write, replace or redirect. Each attack is the user's own process (``runuser -u nobody``) against
the real CLI started as root."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ringfence.serve import token_hash
from tests.test_cli import BIN, INVENTORY, POLICY

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root's commands against another user's files need root")
USER = "nobody"
ALICE = "alice-token-0123456789abcdef"
MALLORY = "attacker-secret-token-0123456789abcdef"
MALLORY_LINE = f"mallory:{token_hash(MALLORY)}:policy-author,onboarding,incident-responder\n"


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER!r} here")


def as_nobody(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by the system's Python as USER (stdlib only: the venv may be root's alone)."""
    return subprocess.run(
        ["runuser", "-u", USER, "--", "/usr/bin/python3", "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def shared() -> Iterator[Path]:
    """A root-owned directory USER can reach (pytest's own temporary directories are root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="rf-hostfiles-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=False)


def ringfence(*args: str, umask: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


# --- compile --out -----------------------------------------------------------------------------------


def test_attack_compile_out_writes_through_no_link_planted_at_a_temporary_name(shared: Path) -> None:
    """The static layout's directory belongs to the account that serves it: that account plants
    links at the names a compile would write its temporary files under (``.<name>.<pid>.tmp`` for
    the coming pids), pointing at a root-only file. Root's next compile writes every file of the
    layout whole and leaves the root-only file as it was."""
    pw = nobody()
    victim = shared / "victim"
    victim.write_text("precious root-only content\n")
    victim.chmod(0o600)
    keys, out, names_from = shared / "keys", shared / "layout", shared / "layout-root"
    assert ringfence("keygen", "--out", str(keys)).returncode == 0
    out.mkdir()
    os.chown(out, pw.pw_uid, pw.pw_gid)
    key = str(keys / "bundle-signing.pem")
    compile_ = ("compile", "--policy", POLICY, "--inventory", INVENTORY, "--key", key, "--out")
    first = ringfence(*compile_, str(names_from))  # the file names a compile writes (the account sees them served)
    assert first.returncode == 0, first.stderr
    names = sorted(p.name for p in (names_from / "bundles").iterdir())
    assert names
    planted = as_nobody(
        "import os, sys\n"
        "d, victim, *names = sys.argv[1:]\n"
        "os.mkdir(d)\n"
        "nxt = int(open('/proc/sys/kernel/ns_last_pid').read()) + 1\n"
        "for name in names[:3]:\n"
        "    for pid in range(nxt, nxt + 1500):\n"
        "        os.symlink(victim, f'{d}/.{name}.{pid}.tmp')\n",
        str(out / "bundles"),
        str(victim),
        *names,
    )
    assert planted.returncode == 0, planted.stderr
    again = ringfence(*compile_, str(out))
    assert again.returncode == 0, again.stderr
    assert victim.read_text() == "precious root-only content\n"
    for name in names[:3]:
        st = (out / "bundles" / name).lstat()
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644


@pytest.mark.parametrize("swapped", ["bundles", "heads"])
def test_attack_compile_out_writes_nothing_through_a_subdirectory_swapped_for_a_link(
    shared: Path, swapped: str
) -> None:
    """The account owning ``--out`` swaps ``bundles/`` (or ``heads/``) for a link to a root-only
    directory holding a root file of a layout file's name. Root's next compile refuses, naming the
    link, and the root-only directory and its file are as they were (no file replaced, none added)."""
    pw = nobody()
    keys, out, vault = shared / "keys", shared / "layout", shared / "vault"
    assert ringfence("keygen", "--out", str(keys)).returncode == 0
    out.mkdir()
    os.chown(out, pw.pw_uid, pw.pw_gid)
    vault.mkdir(mode=0o700)
    compile_ = ("compile", "--policy", POLICY, "--inventory", INVENTORY, "--key", str(keys / "bundle-signing.pem"))
    first = ringfence(*compile_, "--out", str(out))
    assert first.returncode == 0, first.stderr
    name = sorted(p.name for p in (out / swapped).iterdir())[0]
    (vault / name).write_text("precious root-only content\n")
    (vault / name).chmod(0o600)
    swap = as_nobody(
        "import os, sys\nd, v = sys.argv[1:]\nos.rename(d, d + '.old')\nos.symlink(v, d)\n",
        str(out / swapped),
        str(vault),
    )
    assert swap.returncode == 0, swap.stderr
    # a later revision: every bundle and head is written again
    again = ringfence(*compile_, "--revision", str(2**62), "--out", str(out))
    assert again.returncode != 0
    assert f"{out / swapped}: a symbolic link" in again.stderr
    assert sorted(p.name for p in vault.iterdir()) == [name]
    st = (vault / name).stat()
    assert (vault / name).read_text() == "precious root-only content\n" and stat.S_IMODE(st.st_mode) == 0o600


# --- serve-token ---------------------------------------------------------------------------------------


def sticky_shared_dir(base: Path, pw: pwd.struct_passwd) -> Path:
    """A shared directory (mode 1777) where USER made ``admin-tokens`` first, writable by all."""
    d = base / "shared"
    d.mkdir()
    d.chmod(0o1777)
    made = as_nobody("import os, sys; os.umask(0); open(sys.argv[1], 'w').close()", str(d / "admin-tokens"))
    assert made.returncode == 0, made.stderr
    return d


def root_dir_file_of_nobody(base: Path, pw: pwd.struct_passwd) -> Path:
    """root's own directory, where the file is USER's (a directory that was theirs, handed over)."""
    d = base / "root"
    d.mkdir()
    (d / "admin-tokens").write_text("")
    (d / "admin-tokens").chmod(0o600)
    os.chown(d / "admin-tokens", pw.pw_uid, pw.pw_gid)
    return d


def root_file_writable_by_all(base: Path, pw: pwd.struct_passwd) -> Path:
    """root's own file in root's own directory, but mode 666."""
    d = base / "root"
    d.mkdir()
    (d / "admin-tokens").write_text("")
    (d / "admin-tokens").chmod(0o666)
    return d


def dir_of_nobody(base: Path, pw: pwd.struct_passwd) -> Path:
    """a directory USER owns (mode 755): they may replace whatever root writes in it."""
    d = base / "theirs"
    d.mkdir()
    os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def link_planted_by_nobody(base: Path, pw: pwd.struct_passwd) -> Path:
    """a link at the file's name, made by USER in a directory that was theirs, to a file of theirs."""
    d = dir_of_nobody(base, pw)
    made = as_nobody(
        "import os, sys; os.umask(0); open(sys.argv[1], 'w').close(); os.symlink(sys.argv[1], sys.argv[2])",
        str(d / "theirs-file"),
        str(d / "admin-tokens"),
    )
    assert made.returncode == 0, made.stderr
    os.chown(d, 0, 0)  # root took the directory back, not the link in it
    return d


PLANTS: dict[str, Callable[[Path, pwd.struct_passwd], Path]] = {
    "shared sticky directory, the file made first by another user": sticky_shared_dir,
    "root's directory, the file another user's": root_dir_file_of_nobody,
    "root's file, mode 666": root_file_writable_by_all,
    "a directory another user owns": dir_of_nobody,
    "a link another user planted": link_planted_by_nobody,
}


@pytest.mark.parametrize("plant", list(PLANTS), ids=list(PLANTS))
def test_attack_serve_token_adds_no_token_to_a_file_another_user_may_write(shared: Path, plant: str) -> None:
    """USER prepared the tokens file (or the directory it is in) before root ran ``serve-token``
    there, to append an admin token of their own afterwards: serve-token refuses, names the file
    and the problem, and writes nothing."""
    pw = nobody()
    d = PLANTS[plant](shared, pw)
    proc = ringfence("serve-token", "alice", "--role", "reader", "--file", "admin-tokens", cwd=d)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "admin-tokens: refused:" in proc.stderr or "not a link" in proc.stderr, proc.stderr
    for f in (d / "admin-tokens", d / "theirs-file"):
        assert not f.exists() or f.read_text() == ""


def test_serve_token_still_makes_a_private_file_under_umask_000(shared: Path) -> None:
    d = shared / "root"
    d.mkdir()
    assert (
        ringfence("serve-token", "alice", "--role", "reader", "--file", "admin-tokens", umask=0, cwd=d).returncode == 0
    )
    assert stat.S_IMODE((d / "admin-tokens").stat().st_mode) == 0o600
    assert ringfence("serve-token", "bob", "--role", "reader", "--file", "admin-tokens", cwd=d).returncode == 0
    assert (d / "admin-tokens").read_text().count("\n") == 2


# --- serve --admin-tokens ------------------------------------------------------------------------------


def start_serve(tokens: Path, state: Path) -> tuple[subprocess.Popen[str], str, Path]:
    log = state.with_name(state.name + ".log")
    proc = subprocess.Popen(
        [str(BIN), "serve", "--port", "0", "--store", f"sqlite:{state / 'state.db'}", "--admin-tokens", str(tokens)],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline(), log


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("plant", list(PLANTS)[:4], ids=list(PLANTS)[:4])
def test_attack_serve_does_not_start_on_a_tokens_file_another_user_may_write(
    shared: Path, tmp_path: Path, plant: str
) -> None:
    """The same files, given to ``serve --admin-tokens`` (root wrote its line there by hand):
    serve does not start, and says which file or directory another user may write."""
    pw = nobody()
    d = PLANTS[plant](shared, pw)
    with (d / "admin-tokens").open("a") as f:
        f.write(f"alice:{token_hash(ALICE)}:reader\n")
    proc, line, log = start_serve(d / "admin-tokens", tmp_path / "state")
    try:
        assert "listening on" not in line
        assert proc.wait(30) != 0
    finally:
        stop(proc)
    assert "refused:" in log.read_text() and "Traceback" not in log.read_text(), log.read_text()


def test_attack_serve_refuses_every_admin_token_once_the_tokens_file_is_writable_by_another_user(
    shared: Path, tmp_path: Path
) -> None:
    """serve started on a safe file; then the file is left writable by all (a careless chmod) and
    USER appends a token of their own: at the next admin request serve reads it again, finds it
    writable by others, and refuses every admin token (theirs too) until it is safe again."""
    nobody()
    d = shared / "root"
    d.mkdir()
    tokens = d / "admin-tokens"
    tokens.write_text(f"alice:{token_hash(ALICE)}:reader\n")
    tokens.chmod(0o600)
    proc, line, log = start_serve(tokens, tmp_path / "state")
    try:
        assert "listening on" in line, log.read_text()
        url = line.split("listening on ")[1].split()[0]

        def status(token: str) -> int:
            return httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code

        assert (status(ALICE), status(MALLORY)) == (200, 401)
        tokens.chmod(0o666)
        added = as_nobody("import sys; open(sys.argv[1], 'a').write(sys.argv[2])", str(tokens), MALLORY_LINE)
        assert added.returncode == 0, added.stderr
        assert (status(ALICE), status(MALLORY)) == (401, 401)
        assert "writable by group or others" in log.read_text()
        tokens.chmod(0o600)  # root repairs it (and removes mallory's line): tokens work again
        tokens.write_text(f"alice:{token_hash(ALICE)}:reader\n")
        assert (status(ALICE), status(MALLORY)) == (200, 401)
    finally:
        stop(proc)


# --- keygen --out ----------------------------------------------------------------------------------------


def test_attack_keygen_out_directory_is_private_under_umask_000(shared: Path) -> None:
    """root runs ``keygen --out DIR`` with umask 000 (a shell or unit that set it): DIR and any
    directory it creates above are 0700, so USER can neither read the key nor swap in their own."""
    nobody()
    out = shared / "keys" / "signer"
    proc = ringfence("keygen", "--out", str(out), umask=0)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o700 and stat.S_IMODE(out.parent.stat().st_mode) == 0o700
    swap = as_nobody(
        "import os, sys\n"
        "d = sys.argv[1]\n"
        "open(d + '/mine.pem', 'w').write('their key')\n"
        "os.replace(d + '/mine.pem', d + '/bundle-signing.pem')\n",
        str(out),
    )
    assert swap.returncode != 0 and "PermissionError" in swap.stderr
    assert (out / "bundle-signing.pem").read_bytes().startswith(b"-----BEGIN")
