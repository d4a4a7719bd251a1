"""The composition root: discover, resolve, attach, drain, aggregate, export, once
per poll, over one of two dataplanes with the same shape:

eBPF: interfaces --> bpf.attach --> (kernel meters) --> bpf.drain
VPP:  VPP interfaces --> flowprobe on them --> (VPP meters) --> mediation listener
    --> flowtable (timeouts, end of flow) --> exporter (IPFIX) --> transport
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from agent import netlink
from agent.config import VPP_SOCKETS, Config, ConfigError
from agent.exporter import Exporter
from agent.flowtable import FlowTable
from agent.interfaces import InterfaceSet, links
from agent.metrics import Metrics
from agent.podmeta import PodTable
from agent.records import EGRESS, take
from agent.stopping import Stop
from agent.transport import make as make_transport

log = logging.getLogger(__name__)


def netns_lookup(metrics: Metrics) -> bool:
    """Whether the resolver's last resort (entering pod namespaces) can run: it needs
    CAP_SYS_ADMIN, which the DaemonSet does not grant. Said once, and as a metric."""
    from bpf import caps

    able = caps.has("SYS_ADMIN")
    metrics.netns_lookup.set(int(able))
    if not able:
        log.warning("no CAP_SYS_ADMIN: pods found by route, bridge, Cilium's endpoint map "
                    "or their veth's peer namespace; the lookup entering pod network "
                    "namespaces is off")
    return able


def choose_dataplane(cfg: Config) -> tuple[str, str]:
    """("ebpf", "") or ("vpp", socket path), as --dataplane and the host say."""
    if cfg.dataplane == "ebpf":
        return "ebpf", ""
    found = cfg.vpp_socket or next((p for p in VPP_SOCKETS if os.path.exists(p)), "")
    if found:
        return "vpp", found
    if cfg.dataplane == "vpp":
        raise ConfigError("--dataplane vpp: no VPP API socket at " + ", ".join(VPP_SOCKETS)
                          + "; set --vpp-socket")
    return "ebpf", ""


class Agent:
    def __init__(self, cfg: Config, metrics: Metrics | None = None) -> None:
        """Everything that can be wrong with the input is checked before the
        program is loaded, so a bad setting attaches nothing."""
        from pyroute2 import IPRoute

        self.cfg = cfg
        self.metrics = metrics or Metrics()
        host, port = cfg.collector_host_port
        tls = None
        if cfg.transport == "tls":
            from agent.transport import client_tls

            tls = client_tls(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
        self.transport = make_transport(cfg.transport, host, port, tls)
        self.ipr = IPRoute()
        netlink.check(self.ipr)
        self.kind, vpp_socket = choose_dataplane(cfg)
        if not cfg.kubernetes and self.kind == "ebpf":
            InterfaceSet(cfg.interface).check_named(links())
        if self.kind == "vpp":
            from vpp_plugin.dataplane import VppDataplane

            self.dataplane = VppDataplane(cfg, vpp_socket, self.metrics)
            resolver = self.dataplane.interfaces
            domain = cfg.vpp_observation_domain_id or cfg.observation_domain_id + 1000
        else:
            from agent.resolve import Resolver
            from bpf.dataplane import EbpfDataplane

            self.dataplane = EbpfDataplane(cfg, self.metrics, self.ipr)
            resolver = Resolver(self.ipr, cfg.cilium_endpoints, netns_lookup(self.metrics))
            domain = cfg.observation_domain_id
        self.cluster = None
        if cfg.kubernetes:
            from agent.kube import Cluster
            from agent.pods import PodSource

            self.cluster = Cluster(cfg.node_name, cfg.kubeconfig, self.metrics,
                                   tuple(cfg.pod_labels))
            self.source = PodSource(self.cluster, resolver, self.metrics,
                                    tuple(cfg.cluster_cidr), bool(cfg.pod_labels),
                                    cfg.enterprise_number)
        else:
            self.source = InterfaceSet(cfg.interface)
        self.generation = self.dataplane.generation
        self.table = FlowTable(  # VPP: idle counts from a report, and VPP reports late
            cfg.active_timeout, cfg.idle_timeout + self.dataplane.report_lag, cfg.max_flows,
            end_grace_s=cfg.poll_interval
        )
        self.exporter = Exporter(
            self.transport,
            domain,
            self.metrics,
            cfg.max_message_size,
            cfg.template_refresh,
            cfg.export_backlog,
            with_pods=cfg.kubernetes,
            biflow=cfg.biflow,
            labels=cfg.kubernetes and bool(cfg.pod_labels),
            enterprise_number=cfg.enterprise_number if cfg.kubernetes else 0,
        )
        self.names: dict[int, str] = {}
        self.exit_code = 0
        self._restore()

    def _restore(self) -> None:
        """Flows an earlier agent drained but had not exported (pinned, bpf/restart.py)
        go back into the table; records it had committed are sent."""
        restore = getattr(self.dataplane, "restore", None)
        left = restore() if restore is not None else None
        if left is None:
            return
        rows, due = left
        self.table.update(rows, unique=True)
        self.exporter.export(due, self.names, None, self.dataplane.keep,
                             self.dataplane.progress)
        self.dataplane.exported()

    def reconcile(self) -> None:
        """Desired against metered, in one place (the dataplane applies it)."""
        present = self.dataplane.present()
        if self.dataplane.generation != self.generation:  # VPP restarted: indexes moved
            self.generation = self.dataplane.generation
            if self.cluster is not None:
                self.source.resolved.clear()
        want = self.source.desired(present)
        self.dataplane.apply(want, present)
        addresses = getattr(self.dataplane, "pod_addresses", None)
        if addresses is not None and self.cluster is not None:  # for the entry points
            addresses(self.source.addresses())
        check = getattr(self.dataplane, "check_past_hook", None)
        if check is not None and self.cluster is not None:  # the drain tells what pods got
            check()
        self.names.update(want)
        netlink.drop_strays(self.ipr)

    def poll(self, final: bool = False) -> None:
        t0 = time.perf_counter()
        batch = self.dataplane.drain()
        if self.cfg.dedup and self.cluster is not None and self.dataplane.both_ways:
            batch = self._once(batch)
        self.metrics.drain_seconds.observe(time.perf_counter() - t0)
        evicted = self.table.update(batch, unique=self.dataplane.unique,
                                    reports=self.dataplane.reports)
        due = self.table.flush() if final else self.table.expire(int(time.time() * 1000))
        if self.cfg.biflow:  # both directions leave together, to be paired
            due = np.concatenate([due, self.table.partners(due)])
        out = np.concatenate([evicted, due]) if len(evicted) else due
        attached = self.dataplane.attached
        reported = attached | set(
            np.unique(self.table.flows["key"]["ifindex"]).tolist()) | set(
            np.unique(out["key"]["ifindex"]).tolist())
        pods = None
        if self.cluster is not None:
            pods = self.source.table(reported)
            receivers, again = pods.receivers(batch)
            drained = getattr(self.dataplane, "drained", None)
            if drained is not None:
                drained(receivers, batch["packets"])
            self.metrics.pod_traffic(batch, {**self.source.remembered, **self.source.by_ifindex},
                                     receivers, again)
            self.metrics.workload_traffic(batch, pods, receivers, again,
                                          self.cfg.workload_series_limit)
            if self.kind == "vpp" and len(batch):  # flowprobe on an interface of no pod
                known = np.array(sorted(self.source.by_ifindex), np.uint32)
                self.metrics.vpp_unknown_interface_records.inc(
                    int((~np.isin(batch["key"]["ifindex"], known)).sum()))
            self.metrics.pods_attached.set(
                sum(1 for i in self.source.by_ifindex if i in attached))
        t1 = time.perf_counter()
        commit = getattr(self.dataplane, "commit", None)
        if commit is not None:  # pinned: logged before it leaves (bpf/journal.py)
            self.exporter.export(out, self.names, pods,
                                 lambda held: commit(self.table, held),
                                 self.dataplane.progress)
            self.dataplane.exported()
        else:
            self.exporter.export(out, self.names, pods)
        self.metrics.export_seconds.observe(time.perf_counter() - t1)
        self.metrics.flows_active.set(len(self.table))
        for ifindex in [i for i in self.names if i not in reported]:
            del self.names[ifindex]

    def run(self, stop: Stop) -> None:
        log.info(
            "agent running",
            extra={
                "collector": self.cfg.collector,
                "transport": self.cfg.transport,
                "interfaces": self.cfg.interface,
                "kubernetes": self.cfg.kubernetes,
                "node": self.cfg.node_name,
            },
        )
        if self.cluster is not None:
            self.cluster.start()
            deadline = time.monotonic() + 10  # a SIGTERM meanwhile is seen within 0.2 s
            while not self.cluster.wait_synced(0.2) and not stop.is_set():
                if time.monotonic() > deadline:
                    log.warning("API server not reached yet: metering what is known, "
                                "retrying")
                    break
        try:
            next_reconcile = 0.0
            while not stop.is_set():
                # Reconcile on the clock; drain on the clock or as soon as the map fills. A
                # failure in one never skips the other: metering goes on for the node.
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + self.cfg.poll_interval
                    self._guarded(self.reconcile, "reconcile failed")
                self._guarded(self.poll, "poll failed")
                if self.dataplane.restart_needed:  # e.g. VPP came back as another release
                    log.error(self.dataplane.restart_needed)
                    self.exit_code = 3
                    break
                self.dataplane.wait(stop, max(0.0, next_reconcile - time.monotonic()))
        finally:
            self.shutdown()

    def _once(self, batch: np.ndarray) -> np.ndarray:
        """VPP meters each pod's interface both ways: a packet between two metered pods of
        the node comes in its sender's RX record and again in its receiver's TX record.
        The TX one goes (as the eBPF program skips it in the kernel)."""
        if not len(batch):
            return batch
        metered = PodTable(self.cfg.node_name, self.source.by_ifindex, ())
        k = batch["key"]
        from_pod = metered.by_address(k["src"], k["ip_version"]) != metered.none
        twice = (k["direction"] == EGRESS) & from_pod & (k["overflow"] == 0)
        if not twice.any():
            return batch
        self.metrics.packets_deduplicated.inc(int(batch["packets"][twice].sum()))
        return take(batch, ~twice)

    def _successor(self) -> bool:
        """--handover auto: whether another agent will take over the links and maps."""
        if self.cluster is None or not (self.cfg.pod_name and self.cfg.pod_namespace):
            log.info("no handover: not a DaemonSet's agent (--kubernetes, --pod-name and "
                     "--pod-namespace)")
            return False
        from agent import successor

        yes, why = successor.ask(self.cluster, self.cfg.pod_namespace, self.cfg.pod_name)
        log.info("handing over to the next agent" if yes else "no handover", extra={
            "why": why})
        return yes

    def _guarded(self, step, what: str) -> None:
        try:
            step()
        except Exception:
            self.metrics.poll_errors.inc()
            log.exception(what)

    def shutdown(self) -> None:
        """Export what is pending (flowEndReason 4), then remove exactly what the
        agent added (TC filters, or flowprobe on VPP interfaces)."""
        try:
            auto = self.cfg.handover == "auto"
            if auto and getattr(self.dataplane, "restart", None) is not None:  # pinned
                self.dataplane.hand_over(self._successor())
            self.dataplane.detach_all()
            # a handover leaves the table pinned for the next agent: nothing forced out,
            # but for auto's (a node shutting down must not keep flows in its bpffs)
            self.poll(final=auto or not getattr(self.dataplane, "handover", False))
            if self.exporter.backlog_records:
                log.warning(
                    "records not delivered at exit",
                    extra={"records": self.exporter.backlog_records},
                )
        finally:
            if self.cluster is not None:
                self.cluster.stop()
            self.exporter.close()
            self.dataplane.close()
            self.ipr.close()
            log.info("agent stopped")
