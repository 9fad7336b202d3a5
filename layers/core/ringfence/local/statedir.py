"""What ``ringfence serve --store sqlite:PATH`` checks of its state directory before it opens the
store (docs/onprem.md, "Start-up checks").

* A missing or empty (0-byte) ``PATH`` in a directory that was used before — its signing key,
  published objects, a WAL file — is a lost store (a failed restore, a wrong path, a truncation),
  not a first start: SQLite would make a new empty store of it, and serve would forget every
  registration, token, pairing key, policy version and audit record while agents hold what it
  published. Refused unless the operator asks for a new store (``--new-store``).
* An empty file is never a store: refused, also in an unused directory, unless ``--new-store``.
  Nor is an SQLite file without ringfence's schema (``user_version`` 0): what a backup of a wrong
  path writes (``sqlite3`` makes an empty database of a name that does not exist), refused the
  same way; ``--new-store`` makes the new store in it only when it holds no table.
* An existing store must pass SQLite's ``PRAGMA quick_check`` (every page and b-tree of the file,
  not the indexes' contents against their tables): a damaged file is refused before anything
  writes to it, rather than served while writes to its damaged tables fail.
* The state directory's own signing key (no ``--signing-key``) missing, empty or unreadable
  beside a store that holds data is refused: a new key would sign bundles no enrolled agent
  accepts (they pinned the lost key's public key), and the estate would stop taking changes with
  no error but the agents'. The key is generated only for a store that holds nothing yet.
* The state directory itself (:func:`secure_state_dir`, before anything else): made mode 700
  (its missing parents 755) whatever the umask; an existing one must be owned by the user serve
  runs as and writable by it alone, and every directory above it owned by root or that user and
  writable by its owner only (or sticky, as /tmp is). Otherwise another local user could read
  the store or swap a link or a key of theirs into it, and serve, often root, would follow it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import stat
from pathlib import Path

from ringfence.bundle import BundleError, SigningKey
from ringfence.local.signer_process import unsafe_directory
from ringfence.store.failure import classify

# what the control plane leaves in its state directory once it has run (objects/agent is the
# agent artifact `ringfence publish-agent` may put there before any start)
_LIFE_FILES = ("signing-key.pem", "signing-key.pub.pem")
_LIFE_OBJECTS = ("bundles", "deltas", "policies", "reports", "keys")
QUICK_CHECK_PROBLEMS = 10  # problems quick_check reports at most (it stops there)
SIGNING_KEY = "signing-key.pem"  # the state directory's own key (LocalWiring generates it)
LINKED_KEY = "a symbolic link, which serve does not follow in its state directory: put the key file itself there, or give its path with --signing-key"
# what a store holds that shows it was used, and what one row of each is
_HELD_QUERY = (
    "SELECT (SELECT COUNT(*) FROM inventory), (SELECT COUNT(*) FROM policy), (SELECT COUNT(*) FROM bundle), "
    "(SELECT COUNT(*) FROM token), (SELECT COUNT(*) FROM pairing), (SELECT COUNT(*) FROM audit)"
)
_HELD = (
    "workload(s)",
    "policy version(s)",
    "published bundle(s)",
    "agent token(s)",
    "pairing key(s)",
    "audit record(s)",
)


class StateRefused(RuntimeError):
    """The state directory or its store is not one serve starts on (the message starts with the
    path and says how to proceed)."""


log = logging.getLogger("ringfence.serve")


def make_dirs(path: Path, mode: int) -> None:
    """Make ``path`` and its missing parents, each of exactly ``mode`` whatever the umask (under
    umask 000 ``mkdir -p`` makes them writable by everyone; under 077 a service user could not
    pass through them). One that appears meanwhile is left as it is: the checks that follow judge it."""
    missing = []
    d = Path(os.path.abspath(path))
    while not os.path.lexists(d):
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def secure_state_dir(state: Path) -> None:
    """Make the state directory (mode 700) when missing, then :class:`StateRefused` unless it is
    owned by the user serve runs as and writable by it alone, and every directory above it (along
    the path as given and the path it resolves to) is owned by root or that user and writable by
    its owner only, or sticky (another user may make a directory there, but it is not serve's: its
    owner is refused). Others' read and search bits on it are taken away (a directory made 755 by
    an earlier serve exposed the store to every local user)."""
    uid = os.geteuid()
    owners = (0,) if uid == 0 else (0, uid)
    make_dirs(state.parent, 0o755)
    with contextlib.suppress(FileExistsError):
        os.mkdir(state, 0o700)
    given = Path(os.path.abspath(state))
    fix = "give serve a directory of its own (docs/serve.md#the-state-directory)"
    for chain in (given, Path(os.path.realpath(given))):
        for d in [*reversed(chain.parents), chain]:
            try:
                ds = d.lstat()
            except OSError as exc:
                raise StateRefused(f"state directory {given}: {d}: {exc.strerror}") from None
            if stat.S_ISLNK(ds.st_mode):
                if ds.st_uid in owners:
                    continue  # root's or serve's own; its target is on the resolved chain
                raise StateRefused(
                    f"state directory {given}: {d} is a link owned by uid {ds.st_uid}, who could point it elsewhere: {fix}"
                )
            if d != chain:
                why = unsafe_directory(d, ds, sticky_ok=True, owners=owners, what="the state directory")
                if why is not None:
                    raise StateRefused(f"state directory {given}: {why}; {fix}")
    fd = os.open(given, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != uid:
            raise StateRefused(
                f"state directory {given}: owned by uid {st.st_uid}, not by uid {uid} that serve runs as: its owner "
                f"could read the store and swap links or a signing key of theirs into it; {fix}"
            )
        if mode & 0o022:
            raise StateRefused(
                f"state directory {given}: writable by group or others (mode {mode:o}): another user could have "
                "swapped links or a signing key of theirs into it. Check that nothing in it is another user's or a "
                f"link, then `chmod 700 {given}`"
            )
        if mode & 0o007:
            os.fchmod(fd, mode & 0o770)
            log.warning("state directory %s: others could read it (mode %o): now mode %o", given, mode, mode & 0o770)
    finally:
        os.close(fd)


def earlier_life(database: Path) -> list[str]:
    """What in the database's directory shows the control plane ran there before."""
    state = database.parent
    found = [name for name in _LIFE_FILES if (state / name).exists()]
    wal = database.with_name(database.name + "-wal")
    if wal.exists():
        found.append(wal.name)
    for name in _LIFE_OBJECTS:
        d = state / "objects" / name
        if d.is_dir() and any(d.iterdir()):
            found.append(f"objects/{name}/")
    return found


def check_state(database: Path, new_store: bool = False, *, fresh: str = "--new-store") -> None:
    """Refuse (:class:`StateRefused`) a missing or empty store in a directory used before, an
    empty file or an SQLite database without ringfence's schema anywhere, and ``new_store`` over a
    file that holds anything (an SQLite database without a table holds nothing). ``fresh``: what
    the refusals name to start a new store on purpose (another command than serve has none)."""
    try:
        size: int | None = database.stat().st_size
    except FileNotFoundError:
        size = None
    except OSError as exc:
        raise StateRefused(f"{database}: {exc.strerror}") from None
    schema = _schema(database) if size else None
    if new_store:
        if size and schema != (0, 0):
            raise StateRefused(
                f"{database}: --new-store, but the file holds {size} bytes: serve never starts a new store over "
                "one; move the file aside first (and remove --new-store once the new store is made)"
            )
        return
    restore = "restore it from its backup (docs/onprem.md#backup-and-restore)"
    if size == 0:
        raise StateRefused(
            f"{database}: an empty file (0 bytes), not a ringfence store: {restore}, or start a new, empty store "
            f"in its place with {fresh}"
        )
    if schema is not None and schema[0] == 0:
        # SQLite would take it for a new store and serve would start afresh beside the signing
        # key and published objects of the one it replaced
        held = f"{schema[1]} table(s) of something else" if schema[1] else "no table"
        fix = f"start a new, empty store in its place with {fresh}" if not schema[1] else "move it aside"
        raise StateRefused(
            f"{database}: an SQLite database without ringfence's schema (user_version 0, {held}), not a ringfence "
            f"store (a backup of a wrong path?): {restore}, or {fix}"
        )
    if size is None and database.parent.is_dir():
        found = earlier_life(database)
        if found:
            raise StateRefused(
                f"{database}: no such file, but {database.parent} was used before ({', '.join(found)}): a new store "
                "would forget every registration, agent token, pairing key, policy version and audit record. "
                f"Check the path, or {restore}; to start a new, empty store here on purpose, start once with {fresh}"
            )


def held(database: Path) -> str | None:
    """What the store holds (``3 workload(s), 12 audit record(s)``), read-only; None when it
    holds none of it, is not there or cannot be read (the store's own open says why)."""
    if not database.is_file() or database.stat().st_size == 0:
        return None
    try:
        db = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=30, isolation_level=None)
        try:
            counts = zip((int(n) for n in db.execute(_HELD_QUERY).fetchone()), _HELD, strict=True)
        finally:
            db.close()
    except sqlite3.Error:
        return None
    found = [f"{n} {what}" for n, what in counts if n]
    return ", ".join(found) if found else None


def check_signing_key(database: Path) -> None:
    """The state directory's own signing key, when serve is to use it (no ``--signing-key``):
    :class:`StateRefused` when it is missing, empty or does not load while the store beside it
    holds data. Missing beside a new or empty store, LocalWiring generates it."""
    key = database.parent / SIGNING_KEY
    missing = not key.exists() and not key.is_symlink()
    problem = None
    if not missing:
        try:
            # a link is not followed: nothing in the state directory leads root elsewhere
            fd = os.open(key, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                SigningKey.from_pem_file(f.read(), key)
            return
        except OSError as exc:
            problem = LINKED_KEY if exc.errno == errno.ELOOP else str(exc.strerror)
        except BundleError as exc:
            problem = str(exc).removeprefix(f"{key}: ")
    found = held(database)
    if found is None:
        return  # nothing signed yet, nothing pinned to it: generated (missing) or refused as it is (LocalWiring)
    what = "no such file" if missing else problem
    raise StateRefused(
        f"{key}: {what}, but {database.name} holds data ({found}): a new key would sign bundles that no enrolled "
        "agent accepts (they pinned this key's public key), so serve does not make one. Restore "
        f"{SIGNING_KEY} from its backup (docs/onprem.md#backup-and-restore), or give the key's path with "
        "--signing-key; if it is lost, rotate to a new key (docs/bundle.md#keys-and-rotation): `ringfence keygen`, "
        f"add its public key to every agent's key set, then put it here as {SIGNING_KEY} and start again"
    )


def _schema(database: Path) -> tuple[int, int] | None:
    """The file's SQLite ``user_version`` (ringfence's schema version; 0: none) and how many tables
    it holds, read-only; None when SQLite cannot read it (quick_check or the store's open says why)."""
    try:
        db = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=30, isolation_level=None)
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            tables = int(db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return version, tables


def quick_check(database: Path) -> None:
    """SQLite's ``PRAGMA quick_check`` of an existing store; :class:`StateRefused` naming the file
    and the first problems when it is damaged (or no database at all)."""
    if not database.is_file() or database.stat().st_size == 0:
        return
    try:
        # read-only: a damaged file is refused as it is, nothing written to it
        db = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=30, isolation_level=None)
        try:
            rows = [str(r[0]) for r in db.execute(f"PRAGMA quick_check({QUICK_CHECK_PROBLEMS})")]
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        found = classify(exc)
        if found is None or found[0] != "damaged":
            raise  # unreadable for another reason (permissions, a lock): the store's own open says so
        raise StateRefused(f"{database}: damaged (SQLite: {found[1]}): {_damaged(database)}") from None
    if rows != ["ok"]:
        rows = [" ".join(r.replace("*** in database main ***", "").split()) for r in rows]
        shown = "; ".join(rows[:3])
        more = f" (and {len(rows) - 3} more)" if len(rows) > 3 else ""
        raise StateRefused(f"{database}: damaged (SQLite quick_check: {shown}{more}): {_damaged(database)}")


def _damaged(database: Path) -> str:
    return (
        "serve does not start on a damaged store; keep the file for analysis, restore "
        f"{database.name} from its backup (docs/onprem.md#backup-and-restore) and start again"
    )
