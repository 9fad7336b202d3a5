"""Real packets between lab namespaces: echo servers on every instance and client probes from any,
through two long-lived helper processes (``probe multiserve`` and ``probe worker``) instead of one
process per server and per probe."""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import IO, Any

from ringfence.local.lab import PROBE


@dataclass(frozen=True)
class Probe:
    src_ns: str
    host: str
    port: int
    proto: str = "tcp"


class _JsonLines:
    """A child process spoken to in JSON lines; answers matched by ``id`` (or in order)."""

    def __init__(self, proc: subprocess.Popen[str], keyed: bool) -> None:
        self.proc = proc
        self.keyed = keyed
        self.pending: dict[Any, Future[dict[str, Any]]] = {}
        self.order: list[Future[dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        assert proc.stdout is not None and proc.stdin is not None
        self.stdin: IO[str] = proc.stdin
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, out: IO[str]) -> None:
        for line in out:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                fut = (
                    self.pending.pop(msg.get("id"), None) if self.keyed else (self.order.pop(0) if self.order else None)
                )
            if fut is not None:
                fut.set_result(msg)
        with self.lock:  # the process ended: nothing more will be answered
            waiting = [*self.pending.values(), *self.order]
            self.pending.clear()
            self.order.clear()
        for fut in waiting:
            fut.set_result({"ok": False, "error": "probe process ended"})

    def send(self, msg: dict[str, Any]) -> Future[dict[str, Any]]:
        fut: Future[dict[str, Any]] = Future()
        with self.lock:
            if self.keyed:
                msg = {**msg, "id": next(self.ids)}
                self.pending[msg["id"]] = fut
            else:
                self.order.append(fut)
            try:
                self.stdin.write(json.dumps(msg) + "\n")
                self.stdin.flush()
            except (BrokenPipeError, ValueError):
                fut.set_result({"ok": False, "error": "probe process ended"})
        return fut


class Traffic:
    """Echo servers (TCP and UDP) in lab namespaces and probes between them."""

    def __init__(self, spawn: Any) -> None:
        """``spawn(*cmd, **popen_kw)`` starts a process the lab cleans up (``Lab.start``)."""
        kw = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "bufsize": 1}
        self.servers = _JsonLines(spawn(*PROBE, "multiserve", **kw), keyed=False)
        self.worker = _JsonLines(spawn(*PROBE, "worker", **kw), keyed=True)
        self.holds = itertools.count(1)

    def serve(self, ns: str, tcp: Sequence[int], udp: Sequence[int] = ()) -> None:
        got = self.servers.send({"op": "add", "ns": ns, "tcp": list(tcp), "udp": list(udp)}).result(30)
        if not got.get("ok"):
            raise RuntimeError(f"echo servers in {ns}: {got.get('error')}")

    def unserve(self, ns: str) -> None:
        self.servers.send({"op": "del", "ns": ns}).result(30)

    def probe(self, p: Probe, timeout: float = 0.8) -> bool:
        return self.probes([p], timeout)[0]

    def probes(self, ps: Sequence[Probe], timeout: float = 0.8) -> list[bool]:
        """All at once (the worker runs them in parallel); a blocked one costs ``timeout``."""
        futs = [
            self.worker.send({"op": p.proto, "ns": p.src_ns, "host": p.host, "port": p.port, "timeout": timeout})
            for p in ps
        ]
        return [bool(f.result(timeout + 30).get("ok")) for f in futs]

    def hold(self, src_ns: str, host: str, port: int) -> str | None:
        """Open one TCP session and keep it; its handle, or None when it could not connect."""
        hid = f"h{next(self.holds)}"
        got = self.worker.send({"op": "hold", "ns": src_ns, "host": host, "port": port, "hold": hid}).result(30)
        return hid if got.get("ok") else None

    def ping(self, hold: str, timeout: float = 0.8) -> bool:
        """One echo round trip on a held session."""
        return bool(self.worker.send({"op": "ping", "hold": hold, "timeout": timeout}).result(timeout + 30).get("ok"))

    def release(self, hold: str) -> None:
        self.worker.send({"op": "close", "hold": hold}).result(30)
