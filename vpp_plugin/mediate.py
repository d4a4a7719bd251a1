"""Mediation: VPP's flowprobe IPFIX in, flow batches (FLOW_DTYPE) out.

A UDP listener where VPP's exporter points, the collector's decoder (templates per
exporter and observation domain, data held until its template arrives, malformed
input counted), and one vectorised conversion per data set. VPP's quirks: the
timestamp's low word is nanoseconds, not a binary fraction; the sequence number
counts packets, not records (so gaps are not counted as loss here); up to 22.02
there is no flowDirection, and flowprobe meters transmit only.

What a flowprobe record covers (src/plugins/flowprobe/node.c, every release read:
add_to_flow_record_state, flowprobe_export_entry, flowprobe_walker_process): its
counters are the delta since VPP's previous report of the flow, its flowEnd the
flow's last packet, but its flowStart the packet that created VPP's entry, for as
long as the entry lives (only packetcount, octetcount and last_exported are reset
at an export). So the mediation remembers where each flow's previous report ended
and starts the next one there (Continuity): the records then tile time as the
README says, and the flow table's active timeout counts from the previous record.
"""

from __future__ import annotations

import logging
import socket
import time

import numpy as np

from agent.flowtable import FlowTable, key_hash, key_words, report_order
from agent.ipfix.decoder import NTP_EPOCH_OFFSET, Decoder, RecordSet
from agent.records import EGRESS, FLOW_DTYPE, take

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


class Continuity:
    """Where each flow's previous VPP report ended, so that the next one starts there.

    A small FlowTable holds one row per key whose last_ms is that end: bounded
    (the oldest ends go first when full) and forgotten once VPP's entry is certainly
    gone (forget_after_s: its active and passive timers and its 5 s flush have passed;
    a new entry starts after the old one's end anyway, so forgetting late is harmless).
    Vectorised: one sort and one lookup per batch."""

    def __init__(self, forget_after_s: float = 600.0, max_flows: int = 1 << 20) -> None:
        self.max_flows = max_flows
        self._next_expire = 0
        self.ends = FlowTable(active_timeout_s=1e9, idle_timeout_s=forget_after_s,
                              max_flows=max_flows)

    def __len__(self) -> int:
        return len(self.ends)

    def apply(self, batch: np.ndarray, now_ms: int) -> np.ndarray:
        """The batch with each report's first_ms no earlier than the end of the flow's
        previous report (in this batch or remembered), and no later than its own end;
        ordered by key hash, key, then end: the order FlowTable.update(reports=True)
        folds in, so it sorts nothing again (nor after a boolean mask)."""
        if now_ms >= self._next_expire:  # forget what VPP certainly forgot (once a second)
            self.ends.expire(now_ms)
            self._next_expire = now_ms + 1000
        n = len(batch)
        if not n:
            return batch
        words = key_words(batch)
        h = key_hash(words)
        order = report_order(h, words, batch["last_ms"])
        b = take(batch, order)
        w = key_words(b)  # a contiguous copy costs less than gathering words[order]
        first_of_key = np.ones(n, bool)
        first_of_key[1:] = (w[1:] != w[:-1]).any(axis=1)
        previous = np.zeros(n, np.uint64)
        previous[1:] = b["last_ms"][:-1]  # the same key's report before, in this batch
        known = ~first_of_key
        heads = np.flatnonzero(first_of_key)
        slots = self.ends.find(h[order][heads], w[heads])
        remembered = slots >= 0
        previous[heads[remembered]] = self.ends.flows["last_ms"][slots[remembered]]
        known[heads[remembered]] = True
        start = np.minimum(np.maximum(b["first_ms"], previous), b["last_ms"])
        b["first_ms"] = np.where(known, start, b["first_ms"])
        last_of_key = np.append(heads[1:] - 1, n - 1)
        # flows already remembered: their end moves on in place (no fold, no new index)
        known_slots = slots[remembered]
        mem = self.ends.flows["last_ms"]
        mem[known_slots] = np.maximum(mem[known_slots], b["last_ms"][last_of_key[remembered]])
        ends = take(b, last_of_key[~remembered])  # new flows: added to the memory
        if not len(ends):
            return b
        for name in ("packets", "octets", "tcp_flags"):
            ends[name] = 0
        if len(ends) > self.max_flows:  # the table makes room for a batch, not beyond it
            ends = take(ends, np.argpartition(ends["last_ms"], -self.max_flows)[
                -self.max_flows:])
        self.ends.update(ends, unique=True)
        return b


FLOWPROBE_PORT = 4739  # flowprobe's UDP source port, in every release


class Mediator:
    def __init__(self, address: str, port: int, source: str = "", rcvbuf: int = 8 << 20,
                 forget_after_s: float = 600.0, max_flows: int = 1 << 20) -> None:
        """source: the address the agent configured as VPP's IPFIX source; datagrams from
        anywhere else (or from another port than flowprobe's) are counted and dropped,
        never labelled with pod names. Empty: every sender is taken (benchmarks).
        forget_after_s, max_flows: how long and how many flows' last report ends are
        remembered (Continuity)."""
        self.address, self.port, self.source = address, port, source
        self.continuity = Continuity(forget_after_s, max_flows)
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
            if rs.array is None or rs.spec.scope_count or rs.spec.length_octets:
                # options, and records with strings (flowprobe sends none): not flows
                self.unusable += len(rs)
                continue
            by_layout.setdefault(rs.array.dtype, []).append(rs.array.tobytes())
        batches = [to_flows(np.frombuffer(b"".join(parts), dtype))
                   for dtype, parts in by_layout.items()]
        batch = (np.concatenate(batches) if len(batches) > 1 else batches[0]) if batches else (
            np.zeros(0, FLOW_DTYPE))
        return self.continuity.apply(batch, int(time.time() * 1000))

    def close(self) -> None:
        self.sock.close()
