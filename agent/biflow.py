"""RFC 5103 biflows: both directions of a connection, seen on one interface, in one record.

A record and its reverse carry the same interface, opposite directions and
swapped addresses and ports (for ICMP and ICMPv6, echo request and reply). Between
two metered pods of one node each direction is counted once, at its sender's veth
ingress (dedup): there the reverse is the ingress record of the other interface,
paired when both are due in one batch. The
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
from agent.records import FLOW_DTYPE, INGRESS, take

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


_IFINDEX = np.array([0xFFFFFFFF, 0, 0, 0, 0, 0], np.uint64)  # the key's first word, low half


def _match(words: np.ndarray, query: np.ndarray) -> np.ndarray:
    """For each query key (n x 6 words), the index of the equal key in words, or -1."""
    h = key_hash(words)
    order = np.argsort(h)
    sorted_h = h[order]
    qh = key_hash(query)
    pos = np.minimum(np.searchsorted(sorted_h, qh), len(words) - 1)
    found = order[pos]
    return np.where((sorted_h[pos] == qh) & (words[found] == query).all(axis=1), found, -1)


def pair(flows: np.ndarray) -> np.ndarray:
    """FLOW_DTYPE records to BIFLOW_DTYPE records, partners joined."""
    n = len(flows)
    out = np.zeros(n, BIFLOW_DTYPE)
    if not n:
        return out
    words = key_words(flows)
    rev = reversed_keys(flows)
    partner = _match(words, np.ascontiguousarray(rev).view("<u8").reshape(-1, 6))
    # A pod-to-pod connection of one node, deduplicated: each direction at its sender's
    # ingress, on two interfaces. Matched on the key without the interface.
    ingress = flows["key"]["direction"] == INGRESS
    if ((partner < 0) & ingress).any():
        rev["direction"] = INGRESS
        rwords = np.ascontiguousarray(rev).view("<u8").reshape(-1, 6) & ~_IFINDEX
        loose = np.where(ingress[:, None], words & ~_IFINDEX, ~np.uint64(0))
        crossed = _match(loose, rwords)
        ifindex = flows["key"]["ifindex"]
        crossed = np.where((crossed >= 0) & (ifindex[np.maximum(crossed, 0)] != ifindex),
                           crossed, -1)
        partner = np.where((partner < 0) & ingress, crossed, partner)
    found = partner >= 0
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
