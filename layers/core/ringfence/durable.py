"""Files written whole or not at all: the bytes go to a temporary file beside the target
(``.tmp-…``, exclusive, never through a symlink), are fsynced, and only then take the target's
name, after which the directory is fsynced so that the name itself survives a power loss. A
reader, or a restart after ``kill -9`` or a power cut, sees the whole file or none (or the one it
replaced), never an empty or partial one.

:func:`replace` puts the file over whatever held the name (a rename); :func:`create` only where
no file is (a link, which never replaces: of two writers of one name, one wins and the other's
bytes are dropped). The agent keeps its own (``ringfence_agent.state.atomic_write``): it does
not import the control plane's library."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def replace(path: Path, data: bytes, mode: int, *, sync: bool = True) -> None:
    """``data`` at ``path`` with permissions ``mode`` (whatever the umask), over any file there.
    ``sync=False`` skips both fsyncs: still whole or not at all to a reader, but a power cut may
    lose it."""
    with _temporary(path, data, mode, sync) as tmp:
        os.replace(tmp, path)
    if sync:
        _sync_directory(path.parent)


def create(path: Path, data: bytes, mode: int) -> bool:
    """``data`` at ``path`` with permissions ``mode`` (whatever the umask), only where no file
    is: False, and nothing written, when one is (whoever wrote it)."""
    with _temporary(path, data, mode, True) as tmp:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    _sync_directory(path.parent)
    return True


def replace_beneath(
    root: Path,
    relative: Path,
    data: bytes,
    mode: int,
    *,
    sync: bool = True,
    dir_mode: int | None = None,
    root_fd: int | None = None,
) -> None:
    """:func:`replace` of ``root / relative``, following no symbolic link below ``root``: ``root``
    may belong to another account (the web server's serving a static layout, serve's ``--user``
    owning the state directory), which could swap a subdirectory for a link to a root-only one.
    Each directory is made and opened relative to the one above it (``O_NOFOLLOW``; a missing one
    made of ``dir_mode`` whatever the umask, or by the umask when None), and the temporary file is
    made, and renamed, in the last one's descriptor. A link (or a non-directory) on the way raises
    :class:`NotADirectoryError` naming it; nothing is written then. ``root_fd``: ``root`` as a
    descriptor the caller opened and checked, used instead of opening ``root`` by path again (which
    follows a link its directory's owner may have swapped in meanwhile); ``root`` only names it."""
    with _beneath(root, relative, dir_mode, root_fd=root_fd) as fd:
        replace_at(fd, relative.name, data, mode, sync=sync)


def replace_at(dir_fd: int, name: str, data: bytes, mode: int, *, sync: bool = True) -> None:
    """:func:`replace` of ``name`` in the directory open as ``dir_fd``: the directory checked on
    that descriptor is the one written (no path looked up again between)."""
    tmp = _temporary_at(dir_fd, data, mode, sync)
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a link at ``name``, never follows it
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if sync:
        os.fsync(dir_fd)


def create_beneath(
    root: Path, relative: Path, data: bytes, mode: int, *, dir_mode: int | None = None, root_fd: int | None = None
) -> bool:
    """:func:`create` of ``root / relative``, following no link below ``root`` (as
    :func:`replace_beneath`, ``root_fd`` too)."""
    with _beneath(root, relative, dir_mode, root_fd=root_fd) as fd:
        tmp = _temporary_at(fd, data, mode, True)
        try:
            os.link(tmp, relative.name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
        os.fsync(fd)
        return True


@contextlib.contextmanager
def _beneath(root: Path, relative: Path, dir_mode: int | None, *, root_fd: int | None = None) -> Iterator[int]:
    """The descriptor of ``root / relative``'s directory, each directory below ``root`` made when
    missing and opened relative to the one above without following a link. ``root_fd``: ``root``
    already open (a duplicate is walked from; the caller keeps and closes its own)."""
    held = [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if root_fd is None else os.dup(root_fd)]
    try:
        where = root
        for part in relative.parts[:-1]:
            where = where / part
            made = True
            try:
                os.mkdir(part, 0o777 if dir_mode is None else dir_mode, dir_fd=held[-1])  # never follows a link
            except FileExistsError:
                made = False
            try:
                held.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=held[-1]))
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link (ELOOP) or a file at the name
                    raise NotADirectoryError(errno.ENOTDIR, "a symbolic link or not a directory", str(where)) from None
                raise
            if made and dir_mode is not None:
                os.fchmod(held[-1], dir_mode)  # whatever the umask
        yield held[-1]
    finally:
        for fd in held:
            os.close(fd)


def _temporary_at(dir_fd: int, data: bytes, mode: int, sync: bool) -> str:
    """A new file of an unguessable name in ``dir_fd`` holding ``data``; its name."""
    tmp = f".tmp-{secrets.token_hex(12)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    return tmp


@contextlib.contextmanager
def _temporary(path: Path, data: bytes, mode: int, sync: bool) -> Iterator[str]:
    """:func:`_temporary_at` in ``path``'s directory, by path; removed on leaving unless it was
    renamed away."""
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = os.path.join(path.parent, _temporary_at(dir_fd, data, mode, sync))
    finally:
        os.close(dir_fd)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
