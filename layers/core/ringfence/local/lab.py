"""A lab of network namespaces on a Linux bridge: hosts with real addresses and real firewalls.

Used by the live demo (one namespace per instance, the control plane in one more) and by the
agent's dataplane tests. A separate "switch" namespace holds the bridge, so nothing touches the
host's own network: no address, route or interface is added to the namespace the lab was built
from. Names are unique per run (the creating pid is in them, so :func:`sweep_stale` can tell a
dead run's namespaces from a live one's); :meth:`Lab.close` kills every process it started or
finds inside its namespaces, then deletes the namespaces (and with them every veth).

Hosts added with :meth:`Lab.add` get any addresses; the test-compatible constructor
``Lab({"h1": 1})`` gives 10.77.0.<n>/24 and fd77::<n>/64 on ``eth0``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringfence.local import probe

AGENT = Path(sys.executable).parent / "ringfence-agent"
PY = sys.executable
PROBE = (PY, "-m", "ringfence.local.probe")  # the traffic tool, runnable inside any namespace
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_PREFIX = re.compile(r"^rf(\d+)x[0-9a-f]{4}-")


def prerequisites() -> str | None:
    """Why the dataplane cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (make sysdeps)"
    name = f"rfprobe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"`ip netns add` fails here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


def sh(
    *cmd: str, check: bool = True, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


CONNTRACK_ACCT = "/proc/sys/net/netfilter/nf_conntrack_acct"  # per network namespace: the writer's thread's

# --- entering a namespace from Python ----------------------------------------------------------


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter_netns(name: str) -> None:
    """Move the calling thread into namespace ``name`` for good. A network namespace is per thread:
    called before any other thread starts, the whole process (and every child) lives there."""
    fd = os.open(NETNS_DIR / name, os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run a block in namespace ``name`` on the calling thread only (sockets created inside stay
    there after the block), then return the thread to where it was."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter_netns(name)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


# --- the lab -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One traffic probe for :meth:`Lab.reach`: ``src`` to ``dst``'s lab address (v4, or v6) on
    ``port``, a TCP echo round trip (from source port ``sport`` if given) or a UDP one; ``addr``
    overrides ``dst``'s address, as in :meth:`Lab.tcp`."""

    src: str
    dst: str
    port: int
    v6: bool = False
    udp: bool = False
    sport: int = 0
    addr: str = ""

    def __str__(self) -> str:
        to = f"{self.dst} at {self.addr}" if self.addr else self.dst
        extra = (" v6" if self.v6 and not self.addr else "") + (f" from port {self.sport}" if self.sport else "")
        return f"{'udp' if self.udp else 'tcp'} {self.src} → {to}:{self.port}{extra}"


@dataclass
class Host:
    name: str
    ns: str
    v4: list[str] = field(default_factory=list)  # "a.b.c.d/len"
    v6: list[str] = field(default_factory=list)
    port: str = ""  # its veth peer on the bridge


class Lab:
    def __init__(self, hosts: Mapping[str, int] | None = None) -> None:
        """hosts: name → last octet / hextet (10.77.0.<n>/24, fd77::<n>/64)."""
        self.prefix = f"rf{os.getpid()}x{secrets.token_hex(2)}"
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, Host] = {}
        self.procs: list[subprocess.Popen[Any]] = []
        self.created: list[str] = []
        self._ports = 0
        self._lock = threading.Lock()
        try:
            sh("ip", "netns", "add", self.switch)
            self.created.append(self.switch)
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            sh("ip", "-n", self.switch, "link", "set", "lo", "up")
            for host, n in (hosts or {}).items():
                self.add(host, [f"10.77.0.{n}/24"], [f"fd77::{n:x}/64"])
        except BaseException:
            self.close()
            raise

    def ns(self, host: str) -> str:
        return self.hosts[host].ns

    def v4(self, host: str) -> str:
        return self.hosts[host].v4[0].split("/")[0]

    def v6(self, host: str) -> str:
        return self.hosts[host].v6[0].split("/")[0]

    def add(
        self,
        host: str,
        v4: Sequence[str] = (),
        v6: Sequence[str] = (),
        routes: Sequence[str] = (),
        conntrack_acct: bool = True,
    ) -> str:
        """A namespace for ``host`` with ``eth0`` on the bridge holding the given addresses
        ("a.b.c.d/len"); ``routes``: extra destinations reached on-link through ``eth0``."""
        with self._lock:
            if host in self.hosts:
                raise ValueError(f"lab host {host!r} exists already")
            ns = f"{self.prefix}-{host}"
            port = f"p{self._ports}"
            self._ports += 1
            self.created.append(ns)  # deleted on close() even if what follows fails
            self.hosts[host] = Host(host, ns, list(v4), list(v6), port)
        sh("ip", "netns", "add", ns)  # not under the lock: a fleet's boots run side by side
        # one `ip` process per namespace (its -batch), not one per command: a scale-out of 50 booted
        # ~450 `ip` processes on the lab's two cores, most of the 3.5 s its last VM took to start
        switch = [f"link add {port} type veth peer name eth0 netns {ns}", f"link set {port} master br0 up"]
        sh("ip", "-n", self.switch, "-batch", "-", stdin="\n".join(switch) + "\n")
        host_cmds = ["link set lo up"]
        host_cmds += [f"addr add {a} dev eth0" for a in v4]
        host_cmds += [f"addr add {a} dev eth0 nodad" for a in v6]
        host_cmds += ["link set eth0 up"] + [f"route add {r} dev eth0" for r in routes]
        sh("ip", "-n", ns, "-batch", "-", stdin="\n".join(host_cmds) + "\n")
        if conntrack_acct:  # byte/packet accounting for flow reports (per-netns sysctl; harmless if absent)
            with contextlib.suppress(OSError), in_netns(ns), open(CONNTRACK_ACCT, "w") as f:
                f.write("1")
        return ns

    def remove(self, host: str) -> None:
        """Kill what runs in ``host`` and delete its namespace (its veth goes with it)."""
        with self._lock:
            h = self.hosts.pop(host, None)
        if h is None:
            return
        _kill_inside(h.ns)
        sh("ip", "netns", "del", h.ns, check=False)
        with self._lock, contextlib.suppress(ValueError):
            self.created.remove(h.ns)

    # --- processes -----------------------------------------------------------------------------

    def exec(
        self, host: str, *cmd: str, check: bool = False, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns(host), *cmd, check=check, stdin=stdin, timeout=timeout)

    def spawn(self, host: str, *cmd: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[Any]:
        return self.start("ip", "netns", "exec", self.ns(host), *cmd, env=env, **kw)

    def start(self, *cmd: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[Any]:
        """A process the lab kills on :meth:`close` (``spawn`` starts one inside a host)."""
        kw.setdefault("text", True)
        p = subprocess.Popen(
            list(cmd),
            start_new_session=True,  # its own process group: killed as one, and not by the terminal's Ctrl-C
            env={**os.environ, **(env or {})},
            **kw,
        )
        with self._lock:
            self.procs.append(p)
        return p

    def agent(
        self, host: str, *args: str, env: Sequence[str] = (), check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``ringfence-agent args`` in ``host``; ``env``: NAME=value assignments for it."""
        prefix = ["env", *env] if env else []
        return self.exec(host, *prefix, str(AGENT), *args, check=check, timeout=timeout)

    def serve(self, host: str, tcp: Sequence[int], udp: Sequence[int] = ()) -> subprocess.Popen[Any]:
        tcp_ports, udp_ports = ",".join(map(str, tcp)), ",".join(map(str, udp))
        p = self.spawn(host, *PROBE, "serve", "--tcp", tcp_ports, "--udp", udp_ports, stdout=subprocess.PIPE)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip() == "ready", line
        return p

    # 0.8 s: far above a lab round trip even on a loaded 2-core CI box; a drop costs exactly this
    def tcp(
        self, src: str, dst: str, port: int, v6: bool = False, timeout: float = 0.8, sport: int = 0, addr: str = ""
    ) -> bool:
        """``addr`` overrides ``dst``'s lab address (an extra address the host holds)."""
        addr = addr or (self.v6(dst) if v6 else self.v4(dst))
        cmd = [*PROBE, "tcp", addr, str(port), "--timeout", str(timeout), "--sport", str(sport)]
        return self.exec(src, *cmd).returncode == 0

    def udp(self, src: str, dst: str, port: int, v6: bool = False, timeout: float = 0.8) -> bool:
        addr = self.v6(dst) if v6 else self.v4(dst)
        return self.exec(src, *PROBE, "udp", addr, str(port), "--timeout", str(timeout)).returncode == 0

    def reach(self, probes: Sequence[Probe], timeout: float = 0.8) -> list[bool]:
        """Every probe at once, each as :meth:`tcp` / :meth:`udp` would run it (same timeout, same
        round trip), from threads of this process that enter the source's namespace: a run of
        dropped probes costs one timeout, not one each, and no interpreter starts per probe."""
        if not probes:
            return []
        jobs = [(self.ns(p.src), p.addr or (self.v6(p.dst) if p.v6 else self.v4(p.dst)), p) for p in probes]
        results = [False] * len(jobs)
        errors: list[BaseException] = []

        def one(i: int) -> None:
            ns, addr, p = jobs[i]
            try:
                with in_netns(ns):  # this thread only; sockets opened here stay in ns
                    if p.udp:
                        results[i] = probe.udp_probe(addr, p.port, timeout)
                    else:
                        results[i] = probe.tcp_probe(addr, p.port, timeout, p.sport)
            except BaseException as exc:  # not a probe's answer (a namespace gone): the caller's error
                errors.append(exc)

        # threads of their own, gone afterwards: none is reused while it might sit in a namespace
        threads = [
            threading.Thread(target=one, args=(i,), name=f"lab-probe-{i}", daemon=True) for i in range(len(jobs))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def mismatches(
        self, allowed: Sequence[Probe] = (), dropped: Sequence[Probe] = (), timeout: float = 0.8
    ) -> list[str]:
        """The probes among ``allowed`` that do not get through and those among ``dropped`` that
        do, all run at once (:meth:`reach`); ``assert not net.mismatches(...)`` names each one."""
        expected = [(p, True) for p in allowed] + [(p, False) for p in dropped]
        got = self.reach([p for p, _ in expected], timeout)
        return [
            f"{p}: {'gets through' if ok else 'is dropped'}, expected {'allowed' if want else 'dropped'}"
            for (p, want), ok in zip(expected, got, strict=True)
            if ok != want
        ]

    def hold(self, src: str, dst: str, port: int, v6: bool = False) -> Holder:
        addr = self.v6(dst) if v6 else self.v4(dst)
        p = self.spawn(src, *PROBE, "hold", addr, str(port), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return Holder(p)

    def kill(self, p: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)

    def reset(self, host: str) -> None:
        """Remove whatever Ringfence programmed in one host (both backends)."""
        self.exec(host, "nft", "delete", "table", "inet", "ringfence")
        if shutil.which("iptables-restore") and "RF-IN" in self.exec(host, "iptables-save", "-t", "filter").stdout:
            self.agent(host, "flush", "--backend", "iptables")

    def close(self) -> None:
        """Idempotent; safe from a signal handler's cleanup path (no lock is taken). Every
        process first (one pass over /proc for those inside the namespaces), then every namespace
        in one ``ip -batch`` (the kernel tears them down in the background)."""
        for p in list(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in list(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        self.procs.clear()
        names = list(reversed(self.created))
        kill_inside_all(names)
        if names:
            subprocess.run(
                ["ip", "-force", "-batch", "-"],
                input="".join(f"netns del {n}\n" for n in names),
                capture_output=True,
                text=True,
                check=False,
            )
        self.created.clear()
        self.hosts.clear()


def kill_inside_all(names: list[str]) -> None:
    """SIGKILL every process (but this one) whose network namespace is one of ``names``."""
    inodes = set()
    for n in names:
        with contextlib.suppress(OSError):
            inodes.add(os.stat(NETNS_DIR / n).st_ino)
    if not inodes:
        return
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            ino = os.stat(d / "ns" / "net").st_ino
        except OSError:
            continue
        if ino in inodes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(d.name), signal.SIGKILL)


def _kill_inside(ns: str) -> None:
    """SIGKILL every process still inside namespace ``ns`` (whoever started it), except this one
    (the live demo runs inside its control-plane namespace)."""
    out = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in out:
        if pid.isdigit() and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)


def sweep_stale() -> list[str]:
    """Delete lab namespaces whose creating process is gone (a run killed with SIGKILL), after
    killing what still runs inside them; returns their names. A live run's are left alone."""
    stale = []
    for path in sorted(NETNS_DIR.glob("rf*")) if NETNS_DIR.is_dir() else []:
        m = _PREFIX.match(path.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            stale.append(path.name)
    if stale:
        kill_inside_all(stale)
        subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input="".join(f"netns del {n}\n" for n in stale),
            capture_output=True,
            text=True,
            check=False,
        )
    return stale


class Holder:
    """One long-lived TCP connection inside a namespace."""

    def __init__(self, p: subprocess.Popen[Any]) -> None:
        self.p = p
        assert p.stdout is not None
        self.connected = p.stdout.readline().strip() == "connected"

    def ping(self) -> bool:
        assert self.p.stdin is not None and self.p.stdout is not None
        try:
            self.p.stdin.write("x\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            return False
        return bool(self.p.stdout.readline().strip() == "ok")


def wait_until(pred: Callable[[], object], timeout: float = 10.0, interval: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
