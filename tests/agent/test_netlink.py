"""The agent's one walker of netlink replies (agent/ringfence_agent/netlink.py), shared by the
session cut (conntrack deletions, socket lookups and aborts) and the nf_tables reads: lengths
checked, NLMSG_ERROR's and NLMSG_DONE's codes read, the kernel's datagrams only, one deadline.
The requests themselves meet the real kernel in test_agent_sessions.py and
test_nftables_netlink.py."""

from __future__ import annotations

import errno
import socket
import struct
import time

import pytest

from ringfence_agent import netlink

NETLINK_SOCK_DIAG = 4


def _msg(kind: int, seq: int, payload: bytes, flags: int = 0) -> bytes:
    return netlink.HEADER.pack(netlink.HEADER.size + len(payload), kind, flags, seq, 0) + payload


def test_a_done_message_carrying_an_error_is_read_as_that_error() -> None:
    data = (
        _msg(20, 7, b"answer")  # 22 bytes: the next message starts at the 4-byte boundary
        + b"\0\0"
        + _msg(netlink.NLMSG_DONE, 7, struct.pack("=i", -errno.ENOBUFS), netlink.NLM_F_MULTI)
        + _msg(netlink.NLMSG_DONE, 8, struct.pack("=i", 0), netlink.NLM_F_MULTI)
        + _msg(netlink.NLMSG_ERROR, 9, struct.pack("=i", -errno.ENOENT) + bytes(16))
    )
    answer, failed, whole, error = netlink.messages(data)
    assert (answer.kind, answer.seq, answer.payload, answer.error, answer.final) == (20, 7, b"answer", 0, False)
    assert (failed.kind, failed.error, failed.final) == (netlink.NLMSG_DONE, errno.ENOBUFS, True)
    assert (whole.seq, whole.error) == (8, 0)
    assert (error.kind, error.seq, error.error) == (netlink.NLMSG_ERROR, 9, errno.ENOENT)


@pytest.mark.parametrize(
    "data",
    [
        _msg(netlink.NLMSG_DONE, 1, b"\0\0"),  # too short for its code
        _msg(netlink.NLMSG_ERROR, 1, b""),
        _msg(20, 1, b"abcd")[:-1],  # runs past the datagram
        _msg(20, 1, b"abcd") + b"\x10\0\0",  # a header cut short after a whole message
        struct.pack("=IHHII", 8, 20, 0, 1, 0),  # a length shorter than its header
    ],
)
def test_a_malformed_datagram_is_an_oserror(data: bytes) -> None:
    with pytest.raises(OSError) as exc:
        netlink.messages(data)
    assert exc.value.errno == errno.EPROTO


def test_an_answer_forged_by_another_process_is_not_taken() -> None:
    """Any local process may send to the agent's netlink port: an "answer" to a pending socket
    lookup it sends (a cookie of its choosing) is dropped unread. (The kernel's own answers are
    taken in the namespaced cuts of test_agent_sessions.py.)"""
    with (
        netlink.open_socket(NETLINK_SOCK_DIAG) as reader,
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as other,
    ):
        other.bind((0, 0))
        seq = netlink.first_seq()
        other.sendto(_msg(20, seq, bytes(72)), (reader.getsockname()[0], 0))
        started = time.monotonic()
        with pytest.raises(OSError) as exc:
            list(netlink.answers(reader, {seq}, started + 0.3))
        assert exc.value.errno == errno.ETIMEDOUT and time.monotonic() - started < 2
