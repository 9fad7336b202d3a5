"""``ringfence serve``: the agent and admin APIs over HTTP, for on-premise estates and local runs.

A Starlette app run by uvicorn. Each request becomes an API Gateway REST (v1) proxy event and is
handed to the same resolvers' ``resolve`` that the Lambda functions run (:mod:`ringfence.routes`):
no second implementation of any route. ``resolve`` blocks (the ``wait`` long-poll for up to its
timeout), so it runs in a thread pool with a large limit; a resolver serves one request at a time
(it keeps the current event on itself), so each thread takes one from a pool of resolvers over
the one shared service.

The admin API is authenticated here by bearer admin tokens (a file of
``principal:sha256(token):roles`` lines); the principal is put where API Gateway puts the IAM
caller (``requestContext.identity.userArn``), so the admin routes audit the same field on both
hosts, and the token's admin roles where a Lambda authorizer puts its context.
Nothing of the request's own reaches ``requestContext``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import logging
import os
import queue
import re
import secrets
import socket
import ssl
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from starlette.responses import Response

from ringfence.addresslimit import AddressLimit, limited
from ringfence.adminroles import AdminRole, AdminRolesError, parse_roles
from ringfence.control.wiring import Metric, no_metric
from ringfence.metrics import CONTENT_TYPE_LATEST, Counters

if TYPE_CHECKING:
    from ringfence.bundlewire import Signer
    from ringfence.store.failure import StoreHealth

log = logging.getLogger("ringfence.serve")

AGENT_PREFIX = "/v1/"
ADMIN_PREFIX = "/admin/"
DEFAULT_THREADS = 512  # concurrent long-polls (each waiting agent holds one), and other agent requests
ADMIN_THREADS = 32  # the admin API's own: no agent traffic queues an operator's quarantine
ENROLL_THREADS = 64  # nonce, enroll, token refresh, artifacts: unauthenticated, their own
EVENT_THREADS = 64  # cloud event deliveries
WAITS_PER_TOKEN = 2  # long-polls one bearer token keeps open at once (2: an agent's reconnect overlaps its old wait)
WAIT_RETRY_AFTER = 5  # seconds: the Retry-After of a wait refused for that
_WAIT_PATH = re.compile(r"^/v1/agents/[^/]+/wait$")
_TOKEN_PATH = re.compile(r"^/v1/agents/[^/]+/")
MAX_EVENT_BODY = 1024 * 1024  # an Event Grid delivery is at most 1 MB
MAX_AGENT_BODY = 1024 * 1024  # the largest agent body is a report batch (256 KiB): some headroom
MAX_ADMIN_BODY = 16 * 1024 * 1024  # policy files


class ServeError(Exception):
    """A setting ``ringfence serve`` cannot run with (the message says which and why)."""


class Resolver(Protocol):
    def resolve(self, event: dict[str, Any], context: Any) -> dict[str, Any]: ...


# --- admin tokens ----------------------------------------------------------------------------------

_PRINCIPAL = re.compile(r"^[A-Za-z0-9_.@+=,/:-]{1,256}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class AdminTokens:
    """Who may call the admin API: SHA-256 of a bearer token (hex) → its principal and admin roles.
    The file has one ``principal:sha256hex:role[,role…]`` per line (roles of
    :class:`ringfence.adminroles.AdminRole`); blank lines and ``#`` comments are ignored. Tokens
    themselves are never stored, logged or compared in the clear."""

    by_hash: dict[str, str] = field(default_factory=dict)
    roles_by_hash: dict[str, frozenset[AdminRole]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> AdminTokens:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ServeError(f"--admin-tokens {path}: {exc.strerror}") from None
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: bytes, path: Path) -> AdminTokens:
        """The tokens in ``data``, the text of the file ``path`` (named in errors)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ServeError(f"--admin-tokens {path}: not UTF-8 text (byte {exc.start})") from None
        by_hash: dict[str, str] = {}
        roles_by_hash: dict[str, frozenset[AdminRole]] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            head, _, roles = line.rpartition(":")
            principal, sep, digest = head.rpartition(":")
            if _SHA256.match(roles.lower()) and not _SHA256.match(digest.lower()):
                raise ServeError(
                    f"{path}:{n}: no admin roles: append :ROLE[,ROLE…] ({', '.join(r.value for r in AdminRole)});"
                    " `ringfence serve-token --role` writes it"
                )
            if sep and any(_SHA256.match(part.lower()) for part in principal.split(":")):
                # two entries run together (a line written without its newline): the principal
                # would carry the earlier entry's hash, its holder locked out
                raise ServeError(
                    f"{path}:{n}: the principal {principal.split(':')[0]!r} runs into another entry (a token"
                    " hash in the principal): one principal:sha256hex:roles a line"
                )
            if not sep or not _PRINCIPAL.match(principal) or not _SHA256.match(digest.lower()):
                raise ServeError(
                    f"{path}:{n}: expected principal:sha256hex:roles (64 hex digits; principal of letters,"
                    " digits and _.@+=,/:-)"
                )
            try:
                held = parse_roles(roles.split(","), f"{path}:{n}")
            except AdminRolesError as exc:
                raise ServeError(str(exc)) from None
            if digest.lower() in by_hash:
                raise ServeError(f"{path}:{n}: the same token hash is listed twice")
            by_hash[digest.lower()] = principal
            roles_by_hash[digest.lower()] = held
        if not by_hash:
            raise ServeError(f"{path}: no admin tokens (lines of principal:sha256hex:roles)")
        return cls(by_hash, roles_by_hash)

    def holder(self, authorization: str | None) -> tuple[str, frozenset[AdminRole]] | None:
        """The principal whose token the ``Authorization: Bearer`` header carries, and its roles."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        got = token_hash(authorization.removeprefix("Bearer ").strip())
        found = None
        for digest, principal in self.by_hash.items():  # compare every entry: no early exit
            if hmac.compare_digest(digest, got):
                found = (principal, self.roles_by_hash.get(digest, frozenset()))
        return found

    def principal(self, authorization: str | None) -> str | None:
        """The principal whose token the ``Authorization: Bearer`` header carries, else None."""
        held = self.holder(authorization)
        return held[0] if held else None


def tokens_path_problem(path: Path, owners: frozenset[int], *, missing_ok: bool = False) -> str | None:
    """Why a user other than ``owners`` (uids) could change what the tokens file at ``path``
    holds, or None: every directory above it, along the path as given and along the path it
    resolves to, must be owned by one of ``owners`` and writable by its owner only (one further
    up may be sticky, as /tmp is: there another user cannot rename an entry that is not theirs);
    a symbolic link on the way must be theirs too (:func:`ringfence.local.signer_process.path_problem`).
    The file itself is checked on the descriptor it is read from (:func:`read_tokens_file`)."""
    from ringfence.local.signer_process import path_problem

    return path_problem(
        path,
        tuple(sorted(owners)),
        label="tokens file",
        what="the tokens file (with serve --user, no directory on its path may be the --user user's)",
        check_self=True,
        missing_ok=missing_ok,
    )


def file_problem(path: Path, st: os.stat_result, owners: frozenset[int], served: int | None = None) -> str | None:
    """Why the opened tokens file ``st`` is one another user could write, or None. ``served``:
    the uid ``serve --user`` drops to, named as such when it owns the file."""
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if served is not None and st.st_uid == served:
        return (
            f"{path} is owned by uid {st.st_uid}, the --user user serve drops to: whoever takes over serve could "
            "add a token of their own (make it root's: chown root, chmod 640 or 600)"
        )
    if st.st_uid not in owners:
        return f"{path} is owned by uid {st.st_uid}, who could add a token of their own"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): anyone who may write it may add a token"
    return None


def read_tokens_file(path: Path, owners: frozenset[int], served: int | None = None) -> bytes:
    """The tokens file's bytes, refused (:class:`ServeError`) where a user other than ``owners``
    could have written them: the file or a directory on its path theirs or writable by them. A
    token line is an admin's credential, so whoever may write the file is an admin."""
    why = tokens_path_problem(path, owners)
    if why is not None:
        raise ServeError(f"--admin-tokens {path}: refused: {why}")
    try:
        fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ServeError(f"--admin-tokens {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        why = file_problem(path, os.fstat(f.fileno()), owners, served)
        if why is not None:
            raise ServeError(f"--admin-tokens {path}: refused: {why}")
        return f.read()


class AdminTokenFile:
    """The ``--admin-tokens`` file as ``serve`` holds it: read again when it changes (its size,
    mtime or inode), at the next admin request, so removing a line revokes that token without a
    restart. A file that no longer reads (a typo, a half-written edit) refuses every admin token
    until it reads again, and says so in the log: a revocation never silently fails to apply.
    Only a file that root or the user that started ``serve`` alone may write is read, at start
    and on every change (:func:`read_tokens_file`): one that another user may write refuses every
    admin token, as a file that no longer reads does, since what it holds may be theirs. ``served``
    (``serve --user``: the uid it drops to) is never an accepted owner: whoever takes over the
    serving process is that user, and could otherwise add tokens the next read accepts."""

    def __init__(self, path: Path, served: int | None = None) -> None:
        self.path = path
        self.served = served
        self.owners = frozenset({0, os.geteuid()} - {served})  # fixed here, before any drop
        self._lock = threading.Lock()
        self._seen = self._stamp()
        self._tokens: AdminTokens | None = self._load()  # at start a bad file is an error
        self._blind = False  # this process may not look at the file (serve --user, a root-only file)

    @property
    def by_hash(self) -> dict[str, str]:
        return self._tokens.by_hash if self._tokens else {}

    def _load(self) -> AdminTokens:
        return AdminTokens.parse(read_tokens_file(self.path, self.owners, self.served), self.path)

    def _stamp(self) -> tuple[int, int, int, int] | PermissionError | None:
        try:
            st = os.stat(self.path)
        except PermissionError as exc:
            return exc
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def current(self) -> AdminTokens | None:
        stamp = self._stamp()
        with self._lock:
            if isinstance(stamp, PermissionError):
                # read before serve --user dropped to its user (docs/serve.md: it may stay root's):
                # the set read at start stands, and a revocation needs a restart; said once
                if not self._blind:
                    self._blind = True
                    log.warning(
                        "admin tokens: %s cannot be looked at by this process (%s): the tokens read at start "
                        "stand until a restart (make the file readable by the serving user to revoke without one)",
                        self.path,
                        stamp.strerror,
                    )
                return self._tokens
            if stamp != self._seen:
                self._seen = stamp
                # whatever goes wrong, the old set never stands: a revocation must not fail silently
                self._tokens = None
                try:
                    self._tokens = self._load()
                    log.warning("admin tokens read again from %s (it changed)", self.path)
                except ServeError as exc:
                    log.error("admin tokens: %s: every admin token is refused until the file reads again", exc)
                except Exception as exc:  # nothing in the file may keep a revoked token working
                    log.error(
                        "admin tokens: %s: unexpected %s: every admin token is refused until the file reads again",
                        self.path,
                        type(exc).__name__,
                    )
            return self._tokens

    def holder(self, authorization: str | None) -> tuple[str, frozenset[AdminRole]] | None:
        tokens = self.current()
        return tokens.holder(authorization) if tokens else None

    def principal(self, authorization: str | None) -> str | None:
        held = self.holder(authorization)
        return held[0] if held else None


def new_admin_token(principal: str, roles: Iterable[str]) -> tuple[str, str]:
    """(token, the line for the tokens file)."""
    if not _PRINCIPAL.match(principal):
        raise ServeError(f"principal {principal!r}: letters, digits and _.@+=,/:- only")
    try:
        held = parse_roles(roles, "--role")
    except AdminRolesError as exc:
        raise ServeError(str(exc)) from None
    if not held:
        raise ServeError(f"{principal}: an admin token needs at least one role (--role)")
    token = secrets.token_urlsafe(32)
    return token, f"{principal}:{token_hash(token)}:{','.join(sorted(r.value for r in held))}"


# --- stores ----------------------------------------------------------------------------------------


def build_wiring(
    store: str,
    signing_key: Path | Signer | None = None,
    siem: str | None = None,
    metric: Metric = no_metric,
    new_store: bool = False,
) -> Any:
    """The services' wiring for a ``--store`` value: ``sqlite:PATH`` (the SQLite file ``PATH``; its
    directory holds the published objects and, unless ``signing_key`` is given, the signing key:
    :class:`ringfence.local.wiring.LocalWiring`, with its compute worker) or ``aws`` (DynamoDB, S3
    and SQS named by the RINGFENCE_* environment, endpoints by the AWS SDK's, e.g.
    ``AWS_ENDPOINT_URL``; compute runs where the stack runs it). ``siem`` (``--siem``) overrides
    ``$RINGFENCE_SIEM``: where audit records, drops and findings also go (:mod:`ringfence.siem`).
    ``metric``: what the services count (the compute worker's with ``sqlite:``; :class:`ringfence.metrics.Counters`).
    With ``sqlite:`` the state directory is checked first (:mod:`ringfence.local.statedir`): a
    missing or empty store where the control plane ran before, or a damaged one, is refused unless
    ``new_store`` (``--new-store``) asks for a new one, and so is the state directory's own signing
    key missing or unusable beside a store holding data; a key or directory that cannot be used is
    a :class:`ServeError` naming its path."""
    import dataclasses

    if siem:
        from ringfence.siem import Siem, SiemSpecError

        try:
            Siem.from_spec(siem).close()  # a bad spec fails here, before anything starts
        except SiemSpecError as exc:
            raise ServeError(str(exc)) from None
    if store == "aws":
        if new_store:
            raise ServeError("--new-store is for --store sqlite:PATH")
        if signing_key is not None:
            raise ServeError("--signing-key is for --store sqlite:PATH (on AWS: RINGFENCE_SIGNING_KEY)")
        from ringfence.clouds.aws.wiring import Wiring
        from ringfence.control.wiring import Config

        # its failed hand-offs (the GCP and Azure routes and passes it may serve) are marked in a
        # partition of its own, which the scheduled passes drain
        cfg = Config.from_env(owed_writer="serve")
        w = Wiring(dataclasses.replace(cfg, siem=siem) if siem else cfg)
        w.metric = metric  # what the agent API's routes count (GET /metrics)
        return w
    if store.startswith("sqlite:") and store.removeprefix("sqlite:"):
        from ringfence.bundle import BundleError
        from ringfence.local.statedir import (
            StateRefused,
            check_signing_key,
            check_state,
            quick_check,
            secure_state_dir,
        )
        from ringfence.local.wiring import LocalWiring, StateInUse

        database = Path(store.removeprefix("sqlite:"))
        try:
            from ringfence.local.wiring import local_config

            secure_state_dir(database.parent)  # before anything in it is read: nothing there may be another user's
            check_state(database, new_store)
            quick_check(database)
            if signing_key is None:
                check_signing_key(database)  # never a new key beside a store whose agents pinned the old one
            local = dataclasses.replace(local_config(), siem=siem) if siem else None
            return LocalWiring(database, signing_key=signing_key, cfg=local, metric=metric)
        except (StateInUse, StateRefused, BundleError) as exc:
            raise ServeError(str(exc)) from None
        except OSError as exc:  # a state directory that cannot be written (read-only, not ours), a key not there
            raise ServeError(f"{exc.filename or database.parent}: {exc.strerror or exc}") from None
    raise ServeError(f"--store {store!r}: expected sqlite:PATH or aws")


def _refuse_key_left_in(state: Path, user: str) -> None:
    """A key left in the state directory (copied there, not moved, when moving to --user) is one
    the user can read. Looked for as root and again as the user: root bounded as the systemd unit
    bounds it (no CAP_DAC_OVERRIDE) cannot look into the user's directory, nor the user into root's."""
    try:
        left = (state / "signing-key.pem").exists()
    except PermissionError:
        return
    if left:
        raise ServeError(
            f"{state / 'signing-key.pem'}: a signing key in the state directory, which {user} owns and can read: "
            "move it (do not copy it) to a root-only directory and give that path with --signing-key"
        )


def make_state_dir(state: Path, uid: int, gid: int) -> None:
    """Create the state directory (and its missing parents, 755) as root and hand it to the user.
    The path is walked from ``/`` one directory at a time, each opened relative to the one above
    without following a link, a missing one made there: where the user owns a directory on the
    way, they could otherwise swap a fresh parent, or the state directory itself, for a link
    between a mkdir and a chown by path, and root would hand them a directory wherever it points.
    A link already on the path is followed only if root owns it (its target is walked the same
    way); one of anyone else's is refused."""
    nofollow = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    todo = list(Path(os.path.abspath(state)).parts[1:])
    where, hops = Path("/"), 0
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while todo:
            part = todo.pop(0)
            last, made = not todo, False
            if last:  # the state directory: made here, by root, or refused
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:
                    raise ServeError(f"state directory {state}: made by someone else meanwhile") from None
                made = True
            try:
                try:
                    below = os.open(part, nofollow, dir_fd=fd)
                except FileNotFoundError:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=fd)  # never follows a link at the name
                        made = True
                    below = os.open(part, nofollow, dir_fd=fd)
            except OSError as exc:
                st = None
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link (either errno, by the kernel)
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    st = st if stat.S_ISLNK(st.st_mode) else None
                if st is None or made or st.st_uid != 0 or hops >= 40:
                    raise ServeError(
                        f"state directory {state}: {where / part}: "
                        + (f"a link owned by uid {st.st_uid}, not root" if st is not None else str(exc.strerror))
                        + " (or replaced while it was being made)"
                    ) from None
                hops += 1  # root's link: walk its target the same way
                target = os.readlink(part, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd, where = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), Path("/")
                todo = [*Path(target).parts[1 if target.startswith("/") else 0 :], *todo]
                continue
            os.close(fd)
            fd, where = below, where / part
            if made and not last:
                os.fchmod(fd, 0o755)  # whatever the umask: never 777 (umask 000), nor closed to the user (077)
        os.fchmod(fd, 0o750)  # first: once the user's, root bounded by the unit (no CAP_FOWNER) may not
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def separate_signer(store: str, signing_key: Path | None, user: str) -> Any:
    """``--user``: spawn the signer on ``signing_key`` (it alone loads the key), then drop this
    process to ``user`` for good; the signer (:mod:`ringfence.local.signer_process`). The
    state directory is made for ``user`` when missing, and must be writable by it."""
    from ringfence.local.signer_process import SignerError, SignerProcess, drop_privileges, service_user

    if not (store.startswith("sqlite:") and store.removeprefix("sqlite:")):
        raise ServeError("--user is for --store sqlite:PATH (on AWS the signing key is compute's alone)")
    if signing_key is None:
        raise ServeError("--user needs --signing-key: a root-owned key file (mode 600) that the user cannot read")
    if os.geteuid() != 0:
        raise ServeError("--user: start ringfence serve as root (it drops to the user after spawning the signer)")
    state = Path(store.removeprefix("sqlite:")).parent
    _refuse_key_left_in(state, user)
    try:
        pw = service_user(user)
        if not state.exists():
            make_state_dir(state, pw.pw_uid, pw.pw_gid)
        signer = SignerProcess.spawn(signing_key)  # as given: the signer checks the path and where it leads
    except SignerError as exc:
        raise ServeError(str(exc)) from None
    try:
        drop_privileges(pw)
        _refuse_key_left_in(state, user)  # again as the user, in the directory root may not look into
        if not os.access(state, os.W_OK | os.X_OK):
            raise ServeError(f"state directory {state} is not writable by {user}: give it (and its files) to {user}")
    except BaseException as exc:
        signer.close()
        if isinstance(exc, SignerError):
            raise ServeError(str(exc)) from None
        raise
    return signer


# --- requests → proxy events -----------------------------------------------------------------------


def proxy_event(
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    query: list[tuple[str, str]],
    body: bytes,
    source_ip: str,
    principal: str | None = None,
    roles: frozenset[AdminRole] | None = None,
) -> dict[str, Any]:
    """The API Gateway REST (v1) proxy event of a request, as API Gateway builds it. The identity
    is this server's finding (the client's address; the admin token's principal), never taken
    from anything the client sent."""
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for k, v in headers:
        single[k] = v
        multi.setdefault(k, []).append(v)
    qs: dict[str, str] = {}
    mqs: dict[str, list[str]] = {}
    for k, v in query:
        qs[k] = v
        mqs.setdefault(k, []).append(v)
    try:
        text: str | None = body.decode() if body else None
        b64 = False
    except UnicodeDecodeError:
        text, b64 = base64.b64encode(body).decode(), True
    identity: dict[str, Any] = {"sourceIp": source_ip, "userArn": principal, "caller": principal}
    return {
        "resource": path,
        "path": path,
        "httpMethod": method,
        "headers": single,
        "multiValueHeaders": multi,
        "queryStringParameters": qs or None,
        "multiValueQueryStringParameters": mqs or None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "accountId": "local",
            "apiId": "ringfence-serve",
            "httpMethod": method,
            "path": path,
            "protocol": "HTTP/1.1",
            "requestId": str(uuid.uuid4()),
            "requestTimeEpoch": int(time.time() * 1000),
            "resourceId": "serve",
            "resourcePath": path,
            "stage": "serve",
            "identity": identity,
            # the admin token's roles, where a Lambda authorizer puts its context (routes.admin.token_roles)
            "authorizer": {"ringfence_roles": ",".join(sorted(r.value for r in roles))} if roles is not None else None,
        },
        "body": text,
        "isBase64Encoded": b64,
    }


Outcome = Callable[[str, int], "str | None"]
"""(path, status) → the metric an answer counts toward, or None (the routes' ``outcome``)."""


class ResolverPool:
    """Resolvers built by ``build`` on demand and reused: one per concurrent request. ``outcome``:
    what each answer counts toward in ``GET /metrics`` (as the Lambda function publishes it)."""

    def __init__(self, build: Callable[[], Resolver], outcome: Outcome | None = None) -> None:
        self.build = build
        self.outcome = outcome
        self._idle: queue.SimpleQueue[Resolver] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.built = 0

    def resolve(self, event: dict[str, Any]) -> dict[str, Any]:
        try:
            app = self._idle.get_nowait()
        except queue.Empty:
            with self._lock:
                self.built += 1
            app = self.build()
        try:
            return app.resolve(event, None)
        finally:
            self._idle.put(app)


# --- the ASGI app ----------------------------------------------------------------------------------


@dataclass
class ServeApp:
    """What ``ringfence serve`` serves: the agent API (``/v1/…``) and, with admin tokens, the
    admin API (``/admin/…``) over one wiring."""

    agent: ResolverPool
    admin: ResolverPool | None
    tokens: AdminTokens | AdminTokenFile | None
    threads: int = DEFAULT_THREADS
    asgi: Any = None
    # cloud name → the handler of its event deliveries (``POST /<cloud>/events``): headers, body → answer
    cloud_events: dict[str, Callable[[Mapping[str, str], bytes], Any]] = field(default_factory=dict)
    azure: Any = None  # the ringfence.clouds.azure.wiring.Azure served, if any
    gcp: ResolverPool | None = None  # POST /gcp/events, when RINGFENCE_GCP_PROJECTS is set
    azure_events: ResolverPool | None = None  # POST /azure/events, when Azure is configured
    # what the services count (the Lambda functions' CloudWatch metrics): GET /metrics, admin token
    metrics: Counters = field(default_factory=Counters)
    # requests per client address to nonce, enroll and token (the AWS web ACL's rule); default:
    # AddressLimit.from_env()
    address_limit: AddressLimit | None = None
    # the local store's health (LocalWiring's): once it is damaged, no request is answered from it
    health: StoreHealth | None = None
    # the local compute worker (LocalWiring's): what it owes after a failed computation
    compute: Any = None

    @classmethod
    def over(
        cls,
        wiring: Any,
        tokens: AdminTokens | AdminTokenFile | None,
        threads: int = DEFAULT_THREADS,
        azure: Any = None,
        metrics: Counters | None = None,
        address_limit: AddressLimit | None = None,
    ) -> ServeApp:
        """The APIs over ``wiring``, the admin routes of on-premise workloads (register, CMDB
        import, deregister) among them whatever the wiring, as the AWS admin function routes
        them. ``azure`` (a :class:`ringfence.clouds.azure.wiring.Azure`; default: one from the environment when
        ``RINGFENCE_AZURE_SUBSCRIPTIONS`` is set) adds ``POST /azure/events`` (Event Grid) and the
        ``azure-attested`` enrollment. ``metrics``: the counters ``GET /metrics`` shows (the ones
        the wiring's compute counts into, when it was built with them). ``address_limit``: the
        limit per client address on nonce, enroll and token (default: from the environment,
        :meth:`ringfence.addresslimit.AddressLimit.from_env`)."""
        from ringfence.clouds.onprem import OnPremAdmin
        from ringfence.control.agents import AgentApi
        from ringfence.routes import admin as admin_api
        from ringfence.routes import agent as agent_api
        from ringfence.routes.common import answer_store_failures

        counters = metrics if metrics is not None else Counters()
        gcp, enrollers = gcp_services(wiring, metric=counters)
        api = AgentApi(wiring, enrollers)
        adm = OnPremAdmin(wiring, counters)
        # the local store's failures (full, locked, damaged): answered 503 by every route, counted
        health = getattr(wiring, "health", None)
        worker = getattr(wiring, "worker", None)  # the local compute worker
        if worker is not None:
            counters.gauge(
                "ComputeOwedSeconds",
                "how long a failed computation's work has waited for a retry that succeeds (0: none owed)",
                worker.owed_seconds,
            )

        def guarded(app: Any, told: bool = False) -> Any:
            # the reason (state.db: …) only to a caller authenticated without the store: the admin
            # API's tokens are a file; agents' tokens and event deliveries are checked from it
            return answer_store_failures(app, health, told) if health is not None else app

        agent = ResolverPool(lambda: guarded(agent_api.agent_routes(lambda: api)), agent_api.outcome)
        admin = None
        if tokens is not None:
            admin = ResolverPool(
                lambda: guarded(
                    admin_api.admin_routes(lambda: adm, onprem=lambda: adm, roles_of=admin_api.token_roles),
                    told=True,
                ),
                lambda _path, status: admin_api.outcome(status),
            )
        events: dict[str, Callable[[Mapping[str, str], bytes], Any]] = {}
        if azure is None and os.environ.get("RINGFENCE_AZURE_SUBSCRIPTIONS"):
            from ringfence.clouds.azure.wiring import Azure, AzureConfig

            azure = Azure(AzureConfig.from_env())
        azure_events = None
        if azure is not None:
            from ringfence.clouds.azure.ingest import AzureEvents
            from ringfence.clouds.azure.wiring import attach
            from ringfence.routes.azure import azure_event_routes

            attach(wiring, azure)
            ingest = AzureEvents(wiring, azure, counters)
            azure_events = ResolverPool(lambda: guarded(azure_event_routes(lambda: ingest)))
        return cls(
            agent,
            admin,
            tokens,
            threads,
            health=health,
            compute=worker,
            gcp=gcp,
            cloud_events=events,
            azure=azure,
            azure_events=azure_events,
            metrics=counters,
            address_limit=address_limit,
        )

    def __post_init__(self) -> None:
        import anyio
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        # each kind of request its own threads: long-polls hold theirs for up to max_wait, and
        # however many an agent opens, other agents' heartbeats, enrollment and the admin API
        # (an operator's quarantine) keep threads of their own
        waits = anyio.CapacityLimiter(self.threads)
        agents = anyio.CapacityLimiter(self.threads)
        enrolls = anyio.CapacityLimiter(ENROLL_THREADS)
        admins = anyio.CapacityLimiter(ADMIN_THREADS)
        events = anyio.CapacityLimiter(EVENT_THREADS)
        # long-polls open per bearer token (its SHA-256): one enrolled host cannot take the wait
        # threads of every other (asyncio: read and written on the event loop only)
        open_waits: dict[str, int] = {}
        # what the AWS web ACL does before API Gateway: one address flooding nonces or enrollments
        # (each nonce a write) must not take them from every other host. Here, not in the routes:
        # on AWS the web ACL limits these requests, and the Lambda functions must not do it twice
        if self.address_limit is None:
            try:
                self.address_limit = AddressLimit.from_env()
            except ValueError as exc:
                raise ServeError(str(exc)) from None
        per_address = self.address_limit
        per_address.metric = self.metrics

        def error(status: int, msg: str, detail: str = "", headers: dict[str, str] | None = None) -> Response:
            return JSONResponse({"error": msg, "detail": detail}, status, headers=headers)

        def damaged(told: bool) -> Response:
            from ringfence.routes.common import store_failure

            assert self.health is not None and self.health.damaged
            out = store_failure("damaged", self.health.damaged, told)
            return JSONResponse(out.body, 503, headers=out.headers or None)

        async def read_body(request: Request, limit: int) -> bytes | None:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
            return b"".join(chunks)

        async def dispatch(
            request: Request,
            pool: ResolverPool,
            limit: int,
            principal: str | None,
            roles: frozenset[AdminRole] | None = None,
            limiter: Any = None,
        ) -> Response:
            if self.health is not None and self.health.damaged:
                if pool is self.agent and not (request.headers.get("authorization") or "").startswith("Bearer "):
                    from ringfence.routes.agent import needs_bearer

                    if needs_bearer(request.scope["path"]):
                        # unauthenticated: refused as always, before anything about the store is said
                        if pool.outcome and (counted := pool.outcome(request.url.path, 401)):
                            self.metrics(counted, 1)
                        return error(401, "missing bearer token")
                return damaged(told=principal is not None)  # the admin API's caller is authenticated by now
            body = await read_body(request, limit)
            if body is None:
                return error(413, "request too large", f"over {limit} bytes")
            event = proxy_event(
                request.method,
                # the path as asked (decoded), not request.url.path: that is re-parsed from a URL
                # string, which drops a newline (%0A) and ends at a decoded "?", so a path naming
                # no workload ("dc1-db-1%0A") reached another's route
                request.scope["path"],
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                list(request.query_params.multi_items()),
                body,
                request.client.host if request.client else "",
                principal,
                roles,
            )
            out = await anyio.to_thread.run_sync(pool.resolve, event, limiter=limiter or agents)
            counted = pool.outcome(request.url.path, int(out["statusCode"])) if pool.outcome else None
            if counted is not None:
                self.metrics(counted, 1)
            return to_response(out)

        async def agent(request: Request) -> Response:
            if limited(request.method, request.url.path, request.headers.get("authorization")):
                # the TCP peer: serve takes no forwarded-for header from anyone (uvicorn_server)
                wait = per_address.take(request.client.host if request.client else "")
                if wait is not None:
                    return error(
                        429,
                        "too many requests from this address",
                        f"over {per_address.limit} requests in {per_address.window:g} s to nonce, enroll and token",
                        {"Retry-After": str(wait)},
                    )
            path = re.sub("/+", "/", request.url.path).rstrip("/")  # the resolver routes …/wait/ as …/wait
            if not _WAIT_PATH.match(path):
                limiter = agents if _TOKEN_PATH.match(path) else enrolls
                return await dispatch(request, self.agent, MAX_AGENT_BODY, None, None, limiter)
            # the token as the agent API reads it (spacing around it changes nothing)
            key = token_hash((request.headers.get("authorization") or "").removeprefix("Bearer ").strip())
            if open_waits.get(key, 0) >= WAITS_PER_TOKEN:
                return error(
                    429,
                    "too many waits",
                    f"this token keeps {WAITS_PER_TOKEN} long-polls open already: wait for one to answer",
                    {"Retry-After": str(WAIT_RETRY_AFTER)},
                )
            open_waits[key] = open_waits.get(key, 0) + 1
            try:
                return await dispatch(request, self.agent, MAX_AGENT_BODY, None, None, waits)
            finally:
                left = open_waits[key] - 1
                if left:
                    open_waits[key] = left
                else:
                    del open_waits[key]

        async def admin(request: Request) -> Response:
            if self.admin is None or self.tokens is None:
                return error(404, "the admin API is off", "start ringfence serve with --admin-tokens FILE")
            held = self.tokens.holder(request.headers.get("authorization"))
            if held is None:
                return error(
                    401, "admin token required", "Authorization: Bearer <admin token>", {"WWW-Authenticate": "Bearer"}
                )
            return await dispatch(request, self.admin, MAX_ADMIN_BODY, *held, admins)

        async def cloud_event(request: Request) -> Response:
            handle = self.cloud_events.get(request.path_params["cloud"])
            if handle is None:
                return error(404, "no such event source", "configured: " + ", ".join(sorted(self.cloud_events)))
            body = await read_body(request, MAX_EVENT_BODY)
            if body is None:
                return error(413, "request too large", f"over {MAX_EVENT_BODY} bytes")
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers.raw}
            out = await anyio.to_thread.run_sync(handle, headers, body, limiter=events)
            return JSONResponse(out.body, out.status, headers=out.headers)

        async def gcp(request: Request) -> Response:
            if self.gcp is None:
                return error(404, "GCP events are off", "set RINGFENCE_GCP_PROJECTS (docs/deploy-gcp.md)")
            return await dispatch(request, self.gcp, MAX_AGENT_BODY, None, None, events)

        async def azure_events(request: Request) -> Response:
            if self.azure_events is None:
                return error(404, "Azure events are off", "set RINGFENCE_AZURE_SUBSCRIPTIONS (docs/deploy-azure.md)")
            return await dispatch(request, self.azure_events, MAX_EVENT_BODY, None, None, events)

        async def healthz(request: Request) -> Response:
            if self.health is not None and self.health.damaged:
                # unhealthy, to anyone; why (state.db: …), only to a holder of an admin token
                if self.tokens is not None and self.tokens.holder(request.headers.get("authorization")) is not None:
                    return JSONResponse({"ok": False, "error": self.health.damaged}, 503)
                return JSONResponse({"ok": False}, 503)
            owed = self.compute.state() if self.compute is not None else None
            if (
                owed is not None
                and self.tokens is not None
                and self.tokens.holder(request.headers.get("authorization"))
            ):
                # serving still (agents fetch what is published, admins act), but no change reaches
                # agents until a computation succeeds: why, to a holder of an admin token only
                return JSONResponse({"ok": True, "compute": owed})
            return JSONResponse({"ok": True})

        async def metrics(request: Request) -> Response:
            # the counts say what administrators and agents do: any admin token (reader too) reads them
            if self.tokens is None:
                return error(404, "metrics need the admin API", "start ringfence serve with --admin-tokens FILE")
            if self.tokens.holder(request.headers.get("authorization")) is None:
                return error(
                    401, "admin token required", "Authorization: Bearer <admin token>", {"WWW-Authenticate": "Bearer"}
                )
            return Response(self.metrics.exposition(), 200, media_type=CONTENT_TYPE_LATEST)

        methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
        self.asgi = Starlette(
            routes=[
                Route(AGENT_PREFIX + "{rest:path}", agent, methods=methods),
                Route(ADMIN_PREFIX + "{rest:path}", admin, methods=methods),
                Route("/gcp/events", gcp, methods=["POST"]),
                Route("/azure/events", azure_events, methods=["POST"]),
                Route("/{cloud}/events", cloud_event, methods=["POST"]),  # after the clouds routed above
                Route("/healthz", healthz, methods=["GET"]),
                Route("/metrics", metrics, methods=["GET"]),
            ]
        )


def gcp_services(
    wiring: Any, env: Mapping[str, str] | None = None, metric: Metric = no_metric
) -> tuple[ResolverPool | None, dict[str, Any]]:
    """The GCP events route and the ``gcp-jwt`` enroller over ``wiring``, when the environment
    configures GCP (``RINGFENCE_GCP_PROJECTS``; the audiences turn each on): (None, {}) otherwise,
    and the Google SDKs are never imported."""
    e = os.environ if env is None else env
    if not e.get("RINGFENCE_GCP_PROJECTS"):
        return None, {}
    from ringfence.clouds.gcp.config import GcpConfig
    from ringfence.clouds.gcp.enroll import METHOD, GcpEnroller
    from ringfence.clouds.gcp.ingest import GcpIngest
    from ringfence.routes.gcp import gcp_event_routes

    try:
        cfg = GcpConfig.from_env(e)
    except ValueError as exc:  # e.g. secure tags trusted under any parent: refuse to start
        raise ServeError(f"GCP configuration: {exc}") from None
    ingest = GcpIngest(wiring, cfg, metric=metric)
    health = getattr(wiring, "health", None)  # the local store's: a failure answered 503, as on every route
    enrollers: dict[str, Any] = {}
    if cfg.identity_audience:
        enrollers[METHOD] = GcpEnroller(wiring, cfg, ingest)
        if METHOD not in wiring.cfg.enroll_methods:
            wiring.cfg.enroll_methods.append(METHOD)
    from ringfence.routes.common import answer_store_failures

    def routes() -> Any:
        app = gcp_event_routes(lambda: ingest)
        return answer_store_failures(app, health, told=False) if health is not None else app

    return ResolverPool(routes), enrollers


def to_response(out: dict[str, Any]) -> Response:
    body = out.get("body") or ""
    raw = base64.b64decode(body) if out.get("isBase64Encoded") else body.encode()
    resp = Response(raw, status_code=int(out["statusCode"]))
    for k, v in (out.get("headers") or {}).items():
        resp.headers[k] = str(v)
    for k, vs in (out.get("multiValueHeaders") or {}).items():
        if k.lower() in ("content-length",):
            continue
        del resp.headers[k]
        for v in vs:
            resp.headers.append(k, str(v))
    return resp


# --- running ---------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def check_bind(host: str, tls: bool, insecure: bool) -> None:
    if not tls and not insecure and not is_loopback(host):
        raise ServeError(
            f"refusing to serve plain HTTP on {host}: agents' tokens and admin tokens would cross the "
            "network in the clear. Give --tls-cert and --tls-key, bind 127.0.0.1, or pass --insecure."
        )


@dataclass
class Running:
    url: str
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def log_safely() -> None:
    """serve's log: stderr, warnings and up, the message only (as Python's last-resort handler
    writes it), every record's control characters escaped on every handler (uvicorn's too): a
    caller's text inside a message (an id, a refusal's detail) cannot forge a line nor drive the
    operator's terminal (:class:`ringfence.textsafe.LogEscape`)."""
    from ringfence.textsafe import escape_logs

    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    escape_logs()


def uvicorn_server(app: ServeApp, tls_cert: str | None = None, tls_key: str | None = None) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app.asgi,
        log_level="warning",
        access_log=False,  # query strings name workloads and versions only; still, keep logs lean
        # the client is the TCP peer, always: uvicorn would otherwise take X-Forwarded-For from any
        # local process (FORWARDED_ALLOW_IPS), which could then pose as any address to the events'
        # sourceIp and escape the per-address limit
        proxy_headers=False,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        ssl_version=ssl.PROTOCOL_TLS_SERVER,
        timeout_graceful_shutdown=2,  # long-polls end with the process; agents poll again
        lifespan="off",
    )
    return uvicorn.Server(config)


def url_of(sock: socket.socket, tls: bool) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


@contextmanager
def serving(
    app: ServeApp,
    host: str = "127.0.0.1",
    port: int = 0,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    sock: socket.socket | None = None,
) -> Iterator[Running]:
    """``app`` served in a background thread (tests, the demo); the URL, until the block ends.
    ``sock``: a listening socket to serve on instead of binding ``host:port`` (one bound in
    another network namespace, say)."""
    sock = sock or listen(host, port)
    server = uvicorn_server(app, tls_cert, tls_key)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="ringfence-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        raise ServeError("the server did not start")
    running = Running(url_of(sock, tls_cert is not None), server, thread)
    try:
        yield running
    finally:
        running.stop()
        sock.close()


def reconciles(
    app: ServeApp, wiring: Any, stop: threading.Event, env: Mapping[str, str] | None = None
) -> list[threading.Thread]:
    """The other clouds' scheduled full passes, in threads until ``stop`` (what the AWS stack's
    scheduled cloudreconcile function runs): each configured cloud's inventory, then its perimeter
    where switched on."""
    e = os.environ if env is None else env
    out: list[threading.Thread] = []
    if app.azure is not None:
        from ringfence.clouds.azure.reconcile import AzureReconcile
        from ringfence.perimeter import PerimeterConfig

        interval = float(e.get("RINGFENCE_AZURE_RECONCILE_INTERVAL", "900"))
        perimeter = None
        if e.get("RINGFENCE_AZURE_PERIMETER") == "true":
            perimeter = PerimeterConfig.model_validate_json(e.get("RINGFENCE_PERIMETER_CONFIG") or "{}")
        out.append(AzureReconcile(wiring, app.azure, perimeter, metric=app.metrics).every(interval, stop))
    if app.gcp is not None:
        from ringfence.clouds.gcp.config import GcpConfig
        from ringfence.clouds.gcp.reconcile import GcpPerimeter, GcpReconcile

        interval = float(e.get("RINGFENCE_GCP_RECONCILE_INTERVAL", "900"))
        gcp_reconcile = GcpReconcile(wiring, GcpConfig.from_env(e), GcpPerimeter.from_env(e), metric=app.metrics)
        out.append(gcp_reconcile.every(interval, stop))
    return out


def findings_pass(wiring: Any, stop: threading.Event, env: Mapping[str, str] | None = None) -> threading.Thread | None:
    """With a SIEM (``--siem``): the effective-policy findings not announced yet go to it every
    ``RINGFENCE_FINDINGS_INTERVAL`` seconds (default 60), in a thread until ``stop``."""
    if getattr(wiring, "siem", None) is None:
        return None
    from ringfence.clouds import every
    from ringfence.control.findings import announce

    e = os.environ if env is None else env
    return every("findings", lambda: announce(wiring), float(e.get("RINGFENCE_FINDINGS_INTERVAL", "60")), stop)


def retention_pass(wiring: Any, stop: threading.Event, seconds: float = 3600) -> threading.Thread | None:
    """With the local wiring: agents' report batches older than the retention are deleted now and
    every ``seconds`` (on AWS the bucket's lifecycle rule does it), in a thread until ``stop``."""
    sweep = getattr(wiring, "sweep_reports", None)
    if sweep is None:
        return None
    from ringfence.clouds import every

    return every("reports-retention", sweep, seconds, stop)


def run(
    host: str,
    port: int,
    store: str,
    admin_tokens: Path | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    insecure: bool = False,
    threads: int = DEFAULT_THREADS,
    announce: Callable[[str], None] = print,
    signing_key: Path | None = None,
    siem: str | None = None,
    user: str | None = None,
    new_store: bool = False,
) -> int:
    """Serve until SIGINT/SIGTERM (what ``ringfence serve`` runs). ``user`` (``--user``, started
    as root): the signing key goes to a signer process of its own and everything else runs as
    that user (:func:`separate_signer`)."""
    if (tls_cert is None) != (tls_key is None):
        raise ServeError("give both --tls-cert and --tls-key, or neither")
    for p in (tls_cert, tls_key):
        if p is not None and not Path(p).is_file():
            raise ServeError(f"{p}: no such file")
    check_bind(host, tls_cert is not None, insecure)
    os.umask(0o077)  # the store, its -wal and -shm: serve's alone, whatever umask it was started with
    log_safely()
    try:
        address_limit = AddressLimit.from_env()  # a bad setting fails before anything starts
        if store.startswith("sqlite:"):
            from ringfence.local.wiring import compute_retry_max
            from ringfence.store.sqlite import busy_timeout

            busy_timeout()
            compute_retry_max()
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    tokens = None
    if admin_tokens is not None:
        from ringfence.local.signer_process import SignerError, service_user

        try:  # the --user user may not own it: whoever takes over serve is that user
            served = service_user(user).pw_uid if user is not None else None
        except SignerError as exc:
            raise ServeError(str(exc)) from None
        tokens = AdminTokenFile(admin_tokens, served)
    sock = listen(host, port)  # before the store: a taken port fails before anything starts
    counters = Counters()
    signer = separate_signer(store, signing_key, user) if user is not None else None
    if signer is None and store.startswith("sqlite:") and os.geteuid() == 0:
        log.warning(
            "serving as root, the signing key in this process: whoever takes over a request handler "
            "is root and can copy the key; give --user NAME (docs/serve.md)"
        )
    try:
        wiring = build_wiring(store, signer or signing_key, siem, counters, new_store)
    except BaseException:
        if signer is not None:
            signer.close()
        raise
    stop = threading.Event()
    try:
        app = ServeApp.over(wiring, tokens, threads, metrics=counters, address_limit=address_limit)
        reconciles(app, wiring, stop)
        findings_pass(wiring, stop)
        retention_pass(wiring, stop)
        server = uvicorn_server(app, tls_cert, tls_key)
        log_safely()  # uvicorn's own handlers exist now
        admin = f"admin API for {len(set(tokens.by_hash.values()))} principal(s)" if tokens else "admin API off"
        announce(f"ringfence serve: listening on {url_of(sock, tls_cert is not None)} (store {store}; {admin})")
        server.run(sockets=[sock])
    finally:
        stop.set()
        close = getattr(wiring, "close", None)
        if close is not None:
            close()  # the local wiring: its compute worker stops, the state directory is released
    return 0
