"""Pod metadata for records: the observed pod by interface, any known pod by address.

A record's observed pod is the one behind the interface that saw it: its
source on the TC ingress of the host-side veth (the pod sent it), its
destination on the egress. The other side is named too when its address
belongs to a pod this agent knows. Lookups are sorted-array searches over
whole batches.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from agent.flowtable import key_hash
from agent.ipfix.message import Strings
from agent.kube import Pod
from agent.records import INGRESS
from agent.services import Services
from agent.workloads import labels_text


def _address_words(raw16: np.ndarray, version: np.ndarray) -> np.ndarray:
    """(n, 16) address octets plus IP version as (n, 3) uint64."""
    words = np.zeros((len(raw16), 3), np.uint64)
    words[:, :2] = np.ascontiguousarray(raw16).view("<u8").reshape(-1, 2)
    words[:, 2] = version
    return words


# Antrea's flowType values
UNKNOWN, INTRA_NODE, INTER_NODE, TO_EXTERNAL, FROM_EXTERNAL = 0, 1, 2, 3, 4


def in_networks(raw16: np.ndarray, version: np.ndarray, cidrs: Sequence[str]) -> np.ndarray:
    """Whether each address (16 octets, IPv4 in the first 4) lies in one of the CIDRs."""
    out = np.zeros(len(raw16), bool)
    if not len(raw16):
        return out
    hi = raw16[:, :8].copy().view(">u8")[:, 0]
    lo = raw16[:, 8:].copy().view(">u8")[:, 0]
    for text in cidrs:
        net = ipaddress.ip_network(text)
        bits = net.max_prefixlen
        addr = int(net.network_address) << (128 - bits)  # IPv4 in the top 32 bits
        prefix = net.prefixlen
        mask = ((1 << prefix) - 1) << (128 - prefix) if prefix else 0
        m_hi, m_lo = np.uint64(mask >> 64), np.uint64(mask & (2**64 - 1))
        a_hi, a_lo = np.uint64(addr >> 64), np.uint64(addr & (2**64 - 1))
        out |= (version == net.version) & ((hi & m_hi) == a_hi) & ((lo & m_lo) == a_lo)
    return out


class PodTable:
    def __init__(self, node: str, by_ifindex: Mapping[int, Pod], known: Iterable[Pod],
                 cluster_cidrs: Sequence[str] = (), node_addresses: Iterable[str] = (),
                 services: Services | None = None,
                 workloads: Mapping[str, tuple[str, str]] | None = None,
                 labels: bool = False, enterprise_number: int = 0) -> None:
        """by_ifindex: the metered pods; known: every pod of the node, whose addresses
        name the other side of a record while they own them (Pending or Running, not
        hostNetwork; of two claiming one address, the one created last); node_addresses
        (and hostNetwork pods' addresses) name the node, never a pod. cluster_cidrs: the
        cluster's pod ranges (flowType 2 when the other end is in them). services: the
        Services of the cluster and the node's conntrack, to name Service traffic and
        its backend (a pod of another node named by its EndpointSlice). workloads: uid ->
        (kind, name), sent under enterprise_number when it is set; labels: send the pods'
        selected labels (Antrea's sourcePodLabels and destinationPodLabels)."""
        self.cluster_cidrs = list(cluster_cidrs)
        known = list(known)
        pods = list({p.uid: p for p in known + list(by_ifindex.values())}.values())
        self.node = node
        index = {p.uid: i for i, p in enumerate(pods)}
        none = len(pods)  # the index of "", for records with no pod on that side
        self.node_side = none + 1  # the other side is this node itself (no pod)
        self.services = services
        endpoints = services.refresh().pods if services is not None else []
        self.endpoints_at = none + 2  # backends elsewhere, after the two without a pod
        self.namespaces = [p.namespace for p in pods] + ["", ""] + [
            e.namespace for e in endpoints]
        self.names = [p.name for p in pods] + ["", ""] + [e.pod for e in endpoints]
        self.node_names = [node] * none + ["", node] + [e.node for e in endpoints]
        # a backend elsewhere: its workload is not known here (only this node's pods are)
        known_workloads = workloads or {}
        work = [known_workloads.get(p.uid, ("", "")) for p in pods]
        self.workload_kinds = [w[0] for w in work] + [""] * (2 + len(endpoints))
        self.workload_names = [w[1] for w in work] + [""] * (2 + len(endpoints))
        self.pod_uids = [p.uid for p in pods]
        self.enterprise_number, self.labels = enterprise_number, labels
        self.label_texts: list[str] = []
        self.labels_dropped = 0
        if labels:
            texts = [labels_text(p) for p in pods]
            self.labels_dropped = sum(d for _, d in texts)
            self.label_texts = [t for t, _ in texts] + [""] * (2 + len(endpoints))
        self.none = none
        keys = sorted(by_ifindex)
        self.if_keys = np.array(keys, np.int64)
        self.if_pod = np.array([index[by_ifindex[k].uid] for k in keys], np.int64)
        # each pod's metered interface (0: none), for the egressInterface of its receptions
        self.pod_if = np.zeros(len(self.names), np.uint32)
        self.pod_if[self.if_pod] = self.if_keys
        owners: dict[str, int] = {}
        for ip in list(node_addresses) + [ip for p in known if p.host_network for ip in p.ips]:
            owners[ip] = self.node_side
        metered = list(by_ifindex.values())
        for p in sorted((p for p in known + metered if p.owns_addresses),
                        key=lambda p: (p.created, p in metered)):
            for ip in p.ips:  # created last wins; the node's addresses are never a pod's
                if owners.get(ip) != self.node_side:
                    owners[ip] = index[p.uid]
        raw, versions, owner = [], [], []
        for ip, who in owners.items():
            a = ipaddress.ip_address(ip)
            raw.append(a.packed.ljust(16, b"\0"))
            versions.append(a.version)
            owner.append(who)
        words = np.zeros((0, 3), np.uint64)
        if raw:
            octets = np.frombuffer(b"".join(raw), np.uint8).reshape(-1, 16)
            words = _address_words(octets, np.array(versions, np.uint64))
        h = key_hash(words)
        order = np.argsort(h)
        self.ip_hash, self.ip_words = h[order], words[order]
        self.ip_pod = np.array(owner, np.int64)[order] if owner else np.zeros(0, np.int64)

    def _by_ifindex(self, ifindex: np.ndarray) -> np.ndarray:
        out = np.full(len(ifindex), self.none, np.int64)
        if len(self.if_keys):
            pos = np.minimum(np.searchsorted(self.if_keys, ifindex), len(self.if_keys) - 1)
            hit = self.if_keys[pos] == ifindex
            out[hit] = self.if_pod[pos[hit]]
        return out

    def by_address(self, raw16: np.ndarray, version: np.ndarray) -> np.ndarray:
        """The pod owning each address (16 octets, IPv4 in the first 4), or self.none."""
        out = np.full(len(raw16), self.none, np.int64)
        if not len(self.ip_hash):
            return out
        words = _address_words(raw16, version)
        pos = np.minimum(np.searchsorted(self.ip_hash, key_hash(words)), len(self.ip_hash) - 1)
        hit = (self.ip_words[pos] == words).all(axis=1)
        out[hit] = self.ip_pod[pos[hit]]
        return out

    def receivers(self, flows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What a pod received, counted once whatever --dedup and the CNI do: for records
        of packets a pod sent (ingress), the metered interface of the pod of this node
        they went to (0: none); and which records are a second observation of such a
        packet (at the receiver's egress, kept by --dedup false), not to count again.
        The other end is the one sides() names: a Service's backend where conntrack
        knows it, so a packet to a ClusterIP is received by the pod it reached."""
        ingress, _, remote, _, _, _, _ = self.sides(flows)
        metered = self.pod_if[remote]
        receivers = np.where(ingress, metered, 0).astype(np.uint32)
        again = ~ingress & (metered != 0)
        return receivers, again

    def sides(self, flows: np.ndarray):
        """Per record: whether it is an ingress one, the index of the observed pod and
        of the other end (self.none: no pod; self.node_side: this node), that end's
        address (a Service's backend where conntrack knows it), the Service match, and
        Antrea's flowType."""
        k = flows["key"]
        ingress = k["direction"] == INGRESS
        observed = self._by_ifindex(k["ifindex"].astype(np.int64))
        other = np.where(ingress[:, None], k["dst"], k["src"])
        svc = self.services.match(k, ingress) if self.services is not None else None
        if svc is not None:  # the other end is a Service's address: its backend instead;
            # at the backend, the client conntrack saw before a masquerade, not the node
            other = np.where(svc.translated[:, None], svc.backend, other)
            other = np.where(svc.at_backend[:, None], svc.client, other)
        remote = self.by_address(other, k["ip_version"])
        if svc is not None:  # a backend on another node, as its EndpointSlice names it
            elsewhere = svc.translated & (remote == self.none)
            ep = self.services.index.endpoint(other, k["ip_version"])
            remote = np.where(elsewhere & (ep >= 0), self.endpoints_at + ep, remote)
        src = np.where(ingress, observed, remote)
        dst = np.where(ingress, remote, observed)
        local = (remote < self.none) | (remote == self.node_side)  # this node's pod, or it
        flow_type = np.where(local, INTRA_NODE, UNKNOWN).astype(np.uint8)
        if self.cluster_cidrs:
            pod = in_networks(other, k["ip_version"], self.cluster_cidrs)
            outside = np.where(ingress, TO_EXTERNAL, FROM_EXTERNAL)
            flow_type = np.where(local, INTRA_NODE, np.where(pod, INTER_NODE, outside))
        flow_type = np.where(k["overflow"] == 1, UNKNOWN, flow_type).astype(np.uint8)
        return ingress, observed, remote, src, dst, svc, flow_type

    def columns(self, flows: np.ndarray) -> dict[str, Strings | np.ndarray]:
        """Pod names, flowType, and for a packet a metered pod of this node sent to
        another metered pod of this node (counted once, at the sender's ingress), the
        receiver's interface as egressInterface. Service traffic: the Service port,
        and where conntrack knows it, the backend as the pod behind the Service.
        Workloads (under --enterprise-number) and labels (--pod-labels) when set."""
        k = flows["key"]
        ingress, observed, remote, src, dst, svc, flow_type = self.sides(flows)
        egress = np.where(ingress, self.pod_if[remote], k["ifindex"]).astype(np.uint32)
        extra: dict[str, Strings] = {}
        if self.labels:
            extra["sourcePodLabels"] = Strings(self.label_texts, src)
            extra["destinationPodLabels"] = Strings(self.label_texts, dst)
        if self.enterprise_number:
            for side, who in (("source", src), ("destination", dst)):
                extra[f"{side}WorkloadKind"] = Strings(self.workload_kinds, who)
                extra[f"{side}WorkloadName"] = Strings(self.workload_names, who)
        return {
            "sourcePodNamespace": Strings(self.namespaces, src),
            "sourcePodName": Strings(self.names, src),
            "destinationPodNamespace": Strings(self.namespaces, dst),
            "destinationPodName": Strings(self.names, dst),
            "sourceNodeName": Strings(self.node_names, src),  # pod or node
            "destinationNodeName": Strings(self.node_names, dst),
            "flowType": flow_type,
            "egressInterface": egress,
            **service_columns(svc, len(flows), self.services),
            **extra,
        }


def service_columns(svc, n: int, services: Services | None) -> dict[str, Strings | np.ndarray]:
    """Antrea's Service elements: the Service port's name ("namespace/name:port"), the
    port and address the client used. Antrea defines them for the destination only
    (its records are connections, named from the initiator): a reply from a Service
    carries them too, its source address being the Service's or its backend's."""
    names = (services.index.names if services is not None else []) + [""]
    if svc is None:
        return {"destinationServicePortName": Strings(names, np.zeros(n, np.int64)),
                "destinationServicePort": np.zeros(n, np.uint16),
                "destinationClusterIPv4": np.zeros((n, 4), np.uint8),
                "destinationClusterIPv6": np.zeros((n, 16), np.uint8),
                "destinationServiceIPv4": np.zeros((n, 4), np.uint8),
                "destinationServiceIPv6": np.zeros((n, 16), np.uint8)}
    which = np.where(svc.service >= 0, svc.service, len(names) - 1)
    return {"destinationServicePortName": Strings(names, which),
            "destinationServicePort": svc.port,
            "destinationClusterIPv4": services.index.cluster4[which],
            "destinationClusterIPv6": services.index.cluster6[which],
            "destinationServiceIPv4": svc.frontend[:, :4],
            "destinationServiceIPv6": svc.frontend}
