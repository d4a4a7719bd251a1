"""Prometheus metrics of the agent, one registry per agent (no global state)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

WORKLOAD_LABELS = ["namespace", "workload_kind", "workload", "direction", "flow_type"]
FLOW_TYPES = ("unknown", "intra-node", "inter-node", "to-external", "from-external")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory...
        self.records_exported = Counter(
            "cniflow_records_exported", "Flow records sent to the collector", registry=r
        )
        self.messages_exported = Counter(
            "cniflow_messages_exported", "IPFIX messages sent to the collector", registry=r
        )
        self.export_errors = Counter(
            "cniflow_export_errors", "IPFIX messages the transport failed to send", registry=r
        )
        self.records_dropped = Counter(
            "cniflow_records_dropped",
            "Flow records lost because the export backlog overflowed",
            registry=r,
        )
        self.records_resent = Counter(
            "cniflow_records_resent",
            "Flow records sent again: the TCP connection broke before the collector "
            "acknowledged them", registry=r)
        self.export_backlog = Gauge(
            "cniflow_export_backlog_records", "Flow records waiting for the collector", registry=r
        )
        self.map_entries = Gauge(
            "cniflow_map_entries", "Flows drained from the kernel map at the last poll", registry=r
        )
        self.map_size = Gauge("cniflow_map_size", "Capacity of the kernel flow map", registry=r)
        self.map_failed_inserts = Counter(
            "cniflow_map_failed_inserts",
            "Packets the kernel flow map had no room for (counted in overflow records)",
            registry=r,
        )
        self.packets_lost = Counter(
            "cniflow_packets_lost",
            "Packets neither the flow map nor the overflow map had room for (counted only here)",
            registry=r)
        self.packets_past_hook = Counter(
            "cniflow_packets_past_hook",
            "Packets a CNI delivered into metered pods past their veth's egress hook "
            "(bpf_redirect_peer: Cilium's BPF host routing) and no entry point counted "
            "(a lower bound)", registry=r)
        self.entry_packets = Counter(
            "cniflow_entry_packets",
            "Packets for metered pods counted where they came into the node (an entry "
            "point's ingress: uplink, tunnel, unmetered pod), as the pod's veth's egress",
            registry=r)
        self.entry_points = Gauge(
            "cniflow_entry_points", "Interfaces whose ingress cniflow meters for packets "
            "to metered pods (--entry-points)", registry=r)
        self.pod_ends = Gauge(
            "cniflow_pod_ends", "Metered pods counted at their own end of the veth "
            "(--pod-side)", registry=r)
        self.packets_deduplicated = Counter(
            "cniflow_packets_deduplicated",
            "Packets not counted again at a metered interface's egress: counted at the "
            "metered sender's ingress, or at an entry point", registry=r)
        self.overflow_packets = Counter(
            "cniflow_overflow_packets", "Packets in overflow records (addresses unknown)",
            ["interface", "direction"], registry=r)
        self.overflow_bytes = Counter(
            "cniflow_overflow_bytes", "Octets in overflow records (addresses unknown)",
            ["interface", "direction"], registry=r)
        self.early_drains = Counter(
            "cniflow_early_drains", "Drains before the poll interval because the map filled",
            registry=r)
        self.interfaces_not_metered = Gauge(
            "cniflow_interfaces_not_metered",
            "Wanted interfaces cniflow cannot meter, by reason (netkit)", ["reason"], registry=r)
        self.netns_lookup = Gauge(
            "cniflow_netns_lookup_enabled", "1 when the last-resort interface lookup through "
            "pod network namespaces can run (it needs CAP_SYS_ADMIN)", registry=r)
        self.packets_not_ip = Counter(
            "cniflow_packets_not_ip", "Frames that are not IPv4 or IPv6, passed on", registry=r
        )
        self.packets_malformed = Counter(
            "cniflow_packets_malformed", "Truncated or invalid IP frames, passed on", registry=r
        )
        self.drain_seconds = Histogram(
            "cniflow_drain_duration_seconds",
            "Time to drain the kernel flow map",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.export_seconds = Histogram(
            "cniflow_export_duration_seconds", "Time to encode and send one poll's records",
            registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.flows_active = Gauge(
            "cniflow_flows_active", "Flows held in the agent's flow table", registry=r
        )
        self.interfaces_attached = Gauge(
            "cniflow_interfaces_attached", "Pod interfaces with cniflow's programs",
            registry=r
        )
        self.tcx_moved_to_head = Counter(
            "cniflow_tcx_moved_to_head", "cniflow's TCX links moved back to the head of a "
            "chain another program had been put in front of", registry=r)
        self.tc_moved_to_head = Counter(
            "cniflow_tc_moved_to_head", "cniflow's cls_bpf filters moved back to the head of "
            "a hook another filter had been put in front of", registry=r)
        self.attach_failures = Counter(
            "cniflow_attach_failures", "Interfaces the kernel refused a filter on", registry=r
        )
        self.poll_errors = Counter(
            "cniflow_poll_errors", "Polls that failed with an unexpected error (logged)",
            registry=r)
        self.pods_opted_in = Gauge(
            "cniflow_pods_opted_in", "Pods of this node opted in (hostNetwork ones excluded)",
            registry=r)
        self.annotation_errors = Counter(
            "cniflow_annotation_errors",
            "Pods and namespaces with a cniflow.io/export value other than true or false",
            registry=r)
        self.api_errors = Counter(
            "cniflow_api_errors", "Failed list or watch requests to the API server",
            registry=r)
        self.pods_attached = Gauge(
            "cniflow_pods_attached", "Opted-in pods whose interface is metered", registry=r)
        self.pod_bytes = Counter(
            "cniflow_pod_bytes",
            "Octets (IP header and payload) a metered pod sent or received",
            ["namespace", "pod", "direction"], registry=r)
        self.pod_packets = Counter(
            "cniflow_pod_packets", "Packets a metered pod sent or received",
            ["namespace", "pod", "direction"], registry=r)
        self.vpp_connected = Gauge(
            "cniflow_vpp_connected", "1 while the agent holds a working VPP API connection",
            registry=r)
        self.vpp_errors = Counter(
            "cniflow_vpp_errors",
            "VPP API failures by kind: connect, crc, refused, lost, config",
            ["kind"], registry=r)
        self.vpp_records = Counter(
            "cniflow_vpp_records", "Flow records received from VPP's flowprobe", registry=r)
        self.vpp_unknown_interface_records = Counter(
            "cniflow_vpp_unknown_interface_records",
            "VPP records from interfaces of no known pod (exported without pod metadata)",
            registry=r)
        self.vpp_foreign_datagrams = Counter(
            "cniflow_vpp_foreign_datagrams",
            "Datagrams at the VPP listener not from VPP's configured IPFIX source and port: "
            "dropped", registry=r)
        self.vpp_decode_errors = Counter(
            "cniflow_vpp_decode_errors", "Malformed IPFIX from VPP, by reason", ["reason"],
            registry=r)
        self.workload_bytes = Counter(
            "cniflow_workload_bytes",
            "Octets the metered pods of a workload on this node sent or received, by the "
            "flow's type (Antrea's flowType: intra-node, inter-node, to-external, "
            "from-external, unknown)",
            WORKLOAD_LABELS, registry=r)
        self.workload_packets = Counter(
            "cniflow_workload_packets", "Packets the metered pods of a workload on this node "
            "sent or received, by the flow's type", WORKLOAD_LABELS, registry=r)
        self.service_bytes = Counter(
            "cniflow_service_bytes", "Octets to and from a Service port (requests and "
            "replies) that metered pods of this node sent or received",
            ["namespace", "service", "port"], registry=r)
        self.service_packets = Counter(
            "cniflow_service_packets", "Packets to and from a Service port that metered pods "
            "of this node sent or received", ["namespace", "service", "port"], registry=r)
        self.series_limited_packets = Counter(
            "cniflow_series_limited_packets",
            "Packets left out of the per-workload or per-Service counters (by) because "
            "--workload-series-limit of them already have series", ["by"], registry=r)
        self.pod_labels_left_out = Gauge(
            "cniflow_pod_labels_left_out",
            "Selected label values of this node's pods that records leave out: longer than "
            "the API server allows, or beyond 1024 octets of one pod's labels", registry=r)
        self._workload_series: dict[tuple[str, str, str], set[tuple[str, str]]] = {}
        self._service_series: set[str] = set()
        self._pod_series: set[tuple[str, str]] = set()
        self._kernel_seen: dict[str, int] = {}
        self._overflow_series: set[str] = set()

    def kernel_stats(self, stats: dict[str, int]) -> None:
        """Turn the program's running totals into counter increments."""
        for name, counter in (
            ("map_full", self.map_failed_inserts),
            ("not_ip", self.packets_not_ip),
            ("malformed", self.packets_malformed),
            ("lost", self.packets_lost),
            ("dedup", self.packets_deduplicated),
        ):
            value = stats.get(name, 0)
            delta = value - self._kernel_seen.get(name, 0)
            if delta > 0:
                counter.inc(delta)
            self._kernel_seen[name] = value

    def pod_traffic(self, batch: np.ndarray, by_ifindex: Mapping[int, object],
                    receivers: np.ndarray | None = None,
                    again: np.ndarray | None = None) -> None:
        """Per-pod counters from a drained batch, summed per interface and direction in
        whole arrays. The TC ingress of a pod's host-side veth is what the pod sent, its
        egress what it received. A packet between two metered pods of the node is
        received where it was sent (receivers, from agent.podmeta.PodTable.receivers):
        with dedup the kernel counts it there only, and a CNI that redirects to the peer
        skips the receiver's veth; its second observation (again) is not counted."""
        if len(batch):
            if again is not None and again.any():
                keep = ~again
                batch, receivers = batch[keep], (receivers[keep] if receivers is not None
                                                 else None)
            k = batch["key"]
            slot = k["ifindex"].astype(np.int64) * 2 + k["direction"]
            octets, packets = batch["octets"], batch["packets"]
            if receivers is not None and receivers.any():
                to = receivers != 0
                slot = np.concatenate([slot, receivers[to].astype(np.int64) * 2 + 1])
                octets = np.concatenate([octets, octets[to]])
                packets = np.concatenate([packets, packets[to]])
            keys, inverse = np.unique(slot, return_inverse=True)
            octets = np.bincount(inverse, weights=octets)
            packets = np.bincount(inverse, weights=packets)
            for key, o, p in zip(keys.tolist(), octets.tolist(), packets.tolist(), strict=True):
                pod = by_ifindex.get(key // 2)
                if pod is None:
                    continue
                direction = "sent" if key % 2 == 0 else "received"
                self.pod_bytes.labels(pod.namespace, pod.name, direction).inc(o)
                self.pod_packets.labels(pod.namespace, pod.name, direction).inc(p)
                self._pod_series.add((pod.namespace, pod.name))
        live = {(p.namespace, p.name) for p in by_ifindex.values()}
        for ns, name in self._pod_series - live:  # the pod is gone: so are its series
            for direction in ("sent", "received"):
                for metric in (self.pod_bytes, self.pod_packets):
                    try:
                        metric.remove(ns, name, direction)
                    except KeyError:
                        pass
        self._pod_series &= live

    def workload_traffic(self, batch: np.ndarray, table, receivers: np.ndarray,
                         again: np.ndarray, limit: int) -> None:
        """Per-workload and per-Service counters from a drained batch, counted as the
        per-pod ones are (a packet between two metered pods: sent by one, received by
        the other, once). table: the poll's agent.podmeta.PodTable. At most limit
        workloads and limit Service ports have series: what a hostile namespace owner
        makes of ownerReferences or Services stays bounded, the rest is counted apart."""
        self.pod_labels_left_out.set(table.labels_dropped)
        if len(batch):
            keep = ~again
            ingress, observed, _, _, _, svc, flow_type = table.sides(batch)
            pod = np.concatenate([observed[keep], table._by_ifindex(
                receivers[keep & (receivers != 0)].astype(np.int64))])
            to = keep & (receivers != 0)
            sent = np.concatenate([ingress[keep], np.zeros(int(to.sum()), bool)])
            ftype = np.concatenate([flow_type[keep], np.ones(int(to.sum()), np.uint8)])
            octets = np.concatenate([batch["octets"][keep], batch["octets"][to]])
            packets = np.concatenate([batch["packets"][keep], batch["packets"][to]])
            slot = pod.astype(np.int64) * 16 + sent * 8 + ftype
            self._count_workloads(table, slot, octets, packets, limit)
            if svc is not None:
                hit = keep & (svc.service >= 0)
                self._count_services(table.services.index.names, svc.service[hit],
                                     batch["octets"][hit], batch["packets"][hit], limit)
        live = {(table.namespaces[i], table.workload_kinds[i], table.workload_names[i])
                for i in table.if_pod.tolist()}
        for key in [k for k in self._workload_series if k not in live]:
            for direction, ftype in self._workload_series.pop(key):
                for metric in (self.workload_bytes, self.workload_packets):
                    metric.remove(*key, direction, ftype)
        names = set(table.services.index.names) if table.services is not None else set()
        for name in self._service_series - names:  # the Service (port) is gone
            for metric in (self.service_bytes, self.service_packets):
                metric.remove(*_service_labels(name))
        self._service_series &= names

    def _count_workloads(self, table, slot, octets, packets, limit: int) -> None:
        keys, inverse = np.unique(slot, return_inverse=True)
        octets = np.bincount(inverse, weights=octets)
        packets = np.bincount(inverse, weights=packets)
        for key, o, p in zip(keys.tolist(), octets.tolist(), packets.tolist(), strict=True):
            i = key // 16
            kind = table.workload_kinds[i] if i < len(table.workload_kinds) else ""
            if not kind:  # no pod of this node behind the interface
                continue
            workload = (table.namespaces[i], kind, table.workload_names[i])
            series = self._workload_series.get(workload)
            if series is None:
                if len(self._workload_series) >= limit:
                    self.series_limited_packets.labels("workload").inc(p)
                    continue
                series = self._workload_series[workload] = set()
            labels = ("sent" if key & 8 else "received", FLOW_TYPES[key % 8])
            series.add(labels)
            self.workload_bytes.labels(*workload, *labels).inc(o)
            self.workload_packets.labels(*workload, *labels).inc(p)

    def _count_services(self, names, service, octets, packets, limit: int) -> None:
        keys, inverse = np.unique(service, return_inverse=True)
        octets = np.bincount(inverse, weights=octets)
        packets = np.bincount(inverse, weights=packets)
        for key, o, p in zip(keys.tolist(), octets.tolist(), packets.tolist(), strict=True):
            name = names[key]
            if name not in self._service_series:
                if len(self._service_series) >= limit:
                    self.series_limited_packets.labels("service").inc(p)
                    continue
                self._service_series.add(name)
            self.service_bytes.labels(*_service_labels(name)).inc(o)
            self.service_packets.labels(*_service_labels(name)).inc(p)

    def overflow(self, batch: np.ndarray, names: Mapping[int, str]) -> None:
        """Per-interface overflow counters from a drained batch's overflow entries; the
        series of interfaces no longer metered go."""
        over = batch[batch["key"]["overflow"] == 1] if len(batch) else batch
        for r in over.tolist() if len(over) else []:
            key, packets, octets = r[0], r[1], r[2]
            name = names.get(key[0], str(key[0]))
            direction = "in" if key[1] == 0 else "out"
            self.overflow_packets.labels(name, direction).inc(packets)
            self.overflow_bytes.labels(name, direction).inc(octets)
            self._overflow_series.add(name)
        for name in self._overflow_series - set(names.values()):
            for direction in ("in", "out"):
                for metric in (self.overflow_packets, self.overflow_bytes):
                    try:
                        metric.remove(name, direction)
                    except KeyError:
                        pass
        self._overflow_series &= set(names.values())

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)


def _service_labels(name: str) -> tuple[str, str, str]:
    """"namespace/name:port" (a ServicePortName) as (namespace, service, port)."""
    namespace, _, rest = name.partition("/")
    service, _, port = rest.partition(":")
    return namespace, service, port
