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
        self.packets_deduplicated = Counter(
            "cniflow_packets_deduplicated",
            "Packets not counted again at a metered interface's egress: counted at the "
            "metered sender's ingress", registry=r)
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
            "cniflow_interfaces_attached", "Interfaces with cniflow's filters", registry=r
        )
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
