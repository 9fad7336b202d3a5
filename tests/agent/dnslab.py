"""A lab whose host ``h2`` resolves names through a DNS server in the lab (``dns``), whose answer
a test changes by rewriting a file: for the agent's control-plane and DNS fail-safes. ``ip netns
exec`` binds /etc/netns/<ns>/resolv.conf and hosts over the host's own, so only h2 sees them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ringfence.local.lab import Lab as NetLab

CP_MOVED = "10.77.0.101"
"""the control plane's second address, held by ``cp`` beside its own"""
RESPONDER = Path(__file__).with_name("dnsresponder.py")


@contextmanager
def resolving_lab(
    hosts: dict[str, int], tmp_path: Path, serve: Callable[[NetLab], object] = lambda lab: None
) -> Iterator[tuple[NetLab, Path]]:
    """The lab of ``hosts`` (which name ``h2``, ``cp`` and ``dns``), with ``serve`` run first (its
    listeners). Yields the lab and the file whose address ``dns`` answers for every name (``cp``'s
    to begin with)."""
    lab = NetLab(hosts)
    etc = Path("/etc/netns") / lab.ns("h2")
    try:
        serve(lab)
        address = tmp_path / "cp-address"
        address.write_text(lab.v4("cp"))
        resolver = lab.spawn("dns", sys.executable, str(RESPONDER), str(address), stdout=subprocess.PIPE)
        assert resolver.stdout is not None and resolver.stdout.readline().strip() == "ready"
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n")  # the name is in DNS only
        (etc / "resolv.conf").write_text(f"nameserver {lab.v4('dns')}\noptions timeout:1 attempts:2\n")
        subprocess.run(["ip", "-n", lab.ns("cp"), "addr", "add", f"{CP_MOVED}/24", "dev", "eth0"], check=True)
        yield lab, address
    finally:
        lab.close()
        shutil.rmtree(etc, ignore_errors=True)


def applied(state: Path) -> int | None:
    """The bundle version the agent's status file says it enforces (None: none yet)."""
    try:
        version = json.loads((state / "status.json").read_text()).get("applied_version")
    except (OSError, ValueError):
        return None
    return version if isinstance(version, int) else None
