"""Mediation: VPP's flowprobe IPFIX in, flow batches (FLOW_DTYPE) out.

A UDP listener where VPP's exporter points, the collector's decoder (templates per
exporter and observation domain, data held until its template arrives, malformed
input counted), and one vectorised conversion per data set. VPP's quirks: the
timestamp's low word is nanoseconds, not a binary fraction; the sequence number
counts packets, not records (so gaps are not counted as loss here); up to 22.02
there is no flowDirection, and flowprobe meters transmit only.
"""

from __future__ import annotations

import logging
import socket

import numpy as np

from agent.ipfix.decoder import NTP_EPOCH_OFFSET, Decoder, RecordSet
from agent.records import EGRESS, FLOW_DTYPE

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535


def to_flows(a: np.ndarray) -> np.ndarray:
    """One decoded flowprobe data set as flow records (fields by IANA name)."""
    names = set(a.dtype.names or ())
    n = len(a)
    out = np.zeros(n, FLOW_DTYPE)
    k = out["key"]
    if "flowDirection" in names:
        k["direction"] = a["flowDirection"]
    else:
        k["direction"] = EGRESS
    if "ingressInterface" in names and "egressInterface" in names:
        k["ifindex"] = np.where(k["direction"] == EGRESS, a["egressInterface"],
                                a["ingressInterface"])
    if "sourceIPv4Address" in names:
        k["ip_version"] = 4
        k["src"][:, :4] = a["sourceIPv4Address"].astype(">u4").view(np.uint8).reshape(n, 4)
        k["dst"][:, :4] = a["destinationIPv4Address"].astype(">u4").view(np.uint8).reshape(n, 4)
    elif "sourceIPv6Address" in names:
        k["ip_version"] = 6
        k["src"] = a["sourceIPv6Address"]
        k["dst"] = a["destinationIPv6Address"]
    for src, dst in (("protocolIdentifier", ("key", "proto")),
                     ("sourceTransportPort", ("key", "sport")),
                     ("destinationTransportPort", ("key", "dport")),
                     ("packetDeltaCount", ("packets",)), ("octetDeltaCount", ("octets",)),
                     ("tcpControlBits", ("tcp_flags",))):
        if src in names:
            target = out[dst[0]] if len(dst) == 1 else out[dst[0]][dst[1]]
            target[...] = a[src]
    for src, dst in (("flowStartNanoseconds", "first_ms"), ("flowEndNanoseconds", "last_ms")):
        if src in names:
            t = a[src].astype(np.uint64)
            seconds = (t >> np.uint64(32)) - np.uint64(NTP_EPOCH_OFFSET)
            out[dst] = seconds * np.uint64(1000) + (t & np.uint64(0xFFFFFFFF)) // np.uint64(
                1_000_000)
    return out


FLOWPROBE_PORT = 4739  # flowprobe's UDP source port, in every release


class Mediator:
    def __init__(self, address: str, port: int, source: str = "", rcvbuf: int = 8 << 20) -> None:
        """source: the address the agent configured as VPP's IPFIX source; datagrams from
        anywhere else (or from another port than flowprobe's) are counted and dropped,
        never labelled with pod names. Empty: every sender is taken (benchmarks)."""
        self.address, self.port, self.source = address, port, source
        self.foreign = 0  # datagrams dropped: not from VPP
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            self.sock.bind((address, port))
        except OSError as e:
            self.sock.close()
            raise OSError(e.errno, f"cannot listen for VPP's IPFIX on {address}:{port}: "
                                   f"{e.strerror}") from None
        self.sock.setblocking(False)
        self.decoder = Decoder()
        self.buf = bytearray(MAX_DATAGRAM)
        self.unusable = 0  # records of sets that are not flowprobe's fixed layout

    def drain(self, max_messages: int = 1 << 20) -> np.ndarray:
        """Every datagram waiting now, decoded into one batch."""
        sets: list[RecordSet] = []
        view = memoryview(self.buf)
        for _ in range(max_messages):
            try:
                n, peer = self.sock.recvfrom_into(self.buf)
            except BlockingIOError:
                break
            if self.source and (peer[0] != self.source or peer[1] != FLOWPROBE_PORT):
                self.foreign += 1
                continue
            sets += self.decoder.message(bytes(view[:n]), f"{peer[0]}:{peer[1]}")
        by_layout: dict[np.dtype, list[bytes]] = {}  # sets of one template: one conversion
        for rs in sets:
            if rs.array is None or rs.spec.scope_count:
                self.unusable += len(rs)
                continue
            by_layout.setdefault(rs.array.dtype, []).append(rs.array.tobytes())
        batches = [to_flows(np.frombuffer(b"".join(parts), dtype))
                   for dtype, parts in by_layout.items()]
        if not batches:
            return np.zeros(0, FLOW_DTYPE)
        return np.concatenate(batches) if len(batches) > 1 else batches[0]

    def close(self) -> None:
        self.sock.close()
