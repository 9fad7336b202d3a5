"""Tiny traffic tool run inside lab namespaces (lab and loopback addresses only, bounded timeouts).

``python -m ringfence.local.probe CMD`` (``PROBE`` in :mod:`ringfence.local.lab`):

probe serve --tcp 22,8080 --udp 5353        echo servers on 0.0.0.0 and ::
probe tcp HOST PORT [--timeout S] [--sport P]  exit 0 if a TCP echo round trip works (from port P)
probe udp HOST PORT [--timeout S]           exit 0 if a UDP echo round trip works
probe hold HOST PORT                        keep one TCP connection; each stdin line → one echo,
                                                  prints "ok" or "fail"
probe rate HOST PORT SECONDS                new TCP connections per second (prints a number)
probe dhcp-serve --ports 67,6700              answers DHCP-like requests arriving on each port with a
                                                  broadcast reply from that port to the client's port
probe dhcp CLIENT_PORT SERVER_PORT          broadcast a DHCPDISCOVER from CLIENT_PORT to SERVER_PORT on
                                                  eth0; exit 0 when the matching reply arrives
probe burst HOST PORT N                     N concurrent TCP connection attempts (N source ports),
                                                  abandoned after a moment; prints how many connected
probe multiserve                                  echo servers in many namespaces from one process; JSON
                                                  lines on stdin: {"op": "add", "ns": NS, "tcp": [..],
                                                  "udp": [..]} / {"op": "del", "ns": NS}; one answer each
probe worker                                      client probes from many namespaces, in parallel; JSON
                                                  lines: {"id", "op": tcp|udp|hold|ping|close, "ns", ...}

multiserve and worker enter namespaces with setns(2) per thread (root only): one process for the
whole lab instead of one per host and probe, which matters on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def _listen(tcp: list[int], udp: list[int]) -> list[tuple[socket.socket, str]]:
    out = []
    for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):  # noqa: S104 - inside a lab namespace
        for port in tcp:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
            s.listen(512)
            s.setblocking(False)
            out.append((s, "accept"))
        for port in udp:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
            s.setblocking(False)
            out.append((s, "udp"))
    return out


def serve(tcp: list[int], udp: list[int]) -> None:
    socks = _listen(tcp, udp)
    print("ready", flush=True)
    _echo_loop(socks, None)


def _echo_loop(socks: list[tuple[socket.socket, str]], stop: socket.socket | None) -> None:
    sel = selectors.DefaultSelector()
    for s, kind in socks:
        sel.register(s, selectors.EVENT_READ, kind)
    if stop is not None:
        sel.register(stop, selectors.EVENT_READ, "stop")
    while True:
        for key, _ in sel.select():
            if key.data == "stop":
                for k in list(sel.get_map().values()):
                    k.fileobj.close()  # type: ignore[union-attr]
                return
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "accept":
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, "conn")
            elif key.data == "udp":
                try:
                    data, peer = sock.recvfrom(2048)
                    sock.sendto(data, peer)
                except OSError:
                    pass
            else:
                try:
                    data = sock.recv(2048)
                except OSError:
                    data = b""
                if data:
                    with contextlib.suppress(OSError):
                        sock.sendall(data)
                else:
                    sel.unregister(sock)
                    sock.close()


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp_probe(host: str, port: int, timeout: float, sport: int = 0) -> bool:
    try:
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            if sport:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("::" if ":" in host else "0.0.0.0", sport))  # noqa: S104 - a source port, lab only
            s.connect((host, port))
            s.sendall(b"ping")
            return s.recv(16) == b"ping"
    except OSError:
        return False


def udp_probe(host: str, port: int, timeout: float) -> bool:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(b"ping", (host, port))
            data, _ = s.recvfrom(16)
            return data == b"ping"
        except OSError:
            return False


def hold(host: str, port: int) -> None:
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((host, port))
        print("connected", flush=True)
    except OSError:
        print("fail", flush=True)
        return
    for _line in sys.stdin:
        try:
            s.sendall(b"ping")
            print("ok" if s.recv(16) == b"ping" else "fail", flush=True)
        except OSError:
            print("fail", flush=True)


def rate(host: str, port: int, seconds: float) -> None:
    n = failed = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with socket.socket(_family(host), socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.settimeout(0.2)
            try:
                s.connect((host, port))
                n += 1
            except OSError:
                failed += 1
    print(f"{n / seconds:.1f} {failed}")


def burst(host: str, port: int, n: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, n + 64))
    socks = []
    for _ in range(n):
        s = socket.socket(_family(host), socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))  # one SYN each, from its own ephemeral port
        socks.append(s)
    time.sleep(0.5)
    connected = sum(1 for s in socks if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and _peer(s))
    for s in socks:
        s.close()
    print(connected)


def _peer(s: socket.socket) -> bool:
    try:
        s.getpeername()
        return True
    except OSError:
        return False


# A minimal BOOTP/DHCP frame (RFC 2131): enough for a lab exchange through the firewall. Real clients
# send DISCOVER from 0.0.0.0 over a packet socket; a UDP socket goes through netfilter, which is the
# point here.
_MAGIC = b"\x63\x82\x53\x63"


def _bootp(op: int, xid: bytes, msg_type: int) -> bytes:
    head = bytes([op, 1, 6, 0]) + xid + bytes(20) + bytes(16) + bytes(64 + 128)
    return head + _MAGIC + bytes([53, 1, msg_type, 255])


def _broadcast_socket(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")  # limited broadcast needs a device
    s.bind(("0.0.0.0", port))  # noqa: S104 - DHCP listens on all (lab namespace)
    return s


def dhcp_serve(ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for port in ports:
        sel.register(_broadcast_socket(port), selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data, (_, client_port) = sock.recvfrom(2048)
            if len(data) >= 240 and data[0] == 1 and data[236:240] == _MAGIC:
                sock.sendto(_bootp(2, data[4:8], 2), ("255.255.255.255", client_port))  # OFFER


def dhcp_client(client_port: int, server_port: int, timeout: float) -> bool:
    import secrets

    xid = secrets.token_bytes(4)
    with _broadcast_socket(client_port) as s:
        s.settimeout(timeout)
        try:
            s.sendto(_bootp(1, xid, 1), ("255.255.255.255", server_port))
            while True:
                data, (_, sport) = s.recvfrom(2048)
                if data[0] == 2 and data[4:8] == xid and sport == server_port:
                    return True
        except OSError:
            return False


# --- one process for the whole lab -------------------------------------------------------------


def _in_netns(ns: str) -> contextlib.AbstractContextManager[None]:
    from ringfence.local.lab import in_netns

    return in_netns(ns)


def multiserve() -> None:
    """Echo servers in many namespaces: one serving thread per namespace, commands on stdin."""
    servers: dict[str, socket.socket] = {}  # ns → the write end that stops its thread
    out_lock = threading.Lock()

    def answer(msg: dict[str, object]) -> None:
        with out_lock:
            print(json.dumps(msg), flush=True)

    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            ns = str(cmd["ns"])
            if cmd["op"] == "add":
                with _in_netns(ns):
                    socks = _listen([int(x) for x in cmd.get("tcp", [])], [int(x) for x in cmd.get("udp", [])])
                stop_r, stop_w = socket.socketpair()
                servers[ns] = stop_w
                threading.Thread(target=_echo_loop, args=(socks, stop_r), daemon=True).start()
            elif cmd["op"] == "del" and ns in servers:
                servers.pop(ns).send(b"x")
            answer({"ok": True, "ns": ns})
        except (OSError, KeyError, ValueError) as exc:
            answer({"ok": False, "error": str(exc)})


class _Worker:
    def __init__(self) -> None:
        self.out_lock = threading.Lock()
        self.held: dict[str, socket.socket] = {}
        self.pool = ThreadPoolExecutor(max_workers=32)

    def answer(self, msg: dict[str, object]) -> None:
        with self.out_lock:
            print(json.dumps(msg), flush=True)

    def run(self) -> None:
        for line in sys.stdin:
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            self.pool.submit(self.one, cmd)

    def one(self, cmd: dict[str, object]) -> None:
        rid = cmd.get("id")
        try:
            self.answer({"id": rid, "ok": self.do(cmd)})
        except Exception as exc:
            self.answer({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    def do(self, cmd: dict[str, object]) -> bool:
        op = cmd["op"]
        timeout = float(cmd.get("timeout", 0.8))  # type: ignore[arg-type]
        if op in ("ping", "close"):
            s = self.held.get(str(cmd["hold"]))
            if s is None:
                return False
            if op == "close":
                self.held.pop(str(cmd["hold"]), None)
                s.close()
                return True
            try:
                s.settimeout(timeout)
                s.sendall(b"ping")
                return s.recv(16) == b"ping"
            except OSError:
                return False
        host, port = str(cmd["host"]), int(cmd["port"])  # type: ignore[call-overload]
        with _in_netns(str(cmd["ns"])):
            s = socket.socket(_family(host), socket.SOCK_DGRAM if op == "udp" else socket.SOCK_STREAM)
        with contextlib.ExitStack() as stack:
            if op != "hold":
                stack.enter_context(s)
            s.settimeout(timeout)
            try:
                if op == "udp":
                    s.sendto(b"ping", (host, port))
                    return s.recvfrom(16)[0] == b"ping"
                s.connect((host, port))
                s.sendall(b"ping")
                ok = s.recv(16) == b"ping"
            except OSError:
                s.close()
                return False
            if op == "hold" and ok:
                self.held[str(cmd["hold"])] = s
            return ok
        return False  # pragma: no cover


def worker() -> None:
    _Worker().run()


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tcp", default="")
    s.add_argument("--udp", default="")
    for name in ("tcp", "udp", "hold", "rate", "burst"):
        q = sub.add_parser(name)
        q.add_argument("host")
        q.add_argument("port", type=int)
        if name == "rate":
            q.add_argument("seconds", type=float)
        if name == "burst":
            q.add_argument("n", type=int)
        q.add_argument("--timeout", type=float, default=0.5)
        q.add_argument("--sport", type=int, default=0)
    sub.add_parser("multiserve")
    sub.add_parser("worker")
    d = sub.add_parser("dhcp-serve")
    d.add_argument("--ports", default="67")
    d = sub.add_parser("dhcp")
    d.add_argument("client_port", type=int)
    d.add_argument("server_port", type=int)
    d.add_argument("--timeout", type=float, default=0.8)
    a = p.parse_args()
    if a.cmd == "multiserve":
        multiserve()
    elif a.cmd == "worker":
        worker()
    elif a.cmd == "dhcp-serve":
        dhcp_serve([int(x) for x in a.ports.split(",") if x])
    elif a.cmd == "dhcp":
        return 0 if dhcp_client(a.client_port, a.server_port, a.timeout) else 1
    elif a.cmd == "serve":
        serve([int(x) for x in a.tcp.split(",") if x], [int(x) for x in a.udp.split(",") if x])
    elif a.cmd == "tcp":
        return 0 if tcp_probe(a.host, a.port, a.timeout, a.sport) else 1
    elif a.cmd == "udp":
        return 0 if udp_probe(a.host, a.port, a.timeout) else 1
    elif a.cmd == "hold":
        hold(a.host, a.port)
    elif a.cmd == "burst":
        burst(a.host, a.port, a.n)
    else:
        rate(a.host, a.port, a.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
