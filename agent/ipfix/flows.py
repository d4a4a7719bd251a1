"""Flow templates and the mapping from FLOW_DTYPE records to IPFIX columns."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from agent.ipfix.message import Strings, Template
from agent.ipfix.registry import Element, element, workload_elements
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
POD_STRINGS = [  # Antrea's enterprise elements (PEN 56506)
    "sourcePodNamespace",
    "sourcePodName",
    "destinationPodNamespace",
    "destinationPodName",
    "sourceNodeName",
    "destinationNodeName",
]

TEMPLATE_V4 = Template.of(256, V4 + COMMON + STRINGS)
TEMPLATE_V6 = Template.of(257, V6 + COMMON + STRINGS)
TEMPLATES = {4: TEMPLATE_V4, 6: TEMPLATE_V6}
# Antrea's flowType (56506/137) beside the pod names: whether the other end is a pod of
# this node (1), of another node (2), or outside the cluster (3 to, 4 from).
# Fixed-length before the strings, as templates order them.
FLOW_TYPE = ["flowType"]
# Antrea's Service elements (56506/106 to 109, 168, 169): the Service port a flow went
# to, or for a reply came from, its ClusterIP, and the address the client used (the
# ClusterIP, an external or load balancer IP, or this node's for a NodePort); empty and
# zero for other flows
SERVICE = {4: ["destinationServicePort", "destinationClusterIPv4", "destinationServiceIPv4"],
           6: ["destinationServicePort", "destinationClusterIPv6", "destinationServiceIPv6"]}
SERVICE_STRINGS = ["destinationServicePortName"]
POD_FIELDS = (POD_STRINGS + FLOW_TYPE + SERVICE_STRINGS  # announced with RFC 5610 records
              + ["destinationServicePort", "destinationClusterIPv4", "destinationClusterIPv6",
                 "destinationServiceIPv4", "destinationServiceIPv6"])
TEMPLATE_V4_PODS = Template.of(
    258, V4 + COMMON + FLOW_TYPE + SERVICE[4] + STRINGS + POD_STRINGS + SERVICE_STRINGS)
TEMPLATE_V6_PODS = Template.of(
    259, V6 + COMMON + FLOW_TYPE + SERVICE[6] + STRINGS + POD_STRINGS + SERVICE_STRINGS)
POD_TEMPLATES = {4: TEMPLATE_V4_PODS, 6: TEMPLATE_V6_PODS}
REVERSE = [  # RFC 5103: the partner direction's counters, under PEN 29305
    "reverseOctetDeltaCount",
    "reversePacketDeltaCount",
    "reverseTcpControlBits",
    "reverseIpClassOfService",
    "biflowDirection",
]
BIFLOW_TEMPLATES = {4: Template.of(263, V4 + COMMON + REVERSE + STRINGS),
                    6: Template.of(264, V6 + COMMON + REVERSE + STRINGS)}
BIFLOW_POD_TEMPLATES = {
    v: Template.of(265 if v == 4 else 266, (V4 if v == 4 else V6) + COMMON + REVERSE + FLOW_TYPE
                   + SERVICE[v] + STRINGS + POD_STRINGS + SERVICE_STRINGS) for v in (4, 6)}

# RFC 5610 information element type records, so generic collectors learn the
# Antrea elements' names and types. All nine fields: libfixbuf ignores fewer.
IE_TYPES = Template.of(
    260,
    [
        "informationElementId",
        "privateEnterpriseNumber",
        "informationElementDataType",
        "informationElementSemantics",
        "informationElementUnits",
        "informationElementRangeBegin",
        "informationElementRangeEnd",
        "informationElementName",
        "informationElementDescription",
    ],
    scope_count=2,
)


# Exporting Process Reliability Statistics (RFC 7011 section 4.3): what was lost
EXPORT_STATS = Template.of(
    261,
    [
        "exportingProcessId",
        "notSentFlowTotalCount",
        "notSentPacketTotalCount",
        "notSentOctetTotalCount",
        "flowStartMilliseconds",  # first and last flow not sent
        "flowEndMilliseconds",
    ],
    scope_count=1,
)
# The interface table: ifindex to name, for collectors that map the index fields
INTERFACES = Template.of(262, ["ingressInterface", "interfaceName"], scope_count=1)


# Antrea's pod labels (56506/143, 144: JSON text), with --pod-labels
LABELS = ["sourcePodLabels", "destinationPodLabels"]


def templates(with_pods: bool, biflow: bool = False, labels: bool = False,
              enterprise_number: int = 0) -> dict[int, Template]:
    """The data templates; with pods, labels and workload elements (strings, last) as
    configured: same ids, one layout per agent."""
    if biflow:
        base = BIFLOW_POD_TEMPLATES if with_pods else BIFLOW_TEMPLATES
    else:
        base = POD_TEMPLATES if with_pods else TEMPLATES
    extra = pod_extras(labels, enterprise_number) if with_pods else []
    if not extra:
        return base
    return {v: Template(t.id, list(t.elements) + extra) for v, t in base.items()}


def pod_extras(labels: bool, enterprise_number: int) -> list[Element]:
    return ([element(n) for n in LABELS] if labels else []) + (
        workload_elements(enterprise_number) if enterprise_number else [])


def announced(labels: bool = False, enterprise_number: int = 0) -> list[Element]:
    """The enterprise elements told with RFC 5610 type records."""
    return [element(n) for n in POD_FIELDS] + pod_extras(labels, enterprise_number)


def interface_columns(ifnames: Mapping[int, str]) -> dict[str, np.ndarray | Strings]:
    keys = sorted(ifnames)
    return {"ingressInterface": np.array(keys, np.uint32),
            "interfaceName": Strings([ifnames[k] for k in keys], np.arange(len(keys)))}


def export_stats_columns(process: int, lost: Mapping[str, int]) -> dict[str, np.ndarray]:
    return {
        "exportingProcessId": np.array([process], np.uint32),
        "notSentFlowTotalCount": np.array([lost["flows"]], np.uint64),
        "notSentPacketTotalCount": np.array([lost["packets"]], np.uint64),
        "notSentOctetTotalCount": np.array([lost["octets"]], np.uint64),
        "flowStartMilliseconds": np.array([lost["first_ms"]], np.uint64),
        "flowEndMilliseconds": np.array([lost["last_ms"]], np.uint64),
    }


def ie_type_columns(names: list[str | Element]) -> dict[str, np.ndarray | Strings]:
    els = [n if isinstance(n, Element) else element(n) for n in names]
    n = len(els)
    zero = np.zeros(n, np.uint64)
    return {
        "informationElementId": np.array([e.id for e in els], np.uint16),
        "privateEnterpriseNumber": np.array([e.pen for e in els], np.uint32),
        "informationElementDataType": np.array([e.type_code for e in els], np.uint8),
        "informationElementSemantics": np.zeros(n, np.uint8),  # default
        "informationElementUnits": np.zeros(n, np.uint16),  # none
        "informationElementRangeBegin": zero,
        "informationElementRangeEnd": zero,
        "informationElementName": Strings([e.name for e in els], np.arange(n)),
        "informationElementDescription": Strings([e.description for e in els], np.arange(n)),
    }


def lookup_strings(ifindex: np.ndarray, table: Mapping[int, str]) -> Strings:
    """Per-record string by interface index ("" where unknown), without a Python loop per record."""
    keys = np.array(sorted(table), np.int64)
    values = [table[k] for k in keys.tolist()] + [""]
    if not len(keys):
        return Strings(values, np.zeros(len(ifindex), np.int64))
    pos = np.minimum(np.searchsorted(keys, ifindex), len(keys) - 1)
    idx = np.where(keys[pos] == ifindex, pos, len(keys))
    return Strings(values, idx)


def columns(
    flows: np.ndarray, ifnames: Mapping[int, str], pods=None
) -> dict[str, np.ndarray | Strings]:
    """IPFIX columns of a batch; pods (an agent.podmeta.PodTable) adds the Antrea ones."""
    out = _flow_columns(flows, ifnames)
    if "rev_packets" in flows.dtype.names:  # biflows (agent.biflow)
        out.update({
            "reverseOctetDeltaCount": flows["rev_octets"],
            "reversePacketDeltaCount": flows["rev_packets"],
            "reverseTcpControlBits": flows["rev_tcp_flags"],
            "reverseIpClassOfService": flows["rev_tos"],
            "biflowDirection": flows["biflow_direction"],
        })
    if pods is not None:
        out.update(pods.columns(flows))
    return out


def _flow_columns(flows: np.ndarray, ifnames: Mapping[int, str]) -> dict[str, np.ndarray | Strings]:
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
