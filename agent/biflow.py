"""RFC 5103 biflows: both directions of a connection, seen on one interface, in one record.

A record and its reverse carry the same interface, opposite directions and
swapped addresses and ports (for ICMP and ICMPv6, echo request and reply). The
pairing is done on each batch the flow table hands over, and the flow table
reports a flow's partner together with it (FlowTable.partners); a direction
with no partner leaves as a biflow of its own with zero reverse counters and
biflowDirection 0 (arbitrary). In a pair, the direction
whose first packet came first is the initiator: it becomes the source, and
biflowDirection is 1.
"""

from __future__ import annotations

import numpy as np

from agent.flowtable import key_hash, key_words
from agent.records import FLOW_DTYPE, take

BIFLOW_DTYPE = np.dtype(FLOW_DTYPE.descr + [
    ("rev_packets", "<u8"),
    ("rev_octets", "<u8"),
    ("rev_tcp_flags", "<u2"),
    ("rev_tos", "u1"),
    ("biflow_direction", "u1"),
])

ICMP_REPLIES = {1: (0x0000, 0x0800), 58: (129 << 8, 128 << 8)}  # reply -> request type/code


def reversed_keys(flows: np.ndarray) -> np.ndarray:
    """Each record's key as its partner would carry it."""
    rev = np.ascontiguousarray(flows["key"]).copy()
    k = flows["key"]
    rev["src"], rev["dst"] = k["dst"], k["src"]
    rev["sport"], rev["dport"] = k["dport"], k["sport"]
    rev["direction"] = 1 - k["direction"]
    for proto, (reply, request) in ICMP_REPLIES.items():
        icmp = k["proto"] == proto  # no ports: (0, type << 8 | code), the type is mapped
        rev["sport"][icmp] = 0
        rev["dport"][icmp] = k["dport"][icmp]
        rev["dport"][icmp & (k["dport"] == reply)] = request
        rev["dport"][icmp & (k["dport"] == request)] = reply
    return rev


def pair(flows: np.ndarray) -> np.ndarray:
    """FLOW_DTYPE records to BIFLOW_DTYPE records, partners joined."""
    n = len(flows)
    out = np.zeros(n, BIFLOW_DTYPE)
    if not n:
        return out
    words = key_words(flows)
    h = key_hash(words)
    order = np.argsort(h)
    sorted_h = h[order]
    rwords = np.ascontiguousarray(reversed_keys(flows)).view("<u8").reshape(-1, 6)
    rh = key_hash(rwords)
    pos = np.minimum(np.searchsorted(sorted_h, rh), n - 1)
    partner = order[pos]
    found = (sorted_h[pos] == rh) & (words[partner] == rwords).all(axis=1)
    partner = np.where(found, partner, -1)
    idx = np.arange(n)
    # keep each pair once, from its initiator's side: the earlier first packet; in the
    # same millisecond (the clock is coarse), the ICMP request or the higher (client) port
    first = flows["first_ms"]
    p = np.maximum(partner, 0)
    other_first = np.where(found, first[p], first)
    k = flows["key"]
    proto, sport, dport = k["proto"], k["sport"].astype(np.int64), k["dport"].astype(np.int64)
    request = np.zeros(n, bool)
    for icmp, (_, req) in ICMP_REPLIES.items():
        request |= (proto == icmp) & (k["dport"] == req)
    client = np.where(request | request[p], request, sport > dport)
    tie = first == other_first
    tie_win = np.where(client != client[p], client, idx < partner)
    leads = ~found | (first < other_first) | (tie & tie_win)
    keep = np.flatnonzero(leads)
    fwd = take(flows, keep)
    for name in FLOW_DTYPE.names:
        out[name][: len(keep)] = fwd[name]
    paired = found[keep]
    rev = take(flows, np.maximum(partner[keep], 0))
    out["rev_packets"][: len(keep)] = np.where(paired, rev["packets"], 0)
    out["rev_octets"][: len(keep)] = np.where(paired, rev["octets"], 0)
    out["rev_tcp_flags"][: len(keep)] = np.where(paired, rev["tcp_flags"], 0)
    out["rev_tos"][: len(keep)] = np.where(paired, rev["tos"], 0)
    out["biflow_direction"][: len(keep)] = paired.astype(np.uint8)
    out["last_ms"][: len(keep)] = np.where(paired, np.maximum(fwd["last_ms"], rev["last_ms"]),
                                           fwd["last_ms"])
    return out[: len(keep)]
