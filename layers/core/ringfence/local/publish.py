"""Published documents as files: the on-premise counterpart of the S3 publisher.

Keys are relative paths under one directory (``<state>/objects``). Every file is written to a
temporary name, fsynced and renamed into place, so a reader (or a restart after ``kill -9``)
sees a whole document or none; bundle and delta keys are content-addressed, so a file is never
replaced by different bytes.

Any write that fails (any ``OSError``: a disk full, a directory restored as another user's, an
immutable one) is raised as :class:`~ringfence.store.failure.ObjectsUnwritable`, which ``serve``
counts as the state directory unavailable and answers 503, whatever its errno.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from ringfence import durable
from ringfence.control.publish import Publisher, TooLarge
from ringfence.local.statedir import make_dirs
from ringfence.store.failure import ObjectsUnwritable


class BadKey(ValueError):
    """A key that cannot name a file under the publisher's directory."""


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    """A failed write as ObjectsUnwritable: its errno and the system's text, not the path."""
    try:
        yield
    except ObjectsUnwritable:
        raise
    except OSError as exc:
        raise ObjectsUnwritable(exc.errno, exc.strerror or "cannot be written") from exc


class FilePublisher(Publisher):
    """``parent_fd``: ``root``'s parent (the state directory) as a descriptor the caller opened
    without following a link and checked; ``objects`` is made, and every read and write walks,
    from it, never from a path looked up again (root's ``publish-agent`` into a directory whose
    parent another user owns: they could swap the state directory for a link between writes).
    The caller keeps the descriptor open while the publisher is used, and closes it."""

    def __init__(self, root: Path, *, fsync: bool = True, parent_fd: int | None = None) -> None:
        super().__init__()
        self.root = root
        self.fsync = fsync
        self.parent_fd = parent_fd
        if parent_fd is None:
            make_dirs(root, 0o700)  # not by the umask: under 000 any local user could plant links here
        else:
            with durable._beneath(root.parent, Path(root.name, "-"), 0o700, root_fd=parent_fd):
                pass

    def path(self, key: str) -> Path:
        """The file of ``key``; keys never leave the directory (ids come from agents and CMDBs)."""
        parts = PurePosixPath(key).parts
        if (
            not parts
            or key.startswith("/")
            or "\\" in key
            or "\0" in key
            or any(p in (".", "..") or p.startswith(".") for p in parts)
            or str(PurePosixPath(key)) != key  # `a//b`, `a/`: one file under two keys
        ):
            raise BadKey(f"{key!r} cannot be used as a published key")
        return self.root.joinpath(*parts)

    def _below(self, key: str) -> Path:
        """``key``'s path relative to the objects directory's parent: writes walk down from there
        without following a link, ``objects`` itself included. root's ``publish-agent`` writes into
        the state directory of ``serve --user``, whose user could plant one (``objects/agent`` to a
        root-only directory)."""
        self.path(key)  # a key that cannot name a file: BadKey
        return Path(self.root.name, *PurePosixPath(key).parts)

    def _store(self, key: str, body: bytes, content_type: str) -> None:
        below = self._below(key)
        with _writing():
            durable.replace_beneath(
                self.root.parent, below, body, 0o600, sync=self.fsync, dir_mode=0o700, root_fd=self.parent_fd
            )

    def _create(self, key: str, body: bytes, content_type: str) -> bool:
        below = self._below(key)
        with _writing():  # always synced: a link never replaces a file
            return durable.create_beneath(self.root.parent, below, body, 0o600, dir_mode=0o700, root_fd=self.parent_fd)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The file of ``key``, reached one directory at a time from the root without following a
        link (so never outside it: a link planted in objects/ would have serve hand out any file it
        can read, the signing key included, to whoever asks for the key's route). A link, or
        anything but a regular file, is not published: FileNotFoundError, as a missing file.
        ``max_bytes``: a bigger file is :class:`TooLarge`, never read whole."""
        path = self.path(key)
        parts = PurePosixPath(key).parts
        try:
            fd = self._directory_of(parts)
            try:
                file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise FileNotFoundError(errno.ENOENT, "not a published file (a link)", str(path)) from None
            raise
        with os.fdopen(file_fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a published file", str(path))
            if max_bytes is None:
                return f.read()
            if st.st_size > max_bytes:
                raise TooLarge(f"{path}: {st.st_size} bytes, over {max_bytes}")
            data = f.read(max_bytes + 1)  # it may have grown since
        if len(data) > max_bytes:
            raise TooLarge(f"{path}: over {max_bytes} bytes")
        return data

    def delete(self, key: str) -> None:
        path = self.path(key)
        if self.parent_fd is None:
            with _writing():
                path.unlink(missing_ok=True)
            return
        parts = PurePosixPath(key).parts
        with _writing():
            try:
                fd = self._directory_of(parts)
            except FileNotFoundError:
                return
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(parts[-1], dir_fd=fd)
            finally:
                os.close(fd)

    def _directory_of(self, parts: tuple[str, ...]) -> int:
        """A descriptor of the directory holding ``parts`` (a key's), reached from the root one
        directory at a time without following a link (from ``parent_fd`` when given); OSError as
        :func:`os.open` raises it (ELOOP or ENOTDIR: a link or a file on the way)."""
        nofollow_dir = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        if self.parent_fd is None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            fd = os.open(self.root.name, nofollow_dir, dir_fd=self.parent_fd)
        try:
            for part in parts[:-1]:
                sub = os.open(part, nofollow_dir, dir_fd=fd)
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd


@contextlib.contextmanager
def _effective(uid: int, gid: int) -> Iterator[None]:
    """This process's effective uid and gid (and no supplementary groups) are ``uid``'s and
    ``gid``'s inside, root's again after. For a single-threaded command run as root only."""
    groups, egid = os.getgroups(), os.getegid()
    os.setgroups([])
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


class OwnersFilePublisher(FilePublisher):
    """A :class:`FilePublisher` whose every file operation is made as ``uid``/``gid`` (effective
    ids), for root's ``publish-agent`` into the state directory of ``serve --user``, which that
    user owns: what root wrote there (mode 600, directories 700) the serving user could not read
    or write into, and ``serve --user`` did not start. Made as the owner, the files are theirs,
    and nothing there is written with root's rights."""

    def __init__(self, root: Path, uid: int, gid: int, *, fsync: bool = True, parent_fd: int | None = None) -> None:
        self.uid, self.gid = uid, gid
        with _effective(uid, gid):
            super().__init__(root, fsync=fsync, parent_fd=parent_fd)

    def _store(self, key: str, body: bytes, content_type: str) -> None:
        with _effective(self.uid, self.gid):
            super()._store(key, body, content_type)

    def _create(self, key: str, body: bytes, content_type: str) -> bool:
        with _effective(self.uid, self.gid):
            return super()._create(key, body, content_type)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        with _effective(self.uid, self.gid):
            return super().get(key, max_bytes)

    def delete(self, key: str) -> None:
        with _effective(self.uid, self.gid):
            super().delete(key)
