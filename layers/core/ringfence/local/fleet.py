"""Instances as namespaces: every instance the embedded AWS runs gets a lab namespace holding its
private address, echo servers on the example's service ports, and one real ``ringfence-agent``
enrolling with its identity document (aws-iid) and following the agent API by push.

:meth:`Fleet.sync` is the hypervisor: it reads moto's instances and boots or destroys namespaces to
match (a pending instance boots at once, so an Auto Scaling launch held in ``Pending:Wait`` has
its agent enrolling while the lifecycle hook waits).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringfence.local.agentfork import AgentForks, AgentProcess
from ringfence.local.aws import Estate
from ringfence.local.imds import IMDS_ADDRESS
from ringfence.local.lab import AGENT, Lab
from ringfence.local.traffic import Traffic

# every instance runs the same echo servers: policy alone decides who reaches what
TCP_PORTS = (22, 53, 389, 443, 1433, 5432, 8080, 8443, 9100)
UDP_PORTS = (53, 123, 514)
LAB_PREFIX_LEN = 8  # every instance address is on-link on the lab bridge (10.0.0.0/8)


@dataclass
class Instance:
    id: str
    ip: str
    name: str
    host: str  # lab host name
    booted_at: float  # wall clock, when its namespace and agent were started
    agent: AgentProcess | None = None
    dir: Path = field(default_factory=Path)

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    def status(self) -> dict[str, Any]:
        """The agent's status file (applied_version, applied_at, last_error, sync timings...)."""
        try:
            data = json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


@dataclass
class FleetConfig:
    api_url: str
    public_key: Path
    workdir: Path
    backend: str = "nftables"  # "dry-run" without root / nft: agents in this namespace, no packets
    imds_url: str = f"http://{IMDS_ADDRESS}"
    heartbeat_interval: float = 15.0
    wait_timeout: float = 25.0
    extra_routes: tuple[str, ...] = (f"{IMDS_ADDRESS}/32",)
    tls_ca_file: Path | None = None  # the CA the control plane's certificate chains to (a lab's own)
    # agents forked from one process that has imported the agent (ringfence.local.agentfork)
    # rather than each exec'd (through `ip netns exec` in a lab): the same agent, without 50
    # interpreter starts on the lab's cores during a scale-out; without a lab (dry-run agents) the
    # template is started through the fleet's start_process and its children stay in this namespace
    fork_agents: bool = True


class Fleet:
    def __init__(
        self,
        cfg: FleetConfig,
        look: Callable[[], Estate],
        lab: Lab | None,
        traffic: Traffic | None,
        log: Callable[[str], None] = lambda s: None,
        start_process: Callable[..., subprocess.Popen[Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.look = look  # what moto holds (EmbeddedAws.instances)
        self.lab = lab
        self.traffic = traffic
        self.log = log
        self.start_process = start_process or _popen
        self.instances: dict[str, Instance] = {}
        self.by_ip: dict[str, str] = {}
        self.gone: dict[str, Instance] = {}
        self._booting: set[str] = set()
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_boot: list[Callable[[Instance], None]] = []
        self._forks: AgentForks | None = None

    # --- the hypervisor loop -----------------------------------------------------------------

    def sync(self) -> tuple[list[Instance], list[Instance]]:
        """Boot namespaces for new pending/running instances, destroy those of terminating ones."""
        seen: dict[str, tuple[str, str, str]] = {}
        for iid, inst in self.look().instances.items():
            if inst.private_ip and inst.state in ("pending", "running"):
                seen[iid] = (inst.private_ip, inst.tags.get("Name", iid), inst.state)
        with self.lock:
            destroyed = [self._forget(iid) for iid in [i for i in self.instances if i not in seen]]
            new = [
                (iid, ip, name)
                for iid, (ip, name, _) in seen.items()
                if iid not in self.instances and iid not in self.gone and iid not in self._booting
            ]
            self._booting.update(iid for iid, _, _ in new)
        # booting is mostly waiting for `ip` and process starts: a scale-out of 50 boots in
        # parallel (not under the lock: boot takes it to register the instance)
        try:
            # not under the lock; before the boots, as a new instance may take a gone one's address
            self._power_off(destroyed)
            with ThreadPoolExecutor(max_workers=8) as pool:
                booted = list(pool.map(lambda a: self.boot(*a), new))
        finally:
            with self.lock:
                self._booting.difference_update(iid for iid, _, _ in new)
        return booted, destroyed

    def follow(self, interval: float = 0.2, changes: Callable[[int, float], int] | None = None) -> None:
        """Run :meth:`sync` in the background until :meth:`stop`: every ``interval`` s, or, given
        ``changes`` (:meth:`ringfence.local.aws.EmbeddedAws.changes_after`), when moto's change
        count moves (at most every ``interval`` s, and once a second without news): describing
        every instance on a timer was much of what moto did during a scale-out."""

        def loop() -> None:
            seen = -1
            while not self._stop.is_set():
                try:
                    seq = changes(seen, 1.0) if changes is not None else seen
                    if self._stop.is_set():
                        return
                    self.sync()
                    seen = seq
                except Exception as exc:  # moto busy or a boot failed: say so and keep going
                    self.log(f"fleet: {type(exc).__name__}: {exc}")
                self._stop.wait(interval)

        self._thread = threading.Thread(target=loop, name="fleet", daemon=True)
        self._thread.start()

    def stop(self, grace: float = 2.0) -> None:
        """Stop following; every agent gets SIGTERM at once and ``grace`` seconds in all (an agent
        in a long-poll stops when it returns); the lab's close kills what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self.lock:
            agents = [i.agent for i in self.instances.values() if i.agent is not None and i.agent.poll() is None]
        for p in agents:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in agents:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.01, deadline - time.monotonic()))

    # --- one instance --------------------------------------------------------------------------

    def boot(self, iid: str, ip: str, name: str) -> Instance:
        host = iid
        d = self.cfg.workdir / "instances" / iid
        if d.exists():
            shutil.rmtree(d)
        (d / "state").mkdir(parents=True)
        inst = Instance(iid, ip, name, host, time.time(), dir=d)
        if self.lab is not None:
            ns = self.lab.add(host, [f"{ip}/{LAB_PREFIX_LEN}"], routes=self.cfg.extra_routes)
            if self.traffic is not None:
                self.traffic.serve(ns, TCP_PORTS, UDP_PORTS)
        cfg = {
            "workload_id": iid,
            "public_key": str(self.cfg.public_key),
            "state_dir": str(inst.state_dir),
            "backend": self.cfg.backend,
            "api_url": self.cfg.api_url,
            # a lab control plane without TLS on a lab address (the demo's has TLS): said at start
            "insecure_http_lab_only": self.cfg.api_url.startswith("http://"),
            **({"tls_ca_file": str(self.cfg.tls_ca_file)} if self.cfg.tls_ca_file else {}),
            "enroll": {"method": "aws-iid", "imds_url": self._imds_url(iid), "iid_signature": "signature"},
            "heartbeat_interval": self.cfg.heartbeat_interval,
            "wait_timeout": self.cfg.wait_timeout,
            "backoff_max": 2.0,  # the lab's control plane is a few ms away: retry fast
            "request_timeout": 10.0,
            # the demo's map is drawn from what the agents report: often enough to be in it, rarely
            # enough to keep the CPU for the steps
            "observe_interval": 10.0,
            "report_interval": 15.0,
            "dhcp": False,
        }
        (d / "agent.json").write_text(json.dumps(cfg, indent=1))
        args = ["run", "--config", str(d / "agent.json")]
        if self.cfg.fork_agents:
            netns = self.lab.ns(host) if self.lab is not None else None  # None: dry-run agents, in ours
            inst.agent = self._agent_forks().spawn(args, netns, d / "agent.log")
        else:
            logf = (d / "agent.log").open("w")
            if self.lab is not None:
                inst.agent = self.lab.spawn(host, str(AGENT), *args, stdout=logf, stderr=subprocess.STDOUT)
            else:
                inst.agent = self.start_process(str(AGENT), *args, stdout=logf, stderr=subprocess.STDOUT)
            logf.close()
        with self.lock:
            self.instances[iid] = inst
            self.by_ip[ip] = iid
        for hook in self.on_boot:
            hook(inst)
        return inst

    def _agent_forks(self) -> AgentForks:
        with self.lock:
            if self._forks is None:
                self._forks = AgentForks(self.lab.start if self.lab is not None else self.start_process)
            return self._forks

    def _imds_url(self, iid: str) -> str:
        # without namespaces every agent calls from 127.0.0.1: the stand-in tells them apart by path
        return self.cfg.imds_url if self.lab is not None else f"{self.cfg.imds_url}/instance/{iid}"

    def _forget(self, iid: str) -> Instance:
        inst = self.instances.pop(iid)
        self.by_ip.pop(inst.ip, None)
        self.gone[iid] = inst
        return inst

    def _power_off(self, gone: list[Instance], grace: float = 1.0) -> None:
        """Terminated instances: their agents get SIGTERM, ``grace`` seconds in all, then SIGKILL
        (a terminated VM does not wait for its processes; one by one, each waiting out an agent's
        long-poll with the fleet's lock held, kept a scale-out that followed a scale-in from
        booting any agent), then the namespaces go."""
        agents = [i.agent for i in gone if i.agent is not None and i.agent.poll() is None]
        for p in agents:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in agents:
            try:
                p.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self.lab is not None:
            for inst in gone:
                if self.traffic is not None:
                    with contextlib.suppress(Exception):
                        self.traffic.unserve(self.lab.ns(inst.host))
                self.lab.remove(inst.host)

    # --- looking up ----------------------------------------------------------------------------

    def ns(self, iid: str) -> str:
        assert self.lab is not None
        return self.lab.ns(self.instances[iid].host)

    def get(self, iid: str) -> Instance:
        return self.instances[iid]

    def identity_address(self, address: str) -> str | None:
        """The instance id holding ``address`` (for the IMDS stand-in)."""
        return self.by_ip.get(address)


def _popen(*cmd: str, **kw: Any) -> subprocess.Popen[Any]:
    return subprocess.Popen(list(cmd), start_new_session=True, **kw)
