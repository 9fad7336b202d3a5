"""The agent's own nf_tables netlink reader (agent/ringfence_agent/backends/nftables_netlink.py):
the parser refuses what is malformed with an OSError, a reply is taken only from the kernel and
only within the deadline (review F4), and it reads a real kernel's tables, chains, rules and
sets, another table's unprintable names included."""

from __future__ import annotations

import errno
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringfence_agent import netlink
from ringfence_agent.backends import nftables_netlink as nl

HDR = struct.Struct("=IHHII")
NEWTABLE = (nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_NEWTABLE


def _msg(kind: int, seq: int, payload: bytes, flags: int = 0) -> bytes:
    return HDR.pack(HDR.size + len(payload), kind, flags, seq, 0) + payload


def _table_reply(seq: int, flags: int) -> bytes:
    attrs = nl._attr(nl.NFTA_TABLE_NAME, b"ringfence\0") + nl._attr(nl.NFTA_TABLE_FLAGS, struct.pack(">I", flags))
    return _msg(NEWTABLE, seq, struct.pack("=BBH", 1, 0, 0) + attrs)


def test_attributes_that_run_past_their_buffer_are_an_oserror() -> None:
    good = nl._attr(1, b"abc\0") + nl._attr(2, b"\0\0\0\1")
    assert nl.attributes(good) == [(1, b"abc\0"), (2, b"\0\0\0\1")]
    for bad in (b"\x08\x00\x01\x00ab", b"\x02\x00\x01\x00", b"\x08\x00"):
        with pytest.raises(OSError) as exc:
            nl.attributes(bad)
        assert exc.value.errno == errno.EPROTO


def test_messages_cut_short_are_an_oserror() -> None:
    whole = _table_reply(7, 1)
    assert [m.seq for m in netlink.messages(whole)] == [7]
    with pytest.raises(OSError) as exc:
        netlink.messages(whole[:-4])
    assert exc.value.errno == errno.EPROTO


class _Kernel:
    """Datagrams as if the kernel (port 0) sent them: a socket can never receive one from port 0
    of another process, so the error paths are driven with this stand-in for recvfrom_into."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self.datagrams = datagrams

    def settimeout(self, _: float) -> None:
        pass

    def setblocking(self, _: bool) -> None:
        pass

    def recvfrom_into(self, buf: bytearray) -> tuple[int, tuple[int, int]]:
        if not self.datagrams:
            raise TimeoutError("timed out")
        data = self.datagrams.pop(0)
        buf[: len(data)] = data
        return len(data), (0, 0)


def test_a_short_error_message_is_an_oserror_not_a_struct_error() -> None:
    short = _msg(nl.NLMSG_ERROR, 5, b"\0\0")
    with pytest.raises(OSError) as exc:
        nl.receive(_Kernel([short]), 5, False, time.monotonic() + 1)  # type: ignore[arg-type]
    assert exc.value.errno == errno.EPROTO


def test_a_table_reply_of_the_kernel_is_read_and_another_seq_skipped() -> None:
    replies = [_table_reply(4, 0) + _table_reply(5, nl.DORMANT)]
    (m,) = nl.receive(_Kernel(replies), 5, False, time.monotonic() + 1)  # type: ignore[arg-type]
    assert nl._parse(m.raw).flags == nl.DORMANT


def test_a_dump_the_kernel_ended_with_an_error_is_an_oserror_not_a_short_table() -> None:
    """NLMSG_DONE carries the dump's error code: a dump the kernel stopped short (ENOBUFS,
    EMSGSIZE) used to be taken for the whole table, the rules it had not sent yet unseen."""
    done = _msg(nl.NLMSG_DONE, 5, struct.pack("=i", -errno.EMSGSIZE), netlink.NLM_F_MULTI)
    with pytest.raises(OSError) as exc:
        nl.receive(_Kernel([_table_reply(5, 0) + done]), 5, True, time.monotonic() + 1)  # type: ignore[arg-type]
    assert exc.value.errno == errno.EMSGSIZE
    whole = _msg(nl.NLMSG_DONE, 5, struct.pack("=i", 0), netlink.NLM_F_MULTI)
    assert len(nl.receive(_Kernel([_table_reply(5, 0), whole]), 5, True, time.monotonic() + 1)) == 1  # type: ignore[arg-type]


def test_a_dump_whose_end_alone_says_interrupted_is_asked_again() -> None:
    """The kernel may flag NLM_F_DUMP_INTR on the NLMSG_DONE only (the ruleset changed after its
    last part): that dump is interrupted too, not whole."""
    done = _msg(nl.NLMSG_DONE, 5, struct.pack("=i", 0), netlink.NLM_F_MULTI | nl.NLM_F_DUMP_INTR)
    with pytest.raises(InterruptedError):
        nl.receive(_Kernel([_table_reply(5, 0) + done]), 5, True, time.monotonic() + 1)  # type: ignore[arg-type]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two real netlink sockets: the agent's reader and another local process's."""
    reader = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_NETFILTER)
    other = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_NETFILTER)
    reader.bind((0, 0))
    other.bind((0, 0))
    try:
        yield reader, other
    finally:
        reader.close()
        other.close()


def test_a_reply_forged_by_another_process_is_dropped(pair: tuple[socket.socket, socket.socket]) -> None:
    """A process that sends to the reader's port a "no flags" answer with the right sequence
    number is not the kernel: the reader drops it (and, nothing else coming, gives up at its
    deadline) instead of taking a dormant table for an active one."""
    reader, other = pair
    other.sendto(_table_reply(9, 0), (reader.getsockname()[0], 0))
    started = time.monotonic()
    with pytest.raises(OSError) as exc:
        nl.receive(reader, 9, False, started + 0.5)
    assert exc.value.errno == errno.ETIMEDOUT and time.monotonic() - started < 2


def test_a_stream_of_other_messages_cannot_keep_the_reader_past_its_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, other = pair
    other.settimeout(0.05)  # once the reader stops reading its buffer fills: never block on it
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            try:
                other.sendto(_msg(nl.NLMSG_DONE, 1234, b""), (reader.getsockname()[0], 0))
            except OSError:
                time.sleep(0.01)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(OSError) as exc:
            nl.receive(reader, 77, False, started + 0.5)
    finally:
        stop.set()
        thread.join()
    assert exc.value.errno == errno.ETIMEDOUT and time.monotonic() - started < 2


def test_each_request_takes_a_random_sequence_number(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def record(sock: socket.socket, seq: int, dump: bool, deadline: float) -> list[nl.Message]:
        seen.append(seq)
        return []

    monkeypatch.setattr(nl, "receive", record)
    for _ in range(4):
        nl.rules("inet", "ringfence")
    assert len(set(seen)) == 4 and 1 not in seen


READ = """
import json, sys
from ringfence_agent import netlink
from ringfence_agent.backends import nftables_netlink as nl
info = nl.table_info("inet", "ringfence")
chains = [nl.text(c.attrs[nl.NFTA_CHAIN_NAME]).decode() for c in nl.chains("inet", "ringfence")]
rules = [nl.text(r.attrs[nl.NFTA_RULE_CHAIN]).decode() for r in nl.rules("inet", "ringfence")]
sets = sorted(nl.text(s.attrs[nl.NFTA_SET_NAME]).decode() for s in nl.sets("inet", "ringfence"))
elements, _ = nl.set_elements("inet", "ringfence", b"fs_admin_4")
print(json.dumps({
    "flags": info.flags, "chains": chains, "rules": rules, "sets": sets, "elements": len(elements),
    "absent": [nl.table_info("inet", "nothing"), nl.rules("inet", "nothing"), nl.sets("inet", "nothing")],
    "counters": nl.counters("inet", "ringfence"), "no_counters": nl.counters("inet", "nothing"),
}))
"""

TABLE = """table inet foreign {
  counter r_a { packets 3 bytes 300 }
}
table inet ringfence {
  counter r_a { packets 7 bytes 700 }
  set fs_admin_4 { type ipv4_addr; flags interval; elements = { 10.0.0.0/24, 10.1.1.1 } }
  chain input {
    type filter hook input priority filter; policy accept;
    iif "lo" accept
    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept
    ip saddr @fs_admin_4 accept
  }
  chain output {
    type filter hook output priority filter; policy accept;
    counter accept
  }
}
"""


def test_the_reader_reads_a_real_kernel(tmp_path: Path) -> None:
    """In a namespace: a dormant table's flag, its chains and rules in order, its sets (the
    anonymous one too) and a set's elements; nothing of another table whose chain name is not
    UTF-8; its named counters' packets, not another table's; a table that does not exist is None
    and its dumps are empty."""
    from ringfence.local.lab import Lab as NetLab
    from tests.agent import dataplane

    dataplane.require()
    lab = NetLab({"n1": 1})
    try:
        (tmp_path / "t.nft").write_text(TABLE)
        lab.exec("n1", "nft", "-f", str(tmp_path / "t.nft"), check=True)
        lab.exec("n1", "nft", "add", "table", "inet", "ringfence", "{ flags dormant; }", check=True)
        nfraw = str(Path(__file__).with_name("nfraw.py"))
        lab.exec("n1", sys.executable, nfraw, "badname-chain", "other", check=True)
        proc = lab.exec("n1", sys.executable, "-c", READ, check=True)
    finally:
        lab.close()
    out = json.loads(proc.stdout)
    assert out["flags"] == nl.DORMANT
    assert out["chains"] == ["input", "output"]
    assert out["rules"] == ["input", "input", "input", "output"]
    assert out["sets"] == ["__set0", "fs_admin_4"]
    assert out["elements"] >= 2
    assert out["absent"] == [None, [], []]
    # named counters over netlink, this table's only (another table's of the same name is not read)
    assert out["counters"] == {"r_a": 7} and out["no_counters"] == {}
