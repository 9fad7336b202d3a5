"""The HTTP server under the lab's small stand-ins (the IMDS ones, the local Azure Resource Manager
and Google APIs): :class:`http.server.ThreadingHTTPServer` without its reverse DNS lookup, and
stopping within a tenth of a second."""

from __future__ import annotations

import socketserver
from http.server import ThreadingHTTPServer

SHUTDOWN_POLL = 0.1  # s: how long ``shutdown()`` may wait for the serving loop to see it (stdlib: 0.5)


class LabHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer names itself socket.getfqdn(host): a reverse DNS lookup, which in a lab
        # namespace (the resolver on an address the lab bridge answers no ARP for) waits out the
        # resolver's timeouts — 6 s of every live demo's start, for 169.254.169.254
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def serve_forever(self, poll_interval: float = SHUTDOWN_POLL) -> None:
        super().serve_forever(poll_interval)
