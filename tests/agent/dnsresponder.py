"""A minimal DNS server for the lab (run inside a namespace): every A query is answered with the
IPv4 address in the file given (read per query, so a test can move the name); other types get an
empty answer. UDP and TCP on port 53. Prints ``ready`` once both listen.

``dnsresponder.py query SERVER [tcp]``: one A query straight to SERVER:53; exit 0 if answered."""

from __future__ import annotations

import socket
import struct
import sys
import threading
from pathlib import Path


def answer(query: bytes, address_file: Path) -> bytes:
    qid, _flags, qd = struct.unpack("!HHH", query[:6])
    end = 12
    while query[end] != 0:
        end += query[end] + 1
    question = query[12 : end + 5]
    qtype = struct.unpack("!H", question[-4:-2])[0]
    records = b""
    if qtype == 1 and qd == 1:
        ip = socket.inet_aton(address_file.read_text().strip())
        records = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + ip
    return struct.pack("!HHHHHH", qid, 0x8180, 1, 1 if records else 0, 0, 0) + question + records


def serve_udp(sock: socket.socket, address_file: Path) -> None:
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(answer(data, address_file), peer)


def serve_tcp(sock: socket.socket, address_file: Path) -> None:
    while True:
        conn, _ = sock.accept()
        with conn:
            try:
                (n,) = struct.unpack("!H", conn.recv(2))
                out = answer(conn.recv(n), address_file)
                conn.sendall(struct.pack("!H", len(out)) + out)
            except (OSError, struct.error, IndexError):
                pass


QUERY = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x04test\x00\x00\x01\x00\x01"


def query(server: str, tcp: bool) -> int:
    try:
        if tcp:
            s = socket.create_connection((server, 53), timeout=1)
            s.sendall(struct.pack("!H", len(QUERY)) + QUERY)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(1)
            s.sendto(QUERY, (server, 53))
        return 0 if s.recv(512) else 1
    except OSError:
        return 1


def main() -> None:
    if sys.argv[1] == "query":
        sys.exit(query(sys.argv[2], sys.argv[3:] == ["tcp"]))
    address_file = Path(sys.argv[1])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 53))  # inside a lab namespace
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", 53))
    tcp.listen(16)
    threading.Thread(target=serve_tcp, args=(tcp, address_file), daemon=True).start()
    print("ready", flush=True)
    serve_udp(udp, address_file)


if __name__ == "__main__":
    main()
