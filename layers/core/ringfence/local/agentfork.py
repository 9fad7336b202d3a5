"""Lab agents forked from one process that has already imported the agent.

A VM starts its agent on its own CPU; the lab runs every instance's agent on the same two cores.
About three quarters of a Python agent's CPU up to its first heartbeat is the interpreter's start
and its imports (docs/benchmarks.md, run P), so a 50-instance scale-out spent ~5 CPU-s of the
lab's cores on 50 interpreters starting at once: a cost of the lab, paid in parallel on real
hosts. The fleet instead asks one template process, started once per lab, to fork: each child
leaves the template's session, enters its instance's network namespace, points its output at the
instance's log and runs the real ``ringfence-agent`` command line (:func:`ringfence_agent.cli.main`)
with the same arguments it would be exec'd with. From then on it is the same agent, code and
process tree alike (its ``nft`` and ``conntrack`` children run inside its namespace). One thing
``ip netns exec`` gives an exec'd agent and a fork does not: a mount namespace with the network
namespace's own ``/sys``; the agent reads nothing there (``/proc/self/net`` and ``/proc/sys/net``
follow the process's network namespace).

The wire between the fleet and the template is one JSON request per line on the template's stdin
and one line per answer or exit on its stdout (``pid N``, ``exit N CODE``). Written here rather
than with :mod:`multiprocessing`'s forkserver: when that server dies it reports every child it
started as exited (code 255) at once, though the agents still run, and a scale-in would stop
waiting for agents it still has to stop; here a wait then looks for the agent itself. And a child
of ours runs nothing before the agent's ``main`` but what an exec'd agent's start does (its
session, its namespace, its output), not multiprocessing's bootstrap.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


class AgentProcess(Protocol):
    """What the fleet needs of a running agent: a :class:`subprocess.Popen` or a :class:`Forked`."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


LOST = -1  # an agent's exit code when the template that reaped it is gone: it is gone, how is unknown


class Forked:
    """An agent forked by the template: its process group is its pid (it called setsid), its exit
    code arrives from the template, which reaps it. Should the template die first, the agent is
    looked for in /proc instead (its code is then :data:`LOST`): a wait never outlives it."""

    def __init__(self, pid: int, template: _Template) -> None:
        self.pid = pid
        self._t = template

    def poll(self) -> int | None:
        code = self._t.exits.get(self.pid)
        if code is None and self._t.gone and not _running(self.pid):
            return LOST
        return code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        t = self._t
        with t.changed:
            t.changed.wait_for(lambda: self.pid in t.exits or t.gone, timeout)
        while True:
            code = self.poll()
            if code is not None:
                return code
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"agent {self.pid}", timeout or 0)
            time.sleep(0.05 if left is None else min(0.05, left))


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class _Template:
    """One template process and what it has said: the pids it forked, the exits it reaped."""

    def __init__(self, start: Callable[..., subprocess.Popen[Any]]) -> None:
        self.proc = start(
            sys.executable,
            "-m",
            "ringfence.local.agentfork",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self._out = self.proc.stdin, self.proc.stdout
        ready = self._out.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"the agent template did not start: {ready!r}")
        self.exits: dict[int, int] = {}
        self.pids: list[int] = []  # answers to requests, in order
        self.gone = False  # its stdout closed: it exited
        self.changed = threading.Condition()
        threading.Thread(target=self._read, name="agent-forks", daemon=True).start()

    def _read(self) -> None:
        for line in self._out:
            kind, _, rest = line.strip().partition(" ")
            with self.changed:
                if kind == "pid":
                    self.pids.append(int(rest))
                elif kind == "exit":
                    pid, code = rest.split()
                    self.exits[int(pid)] = int(code)
                self.changed.notify_all()
        with self.changed:  # wake anyone waiting for an answer or an exit
            self.gone = True
            self.changed.notify_all()


class AgentForks:
    """The fleet's side: starts the template (through ``start``, so the lab kills it on close)
    and asks it for agents; a template that has died is replaced at the next request."""

    def __init__(self, start: Callable[..., subprocess.Popen[Any]]) -> None:
        self._start = start
        self._send = threading.Lock()  # one request and its answer at a time
        self.template = _Template(start)

    def spawn(self, args: list[str], netns: str | None, log: Path) -> Forked:
        """``ringfence-agent args`` inside ``netns`` (None: the template's), output to ``log``."""
        with self._send:
            if self.template.gone or self.template.proc.poll() is not None:
                self.template = _Template(self._start)
            t = self.template
            try:
                t.stdin.write(json.dumps({"args": args, "netns": netns, "log": str(log)}) + "\n")
                t.stdin.flush()
            except BrokenPipeError:
                pass  # it died just now: said below, as when it dies before answering
            with t.changed:
                if not t.changed.wait_for(lambda: t.pids or t.gone, 30):
                    raise RuntimeError("the agent template did not answer within 30 s")
                if not t.pids:
                    raise RuntimeError(f"the agent template exited ({t.proc.poll()}) before answering")
                pid = t.pids.pop(0)
        if pid < 0:
            raise RuntimeError(f"the agent template could not fork: see {log}")
        return Forked(pid, t)


# --- the template ------------------------------------------------------------------------------


def _child(req: dict[str, Any], closing: list[int]) -> None:
    """In the forked child: never returns."""
    code = 1
    try:
        os.setsid()  # its own process group: the fleet signals it and its nft children as one
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        for fd in closing:
            os.close(fd)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        if req.get("netns"):
            from ringfence.local.lab import enter_netns

            enter_netns(req["netns"])  # before any thread: the whole agent lives there
        from ringfence_agent.cli import main

        sys.argv = ["ringfence-agent", *req["args"]]
        code = main(list(req["args"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve() -> int:
    """The template: preload what an agent imports, then fork one agent per request line."""
    # what every agent imports at start, what `run` imports next, and enter_netns for the children
    for module in ("ringfence_agent.cli", "ringfence_agent.config", "ringfence_agent.daemon", "ringfence.local.lab"):
        importlib.import_module(module)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select; reaped below
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the lab stops it, not the terminal's Ctrl-C
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    pending = b""
    while True:
        readable, _, _ = select.select([0, wake_r], [], [])  # retried on EINTR (PEP 475)
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        while True:  # reap every child that exited, whatever woke us
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            out.write(f"exit {pid} {os.waitstatus_to_exitcode(status)}\n")
        if 0 in readable:
            data = os.read(0, 65536)
            if not data:
                return 0  # the fleet is gone; the lab kills the agents by namespace
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                req = json.loads(line)
                out.flush()
                try:
                    pid = os.fork()
                except OSError as exc:
                    with contextlib.suppress(OSError), open(req["log"], "a") as f:
                        f.write(f"fork failed: {exc}\n")
                    pid = -1
                if pid == 0:
                    _child(req, [wake_r, wake_w])  # fd 0 is replaced by /dev/null there
                out.write(f"pid {pid}\n")
        out.flush()


if __name__ == "__main__":
    sys.exit(serve())
