"""Flow templates and the mapping from FLOW_DTYPE records to IPFIX columns."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from agent.ipfix.message import Strings, Template
from agent.records import INGRESS

ICMP, ICMPV6 = 1, 58

COMMON = [
    "protocolIdentifier",
    "tcpControlBits",
    "ipClassOfService",
    "minimumTTL",
    "maximumTTL",
    "octetDeltaCount",
    "packetDeltaCount",
    "flowStartMilliseconds",
    "flowEndMilliseconds",
    "flowEndReason",
    "ingressInterface",
    "egressInterface",
    "flowDirection",
]
V4 = [
    "sourceIPv4Address",
    "destinationIPv4Address",
    "sourceTransportPort",
    "destinationTransportPort",
    "icmpTypeCodeIPv4",
]
V6 = [
    "sourceIPv6Address",
    "destinationIPv6Address",
    "sourceTransportPort",
    "destinationTransportPort",
    "icmpTypeCodeIPv6",
]
STRINGS = ["interfaceName"]

TEMPLATE_V4 = Template.of(256, V4 + COMMON + STRINGS)
TEMPLATE_V6 = Template.of(257, V6 + COMMON + STRINGS)
TEMPLATES = {4: TEMPLATE_V4, 6: TEMPLATE_V6}


def lookup_strings(ifindex: np.ndarray, table: Mapping[int, str]) -> Strings:
    """Per-record string by interface index ("" where unknown), without a Python loop per record."""
    keys = np.array(sorted(table), np.int64)
    values = [table[k] for k in keys.tolist()] + [""]
    if not len(keys):
        return Strings(values, np.zeros(len(ifindex), np.int64))
    pos = np.minimum(np.searchsorted(keys, ifindex), len(keys) - 1)
    idx = np.where(keys[pos] == ifindex, pos, len(keys))
    return Strings(values, idx)


def columns(flows: np.ndarray, ifnames: Mapping[int, str]) -> dict[str, np.ndarray | Strings]:
    k = flows["key"]
    proto = k["proto"]
    icmp = (proto == ICMP) | (proto == ICMPV6)
    ifindex = k["ifindex"]
    ingress = k["direction"] == INGRESS
    zero16 = np.zeros(len(flows), np.uint16)
    return {
        "sourceIPv4Address": k["src"][:, :4],
        "destinationIPv4Address": k["dst"][:, :4],
        "sourceIPv6Address": k["src"],
        "destinationIPv6Address": k["dst"],
        "sourceTransportPort": np.where(icmp, zero16, k["sport"]),
        "destinationTransportPort": np.where(icmp, zero16, k["dport"]),
        "icmpTypeCodeIPv4": np.where(proto == ICMP, k["dport"], zero16),
        "icmpTypeCodeIPv6": np.where(proto == ICMPV6, k["dport"], zero16),
        "protocolIdentifier": proto,
        "tcpControlBits": flows["tcp_flags"],
        "ipClassOfService": flows["tos"],
        "minimumTTL": flows["min_ttl"],
        "maximumTTL": flows["max_ttl"],
        "octetDeltaCount": flows["octets"],
        "packetDeltaCount": flows["packets"],
        "flowStartMilliseconds": flows["first_ms"],
        "flowEndMilliseconds": flows["last_ms"],
        "flowEndReason": flows["end_reason"],
        "ingressInterface": np.where(ingress, ifindex, 0),
        "egressInterface": np.where(ingress, 0, ifindex),
        "flowDirection": k["direction"],
        "interfaceName": lookup_strings(ifindex, ifnames),
    }
