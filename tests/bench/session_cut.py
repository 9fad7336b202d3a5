"""What cutting revoked connections costs (docs/agent.md, "Revocation cuts open connections").

Run as root; it makes and deletes a network namespace of its own::

    .venv/bin/python -m tests.bench.session_cut 1000 3000 10000 --live 1000 3000 9000

Per size N: N established TCP entries into this host (10.8.0.1:80) from N peers, a tenth of them
SSH from the admin range, inserted with ``conntrack -I``; then the agent's cutter runs against
three plans: a quarantine (everything but the admin SSH cut), a removed allow (1% of the peers
lose their allow) and a set delta naming 10 peers. Each phase is timed: listing, judging,
deleting the entries, aborting local sockets (none exist behind inserted entries: each request
is answered ENOENT, which costs what a real abort's lookup does); the entries are re-inserted
between runs.

Per ``--live`` size N, three times: N real TCP connections to a listener on 10.8.0.1:80 in the
namespace, then ``destroy_sockets`` of all of them, timed: every socket looked up and aborted (the cost a
quarantine's abort step has on a host whose processes hold the cut connections).
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time

from ringfence_agent.plan import Failsafes, Flow, Match, Plan, PlanRule, PlanSet
from ringfence_agent.sessions import Session, SessionCutter, destroy_sockets, list_sessions, netlink_delete

NS = f"rfcutbench{os.getpid()}"


def peer(i: int) -> str:
    return f"10.9.{i // 250}.{i % 250 + 1}" if i % 10 else f"10.7.{i // 2500}.{(i // 10) % 250 + 1}"


def entries(n: int) -> str:
    lines = []
    for i in range(n):
        port = 22 if i % 10 == 0 else 80
        lines.append(
            f"-I -s {peer(i)} -d 10.8.0.1 -p tcp --sport {10000 + i % 50000} --dport {port} "
            "--state ESTABLISHED -t 3600 -u ASSURED"
        )
    return "\n".join(lines) + "\n"


def plans(n: int) -> dict[str, tuple[Plan, list[str] | None]]:
    fs = Failsafes(admin_v4=("10.7.0.0/16",), admin_ports=(Match("tcp", (22, 22)),))
    quarantine = Plan("w", 2, "enforce", True, failsafes=fs)
    allowed = tuple(sorted({f"{peer(i)}/32" for i in range(n) if i % 10 and i % 100 != 1}))
    rule = PlanRule("inbound", 0, "web", "allow", "peers", (Match("tcp", (80, 80)),))
    removed = Plan("w", 2, "enforce", False, sets={"peers": PlanSet(allowed, ())}, rules=[rule], failsafes=fs)
    gone = [f"{peer(i)}/32" for i in range(1, n, 100)][:10]
    return {"quarantine": (quarantine, None), "removed allow": (removed, None), "delta of 10 peers": (removed, gone)}


def run(n: int) -> None:
    script = f"/tmp/{NS}-{n}.txt"
    with open(script, "w") as f:
        f.write(entries(n))
    for name, (plan, peers) in plans(n).items():
        subprocess.run(["conntrack", "-F"], capture_output=True, check=False)
        subprocess.run(["conntrack", "-R", script], capture_output=True, check=True)
        t0 = time.perf_counter()
        sessions = list_sessions()
        t1 = time.perf_counter()
        doomed = SessionCutter().doomed(plan, sessions, {"10.8.0.1"}, peers)
        t2 = time.perf_counter()
        result = netlink_delete([s for s, _, _ in doomed])
        t3 = time.perf_counter()
        destroy_sockets([(s, f) for s, f, _ in doomed])  # no sockets behind inserted entries: each an ENOENT
        t4 = time.perf_counter()
        left = len(list_sessions())
        print(
            f"{n:>6} entries  {name:<18} cut {result.deleted:>6}  list {1000 * (t1 - t0):6.1f} ms  "
            f"judge {1000 * (t2 - t1):6.1f} ms  delete {1000 * (t3 - t2):6.1f} ms  "
            f"abort {1000 * (t4 - t3):6.1f} ms  total {1000 * (t4 - t0):6.1f} ms  left {left}"
        )
    os.unlink(script)


def live(n: int, rounds: int = 3) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 100  # both ends of every connection in this process
    if need > hard:
        raise SystemExit(f"--live {n} needs {need} file descriptors, the limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("10.8.0.1", 80))
    srv.listen(4096)
    for _ in range(rounds):
        pairs = []
        for _ in range(n):
            client = socket.create_connection(("10.8.0.1", 80))
            pairs.append((client, srv.accept()[0]))
        cut = []
        for client, _ in pairs:
            port = client.getsockname()[1]
            s = Session(4, "tcp", 6, "10.8.0.1", "10.8.0.1", port, 80, "10.8.0.1", 80)
            cut.append((s, Flow("inbound", "10.8.0.1", "tcp", port, 80)))
        t0 = time.perf_counter()
        result = destroy_sockets(cut)
        t1 = time.perf_counter()
        print(
            f"{n:>6} sockets  live connections   aborted {result.deleted:>6}  gone {result.gone}  "
            f"failed {len(result.failed)}  abort {1000 * (t1 - t0):6.1f} ms"
        )
        for client, served in pairs:
            client.close()
            served.close()
    srv.close()


def main() -> int:
    if "RF_IN_NS" not in os.environ:
        subprocess.run(["ip", "netns", "add", NS], check=True)
        try:
            subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
            subprocess.run(["ip", "-n", NS, "addr", "add", "10.8.0.1/32", "dev", "lo"], check=True)
            env = {**os.environ, "RF_IN_NS": NS}
            cmd = ["ip", "netns", "exec", NS, sys.executable, "-m", "tests.bench.session_cut", *sys.argv[1:]]
            return subprocess.run(cmd, env=env, check=False).returncode
        finally:
            subprocess.run(["ip", "netns", "del", NS], check=False)
    args = sys.argv[1:]
    at = args.index("--live") if "--live" in args else len(args)
    for n in [int(x) for x in args[:at]] or [1000, 3000, 10000]:
        run(n)
    for n in [int(x) for x in args[at + 1 :]]:
        live(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
