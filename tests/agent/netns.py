"""A listening socket inside a lab namespace, served from this (root-namespace) process.

A socket belongs to the network namespace of the thread that created it, whatever thread later
uses it. So a short-lived thread enters the namespace (``setns``, per thread on Linux), binds,
and exits: the control plane then serves agents in the lab while it talks to moto on this
process's loopback — no relay, no second copy of the control plane inside the lab.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000


def listening_socket_in(netns: str, host: str, port: int) -> socket.socket:
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, socket.socket | BaseException] = {}

    def bind() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            out["sock"] = sock
        except BaseException as exc:  # handed to the caller
            out["error"] = exc

    t = threading.Thread(target=bind, name=f"bind-in-{netns}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    got = out["sock"]
    assert isinstance(got, socket.socket)
    return got
