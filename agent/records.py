"""The flow record: the one batch format every stage hands to the next.

bpf/ and vpp_plugin/ produce arrays of FLOW_DTYPE, the flow table keeps and
emits them, the IPFIX encoder writes them. The first 48 bytes are the flow key
and match `struct flow_key` in bpf/flow.bpf.c byte for byte, so a drained key
buffer is copied in one assignment and hashed as six 64-bit words.
"""

from __future__ import annotations

import numpy as np

KEY_DTYPE = np.dtype(
    [
        ("ifindex", "<u4"),
        ("direction", "u1"),  # 0: ingress of the interface, 1: egress
        ("ip_version", "u1"),
        ("proto", "u1"),
        ("overflow", "u1"),  # 1: an interface's total of packets the map had no room for
        ("src", "u1", (16,)),  # IPv4 in the first 4 octets
        ("dst", "u1", (16,)),
        ("sport", "<u2"),
        ("dport", "<u2"),  # ICMP: type << 8 | code
        ("pad1", "<u4"),
    ]
)
assert KEY_DTYPE.itemsize == 48

FLOW_DTYPE = np.dtype(
    [
        ("key", KEY_DTYPE),
        ("packets", "<u8"),
        ("octets", "<u8"),
        ("first_ms", "<u8"),  # wall clock, ms since the epoch
        ("last_ms", "<u8"),
        ("tcp_flags", "<u2"),
        ("min_ttl", "u1"),
        ("max_ttl", "u1"),
        ("tos", "u1"),
        ("end_reason", "u1"),  # IPFIX flowEndReason, set by the flow table
        ("pad", "u1", (2,)),
    ]
)

# flowEndReason values (IANA)
IDLE_TIMEOUT = 1
ACTIVE_TIMEOUT = 2
END_OF_FLOW = 3
FORCED_END = 4
LACK_OF_RESOURCES = 5

TCP_FIN = 0x01
TCP_RST = 0x04

INGRESS = 0
EGRESS = 1


def take(flows: np.ndarray, index: np.ndarray) -> np.ndarray:
    """flows[index] (integer or boolean), copied as opaque rows: numpy's
    field-by-field path for nested structured dtypes is several times slower."""
    dtype = flows.dtype
    return flows.view(np.dtype((np.void, dtype.itemsize)))[index].view(dtype)
