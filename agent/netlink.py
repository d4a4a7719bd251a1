"""Netlink: raw dumps parsed with struct, and keeping the agent's one pyroute2
socket from growing.

Raw dumps (the peers of veths and their namespaces' addresses, agent/peerns.py; the
node's conntrack, agent/services.py) are read here with struct where pyroute2 costs
too much: 230 us a conntrack entry, and native memory leaked decoding links.

pyroute2 (0.9) files a reply it did not wait for in the socket's queue of
unsolicited messages: the kernel's ACK that follows a route lookup's answer,
and the like after tc requests. On a socket bound to no multicast group nobody
reads that queue, so it grows by about 0.4 KB a route lookup and 1 KB an
attach and detach, forever (bench/k8s.py churn: 19 MB in 30 minutes).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
from collections.abc import Iterator

log = logging.getLogger(__name__)

HDR = struct.Struct("=IHHII")  # nlmsghdr
NLA = struct.Struct("=HH")  # nlattr
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12


def route_socket(strict: bool = False) -> socket.socket:
    """A raw NETLINK_ROUTE socket for dump(); strict: with the kernel's strict checking,
    which a dump's target-namespace attribute (IFA_/IFLA_TARGET_NETNSID) needs."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    if strict:
        sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
    sock.bind((0, 0))
    return sock


def dump(sock: socket.socket, kind: int, body: bytes, what: str
         ) -> Iterator[tuple[int, bytes, int, int]]:
    """One dump request; (message type, buffer, start, end) of every reply message
    until the dump is done. An error reply raises OSError naming `what`."""
    sock.send(HDR.pack(HDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
    while True:
        buf = sock.recv(1 << 20)
        off = 0
        while off + HDR.size <= len(buf):
            length, mtype = HDR.unpack_from(buf, off)[:2]
            if length < HDR.size or mtype == NLMSG_DONE:
                return
            if mtype == NLMSG_ERROR:
                err = -struct.unpack_from("=i", buf, off + HDR.size)[0]
                if err:
                    raise OSError(err, f"{what}: {os.strerror(err)}")
                return
            yield mtype, buf, off, off + length
            off += (length + 3) & ~3


def attrs(buf: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Netlink attributes between start and end: type -> (payload start, end)."""
    out = {}
    while start + 4 <= end:
        length, kind = NLA.unpack_from(buf, start)
        if length < 4:
            break
        out[kind & 0x3FFF] = (start + 4, start + length)
        start += (length + 3) & ~3
    return out


def stray_queue(ipr):
    """pyroute2's queue of unsolicited messages for this socket, or None."""
    queue = getattr(getattr(getattr(ipr, "asyncore", None), "msg_queue", None), "root", None)
    return queue if hasattr(queue, "get_nowait") else None


def drop_strays(ipr) -> int:
    """Empty it (the agent subscribes to no group: all of it is stray); returns
    how many messages went."""
    queue = stray_queue(ipr)
    if queue is None:
        return 0
    n = 0
    while not queue.empty():
        queue.get_nowait()
        queue.task_done()
        n += 1
    return n


def check(ipr) -> None:
    """Say once, at start, if this pyroute2 hides the queue: memory may then grow."""
    if stray_queue(ipr) is None:
        log.warning("pyroute2's message queue not found: stray netlink replies are not "
                    "dropped and memory may grow with pod churn")


_seq = itertools.count(2)  # dumps use 1


def request(sock: socket.socket, kind: int, body: bytes, what: str) -> tuple[int, bytes]:
    """One request that is answered by one message (no dump): (its type, its payload).
    A reply to anything else (what a dump cut short left on the socket) is skipped by
    its sequence number: never taken for this one's. An error reply raises OSError
    naming `what`."""
    seq = next(_seq) & 0xFFFFFFFF
    sock.send(HDR.pack(HDR.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body)
    while True:
        buf = sock.recv(1 << 20)
        off = 0
        while off + HDR.size <= len(buf):
            length, mtype, _, got, _ = HDR.unpack_from(buf, off)
            if length < HDR.size:
                break
            if got == seq:
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", buf, off + HDR.size)[0]
                    raise OSError(err, f"{what}: {os.strerror(err)}")
                return mtype, buf[off + HDR.size:off + length]
            off += (length + 3) & ~3
