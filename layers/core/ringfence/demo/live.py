"""``ringfence demo``: the whole loop, live, on one machine.

What runs (all real, nothing stubbed):

- a network-namespace lab (:mod:`ringfence.local.lab`); the **control plane lives in its own
  namespace** on the lab bridge (10.254.0.1, plus 169.254.169.254 for instance metadata). This
  process enters it before starting anything, so moto on 127.0.0.1, the event router, the IMDS
  stand-in and ``ringfence serve`` all run there, reachable from every instance namespace, and
  the host's own network namespace gets no address, route or interface (a lab address range can
  never collide with the host's networks, and nothing is left in it if the run is killed);
- an embedded AWS (moto server) holding the sample estate of ``examples/ordering``
  (:mod:`ringfence.local.estate`), its events routed through EventBridge rules and SQS to the real
  handlers in ``functions/`` (:class:`ringfence.local.router.EventRouter`);
- ``ringfence serve --store aws`` (a subprocess) serving the agent and admin APIs from the same
  route code as the Lambda functions;
- one namespace per instance with its moto private address, echo servers on the example's
  service ports and a real ``ringfence-agent`` (nftables) enrolled by its signed identity
  document, following by long-poll push and set deltas (:mod:`ringfence.local.fleet`).
- a local Azure Resource Manager and the local Google APIs, which ``serve``'s ``POST /azure/events``
  and ``POST /gcp/events`` read VMs from: step 6 (:mod:`ringfence.demo.crosscloud`) announces an
  Azure VM and a GCP VM through those routes and proves the same labels and policy on them.

Each step is proved by real packets between namespaces and timed; ``out/summary.json`` holds
every check and the time-to-policy figures. Every exit (Ctrl-C and SIGTERM included) kills what
the run started and deletes its namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

from ringfence.demo.offline import example_dir
from ringfence.demo.report import Report, Sample
from ringfence.local.estate import ASG_NAME, TAGGER_ROLE, Estate, build_estate, example_workloads, policy_files
from ringfence.local.fleet import Fleet, FleetConfig, Instance
from ringfence.local.imds import IMDS_ADDRESS, Imds
from ringfence.local.lab import Lab, enter_netns, prerequisites, sweep_stale
from ringfence.local.router import LAUNCH_OK
from ringfence.local.tls import LabTls, lab_tls
from ringfence.local.traffic import Probe, Traffic

if TYPE_CHECKING:
    from ringfence.demo.crosscloud import OtherClouds

CP_ADDRESS = "10.254.0.1"  # the control plane's namespace on the lab bridge
OPS, OPS_ADDRESS = "ops", "10.99.0.200"  # an operator's console in the admin range (no agent)
SERVE_PORT = 8443
ADMIN_PRINCIPAL = "demo-operator"
ALL_ADMIN_ROLES = ["policy-author", "incident-responder", "onboarding"]  # the demo does all three
# serve reads the engine head this often while agents wait, and wakes them when it moved
# (RINGFENCE_WAIT_POLL_INTERVAL; AWS default 1 s): one read per interval for all waiting agents
WAIT_POLL_INTERVAL = "0.1"
ENFORCE_TIMEOUT = 60.0
# how often measure() asks whether the control plane has seen a change, and idle() whether the
# queues are empty: each ask is AWS calls on the moto that the timed pipeline is waiting on
READY_POLL = 0.2
IDLE_POLL = 0.25
GIL_SWITCH_INTERVAL = 0.0005  # s; the default 5 ms makes every in-process moto call wait (see _start_router)
# a launch goes InService once the new instance's agent enforces (its first heartbeat), not once
# its bundle is published (the AWS default, "publish")
GATE = {"RINGFENCE_LIFECYCLE_GATE": "agent"}


class Interrupted(BaseException):
    """SIGTERM: unwound like Ctrl-C, so that every cleanup runs."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


# --- the control plane's parts -------------------------------------------------------------------


@dataclass
class Flow:
    src: str  # example name (or instance id)
    dst: str
    service: str  # "tcp/8080"
    expect: bool
    why: str = ""


class Live:
    def __init__(
        self,
        example: Path,
        out: Path,
        report: Report,
        dry_run: bool = False,
        agent_start: str = "fork",
        instances: list[str] | None = None,
    ) -> None:
        self.instances = instances  # the example's instances to create (None: all of them)
        self.dry_run = dry_run  # no namespaces, no firewall: agents in this namespace, checks on bundles
        self.agent_start = agent_start  # agents: "fork" (ringfence.local.agentfork) or "exec"
        self.cp_host = "127.0.0.1" if dry_run else CP_ADDRESS
        self.serve_port = _free_port() if dry_run else SERVE_PORT
        # serve speaks HTTPS with a certificate of the lab's own CA, which agents and the demo verify
        self.api_base = f"https://{self.cp_host}:{self.serve_port}"
        self.tls: LabTls | None = None
        self.tls_context: ssl.SSLContext | None = None
        self.procs: list[subprocess.Popen[Any]] = []  # started outside a lab (dry run)
        self.example = example
        self.out = out
        self.work = out / "demo-live"
        self.r = report
        self.lab: Lab | None = None
        self.aws: Any = None
        self.router: Any = None
        self.wiring: Any = None  # the agent API's, in this process (closed with the run: its change watch)
        self.serve: subprocess.Popen[Any] | None = None
        self.imds: Imds | None = None
        self.traffic: Traffic | None = None
        self.fleet: Fleet | None = None
        self.est = Estate()
        self.api: Any = None  # AgentApi over the same store: what each agent should be at
        self.store: Any = None
        self.admin_token = ""
        self.names: dict[str, str] = {}  # instance id → example name (or asg-N)
        self._asg_seq = 0
        # hosts without an agent (their own namespace, or none in a dry run): name → address
        self.agentless: dict[str, str] = {}
        self.clouds: OtherClouds | None = None  # the local Azure Resource Manager and Google APIs

    # --- start and stop -------------------------------------------------------------------------

    def start(self) -> None:
        r = self.r
        removed = sweep_stale()
        if removed:
            r.say(f"removed {len(removed)} namespaces left by a killed run")
        if self.work.exists():
            import shutil

            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        if not self.dry_run:
            self.lab = Lab()
            self.lab.add("cp", [f"{CP_ADDRESS}/8", f"{IMDS_ADDRESS}/32"], conntrack_acct=False)
            enter_netns(self.lab.ns("cp"))  # before any thread starts: the whole process moves
            r.say(f"lab: bridge {self.lab.switch}, control plane namespace {self.lab.ns('cp')} at {CP_ADDRESS}")

        from ringfence.local.aws import EmbeddedAws

        self.aws = EmbeddedAws()
        self.aws.start()
        r.say(
            f"embedded AWS: moto server at {self.aws.url}"
            + ("" if self.dry_run else " (inside the control-plane namespace)")
        )
        from ringfence.demo.crosscloud import OtherClouds

        # before serve: it routes POST /azure/events and /gcp/events to them (step 6)
        self.clouds = OtherClouds.start()
        r.say(f"other clouds: {self.clouds.describe()}")
        # serve starts (a Python process importing boto3 and the routes: seconds) while the estate
        # is built; it is waited for before the router needs it
        self._launch_serve()
        workloads = example_workloads(self.example, self.instances)
        # tagged by the example policy's allowed tagger (labels.taggers), as the guard rail requires
        tagger = self.aws.client_as("ec2", TAGGER_ROLE)
        self.est = build_estate(tagger, self.aws.client("autoscaling"), workloads, self.aws.region)
        self.names = {iid: name for name, iid in self.est.instances.items()}
        r.say(
            f"estate: {len(self.est.vpcs)} VPCs, {len(self.est.subnets)} subnets, {len(self.est.instances)} instances, "
            f"Auto Scaling group {ASG_NAME} (launch lifecycle hook); label tags (ringfence:*) set by role {TAGGER_ROLE}"
            + ("" if self.instances is None else "; --instances used: the example's instances the steps use")
        )
        pub = self.work / "bundle-signing.pub.pem"
        pub.write_bytes(self.aws.signing_key.public_pem())

        from ringfence.clouds.aws.wiring import Wiring
        from ringfence.control.agents import AgentApi
        from ringfence.control.wiring import Config

        wiring = self.wiring = Wiring(Config.from_env())
        self.api = AgentApi(wiring)
        self.store = wiring.store

        self._await_serve()
        self._start_router()
        if not self.idle(60):
            raise RuntimeError("the estate's events were not ingested within 60 s")
        self.provision()

        api_url = self.api_base
        assert self.tls is not None
        if self.lab is not None:
            self.imds = Imds(self._identify, self.aws.identity_document, self.aws.iid.sign).start()
            self.traffic = Traffic(self.lab.start)
            cfg = FleetConfig(
                api_url=api_url,
                public_key=pub,
                workdir=self.work,
                tls_ca_file=self.tls.ca,
                fork_agents=self.agent_start == "fork",
            )
        else:
            port = _free_port()
            self.imds = Imds(self._identify, self.aws.identity_document, self.aws.iid.sign, "127.0.0.1", port).start()
            cfg = FleetConfig(
                api_url=api_url,
                public_key=pub,
                workdir=self.work,
                backend="dry-run",
                imds_url=f"http://127.0.0.1:{port}",
                tls_ca_file=self.tls.ca,
                fork_agents=self.agent_start == "fork",
            )
        # the operators' console on the bastion range (the policy's admin_cidrs), no agent: a
        # quarantined host must still answer it over SSH
        self.add_host(OPS, OPS_ADDRESS)
        self.fleet = Fleet(cfg, self.aws.instances, self.lab, self.traffic, log=r.say, start_process=self._start)
        t0 = time.time()
        booted, _ = self.fleet.sync()
        where = "in their own namespaces" if self.lab is not None else "in this namespace (dry-run)"
        r.say(f"booted {len(booted)} instances with one agent each {where} in {time.time() - t0:.1f}s")
        self.fleet.follow(interval=0.05, changes=self.aws.changes_after)
        self.wait_all_enforcing(60)

    def _start(self, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        """A process this run kills on close: through the lab, or tracked here (dry run)."""
        if self.lab is not None:
            return self.lab.start(*cmd, **kw)
        env = kw.pop("env", None)
        p = subprocess.Popen(list(cmd), start_new_session=True, env=env, **kw)
        self.procs.append(p)
        return p

    def _identify(self, address: str) -> str | None:
        return self.fleet.identity_address(address) if self.fleet else None

    def serve_env(self) -> dict[str, str]:
        """The environment ``ringfence serve`` (the agent API) starts with: the stack's, as the
        agent-API function has it — no signing key (only the in-process compute holds it)."""
        env = {**os.environ, **self.aws.env, "RINGFENCE_WAIT_POLL_INTERVAL": WAIT_POLL_INTERVAL, **GATE}
        if self.clouds is not None:
            env.update(self.clouds.env())
        env.pop("RINGFENCE_SIGNING_KEY", None)  # set by hand in the shell that started the demo, say
        return env

    def _launch_serve(self) -> None:
        from ringfence import serve

        token, line = serve.new_admin_token(ADMIN_PRINCIPAL, ALL_ADMIN_ROLES)
        tokens = self.work / "admin-tokens"
        tokens.write_text(line + "\n")
        tokens.chmod(0o600)
        self.admin_token = token
        env = self.serve_env()
        self.tls = lab_tls(self.work / "tls", self.cp_host)
        self.tls_context = ssl.create_default_context(cafile=str(self.tls.ca))
        cmd = [
            str(Path(sys.executable).parent / "ringfence"),
            "serve",
            "--store",
            "aws",
            "--host",
            self.cp_host,
            "--port",
            str(self.serve_port),
            "--admin-tokens",
            str(tokens),
            "--tls-cert",
            str(self.tls.cert),
            "--tls-key",
            str(self.tls.key),
        ]
        log = (self.work / "serve.log").open("w")
        self.serve = self._start(*cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _await_serve(self) -> None:
        """Until the ``serve`` :meth:`_launch_serve` started answers (60 s at most)."""
        assert self.serve is not None
        deadline = time.monotonic() + 60
        url = self.api_base
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.serve.poll() is not None:
                raise RuntimeError(f"ringfence serve exited ({self.serve.returncode}): see {self.work / 'serve.log'}")
            try:
                urllib.request.urlopen(f"{url}/v1/nonce", timeout=2, context=self.tls_context).read()  # noqa: S310
            except OSError as exc:
                last = exc
                time.sleep(0.2)
                continue
            self.r.say(
                f"ringfence serve --store aws: agent and admin APIs at {url} (HTTPS, a certificate of the "
                "lab's own CA, which every agent verifies: tls_ca_file)"
            )
            return
        raise RuntimeError(f"ringfence serve did not answer within 60 s: {last}")

    def _start_router(self) -> None:
        import warnings

        from ringfence.local.router import EventRouter  # imports the handlers' dependencies

        # the handlers' logs and metrics are JSON lines for CloudWatch: keep them off the display
        os.environ.update({"POWERTOOLS_LOG_LEVEL": "ERROR", "POWERTOOLS_METRICS_DISABLED": "true", **GATE})
        warnings.filterwarnings("ignore", message="No application metrics to publish")

        # moto answers from threads of this process, the handlers run in others: with handlers
        # busy, each moto call waits for the GIL at every I/O step, up to the switch interval
        # each time (a 4 ms GetItem took ~150 ms next to two busy threads at the default 5 ms,
        # ~50 ms at 0.5 ms; docs/benchmarks.md "Time to policy")
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        # the estate exists already: announced like a first reconcile would find it
        self.router = EventRouter(self.aws, announce_existing=True)
        self.router.start()
        self.r.say("event router: moto changes → EventBridge rules → SQS → functions/{ingest,lifecycle,compute,...}")

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        return self.request(
            method,
            path,
            json.dumps(body).encode() if body is not None else None,
            {"Authorization": f"Bearer {self.admin_token}", "Content-Type": "application/json"},
        )

    def request(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, Any]:
        """One HTTPS call to ``ringfence serve`` (the lab's CA verified): status, JSON answer."""
        req = urllib.request.Request(  # noqa: S310 - the lab's own https URL
            f"{self.api_base}{path}", method=method, data=data, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.tls_context) as resp:  # noqa: S310
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode()
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def provision(self) -> None:
        files = policy_files(self.example, self.est)
        status, body = self.admin("POST", "/admin/policies", {"files": files, "reason": "demo: initial policy"})
        if status != 201:
            raise RuntimeError(f"provisioning the example policy failed: HTTP {status} {body}")
        self.r.say(f"policy version {body.get('version')} provisioned through the admin API ({len(files)} files)")

    def close(self) -> None:
        """Everything this run started, in reverse; never raises. What talks to moto stops first,
        side by side (each mostly waits: agents their grace, serve its long-polls' graceful end,
        the router its pollers' long polls), then moto and the other clouds, then the lab."""
        talking: list[Callable[[], None]] = []
        if self.fleet is not None:
            talking.append(self.fleet.stop)
        if self.router is not None or self.wiring is not None:
            talking.append(self._stop_router)
        if self.imds is not None:
            talking.append(self.imds.stop)
        if self.serve is not None:
            talking.append(self._stop_serve)  # before moto: its head watch would read a stopped server
        served: list[Callable[[], None]] = []
        if self.aws is not None:
            served.append(self.aws.stop)
        if self.clouds is not None:
            served.append(self.clouds.stop)
        _at_once(talking)
        _at_once(served)
        if self.lab is not None:
            with contextlib.suppress(BaseException):
                self.lab.close()  # kills serve, the probe processes, whatever is left inside
        with contextlib.suppress(BaseException):
            self._kill_own()

    def _stop_router(self) -> None:
        try:
            if self.router is not None:
                self.router.stop()
        finally:
            if self.wiring is not None:
                self.wiring.close()

    def _stop_serve(self) -> None:
        assert self.serve is not None
        if self.serve.poll() is None:
            self.serve.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.serve.wait(timeout=5)

    def _kill_own(self) -> None:
        # dry-run agents forked by the template: each in a session of its own, not among procs
        agents = [] if self.fleet is None else [*self.fleet.instances.values(), *self.fleet.gone.values()]
        for inst in agents:
            if inst.agent is not None and inst.agent not in self.procs and inst.agent.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(inst.agent.pid, signal.SIGKILL)
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)

    # --- names and probes -----------------------------------------------------------------------

    def iid(self, name: str) -> str:
        if name in self.est.instances:
            return self.est.instances[name]
        return next((i for i, n in self.names.items() if n == name), name)

    def name(self, iid: str) -> str:
        return self.names.get(iid, iid)

    def ip(self, name: str) -> str:
        if name in self.agentless:
            return self.agentless[name]
        assert self.fleet is not None
        return self.fleet.get(self.iid(name)).ip

    def add_host(self, name: str, address: str) -> None:
        """A host without an agent at ``address``: its own namespace on the lab bridge (none in a
        dry run, where flows from it are judged on the other end's plan)."""
        if self.lab is not None:
            self.lab.add(name, [f"{address}/8"])
        self.agentless[name] = address

    def probe_flows(self, flows: list[Flow]) -> list[bool]:
        if self.lab is None:
            return [self.judge(f) for f in flows]
        assert self.fleet is not None and self.traffic is not None
        probes = []
        for f in flows:
            proto, _, port = f.service.partition("/")
            src = self.lab.ns(f.src) if f.src in self.agentless else self.fleet.ns(self.iid(f.src))
            probes.append(Probe(src, self.ip(f.dst), int(port), proto))
        return self.traffic.probes(probes)

    def plan(self, name: str) -> Any:
        """The plan the agent of ``name`` enforces: its applied bundle with its deltas, its local
        fail-safes (what a dry-run agent would program)."""
        from ringfence_agent.config import load_config
        from ringfence_agent.core import effective_bundle
        from ringfence_agent.plan import compile_plan
        from ringfence_agent.state import StateDir

        assert self.fleet is not None
        inst = self.fleet.get(self.iid(name))
        state = StateDir(inst.state_dir)
        bundle = state.load_bundle()
        if bundle is None:
            return None
        cfg = load_config(inst.dir / "agent.json")
        return compile_plan(effective_bundle(bundle, state.load_deltas(bundle)), cfg.local_failsafes())

    def judge(self, f: Flow) -> bool:
        """Dry run: the flow's first packet judged by both ends' plans (ringfence_agent.plan.Admitter,
        in the order every backend renders them)."""
        from ringfence_agent.plan import Admitter
        from ringfence_agent.plan import Flow as Packet

        proto, _, port = f.service.partition("/")
        ends: list[tuple[str, Literal["inbound", "outbound"], str]] = []
        if f.dst not in self.agentless:
            ends.append((f.dst, "inbound", self.ip(f.src)))
        if f.src not in self.agentless:  # the operators' console, the other clouds' VMs: no agent
            ends.append((f.src, "outbound", self.ip(f.dst)))
        for name, direction, peer in ends:
            plan = self.plan(name)
            if plan is None:
                continue  # no bundle yet: the agent has programmed nothing
            if plan.mode != "enforce":
                continue
            if not Admitter(plan).admits(Packet(direction, peer, proto, 40000, int(port))).admitted:
                return False
        return True

    def set_addresses(self, name: str) -> list[tuple[int, int]]:
        """The addresses in the sets the agent of ``name`` enforces: read from nftables in its
        namespace (the kernel's truth); in a dry run, from its applied bundle and deltas."""
        assert self.fleet is not None
        if self.lab is not None:
            return nft_addresses(self.fleet.ns(self.iid(name)))
        import ipaddress

        from ringfence_agent.core import effective_bundle
        from ringfence_agent.state import StateDir

        state = StateDir(self.fleet.get(self.iid(name)).state_dir)
        bundle = state.load_bundle()
        if bundle is None:
            return []
        spans = []
        for sdoc in effective_bundle(bundle, state.load_deltas(bundle)).sets.values():
            for c in sdoc.v4:
                n = ipaddress.ip_network(c, strict=False)
                spans.append((int(n.network_address), int(n.broadcast_address)))
        return spans

    def expect_flows(self, flows: list[Flow], settle: float = 0.0) -> bool:
        """Probe every flow (in parallel) and check each against its expectation. ``settle``:
        retry failing ones up to that many seconds (a change still propagating)."""
        got = self.probe_flows(flows)
        deadline = time.monotonic() + settle
        while settle and any(g != f.expect for g, f in zip(got, flows, strict=True)) and time.monotonic() < deadline:
            time.sleep(0.2)
            got = self.probe_flows(flows)
        ok = True
        for f, g in zip(flows, got, strict=True):
            why = f" ({f.why})" if f.why else ""
            ok &= self.r.check(f"{f.src} → {f.dst} {f.service}{why}", f.expect, g, flow=True)
        return ok

    # --- enforcement: the control plane's targets against the agents' applied revisions ----------

    def targets(self, ids: list[str] | None = None) -> dict[str, int | None]:
        """Each agent's latest version as the agent API computes it (AgentApi.latest_version: the
        stored bundle moved on by set heads), read with one set-heads call for all."""
        assert self.fleet is not None
        ids = list(self.fleet.instances) if ids is None else ids
        found = self.store.bundle_pointers(ids) if ids else {}
        ptrs = {i: found.get(i) for i in ids}
        names = sorted({n for p in ptrs.values() if p is not None for n in p.sets})
        heads = self.store.set_heads(names) if names else {}
        out: dict[str, int | None] = {}
        for i, p in ptrs.items():
            if p is None:
                out[i] = None
                continue
            sets = [max(v, heads.get(n, v)) for n, v in p.sets.items()]
            out[i] = max([p.version, p.rules_revision, *sets])
        return out

    def notified_since(self, revision: int) -> set[str] | None:
        """The workloads compute's publications after ``revision`` named (None: everyone)."""
        out: set[str] = set()
        for rec in self.store.moved_after(revision):
            if rec.workloads is None:
                return None
            out.update(rec.workloads)
        return out

    def idle(self, timeout: float = 10.0, settle: float = 0.3) -> bool:
        """Nothing left to route or run: the work queues empty and no handler invoked for
        ``settle`` seconds (longer than the router's watch interval, so its last look is in)."""
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        # the handlers invoked so far: the first look's count, not one that always differs (a
        # quiet pipeline was a poll later to be seen quiet, a quarter second at every wait)
        seen = len(self.router.deliveries)
        sqs = self.aws.client("sqs")

        def queued(key: str) -> int:
            a = sqs.get_queue_attributes(
                QueueUrl=self.aws.queues[key],
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )["Attributes"]
            return int(a["ApproximateNumberOfMessages"]) + int(a["ApproximateNumberOfMessagesNotVisible"])

        while time.monotonic() < deadline:
            n = len(self.router.deliveries)
            busy = n != seen or any(queued(q) for q in ("lifecycle", "ingest", "perimeter", "compute"))
            seen = n
            now = time.monotonic()
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= settle:
                return True
            time.sleep(IDLE_POLL)
        return False

    def wait_all_enforcing(self, timeout: float) -> None:
        """Every running agent applied what the control plane holds for it."""
        assert self.fleet is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle(max(0.1, deadline - time.monotonic())):
                tg = self.targets()
                lagging = [i for i, v in tg.items() if v is None or _applied(self.fleet.get(i)) < v]
                if not lagging:
                    self.r.say(f"all {len(tg)} agents enforce their latest bundle")
                    return
            time.sleep(0.3)
        tg = self.targets()
        lagging = [
            f"{self.name(i)} (applied {_applied(self.fleet.get(i))}, latest {v})"
            for i, v in tg.items()
            if v is None or _applied(self.fleet.get(i)) < v
        ]
        raise RuntimeError(f"agents not enforcing after {timeout:.0f}s: {', '.join(lagging)}")

    def measure(
        self,
        kind: str,
        subject: str,
        action: Callable[[], object],
        ready: Callable[[], bool],
        subjects: tuple[str, ...] = (),
        admin: bool = False,
        timeout: float = ENFORCE_TIMEOUT,
        answered_phase: str | None = None,
    ) -> Sample:
        """Time one cloud change: ``action`` at t0; ``ready()`` says the control plane has seen it
        (in its store); once the queues are idle, every agent whose latest version moved must
        apply it; the sample is t0 → the last of those applies (the agents' own clock stamps).
        ``admin``: the action is an admin API call, its answer ends phase ``admin_api``;
        ``answered_phase``: likewise, another phase (an event route that answers once it ingested)."""
        if admin:
            answered_phase = "admin_api"
        assert self.fleet is not None
        m0 = time.perf_counter()
        base, base_revision = self.targets(), self.store.head().revision
        cost = {"targets_before": time.perf_counter() - m0}
        before = set(self.fleet.instances)
        calls0 = self.aws.calls()
        t0 = time.time()
        action()
        answered = time.time() if answered_phase else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ready():
            time.sleep(READY_POLL)
        cost["ready"] = time.time() - t0
        self.idle(max(0.1, deadline - time.monotonic()))
        cost["idle"] = time.time() - t0
        m0 = time.perf_counter()
        tg = self.targets()
        cost["targets_after"] = time.perf_counter() - m0
        # affected: the agents compute notified (its moved records), as their policy changed
        # — not every agent whose version moved: one holding a deny set no allow of its overlaps
        # is not nudged; its copy lags behind and decides the same (docs/bundle.md)
        notified = self.notified_since(base_revision)
        affected = [
            i for i, v in tg.items() if v is not None and v != base.get(i) and (notified is None or i in notified)
        ]
        while time.monotonic() < deadline:
            if all(_applied(self.fleet.get(i)) >= (tg[i] or 0) for i in affected if i in self.fleet.instances):
                break
            time.sleep(0.05)
        else:
            s = Sample(kind, subject, None, len(affected), t0=t0)
            s.moto_calls = _busiest(calls0, self.aws.calls())
            self.r.sample(s)
            return s
        done = [self.fleet.get(i).status() for i in affected if i in self.fleet.instances]
        subject_ids = list(subjects) + [i for i in self.fleet.instances if i not in before]
        enforced = max((float(st.get("applied_at", t0)) for st in done), default=t0)
        phases = self._phases(t0, subject_ids, done, answered, enforced, answered_phase or "admin_api")
        cost["enforced_seen"] = time.time() - t0
        s = Sample(kind, subject, round(enforced - t0, 3), len(affected), phases, t0)
        s.measuring = {k: round(v, 3) for k, v in cost.items()}
        s.moto_calls = _busiest(calls0, self.aws.calls())
        self.r.sample(s)
        return s

    def _phases(
        self,
        t0: float,
        subjects: list[str],
        done: list[dict[str, Any]],
        answered: float | None,
        enforced: float,
        answered_phase: str = "admin_api",
    ) -> dict[str, float]:
        """Where the time went. Cloud events: the router's timeline of the first event about a
        subject after t0 (event_delivery: change → PutEvents returned, the watcher's look
        included; ingest: → the ingest/lifecycle handler finished; perimeter, for a launch: → the
        perimeter handler finished; compute: → the compute handler finished, publication
        included). An admin call (``answered``): the API call (``answered_phase``: another cloud's
        event route, which ingests before it answers), then compute and publication together. Then the last agent's ``last_sync``: push (→ its wait
        answered), fetch, apply."""
        phases: dict[str, float] = {}
        # the events that led to enforcement (not those that followed it, e.g. InService)
        entries = [
            e
            for i in subjects
            for e in self.router.timeline.for_instance(i)
            if t0 - 0.05 <= e.changed <= enforced and e.put
        ]
        cloud_done: float | None = None
        if entries:
            first = min(entries, key=lambda e: e.changed)
            phases["event_delivery"] = first.put - t0
            if first.ingested:
                phases["ingest"] = first.ingested - first.put
                computed = [e.computed for e in entries if e.computed and e.computed <= enforced]
                # a launch passes the perimeter handler between ingest and compute
                fenced = [e.perimeter for e in entries if e.perimeter and e.perimeter <= enforced]
                start = first.ingested
                if fenced:
                    phases["perimeter"] = max(0.0, max(fenced) - first.ingested)
                    start = max(fenced)
                if computed:
                    cloud_done = max(computed)
                    phases["compute"] = max(0.0, cloud_done - start)
        elif answered is not None:
            phases[answered_phase] = answered - t0
            cloud_done = answered
        syncs = [st.get("last_sync") or {} for st in done]
        syncs = [s for s in syncs if "done" in s]
        if syncs:
            last = max(syncs, key=lambda s: float(s["done"]))
            if cloud_done is not None:
                phases["push"] = max(0.0, float(last["woke"]) - cloud_done)
            phases["fetch"] = float(last["fetch_s"])
            phases["apply"] = float(last["apply_s"])
        return {k: round(v, 4) for k, v in phases.items()}

    # --- the launch gate: perimeter and agent before InService ------------------------------------

    def perimeter_groups(self, iid: str) -> dict[str, list[str]]:
        """Each ENI of the instance → the Ringfence perimeter groups (``rf-…``) it carries now."""
        got = self.aws.client("ec2").describe_instances(InstanceIds=[iid])["Reservations"]
        inst = got[0]["Instances"][0] if got else {}
        return {
            n["NetworkInterfaceId"]: sorted(
                g["GroupName"] for g in n.get("Groups", []) if g["GroupName"].startswith("rf-")
            )
            for n in inst.get("NetworkInterfaces", [])
        }

    def gate_at_in_service(self, iid: str, seen: dict[str, Any] | None, t0: float) -> dict[str, Any]:
        """Checks and figures of one launch: at the moment it went InService its agent enforced and
        every ENI carried perimeter groups; the hold compute released (when the groups were
        attached, the agent reported, the action was completed)."""
        name = self.name(iid)
        seen = seen or {}
        agent, enis = seen.get("agent") or {}, seen.get("enis") or {}
        enforcing = isinstance(agent.get("applied_version"), int)
        fenced = bool(enis) and all(enis.values())
        self.r.check(f"{name} at InService: its agent enforces", True, enforcing)
        self.r.check(f"{name} at InService: every ENI carries its rf- perimeter groups", True, fenced)
        hold = self.store.launch_hold(iid)
        out: dict[str, Any] = {
            "perimeter_groups": enis,
            "agent_enforcing_at_in_service": enforcing,
            "perimeter_at_in_service": fenced,
        }
        if hold is not None:

            def after(t: float | None) -> float | None:
                return round(t - t0, 3) if t is not None else None

            out |= {
                "perimeter_attached_at": hold.perimeter_at,
                "perimeter_s_after_scale_out": after(hold.perimeter_at),
                "agent_reported_at": hold.enforced_at,
                "agent_reported_version": hold.enforced_version,
                "released_at": hold.released_at,
                "released_s_after_scale_out": after(hold.released_at),
                "release": hold.outcome,
            }
            both = (
                hold.outcome == "continue"
                and hold.released_at is not None
                and max(hold.perimeter_at or 1e18, hold.enforced_at or 1e18) <= hold.released_at
            )
            self.r.check(f"{name} released (CONTINUE) only after perimeter and agent", True, both)
            groups = sorted({g for gs in enis.values() for g in gs})
            self.r.say(
                f"  {name}: perimeter {', '.join(groups) or 'none'} on {len(enis)} ENI(s) "
                f"{out['perimeter_s_after_scale_out']}s, agent v{hold.enforced_version} "
                f"{after(hold.enforced_at)}s, CONTINUE {out['released_s_after_scale_out']}s after the scale-out"
            )
        else:
            self.r.check(f"{name} released (CONTINUE) only after perimeter and agent", True, False)
        return out

    # --- the Auto Scaling group ------------------------------------------------------------------

    def asg_states(self) -> dict[str, str]:
        """The web group's members → lifecycle state, read from moto's models (what
        ``DescribeAutoScalingGroups`` answers: ``tests/local/test_motoproc.py``). The bench asks
        every 0.2 s while it times a scale-out; parsing the group's XML each time was a sixth of
        this process's CPU, on the cores the pipeline it times runs on."""
        group = self.aws.instances().groups.get(ASG_NAME)
        return dict(group.members) if group is not None else {}

    def scale(self, desired: int) -> None:
        self.aws.client("autoscaling").set_desired_capacity(
            AutoScalingGroupName=ASG_NAME, DesiredCapacity=desired, HonorCooldown=False
        )

    def lb_targets(self) -> list[str]:
        """What the load balancer sends traffic to: the static web servers and the group's
        InService instances."""
        static = [self.iid(n) for n in ("ord-prod-web-1", "ord-prod-web-2")]
        return static + [i for i, st in self.asg_states().items() if st == "InService"]


def _at_once(fns: list[Callable[[], None]]) -> None:
    """Run ``fns`` side by side and wait for all; never raises (a Ctrl-C while waiting does not
    cut the wait short: what is being stopped is stopped)."""

    def quietly(fn: Callable[[], None]) -> None:
        with contextlib.suppress(BaseException):
            fn()

    threads = [threading.Thread(target=quietly, args=(fn,), name="demo-close", daemon=True) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            with contextlib.suppress(BaseException):
                t.join()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _busiest(
    before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]], top: int = 12
) -> dict[str, list[float]]:
    """The calls moto spent most time on between two of its counts (``EmbeddedAws.calls``), and
    under ``ALL_CALLS`` all of them but the long polls (what a change cost the embedded AWS)."""
    moved = {
        k: [n - before.get(k, (0, 0.0))[0], round(t - before.get(k, (0, 0.0))[1], 3)]
        for k, (n, t) in after.items()
        if n > before.get(k, (0, 0.0))[0]
    }
    busy = [v for k, v in moved.items() if k != "sqs.ReceiveMessage"]
    out = dict(sorted(moved.items(), key=lambda kv: -kv[1][1])[:top])
    out[ALL_CALLS] = [sum(int(v[0]) for v in busy), round(sum(v[1] for v in busy), 3)]
    return out


ALL_CALLS = "all but sqs.ReceiveMessage"


def _applied(inst: Instance) -> int:
    v = inst.status().get("applied_version")
    return int(v) if isinstance(v, int) else -1


# --- which steps, on which instances ---------------------------------------------------------------

STEPS = (1, 2, 3, 4, 5, 6)  # after step 0, the start, which always runs
# steps that build on others: 4's flows need 3's fixed tag (ord-prod-web-9 env=prod); 5 releases
# 4's quarantine and scales in what 2 launched
BUILDS_ON: dict[int, tuple[int, ...]] = {4: (3,), 5: (2, 4)}
# the example's instances each step probes or changes: ``--instances used`` creates only these
STEP_INSTANCES: dict[int, tuple[str, ...]] = {
    1: (
        "ord-prod-lb-1",
        "ord-prod-web-1",
        "ord-prod-web-9",
        "ord-prod-proc-1",
        "ord-prod-db-1",
        "ord-dev-web-1",
        "ord-dev-proc-1",
        "pay-prod-db-1",
        "core-dns-1",
        "admin-jump-1",
    ),
    2: ("ord-prod-lb-1", "ord-prod-proc-1", "ord-dev-web-1", "pay-prod-db-1"),
    3: (
        "ord-prod-lb-1",
        "ord-prod-web-2",
        "ord-prod-web-9",
        "ord-prod-proc-1",
        "ord-prod-db-1",
        "ord-dev-web-1",
        "pay-prod-db-1",
    ),
    4: ("ord-prod-lb-1", "ord-prod-web-1", "ord-prod-web-9", "ord-prod-proc-1", "ord-prod-db-1"),
    5: ("ord-prod-lb-1", "ord-prod-web-1", "ord-prod-web-2", "ord-prod-proc-1"),
    6: ("ord-prod-proc-1", "ord-prod-db-1", "ord-dev-db-1", "pay-prod-db-1"),
}


def selected_steps(spec: str | None) -> tuple[int, ...]:
    """``--steps`` (comma-separated numbers of :data:`STEPS`; None: all): those steps and the ones
    they build on (:data:`BUILDS_ON`), in order. ValueError names what is wrong."""
    if spec is None:
        return STEPS
    try:
        asked = {int(x) for x in spec.split(",") if x.strip()}
    except ValueError:
        asked = set()
    if not asked or not asked <= set(STEPS):
        raise ValueError(f"--steps {spec!r}: give step numbers of {', '.join(map(str, STEPS))}, comma-separated")
    todo: set[int] = set()
    more = sorted(asked)
    while more:
        n = more.pop()
        if n not in todo:
            todo.add(n)
            more.extend(BUILDS_ON.get(n, ()))
    return tuple(n for n in STEPS if n in todo)


def used_instances(steps: tuple[int, ...]) -> list[str]:
    """The example's instances ``steps`` probe or change (``--instances used``)."""
    return sorted({name for n in steps for name in STEP_INSTANCES[n]})


# --- the steps -------------------------------------------------------------------------------------


def step_tiers(d: Live) -> None:
    with d.r.step(1, "tier flows allowed; lateral movement and dev → prod blocked"):
        d.expect_flows(
            [
                Flow("ord-prod-lb-1", "ord-prod-web-1", "tcp/8080", True, "lb → web"),
                Flow("ord-prod-web-1", "ord-prod-proc-1", "tcp/8443", True, "web → processing"),
                Flow("ord-prod-proc-1", "ord-prod-db-1", "tcp/5432", True, "processing → database"),
                Flow("ord-prod-web-1", "core-dns-1", "udp/53", True, "core service: DNS"),
                Flow("admin-jump-1", "ord-prod-db-1", "tcp/22", True, "jumpbox SSH"),
                Flow("ord-prod-web-1", "ord-prod-db-1", "tcp/5432", False, "web skips a tier"),
                Flow("ord-prod-web-1", "pay-prod-db-1", "tcp/1433", False, "lateral: web → payroll database"),
                Flow("ord-dev-web-1", "ord-prod-web-1", "tcp/8080", False, "dev → prod"),
                Flow("ord-dev-proc-1", "ord-prod-db-1", "tcp/5432", False, "dev → prod"),
                Flow("ord-prod-lb-1", "ord-prod-web-9", "tcp/8080", False, "env=prdo: not prod, unlabeled"),
            ]
        )


def step_scale_out(d: Live, n: int = 3) -> list[str]:
    new: list[str] = []
    with d.r.step(2, f"scale the web tier out by {n}: enforced before InService, reachable by the LB") as st:
        assert d.fleet is not None
        before = set(d.asg_states())
        seen_inservice: dict[str, float] = {}
        desired = len(before) + n

        def ready() -> bool:
            states = d.asg_states()
            fresh = [i for i in states if i not in before]
            return len(fresh) >= n and len(d.store.bundle_pointers(fresh)) == len(fresh)

        # what was in place at the moment each new instance went InService (the router's watcher
        # saw it and is putting its "Launch Successful" event): its agent's status, its ENIs' groups
        at_in_service: dict[str, dict[str, Any]] = {}

        def on_event(stage: str, e: Any) -> None:
            if stage != "put" or e.detail_type != LAUNCH_OK or not d.fleet:
                return
            for i in e.instance_ids:
                if i not in before and i not in at_in_service:
                    inst = d.fleet.instances.get(i)
                    at_in_service[i] = {"agent": inst.status() if inst else {}, "enis": d.perimeter_groups(i)}

        from ringfence.clouds.aws.perimeter import recorded_changes

        d.router.subscribe(on_event)
        d.r.say(f"SetDesiredCapacity {ASG_NAME} → {desired}")
        with recorded_changes() as perimeter_changes:
            sample = d.measure("launch", f"+{n} web", lambda: d.scale(desired), ready)
        new = [i for i in d.asg_states() if i not in before]
        for i in new:
            d.names.setdefault(i, f"web-asg-{len(d.names)}")
        # the launch is over when every new instance is InService (the hook completed); when it
        # got there: the router's watcher saw it (its "Launch Successful" event)
        deadline = time.monotonic() + ENFORCE_TIMEOUT
        while time.monotonic() < deadline:
            for i in new:
                ok = [e.changed for e in d.router.timeline.for_instance(i) if e.detail_type == LAUNCH_OK]
                if ok:
                    seen_inservice[i] = min(ok)
            if all(i in seen_inservice for i in new) and all(i in at_in_service for i in new):
                break
            time.sleep(0.1)
        fenced = [c for c in perimeter_changes if c.get("workload") in new or set(new) & set(c.get("ids") or [])]
        for c in fenced:
            d.r.say(f"  {c['text']}")
        per: dict[str, Any] = {}
        for i in new:
            inst = d.fleet.instances.get(i)
            status = inst.status() if inst else {}
            first = status.get("applied_at")
            launched = inst.booted_at if inst else None
            in_service = seen_inservice.get(i)
            per[d.name(i)] = {
                "instance": i,
                "ip": inst.ip if inst else None,
                "namespace_booted_at": launched,
                "enforced_at": first,
                "in_service_at": in_service,
                "enforced_s_after_scale_out": round(first - sample.t0, 3) if first else None,
            }
            d.r.say(
                f"  {d.name(i)} {inst.ip if inst else '?'}: enforcing "
                + (f"{per[d.name(i)]['enforced_s_after_scale_out']:.2f}s after the scale-out" if first else "never")
                + (f", InService {in_service - first:+.2f}s after" if first and in_service else ", not InService")
            )
            before_in_service = bool(first and in_service and first <= in_service)
            per[d.name(i)]["enforced_before_in_service"] = before_in_service
            d.r.check(f"{d.name(i)} enforced before InService", True, before_in_service)
            per[d.name(i)].update(d.gate_at_in_service(i, at_in_service.get(i), sample.t0))
        st.timings["instances"] = per
        st.timings["perimeter"] = {
            "changes": [c["text"] for c in fenced],
            "groups": sorted({g for v in per.values() for gs in v["perimeter_groups"].values() for g in gs}),
        }
        if sample.seconds is not None:
            d.r.say(f"  scale-out of {n}: every affected agent ({sample.agents}) enforcing after {sample.seconds:.2f}s")
        flows = [Flow("ord-prod-lb-1", d.name(i), "tcp/8080", True, "LB health check") for i in new]
        flows += [Flow(d.name(i), "ord-prod-proc-1", "tcp/8443", True, "new web → processing") for i in new]
        flows += [Flow("ord-dev-web-1", d.name(i), "tcp/8080", False, "dev → new prod web") for i in new]
        flows += [Flow(d.name(i), "pay-prod-db-1", "tcp/1433", False, "lateral") for i in new[:1]]
        d.expect_flows(flows)
    return new


def step_retag(d: Live, asg_new: list[str]) -> None:
    with d.r.step(
        3,
        "fix the typo'd tag (env=prdo → prod); retag an instance into the wrong app; "
        "a developer's retag into the jumpbox is held",
    ):
        # label tags are changed by the allowed tagger (labels.taggers), as the guard rail requires
        ec2 = d.aws.client_as("ec2", TAGGER_ROLE)
        typo = d.iid("ord-prod-web-9")

        def fixed() -> bool:
            rec = d.store.get(typo)
            return rec is not None and rec.workload.tags.get("ringfence:env") == "prod"

        d.r.say(f"CreateTags ord-prod-web-9 ringfence:env=prod (as {TAGGER_ROLE})")
        s = d.measure(
            "tag_change",
            "ord-prod-web-9 env=prod",
            lambda: ec2.create_tags(Resources=[typo], Tags=[{"Key": "ringfence:env", "Value": "prod"}]),
            fixed,
            (typo,),
        )
        d.r.say(f"  enforced by {s.agents} agents after {s.seconds}s")
        d.expect_flows(
            [
                Flow("ord-prod-lb-1", "ord-prod-web-9", "tcp/8080", True, "now prod web"),
                Flow("ord-prod-web-9", "ord-prod-proc-1", "tcp/8443", True, "now prod web"),
            ]
        )
        victim_name = "ord-prod-web-2"
        victim = d.iid(victim_name)

        def moved() -> bool:
            rec = d.store.get(victim)
            return rec is not None and rec.workload.tags.get("ringfence:app") == "payroll"

        d.r.say(f"CreateTags {victim_name} ringfence:app=payroll (the wrong app)")
        s = d.measure(
            "tag_change",
            f"{victim_name} app=payroll",
            lambda: ec2.create_tags(Resources=[victim], Tags=[{"Key": "ringfence:app", "Value": "payroll"}]),
            moved,
            (victim,),
        )
        d.r.say(f"  enforced by {s.agents} agents after {s.seconds}s")
        d.expect_flows(
            [
                Flow("ord-prod-lb-1", victim_name, "tcp/8080", False, "no longer an ordering web server"),
                Flow(victim_name, "pay-prod-db-1", "tcp/1433", True, "the wrong app's database opens to it"),
            ]
        )
        findings = hygiene_findings(d)
        flagged = [f for f in findings if f["workload"] == victim]
        for f in findings:
            d.r.say(f"  hygiene: {d.name(f['workload'])}: {f['finding']}")
        d.r.check(f"hygiene report flags {victim_name}", True, bool(flagged))
        # put it back for the next steps
        d.measure(
            "tag_change",
            f"{victim_name} app=ordering",
            lambda: ec2.create_tags(Resources=[victim], Tags=[{"Key": "ringfence:app", "Value": "ordering"}]),
            lambda: (rec := d.store.get(victim)) is not None and rec.workload.tags.get("ringfence:app") == "ordering",
            (victim,),
        )
        step_privileged_retag_held(d)


DEVELOPER = "developer"  # an IAM user allowed to tag instances, but not an allowed tagger


def step_privileged_retag_held(d: Live) -> None:
    """A developer re-tags their dev box into the jumpbox (``app=admin, role=jumpbox``, privileged
    values): the control plane holds its previous labels and raises a finding, so the box does not
    join the jumpboxes' SSH rule; re-tagged back, the hold is lifted."""
    dev = d.aws.client_as("ec2", DEVELOPER, user=True)
    box_name = "ord-dev-web-1"
    box = d.iid(box_name)
    jump = {"ringfence:app": "admin", "ringfence:role": "jumpbox", "ringfence:env": "shared"}

    def finding() -> bool:
        return any(a.action == "label.held" and a.target == box for a in d.store.audit_log())

    d.r.say(f"CreateTags {box_name} ringfence:app=admin, ringfence:role=jumpbox, ringfence:env=shared (as {DEVELOPER})")
    dev.create_tags(Resources=[box], Tags=[{"Key": k, "Value": v} for k, v in jump.items()])
    deadline = time.monotonic() + ENFORCE_TIMEOUT
    while time.monotonic() < deadline and not finding():
        time.sleep(0.1)
    d.idle(max(0.1, deadline - time.monotonic()))
    rec = d.store.get(box)
    held = rec is not None and rec.workload.held_labels is not None and rec.labels.get("role") == "web"
    audit = next((a for a in d.store.audit_log() if a.action == "label.held" and a.target == box), None)
    if audit is not None:
        d.r.say(f"  finding: {audit.principal} → {audit.detail.get('requested')}: {audit.reason}")
    d.r.check(f"{box_name} keeps its labels (held)", True, held)
    d.r.check(f"finding raised for {DEVELOPER}'s privileged retag", True, audit is not None)
    d.expect_flows(
        [
            Flow(box_name, "ord-prod-db-1", "tcp/22", False, "held: not a jumpbox"),
            Flow(box_name, "pay-prod-db-1", "tcp/22", False, "held: not a jumpbox"),
        ]
    )
    # re-tagged back, the hold is lifted
    back = {"ringfence:app": "ordering", "ringfence:role": "web", "ringfence:env": "dev"}
    dev.create_tags(Resources=[box], Tags=[{"Key": k, "Value": v} for k, v in back.items()])
    deadline = time.monotonic() + ENFORCE_TIMEOUT
    while time.monotonic() < deadline:
        rec = d.store.get(box)
        if (
            rec is not None
            and rec.workload.tags.get("ringfence:app") == "ordering"
            and rec.workload.held_labels is None
        ):
            break
        time.sleep(0.1)
    d.idle(max(0.1, deadline - time.monotonic()))


def hygiene_findings(d: Live) -> list[dict[str, str]]:
    """The label-hygiene report over the control plane's inventory: tag values that are not
    labels (from ingest), plus workloads whose app label disagrees with the name they were
    given — the example names each server after its app (``ord-`` ordering, ``pay-`` payroll)."""
    out = []
    prefixes = {"ord": "ordering", "pay": "payroll", "core": "core", "admin": "admin"}
    for rec in d.store.all_records():
        for p in rec.problems:
            out.append({"workload": rec.id, "finding": p})
        name = rec.workload.tags.get("Name", "")
        expected = prefixes.get(name.split("-", 1)[0]) if name else None
        app = rec.labels.get("app") or rec.workload.tags.get("ringfence:app")
        if expected and app and app != expected:
            out.append({"workload": rec.id, "finding": f"named {name} (app {expected}) but labelled app={app}"})
    return out


def step_quarantine(d: Live) -> None:
    with d.r.step(4, "quarantine a compromised web server (admin API, audited): sessions cut"):
        assert d.fleet is not None
        victim_name = "ord-prod-web-1"
        victim = d.iid(victim_name)
        inbound = shell = None
        if d.traffic is not None:
            inbound = d.traffic.hold(d.fleet.ns(d.iid("ord-prod-lb-1")), d.ip(victim_name), 8080)
            shell = d.traffic.hold(d.fleet.ns(victim), d.ip("ord-prod-proc-1"), 8443)
            d.r.check("open session lb → web-1 before", True, bool(inbound and d.traffic.ping(inbound)))
            d.r.check(
                "open session web-1 → proc-1 (the attacker's) before", True, bool(shell and d.traffic.ping(shell))
            )
        status: list[int] = []

        def quarantine() -> None:
            code, _ = d.admin("POST", f"/admin/workloads/{victim}/quarantine", {"reason": "demo: suspected compromise"})
            status.append(code)

        s = d.measure(
            "quarantine",
            victim_name,
            quarantine,
            lambda: bool((rec := d.store.get(victim)) and rec.op_quarantined),
            (victim,),
            admin=True,
        )
        d.r.check("admin API accepted the quarantine", True, bool(status) and status[0] in (200, 202))
        d.r.say(f"  enforced by {s.agents} agents after {s.seconds}s")
        if d.traffic is not None:
            d.r.check("held session lb → web-1 still answers (cut)", False, bool(inbound and d.traffic.ping(inbound)))
            d.r.check("held session web-1 → proc-1 still answers (cut)", False, bool(shell and d.traffic.ping(shell)))
        else:
            plan = d.plan(victim_name)
            d.r.check("its agent applied the quarantine bundle", True, bool(plan is not None and plan.quarantined))
        d.expect_flows(
            [
                Flow("ord-prod-lb-1", victim_name, "tcp/8080", False, "new connection to the quarantined host"),
                Flow(victim_name, "ord-prod-proc-1", "tcp/8443", False, "new connection from it"),
                Flow(OPS, victim_name, "tcp/22", True, "fail-safe: SSH from the admin range still works"),
                Flow("ord-prod-lb-1", "ord-prod-web-9", "tcp/8080", True, "the rest keeps working"),
                Flow("ord-prod-web-9", "ord-prod-proc-1", "tcp/8443", True, "the rest keeps working"),
                Flow("ord-prod-proc-1", "ord-prod-db-1", "tcp/5432", True, "the rest keeps working"),
            ]
        )
        audit = [a for a in d.store.audit_log() if victim in json.dumps(a.model_dump(mode="json"))]
        who = audit[-1].model_dump(mode="json") if audit else {}
        d.r.say(f"  audit: {json.dumps(who)[:200]}")
        d.r.check("quarantine audited with the operator's principal", True, ADMIN_PRINCIPAL in json.dumps(who))
        for h in (inbound, shell):
            if h and d.traffic is not None:
                d.traffic.release(h)


def step_release_and_scale_in(d: Live, asg_new: list[str]) -> None:
    with d.r.step(5, "release; scale in; peers drop the terminated instances"):
        assert d.fleet is not None
        victim_name = "ord-prod-web-1"
        victim = d.iid(victim_name)
        d.measure(
            "release",
            victim_name,
            lambda: d.admin("DELETE", f"/admin/workloads/{victim}/quarantine", {"reason": "demo: cleaned"}),
            lambda: bool((rec := d.store.get(victim)) and not rec.op_quarantined),
            (victim,),
            admin=True,
        )
        d.expect_flows([Flow("ord-prod-lb-1", victim_name, "tcp/8080", True, "released")])
        gone_ips = {i: d.fleet.get(i).ip for i in asg_new if i in d.fleet.instances}

        def terminated() -> bool:
            if d.asg_states():
                return False
            recs = d.store.get_many(list(gone_ips))
            return all(r is None or not r.active for r in recs.values())

        d.r.say(f"SetDesiredCapacity {ASG_NAME} → 0")
        d.measure("terminate", f"-{len(gone_ips)} web", lambda: d.scale(0), terminated, tuple(gone_ips))
        for peer in ("ord-prod-lb-1", "ord-prod-proc-1"):
            held = d.set_addresses(peer)
            still = [ip for ip in gone_ips.values() if _covers(held, ip)]
            d.r.check(
                f"{peer}'s firewall sets dropped every terminated instance",
                "none left",
                ", ".join(still) or "none left",
            )
        held = d.set_addresses("ord-prod-lb-1")
        d.r.check(
            "the LB's firewall sets still hold the remaining web servers",
            True,
            all(_covers(held, d.ip(n)) for n in ("ord-prod-web-1", "ord-prod-web-2")),
        )
        d.expect_flows(
            [Flow("ord-prod-lb-1", n, "tcp/8080", True, "remaining web") for n in ("ord-prod-web-1", "ord-prod-web-2")]
        )


def write_map(d: Live) -> dict[str, Any]:
    """``out/map.html``: the dependency map from the flows the agents reported. The agent API
    archived each batch under ``reports/`` in the (embedded) bucket; the flows function's code
    ingests those objects as their S3 events would have it, then the map is drawn from the
    flow rows (from policy when no report came in)."""
    from ringfence.clouds.aws.flowlogs import REPORTS_PREFIX, FlowObjects
    from ringfence.clouds.aws.wiring import Wiring
    from ringfence.control.wiring import Config
    from ringfence.viz.depmap import build_map
    from ringfence.viz.render import to_html

    t0 = time.perf_counter()
    s3 = d.aws.client("s3")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=d.aws.bucket, Prefix=REPORTS_PREFIX)
        for o in page.get("Contents", [])
    ]
    w = Wiring(Config.from_env({**os.environ, **d.aws.env}))
    result = FlowObjects(w, s3).handle([{"s3": {"bucket": {"name": d.aws.bucket}, "object": {"key": k}}} for k in keys])
    active = w.active_policy()
    rows = w.store.flow_rows()
    inventory = [r.effective() for r in w.store.all_records() if r.active]
    m = build_map(active[1], inventory, rows) if active else None
    path = d.out / "map.html"
    if m is not None:
        path.write_text(to_html(m, "Ringfence demo: application dependency map"), encoding="utf-8")
    out = {
        "path": str(path) if m is not None else None,
        "reports": len(keys),
        "flows": result.flows,
        "from": m.source if m is not None else None,
        "nodes": len(m.nodes) if m is not None else 0,
        "edges": len(m.edges) if m is not None else 0,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    d.r.say(
        f"dependency map: {path} — {out['edges']} edges from {out['from']} "
        f"({out['flows']} flows in {out['reports']} agent reports)"
    )
    return out


def nft_addresses(ns: str) -> list[tuple[int, int]]:
    """Every IPv4 element of every set in the namespace's Ringfence table, as (first, last)."""
    import ipaddress

    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", "sets", "table", "inet", "ringfence"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    spans: list[tuple[int, int]] = []
    for item in json.loads(out or "{}").get("nftables", []):
        for elem in (item.get("set") or {}).get("elem", []):
            e = elem.get("elem", {}).get("val", elem) if isinstance(elem, dict) and "elem" in elem else elem
            try:
                if isinstance(e, str):
                    n = ipaddress.ip_network(e, strict=False)
                elif isinstance(e, dict) and "prefix" in e:
                    n = ipaddress.ip_network(f"{e['prefix']['addr']}/{e['prefix']['len']}", strict=False)
                elif isinstance(e, dict) and "range" in e:
                    a, b = (ipaddress.ip_address(x) for x in e["range"])
                    if a.version == 4:
                        spans.append((int(a), int(b)))
                    continue
                else:
                    continue
            except ValueError:
                continue
            if n.version == 4:
                spans.append((int(n.network_address), int(n.broadcast_address)))
    return spans


def _covers(spans: list[tuple[int, int]], ip: str) -> bool:
    import ipaddress

    v = int(ipaddress.ip_address(ip))
    return any(a <= v <= b for a, b in spans)


# --- entry point -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    out = Path(args.out or "out").resolve()  # the agents read their config relative to its own directory
    spec, instances = getattr(args, "steps", None), getattr(args, "instances", "all")
    try:
        if args.bench and (spec is not None or instances != "all"):
            raise ValueError("--steps and --instances are for the walkthrough, not --bench")
        steps = selected_steps(spec)
    except ValueError as exc:
        print(f"ringfence demo: {exc}", file=sys.stderr)
        return 2
    why_not = "--dry-run" if getattr(args, "dry_run", False) else prerequisites()
    if why_not is not None:
        print(
            f"ringfence demo: {why_not}: dry-run agents in this namespace — nothing is programmed and no packet is "
            "sent; each check is judged on the bundles the agents applied (root with nftables runs it for real)",
            flush=True,
        )
    if steps != STEPS:
        asked = {int(x) for x in (spec or "").split(",") if x.strip()}
        added = ", ".join(str(n) for n in steps if n not in asked)
        print(
            f"ringfence demo: steps {', '.join(map(str, steps))} after the start"
            + (f" ({added}: what the others build on)" if added else ""),
            flush=True,
        )
    agent_start = getattr(args, "agent_start", "fork")
    report = Report(out, "dry-run" if why_not else "nftables", agent_start=agent_start)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    demo = Live(
        example_dir(args.example),
        out,
        report,
        dry_run=why_not is not None,
        agent_start=agent_start,
        instances=used_instances(steps) if instances == "used" else None,
    )
    dependency_map: dict[str, Any] | None = None
    try:
        try:
            with report.step(0, "start: lab, embedded AWS, serve, router, instances with agents") as st:
                demo.start()
                st.timings["instances"] = len(demo.fleet.instances) if demo.fleet else 0
            if report.passed:
                if args.bench:
                    from ringfence.demo.bench import bench

                    bench(demo, args)
                else:
                    if 1 in steps:
                        step_tiers(demo)
                    new = step_scale_out(demo) if 2 in steps else []
                    if 3 in steps:
                        step_retag(demo, new)
                    if 4 in steps:
                        step_quarantine(demo)
                    if 5 in steps:
                        step_release_and_scale_in(demo, new)
                    if 6 in steps:
                        from ringfence.demo.crosscloud import step_cross_cloud

                        step_cross_cloud(demo)
                    try:
                        dependency_map = write_map(demo)
                    except Exception as exc:  # the map is a view: its failure is noted, not the demo's
                        report.notes.append(f"dependency map not written: {type(exc).__name__}: {exc}")
        except (KeyboardInterrupt, Interrupted) as exc:
            # a second Ctrl-C must not cut the cleanup short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            report.notes.append(f"interrupted: {type(exc).__name__}")
            report.say("interrupted: cleaning up")
            demo.close()
            report.write()
            return 130
    finally:
        demo.close()
        signal.signal(signal.SIGTERM, previous)
    path = report.write({"dependency_map": dependency_map} if dependency_map else None)
    report.print_summary()
    print(f"\n{'PASSED' if report.passed else 'FAILED'}: {path} (agent logs and state in {demo.work})")
    return 0 if report.passed else 1
