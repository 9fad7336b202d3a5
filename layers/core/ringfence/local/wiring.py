"""The control plane's wiring on one machine (``ringfence serve`` on premise).

:class:`LocalWiring` gives the services (AgentApi, Admin, Compute) what the AWS
:class:`~ringfence.clouds.aws.wiring.Wiring` gives them, from local parts:

* ``store``: :class:`~ringfence.store.sqlite.SqliteStore` in the given file, whose directory is
  the state directory (or any :class:`~ringfence.store.base.Store` passed in, e.g. a DynamoStore);
* ``publisher``: :class:`~ringfence.local.publish.FilePublisher` under ``<state>/objects``;
* ``signer``: the Ed25519 key in a PEM file (by default the state directory's own, generated on
  first start);
* ``enqueue_compute``: hands the work to one in-process worker thread running the same
  :class:`~ringfence.control.compute.Compute` the compute function runs. One thread, one
  writer: computations are serialised as the FIFO queue with one message group serialises them
  in AWS. Urgent work (an administrator's change, a workload deregistered) is taken before
  the ordinary work queued ahead of it, as compute's priority queue is in AWS. An exclusive
  lock on ``<state>/lock`` keeps a second process off the same state;
* ``wait_for_change``: waits on a condition that compute's notifier signals after each
  computation (the long-poll of ``GET /v1/agents/{id}/wait``).

Pending compute work lives in memory only. That loses nothing acknowledged: every request that
enqueues work has written its change to the store first, and the worker's first computation after
a start rebuilds the engine from the store, adopts what is published unchanged and republishes
the rest at a fresh revision (the same recovery a cold compute container does), so work lost with
a killed process is redone.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from ringfence import durable
from ringfence.bundle import BundleError, Signer, SigningKey
from ringfence.control.compute import Compute, ComputeStats
from ringfence.control.wiring import BaseWiring, Config, Metric, no_metric
from ringfence.local.publish import FilePublisher
from ringfence.local.retention import ReportQuota, retention_days, sweep_reports
from ringfence.local.statedir import LINKED_KEY, StateRefused, secure_state_dir
from ringfence.siem import DROP_BUDGET, DROP_WINDOW
from ringfence.store.base import Store
from ringfence.store.failure import StoreHealth
from ringfence.store.sqlite import SqliteStore, busy_timeout

log = logging.getLogger("ringfence.local")


class StateInUse(RuntimeError):
    """Another control-plane process holds the state directory."""


class LocalNotifier:
    """Compute's notifier on one machine: records each workload's latest version and, once a
    computation has finished, wakes every ``wait_for_change`` caller.

    Waiters cannot miss a change between reading the store and starting to wait: each thread
    remembers the change generation it last saw, and a wait returns at once if the generation
    moved since (the caller then reads the store again)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0
        self._pending = False
        self._seen = threading.local()
        self.latest: dict[str, int] = {}

    def nudge(self, workload_id: str, version: int) -> None:
        with self._cond:
            if version > self.latest.get(workload_id, 0):
                self.latest[workload_id] = version
            self._pending = True

    def flush(self) -> None:
        """Wake the waiters if anything was nudged since the last flush."""
        with self._cond:
            if self._pending:
                self._pending = False
                self._generation += 1
                self._cond.notify_all()

    def changed(self) -> None:
        """Wake the waiters now (something outside compute changed published state)."""
        with self._cond:
            self._pending = True
        self.flush()

    def wait(self, seconds: float) -> bool:
        """True when a change happened since this thread last looked (or may have: a thread's
        first wait), False after ``seconds`` without one."""
        with self._cond:
            seen: int | None = getattr(self._seen, "generation", None)
            if seen != self._generation:
                self._seen.generation = self._generation
                return True
            changed = self._cond.wait_for(lambda: self._generation != seen, timeout=max(seconds, 0.0))
            self._seen.generation = self._generation
            return changed


_STOP: Any = object()


class _Lanes(queue.Queue[Any]):
    """The worker's queue: two lanes, FIFO each, put as ``(urgent, item)``; ``get`` hands out the
    urgent lane's items first (an administrator's quarantine before a registration flood's
    backlog, as compute's priority queue does in AWS)."""

    def _init(self, maxsize: int) -> None:
        self.urgent: deque[Any] = deque()
        self.normal: deque[Any] = deque()
        self.last_urgent = False  # the lane of the item ``get`` returned last

    def _qsize(self) -> int:
        return len(self.urgent) + len(self.normal)

    def _put(self, item: tuple[bool, Any]) -> None:
        (self.urgent if item[0] else self.normal).append(item[1])

    def _get(self) -> Any:
        self.last_urgent = bool(self.urgent)
        return self.urgent.popleft() if self.urgent else self.normal.popleft()

    def urgent_waiting(self) -> bool:
        with self.mutex:
            return bool(self.urgent)


RETRY_MAX_S = 30.0


def compute_retry_max(env: Mapping[str, str] | None = None) -> float:
    """``RINGFENCE_COMPUTE_RETRY_MAX`` (seconds, default 30): the longest wait between two tries of
    a computation that failed; a ValueError for a value that is not a number from 0.1 to 3600."""
    raw = (os.environ if env is None else env).get("RINGFENCE_COMPUTE_RETRY_MAX", "")
    if not raw:
        return RETRY_MAX_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0.1 <= seconds <= 3600:  # NaN too
        raise ValueError(f"RINGFENCE_COMPUTE_RETRY_MAX={raw!r}: must be a number of seconds from 0.1 to 3600")
    return seconds


def owed_work(owed: dict[str, Any] | None, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """``messages`` that failed, merged with what was owed already into one message: their
    workloads, explicit re-render requests and refresh, with ``rebuild`` (the retry rebuilds the
    engine from the store in any case: compute distrusts it after a failure, and the rebuild
    republishes whatever changed since the last bundles). Lifecycle actions are not kept: the
    failed run left each to time out into its hook's default result, and said so."""
    before = [owed] if owed is not None else []
    out: dict[str, Any] = {"ids": [], "rebuild": True}
    ids = list(dict.fromkeys(i for m in before + messages for i in m.get("ids", [])))
    publish = list(dict.fromkeys(w for m in before + messages for w in m.get("publish", [])))
    out["ids"] = ids
    if publish:
        out["publish"] = publish
    if any(m.get("refresh") for m in before + messages):
        out["refresh"] = True
    return out


class ComputeWorker(threading.Thread):
    """Runs compute on everything enqueued, one batch at a time (what is queued while a batch
    runs becomes the next batch, as SQS hands Lambda a batch).

    A batch that fails is owed (:attr:`owed`), as SQS redelivers a failed message until it goes
    through: retried after ``retry_delay`` (1 s), the wait doubling after each failure up to
    ``retry_max`` (``RINGFENCE_COMPUTE_RETRY_MAX``, 30 s), until one computation succeeds; work
    enqueued meanwhile is tried at once together with it. Compute rebuilds its engine on the
    retry. A damaged store is not retried (serve computes nothing more from it)."""

    def __init__(
        self,
        compute: Compute,
        notifier: LocalNotifier,
        *,
        retry_delay: float = 1.0,
        retry_max: float = RETRY_MAX_S,
        max_batch: int = 100,
        refresh_interval: float = 3600.0,
    ) -> None:
        super().__init__(name="ringfence-compute", daemon=True)
        self.compute = compute
        self.notifier = notifier
        self.retry_delay = retry_delay
        self.retry_max = retry_max
        self.max_batch = max_batch
        # idle this long: compute re-signs the bundles near expiry (the AWS schedule's job)
        self.refresh_interval = refresh_interval
        self.queue = _Lanes()
        self.runs = 0
        self.failed_batches = 0
        self.last_stats: ComputeStats | None = None
        self._stopping = False
        # the store's failures (counted, logged); once it is damaged, nothing is computed from it
        self.health: StoreHealth | None = None
        # the work of the failed computations, merged (owed_work), until one succeeds; since when
        # (wall clock), how many tries failed, the last one's reason, when the next try is due
        self.owed: dict[str, Any] | None = None
        self.owed_since: float | None = None
        self.failures = 0
        self.reason = ""
        self._retry_at = 0.0  # time.monotonic()

    def submit(self, message: dict[str, Any], *, urgent: bool = False) -> None:
        """``urgent``: computed before everything ordinary still queued (FIFO within each lane)."""
        self.queue.put((urgent, message))

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self.queue.put((False, _STOP))
        self.join(timeout)

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until everything enqueued so far has been computed (or failed, and is owed);
        False on timeout."""
        with self.queue.all_tasks_done:
            return self.queue.all_tasks_done.wait_for(lambda: self.queue.unfinished_tasks == 0, timeout)

    def owed_seconds(self) -> float:
        """How long work has been owed (0: none): ``ringfence_compute_owed_seconds``."""
        since = self.owed_since
        return max(0.0, time.time() - since) if since is not None else 0.0

    def state(self) -> dict[str, Any] | None:
        """What is owed, for an administrator (``/healthz`` with an admin token): None when nothing is."""
        since = self.owed_since
        if since is None:
            return None
        return {
            "owed_seconds": round(max(0.0, time.time() - since), 1),
            "failures": self.failures,
            "error": self.reason,
            "retry_in_seconds": round(max(0.0, self._retry_at - time.monotonic()), 1),
        }

    def _retrying(self) -> bool:
        return self.owed is not None and not (self.health is not None and self.health.damaged)

    def run(self) -> None:
        while True:
            wait = max(0.0, self._retry_at - time.monotonic()) if self._retrying() else self.refresh_interval
            try:
                first = self.queue.get(timeout=wait)
            except queue.Empty:
                if self._retrying():
                    try:
                        self._compute([])  # what is owed, alone
                    finally:
                        self.notifier.flush()
                # an engine dropped by a failure is no reason to skip the refresh: the failure is owed
                elif self.compute.engine is not None:
                    try:
                        self._compute([{"ids": [], "refresh": True}])
                    finally:
                        self.notifier.flush()
                continue
            batch = [first]
            # an urgent batch is urgent work alone: a flood's messages taken with it would make
            # the quarantine's computation as long as the flood's (AWS: a priority queue's batch)
            urgent = self.queue.last_urgent
            while len(batch) < self.max_batch and (not urgent or self.queue.urgent_waiting()):
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            messages = [m for m in batch if m is not _STOP]
            try:
                if messages:
                    self._compute(messages)
            finally:
                self.notifier.flush()
                for _ in batch:
                    self.queue.task_done()
            if any(m is _STOP for m in batch):
                return

    def _compute(self, messages: list[dict[str, Any]]) -> None:
        if self.health is not None and self.health.damaged:
            self.failed_batches += 1
            log.error("%s: not computed (%s message(s)): the store is damaged", self.health.damaged, len(messages))
            if messages:
                self._owe(messages)  # reported as owed; a restart after the restore redoes it
            return
        work = ([self.owed] if self.owed is not None else []) + messages
        try:
            self.last_stats = self.compute.run(work)
        except Exception as exc:
            failed = self.health.failed(exc, "compute") if self.health is not None else None
            if self.failures == 0:  # the traceback once per run of failures, not once a retry for hours
                log.exception("compute failed")
            self.compute.metric("ComputeFailed", 1)
            self.failed_batches += 1
            self._owe(messages)
            self.reason = failed[1] if failed else f"{type(exc).__name__} (see the log)"
            self.failures += 1
            delay = min(self.retry_delay * 2 ** (self.failures - 1), self.retry_max)
            self._retry_at = time.monotonic() + delay
            if not self._stopping and not (failed and failed[0] == "damaged"):
                log.error(
                    "compute failed %s time(s) since %s (%s): no change since reaches agents; retrying in %.1f s",
                    self.failures,
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.owed_since or time.time())),
                    failed[1] if failed else repr(exc),
                    delay,
                )
            return
        self.runs += 1
        if self.owed is not None:
            log.warning(
                "compute caught up after %s failed attempt(s) over %.0f s: what was owed is published",
                self.failures,
                self.owed_seconds(),
            )
        self.owed, self.owed_since, self.failures, self.reason = None, None, 0, ""

    def _owe(self, messages: list[dict[str, Any]]) -> None:
        self.owed = owed_work(self.owed, messages)
        if self.owed_since is None:
            self.owed_since = time.time()


def local_config() -> Config:
    """The local control plane's configuration: pairing only; the agent token's lifetime from
    ``RINGFENCE_TOKEN_TTL`` (seconds, default one hour) and the bundles' from
    ``RINGFENCE_BUNDLE_TTL`` (default 7 days), as on AWS; the SIEM's from ``RINGFENCE_SIEM`` and
    its drop budget from ``RINGFENCE_SIEM_DROP_BUDGET``/``RINGFENCE_SIEM_DROP_WINDOW``."""
    return Config(
        enroll_methods=["pairing"],
        token_ttl=int(os.environ.get("RINGFENCE_TOKEN_TTL", "3600")),
        # read by the signer process too (serve --user): it refuses bundles expiring later
        bundle_ttl=int(os.environ.get("RINGFENCE_BUNDLE_TTL", str(7 * 86400))),
        siem=os.environ.get("RINGFENCE_SIEM", ""),
        siem_drop_budget=int(os.environ.get("RINGFENCE_SIEM_DROP_BUDGET", str(DROP_BUDGET))),
        siem_drop_window=float(os.environ.get("RINGFENCE_SIEM_DROP_WINDOW", str(DROP_WINDOW))),
    )


class LocalWiring(BaseWiring):
    """``LocalWiring(DATABASE)``: the SQLite file ``DATABASE`` (``--store sqlite:DATABASE``) and,
    in its directory (the state directory), ``objects/`` (published files), ``lock`` and, unless
    ``signing_key`` is given, ``signing-key.pem`` (generated, mode 600, when missing), and
    ``signing-key.pub.pem`` for agents to pin, made at every start to hold the public key of the
    key in use, whichever it is (:func:`pin_public_key`). ``start()`` (done by the
    constructor unless ``start=False``) starts the compute worker and schedules the recovering
    rebuild; ``close()`` stops it."""

    mapper_ttl = 0.0  # reading the active policy from SQLite is cheap: registrations see a new policy at once
    flows_inline = True  # no S3 events here: reports become flow rows as they arrive

    def __init__(
        self,
        database: Path | str,
        *,
        signing_key: Path | str | Signer | None = None,
        cfg: Config | None = None,
        store: Store | None = None,
        metric: Metric = no_metric,
        start: bool = True,
        fsync: bool = True,
    ) -> None:
        retry_max = compute_retry_max()  # a bad setting fails before the state directory is taken
        self.database = Path(database)
        self.state_dir = self.database.parent
        secure_state_dir(self.state_dir)  # before anything in it is opened: root never follows another user's link
        self._lock = self._take_lock()
        try:
            super().__init__(
                cfg or local_config(),
                store if store is not None else SqliteStore(self.database, busy_timeout=busy_timeout()),
                FilePublisher(self.state_dir / "objects", fsync=fsync),
            )
            self._own_store_files()
            self._signer: Signer
            if isinstance(signing_key, (str, Path)):
                self._signer = load_signing_key(Path(signing_key))
                pin_public_key(self.state_dir, self._signer, str(signing_key))
            elif signing_key is not None:
                self._signer = signing_key  # a key, or a signer process holding one (serve --user)
                pin_public_key(self.state_dir, self._signer, "the signing key given")
            else:
                self._signer = own_signing_key(self.state_dir)
            # what one workload's token may write into objects/reports/, and for how long it stays
            self.report_quota: ReportQuota | None = ReportQuota.from_env()
            self.report_retention_days = retention_days()
        except BaseException:
            self._lock.close()  # a bad key or database leaves the directory free for the next try
            raise
        self.metric = metric
        self.notifier = LocalNotifier()
        self.compute = Compute(self, metric, notifier=self.notifier)
        self.worker = ComputeWorker(self.compute, self.notifier, retry_max=retry_max)
        self.health = self.worker.health = StoreHealth(self.database.name, metric)
        self._started = False
        if start:
            self.start()

    def _take_lock(self) -> IO[str]:
        """The state directory's lock: opened without following a link, mode 600 (one that others
        could read let any local user hold it and keep serve from starting)."""
        path = self.state_dir / "lock"
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise  # read-only, not ours: serve names the file and the system's reason
            raise StateRefused(f"{path}: a symbolic link, which serve does not follow in its state directory") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise StateRefused(f"{path}: not a file of uid {os.geteuid()} that serve runs as (owner uid {st.st_uid})")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        f = os.fdopen(fd, "r+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise StateInUse(f"{self.state_dir} is in use by another ringfence control plane") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return f

    def _own_store_files(self) -> None:
        """The store's files mode 600, whatever the umask they were made under (SQLite makes its
        -wal and -shm with the database's mode). By name, never opened here: closing another
        descriptor of a file SQLite holds would drop its locks."""
        for path in (
            self.database,
            self.database.with_name(self.database.name + "-wal"),
            self.database.with_name(self.database.name + "-shm"),
        ):
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
                path.chmod(0o600)  # not a link (lstat), in a directory only this user may change

    # --- the services' view -----------------------------------------------------------------------

    @property
    def signer(self) -> Any:
        return self._signer

    def ec2_for(self, account: str, region: str, *, batch: bool = False) -> Any:
        raise RuntimeError("the local control plane has no cloud API: on-premise workloads enroll with pairing keys")

    def send_compute(self, message: dict[str, Any], *, urgent: bool = False) -> None:
        self.worker.submit(message, urgent=urgent)

    def sweep_reports(self, now: float | None = None) -> int:
        """Delete the agents' report batches older than the retention (``RINGFENCE_REPORT_RETENTION_DAYS``,
        default 90 as on AWS); ``ringfence serve`` runs it hourly."""
        return sweep_reports(self.state_dir / "objects", self.report_retention_days, now)

    def wait_for_change(self, seconds: float, workload_id: str | None = None) -> None:
        self.notifier.wait(seconds)  # compute runs in this process: it wakes every waiter at once

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.worker.start()
        if self.store.active_policy() is not None:
            # whatever was enqueued but not computed when the last process died is redone here
            self.enqueue_compute(rebuild=True)

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until the compute worker has finished everything enqueued so far."""
        return self.worker.settle(timeout)

    def close(self) -> None:
        if self._started and self.worker.is_alive():
            self.worker.stop()
        close_signer = getattr(self._signer, "close", None)
        if close_signer is not None:
            close_signer()  # a signer process: its pipe closes and it exits
        close = getattr(self.store, "close", None)
        if close is not None:
            close()
        if self.siem is not None:
            self.siem.close()
        self._lock.close()

    def __enter__(self) -> LocalWiring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_signing_key(path: Path, *, follow: bool = True) -> SigningKey:
    """The bundle signing key from its PKCS#8 PEM file; warns when others can read it. Refused
    (:class:`BundleError`) unless a regular file owned by root or the user serve runs as and
    writable by its owner only: another user's key would be signed with and pinned by agents.
    ``follow=False`` (the state directory's own key): a link there is refused, not followed."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    if follow:
        from ringfence.local.signer_process import SignerError, check_key_directories

        # a link at the key's name is followed: every directory on the way, and on the way to where
        # it points, must be root's or serve's own, or another user could point it at another key
        try:
            check_key_directories(path, owners=tuple(sorted({0, os.geteuid()})))
        except SignerError as exc:
            raise BundleError(f"{path}: {exc}") from None
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise BundleError(f"{path}: {LINKED_KEY if exc.errno == errno.ELOOP else exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        mode = stat.S_IMODE(st.st_mode)
        uid = os.geteuid()
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path}: not a regular file")
        if st.st_uid not in (0, uid) or mode & 0o022:
            raise BundleError(
                f"{path}: owned by uid {st.st_uid}, mode {mode:o}: a signing key must be owned by root or uid {uid} "
                "(that serve runs as) and writable by its owner only, or another user could swap in a key of theirs"
            )
        if mode & 0o077:
            log.warning("signing key %s is readable by group or others (mode %o): chmod 600 it", path, mode)
        return SigningKey.from_pem_file(f.read(), path)


PUBLIC_KEY = "signing-key.pub.pem"  # in the state directory: the file agents are told to pin


def pin_public_key(state_dir: Path, signer: Signer, source: str) -> None:
    """Make ``<state_dir>/signing-key.pub.pem`` hold the public key of ``signer``, the key serve
    signs with (``source`` names it in the log), writing it when it differs or is missing, whole
    or not at all. Whatever the key's source (the state directory's own, ``--signing-key``, a
    signer process): one left by earlier runs on another key (a default key before a move to
    ``--signing-key``) made every agent paired from it refuse every bundle."""
    pem = getattr(signer, "public_pem", None)
    if pem is None:
        return  # a signer that cannot name its public key (tests' stand-ins): nothing to pin
    want: bytes = pem()
    public = state_dir / PUBLIC_KEY
    try:
        held: bytes | None = public.read_bytes()
    except FileNotFoundError:
        held = None
    if held == want:
        return
    durable.replace(public, want, 0o644)  # never half a key; a signer process has no SigningKey here
    log.warning(
        "%s %s: it now holds the public key of %s (key id %s); agents pin it",
        "rewrote" if held is not None else "wrote",
        public,
        source,
        signer.key_id,
    )


def own_signing_key(state_dir: Path) -> SigningKey:
    """The state directory's own signing key, generated on first use (like an SSH host key).
    ``signing-key.pub.pem``, the file agents are told to pin, is made to hold this key's public
    key: after a rotation (a new ``signing-key.pem`` put in place) it still held the old one, and
    an agent paired afterwards pinning it refused every bundle."""
    private, public = state_dir / "signing-key.pem", state_dir / PUBLIC_KEY
    if os.path.lexists(private):
        key = load_signing_key(private, follow=False)
        pin_public_key(state_dir, key, str(private))
        return key
    key = SigningKey.generate()
    key.write(private, public)
    log.warning("generated the bundle signing key %s; agents pin %s", private, public)
    return key
