"""A lab of network namespaces on a Linux bridge, for the agent's real-dataplane tests.

Hosts get 10.77.0.<n>/24 and fd77::<n>/64 on ``eth0``; a separate "switch" namespace holds the
bridge, so nothing touches the host's own network. Names are unique per run; :meth:`Lab.close`
deletes every namespace (and with them every veth) and kills every process it started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROBE = HERE / "netprobe.py"
AGENT = Path(sys.executable).parent / "ringfence-agent"
PY = sys.executable


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


class Lab:
    def __init__(self, hosts: dict[str, int]) -> None:
        """hosts: name → last octet / hextet."""
        self.prefix = f"rf{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = dict(hosts)
        self.procs: list[subprocess.Popen[str]] = []
        self.created: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def v4(self, host: str) -> str:
        return f"10.77.0.{self.hosts[host]}"

    def v6(self, host: str) -> str:
        return f"fd77::{self.hosts[host]:x}"

    def _build(self) -> None:
        sh("ip", "netns", "add", self.switch)
        self.created.append(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        sh("ip", "-n", self.switch, "link", "set", "lo", "up")
        for i, (host, n) in enumerate(self.hosts.items()):
            ns = self.ns(host)
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
            sh("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", f"10.77.0.{n}/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"fd77::{n:x}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            # accounting for flow reports (per-netns sysctl; harmless if absent)
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1", check=False)

    # --- processes -----------------------------------------------------------------------------

    def exec(
        self, host: str, *cmd: str, check: bool = False, stdin: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns(host), *cmd, check=check, stdin=stdin, timeout=timeout)

    def spawn(self, host: str, *cmd: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *cmd],
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            **kw,  # type: ignore[call-overload]
        )
        self.procs.append(p)
        return p

    def agent(
        self, host: str, *args: str, env: Sequence[str] = (), check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``ringfence-agent args`` in ``host``; ``env``: NAME=value assignments for it."""
        prefix = ["env", *env] if env else []
        return self.exec(host, *prefix, str(AGENT), *args, check=check, timeout=timeout)

    def serve(self, host: str, tcp: Sequence[int], udp: Sequence[int] = ()) -> subprocess.Popen[str]:
        p = self.spawn(
            host,
            PY,
            str(PROBE),
            "serve",
            "--tcp",
            ",".join(map(str, tcp)),
            "--udp",
            ",".join(map(str, udp)),
            stdout=subprocess.PIPE,
        )
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
        cmd = [PY, str(PROBE), "tcp", addr, str(port), "--timeout", str(timeout), "--sport", str(sport)]
        return self.exec(src, *cmd).returncode == 0

    def udp(self, src: str, dst: str, port: int, v6: bool = False, timeout: float = 0.8) -> bool:
        addr = self.v6(dst) if v6 else self.v4(dst)
        return self.exec(src, PY, str(PROBE), "udp", addr, str(port), "--timeout", str(timeout)).returncode == 0

    def hold(self, src: str, dst: str, port: int, v6: bool = False) -> Holder:
        addr = self.v6(dst) if v6 else self.v4(dst)
        p = self.spawn(src, PY, str(PROBE), "hold", addr, str(port), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return Holder(p)

    def kill(self, p: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)

    def reset(self, host: str) -> None:
        """Remove whatever Ringfence programmed in one host (both backends)."""
        self.exec(host, "nft", "delete", "table", "inet", "ringfence")
        if shutil.which("iptables-restore") and "RF-IN" in self.exec(host, "iptables-save", "-t", "filter").stdout:
            self.agent(host, "flush", "--backend", "iptables")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                self.kill(p)
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()


class Holder:
    """One long-lived TCP connection inside a namespace."""

    def __init__(self, p: subprocess.Popen[str]) -> None:
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
        return self.p.stdout.readline().strip() == "ok"


def wait_until(pred: object, timeout: float = 10.0, interval: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(pred())  # type: ignore[operator]
