"""``ringfence-agent run``: last known good first, then follow the source, forever.

Order on start: load config → re-apply the last known good bundle from the state directory →
only then contact anyone. When the source is unreachable the agent backs off (exponential, with
jitter, capped) and keeps enforcing what it has; it never flushes on errors or on exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import random
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TypeVar

from ringfence.agentwire import Heartbeat, ReportBatch, agent_version_ok
from ringfence.bundlewire import Bundle, BundleError, SetDelta, SignatureLike, Verifier, key_id_of_raw
from ringfence_agent import enroll, installed_version
from ringfence_agent.backends import ApplyError, make_backend
from ringfence_agent.config import AgentConfig
from ringfence_agent.core import Agent, Rejected, Result
from ringfence_agent.logline import log
from ringfence_agent.plan import PlanError
from ringfence_agent.reports import (
    BoundedBuffer,
    DropCollector,
    FlowSource,
    Spool,
    counter_deltas,
    drop_key,
    flow_key,
    local_addresses,
    make_batches,
    parse_conntrack,
    summarize_flows,
)
from ringfence_agent.resolvers import RESOLV_CONF, system_resolvers
from ringfence_agent.sessions import session_cutter
from ringfence_agent.sources import (
    ApiSource,
    Source,
    SourceError,
    StaticSource,
    Unreachable,
    tls_context,
    verified_peers,
)
from ringfence_agent.state import StateDir

T = TypeVar("T")

# The control-plane fail-safe admits the configured addresses, what the control plane's name
# resolves to NOW (the last answer while lookups fail), and an address it resolved to before only
# when a TLS handshake there verified the control plane's certificate, for CONTROL_PLANE_RETAIN_S
# after the last one. An hour outlives DNS rotation and caching (API Gateway's answers live 60 s,
# a stub resolver or nscd keeps them minutes; a kept-alive connection may still use the old
# address) and bounds the time a proved address stays open after it may have been handed to
# someone else (cloud addresses are reused). An address only ever seen in a DNS answer drops out
# at the next answer without it: a spoofed answer opens tcp/443 until the next lookup, not a day.
CONTROL_PLANE_RETAIN_S = 3600.0
CONTROL_PLANE_MAX = 64  # at most this many of them (the current answer first, then the newest proved)
# at start the name's lookup must not hold READY=1 (systemd's start timeout, network-pre.target)
# behind a slow or silent resolver: after this long the daemon enforces with what it has (the
# configured addresses) and the lookup goes on in the background, for the next sync
BOOT_RESOLVE_S = 2.5
# after SIGTERM/SIGINT a long-poll or report in flight ends at once (its socket is shut down);
# what no signal ends (a name lookup of a silent resolver, a connect to a silent address) is not
# waited for longer than this: the daemon exits with the firewall as it is, as systemd's SIGKILL
# would leave it (TimeoutStopSec, 90 s by default)
STOP_GRACE_S = 5.0
STOP_LOCK_S = 2.0  # then how long a stop waits for the drift check's or heartbeat's kernel read


def release_memory() -> None:
    """Hand freed heap back to the OS after a large apply (glibc only; best effort)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _where(exc: BaseException) -> str:
    """ " (raised in FILE:LINE, FUNCTION)" for the innermost frame of the exception's traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" (raised in {os.path.basename(f.filename)}:{f.lineno}, {f.name})"


# fetch the bundle when the enforced one expires within this many seconds (compute re-signs
# bundles well before: docs/bundle.md, Expiry)
REFRESH_BEFORE = 2 * 86400


def _utc(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


ENFORCE_RETRY_MAX = 30.0  # at most this long between two tries to program the kernel at all

# A report answered 429 (the workload's report quota) holds further reports, and only reports,
# for its Retry-After (none given: one report_interval), at most this long: a broken or hostile
# server's "Retry-After: 86400" must not silence a host's reports for a day. The batches wait in
# the spool meanwhile; bundle syncs and heartbeats go on.
REPORTS_HOLD_MAX = 3600.0

# the Ed25519 base point: a well-formed public key no one holds the private key of
_NOBODYS_KEY = bytes.fromhex("58" + "66" * 31)


class NoPinnedKey(Verifier):
    """The pinned key file is missing, empty or not an Ed25519 key: a key set whose every key
    is revoked (a valid, if unusable, state: the agent keeps its fail-safe posture rather than
    exiting, which would fail open), refusing every document with the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(_NOBODYS_KEY, revoked=[key_id_of_raw(_NOBODYS_KEY)])
        self.reason = reason

    def verify_signed(self, what: str, signature: SignatureLike | None, message_for: Callable[[str], bytes]) -> None:
        raise BundleError(f"{what} refused: {self.reason}")


class LateSource:
    """A source that could not be set up at start (the pairing key file or the CA file missing
    or unreadable): every call tries again and, until it can, fails like an unreachable source —
    the daemon enforces and backs off meanwhile; it never exits for it (which would fail open)."""

    def __init__(self, kind: str, build: Callable[[], Source], reason: str) -> None:
        self.kind = kind
        self._build = build
        self._real: Source | None = None
        self.reason = reason

    @property
    def fetches(self) -> int:
        return self._real.fetches if self._real is not None else 0

    @fetches.setter
    def fetches(self, value: int) -> None:
        if self._real is not None:
            self._real.fetches = value

    def _get(self) -> Source:
        if self._real is None:
            try:
                self._real = self._build()
            except Exception as exc:
                self.reason = f"source not set up: {type(exc).__name__}: {exc}"
                raise Unreachable(self.reason) from None
            log("source set up")
        return self._real

    def wait(self, version: int | None, timeout: float, stop: threading.Event) -> int | None:
        return self._get().wait(version, timeout, stop)

    def announced(self) -> int | None:
        return self._get().announced()

    def bundle(self) -> Bundle | None:
        return self._get().bundle()

    def settled(self) -> None:
        if self._real is not None:
            self._real.settled()

    def deltas(self, since: int, sets: dict[str, int], bundle_version: int) -> list[SetDelta] | None:
        return self._get().deltas(since, sets, bundle_version)

    def heartbeat(self, hb: Heartbeat) -> int | None:
        return self._get().heartbeat(hb)

    def report(self, batch: ReportBatch) -> None:
        self._get().report(batch)

    def abort(self) -> None:
        if self._real is not None:
            self._real.abort()


CONFIG_RETRY_S = 5.0  # how often a config file that did not load is tried again


class NoSource:
    """No configuration loaded and none kept: nothing to contact. Every call fails like an
    unreachable source, so the daemon holds the posture and backs off."""

    kind = "none"
    fetches = 0

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _fail(self) -> Unreachable:
        return Unreachable(self.reason)

    def wait(self, version: int | None, timeout: float, stop: threading.Event) -> int | None:
        stop.wait(timeout)
        return None

    def announced(self) -> int | None:
        raise self._fail()

    def bundle(self) -> Bundle | None:
        raise self._fail()

    def settled(self) -> None:
        return None

    def deltas(self, since: int, sets: dict[str, int], bundle_version: int) -> list[SetDelta] | None:
        raise self._fail()

    def heartbeat(self, hb: Heartbeat) -> int | None:
        raise self._fail()

    def report(self, batch: ReportBatch) -> None:
        raise self._fail()

    def abort(self) -> None:
        return None


def _lookup(host: str) -> tuple[str, ...] | None:
    """What ``host`` resolves to (for TCP), or None when it does not."""
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return None
    return tuple(dict.fromkeys(str(ai[4][0]).split("%")[0] for ai in found)) or None


def notify_systemd(message: str) -> bool:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET (Type=notify units).
    False when there is no socket to tell, or telling failed."""
    where = os.environ.get("NOTIFY_SOCKET", "")
    if not where or where[0] not in "/@":
        return False
    addr = "\0" + where[1:] if where[0] == "@" else where
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
    except OSError:
        return False
    return True


def backoff_delay(failures: int, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform(0.5, 1) × min(cap, 2^failures) seconds."""
    base = min(cap, float(2 ** min(failures, 30)))
    return base * rng.uniform(0.5, 1.0)


class Daemon:
    def __init__(
        self,
        cfg: AgentConfig,
        config_error: str | None = None,
        config_path: Path | None = None,
        posture_only: bool = False,
        config_origin: Path | None = None,
    ) -> None:
        """``config_error``: the config file at ``config_path`` did not load, and ``cfg`` is the
        last configuration that did (or, ``posture_only``, a stand-in that holds the fail-safe
        posture, refuses every document and contacts no one). The file is loaded again every
        CONFIG_RETRY_S; once it loads, :attr:`reload` is set and the daemon stops (``run``'s
        caller starts over with it). ``config_origin``: the file ``config_path`` (``/dev/fd/N``)
        is, passed open (:func:`ringfence_agent.config.load_config`)."""
        self.cfg = cfg
        self.config_error = config_error
        self.config_path = config_origin or config_path
        self.config_source = config_path
        self.config_origin = config_origin
        self.reload = False
        self.state = StateDir(cfg.state_dir, cfg.max_bundle_bytes)
        self.state.on_status_error = log
        self.state.ensure()
        # no usable pinned key: nothing can be verified, so the fail-safe posture is held and
        # every document refused until the key file is fixed and the agent restarted
        self.key_error: str | None = None
        try:
            self.verifier = Verifier.from_file(cfg.public_key, cfg.revoked_keys)
        except (OSError, BundleError, ValueError) as exc:
            self.key_error = f"no usable pinned key in {cfg.public_key}: {exc}"
            self.verifier = NoPinnedKey(self.key_error)
        if posture_only:
            self.key_error = f"config {self.config_path} not loaded ({config_error}); no last good configuration either"
            self.verifier = NoPinnedKey(self.key_error)
        self.backend = make_backend(cfg.backend, cfg.state_dir)
        local = cfg.local_failsafes()
        from_host = [r for r in local.dns_resolvers if r not in cfg.dns_resolvers]
        if from_host:
            log(f"DNS fail-safe admits this host's resolvers ({RESOLV_CONF}): {', '.join(from_host)}")
        elif cfg.system_resolvers and cfg.source_hosts() and not cfg.dns_resolvers:
            log(
                f"no name server in {RESOLV_CONF} to admit: set dns_resolvers, or the control plane's name may not resolve"
            )
        self.agent = Agent(
            cfg.workload_id,
            self.verifier,
            self.backend,
            self.state,
            local,
            log=log,
            sessions=session_cutter(cfg.backend, cfg.cut_revoked_connections),
        )
        self.agent.track_drift = cfg.drift_interval > 0
        # read once: the version of the code running, not of a wheel upgraded under it since; one
        # the agent API would refuse (not PEP 440 or semver) is not sent
        running = installed_version()
        self.agent_version = running if running is not None and agent_version_ok(running) else None
        if running is not None and self.agent_version is None:
            log(f"agent version {running[:80]!r} is not one the control plane takes: heartbeats go without it")
        # one firewall change at a time: the sync loop's applies and the observer's drift repair
        self.apply_lock = threading.Lock()
        self.stop = threading.Event()
        self.signalled = False  # stop came from SIGTERM/SIGINT (the stop watchdog only acts then)
        self.stopped = threading.Event()  # run() finished its cleanup
        self.rng = random.Random()  # noqa: S311 - jitter, not cryptography
        self._last_refused: tuple[str, int, str | None] | None = None
        self.drops: BoundedBuffer = BoundedBuffer(cfg.max_buffered_records)  # type: ignore[type-arg]
        self.flows: BoundedBuffer = BoundedBuffer(cfg.max_buffered_records)  # type: ignore[type-arg]
        self.spool = Spool(cfg.state_dir / "spool.jsonl", cfg.max_spool_bytes)
        self.collector = DropCollector()
        self.counters: dict[str, int] = {}
        self.flow_source = FlowSource()
        self.reports_held_until = 0.0  # monotonic: no report is sent before (a 429's Retry-After)
        self.last_message = ""
        self.contact_error = ""
        try:
            self.source: Source = NoSource(self.key_error or "") if posture_only else self._source()
        except Exception as exc:  # a file it reads is missing or unreadable: enforce, retry later
            late = LateSource("api" if cfg.api_url is not None else "static", self._source, "")
            late.reason = f"source not set up: {type(exc).__name__}: {exc}"
            log(f"{late.reason}; enforcing first, retried with the backoff")
            self.source = late
        self._woke = time.time()  # when the last wait answered (the push arrived)
        # control-plane host name → its last DNS answer and when (monotonic) it was given
        self._cp_answer: dict[str, tuple[tuple[str, ...], float]] = {}
        self._lookups: dict[str, tuple[threading.Thread, list[tuple[str, ...] | None]]] = {}
        self._lookup_lock = threading.Lock()
        self._fetch_s = self._apply_s = 0.0
        self._refresh_tried = 0.0  # when the bundle was last fetched because its expiry is near
        # the kernel refused what start_enforcing meant to program (the last known good, or the
        # posture): tried again from the observer thread until it takes
        self.enforce_pending = False
        self._enforce_tries = 0
        self._enforce_next = 0.0  # monotonic time of the next try
        self._enforce_logged = ""

    def _source(self) -> Source:
        cfg = self.cfg
        if cfg.api_url is not None:
            e = cfg.enroll
            assert e is not None
            if e.method == "aws-iid":
                prove = enroll.aws_iid(e.imds_url, e.iid_signature, cfg.request_timeout)
            elif e.method == "azure-attested":
                prove = enroll.azure_attested(e.imds_url, cfg.request_timeout)
            elif e.method == "gcp-jwt":
                prove = enroll.gcp_jwt(e.gcp_audience or "", e.metadata_url, cfg.request_timeout)
            else:
                prove = enroll.pairing(cfg.workload_id, e.key())
            return ApiSource(
                cfg.api_url,
                cfg.workload_id,
                prove,
                self.state,
                cfg.request_timeout,
                cfg.wait_timeout,
                cfg.max_bundle_bytes,
                cfg.max_answer_bytes,
                tls_context(cfg.tls_ca_file),
            )
        assert cfg.source is not None
        return StaticSource(
            cfg.source,
            cfg.workload_id,
            cfg.poll_interval,
            cfg.request_timeout,
            verify=self.verifier.verify,
            max_bundle_bytes=cfg.max_bundle_bytes,
            tls=tls_context(cfg.tls_ca_file),
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def _signals(self, watchdog: bool) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.signalled = True
            self.stop.set()
            self.source.abort()  # a long-poll in flight returns now, not when the API answers

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        if not watchdog:
            return
        # the handler runs only once the main thread is back in Python, which a name lookup
        # holds off (glibc retries its poll on EINTR): the signal's number also reaches this
        # pipe at once, and the watchdog thread does the handler's work from there
        wakeup, self._wakeup = os.pipe()
        os.set_blocking(self._wakeup, False)
        signal.set_wakeup_fd(self._wakeup, warn_on_full_buffer=False)
        threading.Thread(target=self._stop_watchdog, args=(wakeup,), name="stop-watchdog", daemon=True).start()

    def _stop_watchdog(self, wakeup: int) -> None:
        """After SIGTERM/SIGINT: the stop is set and requests in flight end (the handler's work,
        without waiting for the main thread), and a main thread still stuck in a call no signal
        ends is not waited for beyond :data:`STOP_GRACE_S`. Never in the middle of an apply: the
        kernel's transaction is atomic, what is written after it is what the next start reads."""
        while True:
            signums = os.read(wakeup, 64)
            if not signums:
                return
            if signal.SIGTERM in signums or signal.SIGINT in signums:
                break
        self.signalled = True
        self.stop.set()
        self.source.abort()
        if self.stopped.wait(STOP_GRACE_S):
            return
        keeps = f"reports not spooled; the firewall keeps enforcing revision {self.agent.revision}"
        lib = getattr(self.backend, "lib", None)
        pending = ""
        # the drift check or heartbeat holding the lock is bounded: a read of the kernel's rules
        # (a listing child: seconds with a big set in another table) is killed, never waited on or
        # left behind as an orphan; a transaction is never cut (atomic in the kernel, but what is
        # written after it is what the next start reads): waited for
        if not self.apply_lock.acquire(timeout=STOP_LOCK_S):
            transaction = getattr(lib, "lock", None)
            if transaction is None or transaction.locked():  # (no libnftables: cannot tell, waited for)
                self.apply_lock.acquire()
                pending = "an apply or a read of the kernel's rules (waited for it to end)"
        children = sorted(getattr(lib, "listing_pids", ()))
        if not pending:
            pending = (
                f"a read of the kernel's rules (listing process {', '.join(map(str, children))}, killed)"
                if children
                else "a network call (name lookup or connect)"
            )
        log(f"stopping now: {pending} did not return within {STOP_GRACE_S:.0f}s of the signal; {keeps}")
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(0)

    def run(self, once: bool = False) -> int:
        if threading.current_thread() is threading.main_thread():
            self._signals(watchdog=not once)
        # enforce first: nothing before it may fail (status.json on a full disk used to stop the
        # daemon here, the host open)
        self.start_enforcing()
        # Type=notify: systemd holds network-pre.target (and interfaces) until now
        notify_systemd(f"READY=1\nSTATUS={self._enforcing()}")
        self.state.update_status(
            daemon={
                "pid": os.getpid(),
                "started": time.time(),
                "source": self.source.kind,
                "key_error": self.key_error,
                "config_error": self.config_error,
            },
            flows_source=self.flow_source.kind,
        )
        if self.cfg.insecure_http_lab_only and (self.cfg.api_url or "").startswith("http://"):
            log(
                f"WARNING: insecure_http_lab_only: api_url {self.cfg.api_url} is plain http; the bearer token "
                "and enrollment proofs cross the network in the clear (a lab setting, never production)"
            )
        if self.config_error is not None:
            self.state.update_status(last_error=self._config_problem(), incr={"config_errors": 1})
        if self.flow_source.kind == "unavailable":
            log("no /proc/net/nf_conntrack and no conntrack tool: flow reports are disabled (drops still reported)")
        observer = threading.Thread(target=self._observe_loop, name="observer", daemon=True)
        observer.start()
        failures = 0
        behind = 0  # rounds in a row the source announced a version we could not reach
        chased: int | None = None
        last_heartbeat = 0.0
        last_report = time.monotonic()
        latest: int | None = None
        while not self.stop.is_set():
            try:
                unenforced = self.agent.revision is None
                self.sync(latest)
                self.state.update_status(last_contact=time.time())
                failures = 0
                if self.contact_error:
                    self.contact_error = ""
                    self.last_message = ""
                now = time.monotonic()
                # the first bundle is reported at once: a launch may wait for it (lifecycle hook)
                first = unenforced and self.agent.revision is not None
                if now - last_heartbeat >= self.cfg.heartbeat_interval or once or first:
                    hb_latest = self.heartbeat()
                    last_heartbeat = now
                    if hb_latest is not None and hb_latest > (self.agent.revision or -1) and hb_latest != chased:
                        latest = chased = hb_latest
                        continue
                if (now - last_report >= self.cfg.report_interval or once) and now >= self.reports_held_until:
                    self.send_reports()
                    last_report = now
                if once:
                    break
                if latest is not None and (self.agent.revision or -1) < latest:
                    # announced but not reachable (refused or missing): do not spin on the nudge
                    behind += 1
                    self.stop.wait(backoff_delay(behind, min(self.cfg.backoff_max, self.cfg.poll_interval), self.rng))
                else:
                    behind = 0
                latest = self.source.wait(self.agent.revision, self._wait_timeout(), self.stop)
                self._woke = time.time()
            except (Unreachable, SourceError) as exc:
                failures += 1
                delay = backoff_delay(failures, self.cfg.backoff_max, self.rng)
                self.last_message = self.contact_error = str(exc)
                self.state.update_status(last_error=str(exc), incr={"contact_failures": 1})
                log(f"{exc}; still enforcing revision {self.agent.revision}; retry in {delay:.1f}s")
                if once:
                    break
                self.stop.wait(delay)
            except Exception as exc:
                # nothing from the network may stop the daemon: whatever slipped past the checks
                # above is logged with its type and origin, and retried like a failed contact
                failures += 1
                delay = backoff_delay(failures, self.cfg.backoff_max, self.rng)
                msg = f"unexpected {type(exc).__name__}: {exc}"
                self.last_message = self.contact_error = msg
                self.state.update_status(last_error=msg, incr={"unexpected_errors": 1})
                log(f"{msg}{_where(exc)}; still enforcing revision {self.agent.revision}; retry in {delay:.1f}s")
                if once:
                    break
                self.stop.wait(delay)
        self.stop.set()
        observer.join(timeout=5)
        try:
            self._spool_buffers()
        except OSError as exc:  # a full or read-only state filesystem: the records are lost, not the firewall
            log(f"reports not spooled: {exc}")
        self.state.update_status(daemon={"pid": None, "stopped": time.time(), "source": self.source.kind})
        log(f"stopped; the firewall keeps enforcing revision {self.agent.revision}")
        self.stopped.set()
        return 0

    def _wait_timeout(self) -> float:
        return self.cfg.wait_timeout if self.source.kind == "api" else self.cfg.poll_interval

    def start_enforcing(self) -> None:
        """Re-apply the last known good before any contact; without one (none yet, or set aside
        as unusable) hold the boot posture until a verified bundle applies. Either admits the
        control plane's addresses, resolved first. What the kernel refuses is tried again
        (:meth:`retry_enforcing`) until it takes: a refusal at boot never leaves the host open."""
        if self.cfg.source_hosts():
            self.follow_control_plane(apply=False, within=BOOT_RESOLVE_S)
        if self.key_error is not None:
            # nothing verifies: the last known good stays on disk for a start with the key
            fix = "the config file" if self.config_error is not None else "the key file"
            log(f"{self.key_error}; every bundle and delta is refused until {fix} is fixed")
            self.last_message = self.key_error
            self.state.update_status(last_error=self.key_error, incr={"key_errors": 1})
            self.agent.forget_last_known_good()
        with self.apply_lock:
            self._enforce(self.agent.reapply_last_known_good if self.key_error is None else lambda: Result(False))
        release_memory()

    def _enforce(self, reapply: Callable[[], Result]) -> None:
        """``reapply`` (the last known good, or its retry), else the boot posture; sets
        ``enforce_pending`` when the kernel refused what is wanted. Caller holds apply_lock."""
        try:
            for line in reapply().lines:
                log(line)
        except (Rejected, ApplyError) as exc:
            self._enforce_failed(str(exc))
        except Exception as exc:  # the state directory's documents came from the network too
            self._enforce_failed(f"last known good not re-applied: unexpected {type(exc).__name__}: {exc}", exc)
            if self.agent.kernel_plan is None:
                # never believe a bundle is enforced that the kernel never took: the posture instead
                self.agent.forget_last_known_good()
        posture_wanted = self.agent.bundle is None and self.cfg.boot_posture == "failsafe"
        if posture_wanted and self.agent.kernel_plan is None:
            try:
                # the control plane's addresses: those follow_control_plane put in agent.local
                for line in self.agent.hold_failsafe_posture().lines:
                    log(line)
            except (ApplyError, PlanError) as exc:
                self._enforce_failed(f"fail-safe posture not applied: {exc}")
        posture_missing = posture_wanted and self.agent.kernel_plan is None
        self.enforce_pending = self.agent.refused_lkg is not None or posture_missing
        if self.enforce_pending:
            self._enforce_tries += 1
            delay = min(ENFORCE_RETRY_MAX, 0.5 * 2.0**self._enforce_tries)
            self._enforce_next = time.monotonic() + delay
            if posture_missing:
                self.last_message = f"nothing enforced: the kernel refused the rules; retrying; {self._enforce_logged}"
        elif self._enforce_tries:
            log(f"enforcing after {self._enforce_tries} refused tries: {self._enforcing()}")
            self._enforce_tries, self._enforce_logged = 0, ""
            if self.last_message.startswith("nothing enforced"):
                self.last_message = ""

    def _enforce_failed(self, msg: str, exc: Exception | None = None) -> None:
        self.last_message = msg
        if msg != self._enforce_logged:  # a refusal that repeats is logged once
            self._enforce_logged = msg
            log(msg + (_where(exc) if exc is not None else ""))

    def retry_enforcing(self, now: float | None = None) -> None:
        """Program again what the kernel refused at start (the observer thread calls it): the
        last known good unless a bundle applied since, else the posture."""
        if not self.enforce_pending or (now if now is not None else time.monotonic()) < self._enforce_next:
            return
        with self.apply_lock:
            if self.agent.revision is not None and self.agent.refused_lkg is None:
                self.enforce_pending = False  # a bundle from the source applied meanwhile
                return
            self._enforce(self.agent.retry_last_known_good)

    def _enforcing(self) -> str:
        """What this process has programmed, in a few words (for systemd's STATUS=)."""
        if self.agent.revision is not None:
            return f"enforcing revision {self.agent.revision}"
        if self.agent.kernel_plan is not None:
            return "holding the fail-safe posture"
        if self.enforce_pending:
            return "nothing enforced yet: the kernel refused the rules; retrying"
        return "no bundle (boot_posture open)"

    def follow_control_plane(self, apply: bool = True, within: float | None = None) -> None:
        """Re-resolve the control plane's host name (every sync, before any fetch and apply) and
        let the control-plane fail-safe follow it: API Gateway's addresses change, and a bundle
        must never cut the agent off its own control plane. Admitted: the current answer (the
        last one while the name does not resolve, up to CONTROL_PLANE_RETAIN_S), and addresses a verified TLS handshake
        reached within CONTROL_PLANE_RETAIN_S (see there), at most CONTROL_PLANE_MAX. ``within``:
        how long the lookups may take in all (default ``request_timeout``); one still running
        then is left to finish in the background and its answer used by the next call."""
        hosts = self.cfg.source_hosts()
        deadline = time.monotonic() + (self.cfg.request_timeout if within is None else within)
        for host in hosts:
            answer = self._resolve(host, max(0.0, deadline - time.monotonic()))
            if answer:
                self._cp_answer[host] = (answer, time.monotonic())
            elif host not in self._cp_answer:
                log(f"control plane {host} did not resolve (yet): its fail-safe admits only addresses proved before")
        now = time.monotonic()
        for host, (_, seen) in list(self._cp_answer.items()):
            # a stale answer is no better than an old one: one spoofed answer followed by blocked
            # DNS must not keep its address admitted for longer than a proved one would be
            if now - seen > CONTROL_PLANE_RETAIN_S:
                log(f"control plane {host}: its last DNS answer is over {int(CONTROL_PLANE_RETAIN_S)} s old, dropped")
                del self._cp_answer[host]
        proved: dict[str, float] = {}
        for host in hosts:
            for address, t in verified_peers(host, CONTROL_PLANE_RETAIN_S).items():
                proved[address] = max(t, proved.get(address, t))
        current = [a for host in hosts for a in self._cp_answer.get(host, ((), 0.0))[0]]
        newest = sorted((a for a in proved if now - proved[a] <= CONTROL_PLANE_RETAIN_S), key=lambda a: -proved[a])
        kept = list(dict.fromkeys((*current, *newest)))[:CONTROL_PLANE_MAX]
        try:
            with self.apply_lock:
                result = self.agent.follow_control_plane(tuple(sorted(kept)), apply, self._host_resolvers())
        except (ApplyError, PlanError) as exc:
            log(f"control-plane fail-safe not updated: {exc}")
            return
        for line in result.lines:
            log(line)

    def _host_resolvers(self) -> tuple[str, ...] | None:
        """The DNS fail-safe's servers with the host's read again (DHCP rewrites resolv.conf, and
        glibc follows it: the agent must let it reach the new server), or None to keep what is
        admitted: a file naming none (caught mid-rewrite, or unreadable) admits no fewer than before."""
        if not (self.cfg.system_resolvers and self.cfg.source_hosts()):
            return None
        found = system_resolvers()
        return tuple(dict.fromkeys((*self.cfg.dns_resolvers, *found))) if found else None

    def _resolve(self, host: str, timeout: float) -> tuple[str, ...] | None:
        """``host``'s addresses (getaddrinfo, the system's resolver), or None when it does not
        resolve within ``timeout`` seconds or at all. A lookup is not cancellable: one that
        outlives ``timeout`` runs on in a daemon thread, and the next call for ``host`` waits for
        it rather than start another (at most one per host at a time)."""
        with self._lookup_lock:
            running = self._lookups.get(host)
            if running is None:
                box: list[tuple[str, ...] | None] = []
                thread = threading.Thread(target=lambda: box.append(_lookup(host)), name=f"resolve {host}", daemon=True)
                thread.start()
                running = self._lookups[host] = (thread, box)
        thread, box = running
        thread.join(timeout)
        if thread.is_alive():
            return None
        with self._lookup_lock:
            if self._lookups.get(host) is running:
                del self._lookups[host]
        return box[0] if box else None

    # --- sync --------------------------------------------------------------------------------

    def sync(self, latest: int | None) -> None:
        """One round; when it moved the applied revision, ``last_sync`` in the status says where
        the time went: woken (the wait answered), fetch requests made and seconds fetching,
        seconds applying."""
        before, fetches = self.agent.revision, self.source.fetches
        self._fetch_s = self._apply_s = 0.0
        try:
            self._sync(latest)
        finally:
            if self.agent.revision != before:
                self.state.update_status(
                    last_sync={
                        "revision": self.agent.revision,
                        "woke": self._woke,
                        "fetches": self.source.fetches - fetches,  # 0: it all came with the wait
                        "fetch_s": round(self._fetch_s, 6),
                        "apply_s": round(self._apply_s, 6),
                        "done": time.time(),
                    }
                )

    def _timed(self, what: str, fn: Callable[[], T]) -> T:
        t = time.perf_counter()
        try:
            return fn()
        finally:
            if what == "fetch":
                self._fetch_s += time.perf_counter() - t
            else:
                self._apply_s += time.perf_counter() - t

    def _sync(self, latest: int | None) -> None:
        if self.cfg.source_hosts():
            self.follow_control_plane()
        if latest is None:
            latest = self.source.announced()
        rev = self.agent.revision
        refreshing = rev is not None and latest is not None and latest <= rev
        if refreshing and not self._refresh_due():
            return
        if rev is not None and self.agent.bundle is not None and (latest is None or latest > rev):
            since, bundle_version = rev, self.agent.bundle.version
            deltas = self._timed("fetch", lambda: self._fetch_deltas(since, bundle_version))
            bridged = deltas is not None and self._timed("apply", lambda: self._apply_deltas(deltas))
            if bridged and latest is not None and (self.agent.revision or 0) >= latest:
                return  # the deltas brought it all the way: no whole bundle to fetch
        try:
            doc = self._timed("fetch", self.source.bundle)
        except BundleError as exc:
            self._rejected(f"malformed bundle from source: {exc}")
            return
        if doc is None:
            return
        seen = (doc.workload_id, doc.version, doc.signature.value if doc.signature else None)
        if seen == self._last_refused:
            self.source.settled()
            return  # refused already: reported once, not on every poll
        rev = self.agent.revision
        if refreshing and rev is not None and doc.version < rev:
            # fetched for its expiry, but compute has not re-signed it yet (its deltas are ahead):
            # nothing to apply, nothing to report; the next refresh round asks again
            self.source.settled()
            return
        if self.source.kind == "static" and rev is not None and doc.version < rev and self.agent.deltas:
            # a static layout's bundle may lag behind the deltas already applied: not a rollback
            # attempt worth reporting, and never applied (apply_bundle would refuse it anyway)
            self._last_refused = seen
            self.source.settled()
            log(f"static bundle version {doc.version} is behind the applied revision {rev} (deltas ahead): kept {rev}")
            return
        try:
            with self.apply_lock:
                result = self._timed("apply", lambda: self.agent.apply_bundle(doc))
        except Rejected as exc:
            self._last_refused = seen
            self.source.settled()  # refused for good: the same bytes would be refused again
            self._rejected(str(exc))
            return
        except ApplyError as exc:
            # not settled: the next poll fetches the bundle again (no If-None-Match) and retries
            self.last_message = str(exc)
            log(str(exc))
            return
        except Exception as exc:  # a signed document the agent could not handle: refused, not fatal
            self._last_refused = seen
            self.source.settled()
            self._unexpected(f"bundle for {doc.workload_id!r} version {doc.version}", exc)
            return
        self.source.settled()
        self.last_message = ""
        if result.changed:
            self.collector.reset()
            for line in result.lines:
                log(line)
            release_memory()
        if self.agent.revision is not None and self.agent.bundle is not None:
            revision, bundle_version = self.agent.revision, self.agent.bundle.version
            if latest is not None and revision >= latest:
                return  # the bundle is the newest announced: no deltas after it to ask for
            more = self._timed("fetch", lambda: self._fetch_deltas(revision, bundle_version))
            if more:
                self._timed("apply", lambda: self._apply_deltas(more))

    def _refresh_due(self) -> bool:
        """The enforced bundle expires within ``REFRESH_BEFORE`` (or has): fetch the bundle even
        though no new version was announced — compute re-signs bundles before they expire, at the
        same version. At most once per heartbeat interval."""
        b = self.agent.bundle
        now = time.time()
        if b is None or (b.expires_at is not None and b.expires_at - now > REFRESH_BEFORE):
            return False
        if now - self._refresh_tried < self.cfg.heartbeat_interval:
            return False
        self._refresh_tried = now
        return True

    def _fetch_deltas(self, since: int, bundle_version: int) -> list[SetDelta] | None:
        """The source's deltas; a malformed one is refused and the whole bundle decides (None)."""
        try:
            return self.source.deltas(since, self.agent.set_versions(), bundle_version)
        except BundleError as exc:
            self._rejected(f"malformed delta from source: {exc}")
            return None

    def _apply_deltas(self, deltas: list[SetDelta]) -> bool:
        """Apply in order; False when one was refused or failed (the whole bundle must bridge).

        A batch that fails half-way is undone: the deltas applied before the failure may claim the
        very revision of the bundle that replaces them, which would then be refused as a replay."""
        applied = len(self.agent.deltas)
        for d in deltas:
            try:
                with self.apply_lock:
                    result = self.agent.apply_delta(d)
            except Exception as exc:
                if isinstance(exc, Rejected):
                    self._rejected(str(exc))
                elif isinstance(exc, ApplyError):
                    log(str(exc))
                else:  # a signed delta the agent could not handle: refused, not fatal
                    self._unexpected(f"delta for set {d.set} {d.from_version}→{d.to_version}", exc)
                if len(self.agent.deltas) > applied:
                    with self.apply_lock:
                        rewound = self.agent.rewind_deltas(applied)
                    for line in rewound.lines:
                        log(line)
                return False
            if result.changed:
                for line in result.lines:
                    log(line)
        return True

    def _rejected(self, msg: str) -> None:
        self.last_message = msg
        log(msg)

    def _unexpected(self, what: str, exc: Exception) -> None:
        """A document that raised what no check expected (a bug, or a case no check covers yet):
        refused like any other — counted, reported in the heartbeat — with the error's type and
        where it was raised in the log, so that it is not mistaken for an ordinary refusal."""
        reason = f"unexpected {type(exc).__name__}: {exc}"
        self.state.update_status(
            last_rejected={"what": what, "reason": reason, "time": time.time()}, incr={"rejected": 1}
        )
        self._rejected(f"rejected {what}: {reason}{_where(exc)}")

    # --- heartbeat and reports -----------------------------------------------------------------

    def heartbeat(self) -> int | None:
        status = self.state.read_json("status.json")
        counters = {k: int(v) for k, v in status.get("counters", {}).items()}
        counters.update({f"packets:{k}": v for k, v in self.counters.items()})
        counters["buffered_drops"] = len(self.drops)
        counters["buffered_flows"] = len(self.flows)
        applied = self.agent.bundle  # deltas change set contents only: no need to fold them for the mode
        stale = self.agent.stale()
        self.state.update_status(stale=stale)
        message = self.last_message
        if stale and applied is not None:
            # never fails open: the expired bundle stays enforced; the control plane is told
            message = f"stale: the enforced bundle expired at {_utc(applied.expires_at)}, still enforcing it" + (
                f"; {message}" if message else ""
            )
        if self.config_error is not None:
            message = self._config_problem() + (f"; {message}" if message else "")
        applies = self.agent.applies
        revision, kernel_digest = self.agent.enforced_state()
        try:
            # what the kernel holds, just read whole: a bundle set changed by another tool is repaired here
            with self.apply_lock:
                repaired = self.agent.check_sets(revision, kernel_digest, applies)
        except (ApplyError, PlanError, OSError) as exc:
            log(f"re-applying the bundle after its sets were found altered failed: {exc}")
            repaired = None
        if repaired is not None and repaired.changed:
            self.collector.reset()
            for line in repaired.lines:
                log(line)
            revision, kernel_digest = self.agent.enforced_state()  # what the kernel holds now
            # the repair counted: this heartbeat tells the control plane of it (a finding), not the next
            repaired_status = self.state.read_json("status.json").get("counters", {})
            counters.update({k: int(v) for k, v in repaired_status.items()})
        if kernel_digest is None and self.agent.kernel_read_error is not None:
            problem = f"kernel_read_error: {self.agent.kernel_read_error}"
            message = problem + (f"; {message}" if message else "")
        hb = Heartbeat(
            applied_version=revision,
            mode=applied.mode if applied is not None else None,
            healthy=not message,
            message=message[:1000],
            counters=counters,
            kernel_digest=kernel_digest,
            agent_version=self.agent_version,
        )
        return self.source.heartbeat(hb)

    def send_reports(self) -> None:
        batches = self.spool.pop_all()
        drops = self.drops.take(self.cfg.max_buffered_records)
        flows = summarize_flows(self.flows.take(self.cfg.max_buffered_records))
        discarded = self.drops.discarded + self.flows.discarded + self.spool.discarded
        self.drops.discarded = self.flows.discarded = self.spool.discarded = 0
        batches += make_batches(drops, flows, discarded)
        for i, batch in enumerate(batches):
            try:
                self.source.report(batch)
            except Unreachable as exc:
                for b in batches[i:]:
                    self.spool.append(b)  # try again later, within the spool's byte cap
                if not exc.throttled:
                    raise
                # over the report quota: raised, the backoff of the loop would be reset by the
                # next good sync and the spool sent again every second or two until the quota
                # came back; reports alone wait, syncs and heartbeats go on
                wait = self.cfg.report_interval if exc.retry_after is None else exc.retry_after
                held = min(REPORTS_HOLD_MAX, wait)
                self.reports_held_until = time.monotonic() + held
                self.state.update_status(incr={"reports_throttled": 1})
                given = "no Retry-After" if exc.retry_after is None else f"Retry-After {exc.retry_after:g}s"
                log(f"{exc} ({given}): reports held {held:.0f}s, {len(batches) - i} batches spooled")
                return
            except SourceError as exc:
                # refused (4xx): resending the same batch cannot help; count it as discarded
                self.drops.discarded += len(batch.drops)
                self.flows.discarded += len(batch.flows)
                log(f"report batch refused, discarded: {exc}")

    def _spool_buffers(self) -> None:
        drops = self.drops.take(self.cfg.max_buffered_records)
        flows = summarize_flows(self.flows.take(self.cfg.max_buffered_records))
        if self.source.kind == "api":
            for b in make_batches(drops, flows, 0):
                self.spool.append(b)

    # --- observation thread --------------------------------------------------------------------

    def _observe_loop(self) -> None:
        local = local_addresses()
        last_local = last_drift = time.monotonic()
        interval = self.cfg.observe_interval
        if self.cfg.drift_interval > 0:
            interval = min(interval, self.cfg.drift_interval)
        last_observe = 0.0
        last_config = time.monotonic()
        if self.config_error is not None:
            interval = min(interval, CONFIG_RETRY_S)
        while not self.stop.wait(min(interval, 0.5) if self.enforce_pending else interval):
            now = time.monotonic()
            if self.config_error is not None and now - last_config >= CONFIG_RETRY_S:
                last_config = now
                self.try_config()
            try:
                self.retry_enforcing(now)
            except Exception as exc:
                log(f"programming the kernel again failed: {exc}{_where(exc)}")
            if self.cfg.drift_interval > 0 and now - last_drift >= self.cfg.drift_interval:
                last_drift = now
                try:
                    self.check_drift()
                except Exception as exc:
                    log(f"drift check failed: {exc}")
            if now - last_observe < self.cfg.observe_interval:
                continue
            last_observe = now
            try:
                self.observe_once(local)
                if time.monotonic() - last_local > 60:
                    local, last_local = local_addresses(), time.monotonic()
            except Exception as exc:
                log(f"observation failed: {exc}")

    def _config_problem(self) -> str:
        held = "the fail-safe posture" if isinstance(self.source, NoSource) else "the last configuration that loaded"
        return f"config {self.config_path} not loaded ({self.config_error}): running on {held}; retried every {CONFIG_RETRY_S:g}s"

    def try_config(self) -> bool:
        """Load the config file that did not load at start; once it does, stop for a start over
        with it (:attr:`reload`). What is enforced stays in the kernel meanwhile."""
        from ringfence_agent.config import ConfigError, load_config

        assert self.config_source is not None
        try:
            load_config(self.config_source, self.config_origin)
        except ConfigError as exc:
            problem = str(exc).replace("\n", " ")
            if problem != self.config_error:
                self.config_error = problem
                log(f"config {self.config_path} still does not load: {problem}")
                self.state.update_status(last_error=self._config_problem())
            return False
        except Exception as exc:  # nothing in a file may stop the daemon
            log(f"config {self.config_path}: unexpected {type(exc).__name__}: {exc}{_where(exc)}")
            return False
        log(f"config {self.config_path} loads now: starting over with it (the kernel keeps what it enforces)")
        self.reload = True
        self.stop.set()
        return True

    def check_drift(self) -> None:
        """The kernel compared with what was applied; tamper repaired and reported."""
        with self.apply_lock:
            result = self.agent.check_drift()
        if result.changed:
            self.collector.reset()
            for line in result.lines:
                log(line)

    def observe_once(self, local: set[str]) -> None:
        plan = self.agent.ensure_plan()
        if plan is None or plan.mode == "idle":
            return
        obs = self.backend.observe(plan, self.collector.counters)
        before = dict(self.collector.counters)
        for e in self.collector.events(plan, obs):
            self.drops.add(drop_key(e), e)
        for k, v in counter_deltas(before, obs.counters).items():
            self.counters[k] = self.counters.get(k, 0) + v
        now = time.time()
        for f in parse_conntrack(self.flow_source.lines(), local, now):
            self.flows.add(flow_key(f), f)
