"""A listening socket inside a lab namespace, served from this (root-namespace) process.

A socket belongs to the network namespace of the thread that created it, whatever thread later
uses it: the control plane then serves agents in the lab while it talks to moto on this process's
loopback — no relay, no second copy of the control plane inside the lab.
"""

from __future__ import annotations

import socket

from ringfence.local.lab import in_netns


def listening_socket_in(netns: str, host: str, port: int) -> socket.socket:
    with in_netns(netns):  # this thread only, and back
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    return sock
