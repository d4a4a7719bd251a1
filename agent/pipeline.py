"""The composition root: resolve, attach, drain, aggregate, export, once per poll.

interfaces --> bpf.attach --> (kernel meters) --> bpf.drain
    --> flowtable (timeouts, end of flow) --> exporter (IPFIX) --> transport
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from agent.config import Config
from agent.exporter import Exporter
from agent.flowtable import FlowTable
from agent.interfaces import InterfaceSet, links
from agent.metrics import Metrics
from agent.records import FLOW_DTYPE
from agent.transport import make as make_transport

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, cfg: Config, metrics: Metrics | None = None) -> None:
        """Everything that can be wrong with the input is checked before the
        program is loaded, so a bad setting attaches nothing."""
        from pyroute2 import IPRoute

        from bpf.attach import Attacher
        from bpf.drain import BatchDrain
        from bpf.program import FlowProgram

        self.cfg = cfg
        self.metrics = metrics or Metrics()
        host, port = cfg.collector_host_port
        tls = None
        if cfg.transport == "tls":
            from agent.transport import client_tls

            tls = client_tls(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
        self.transport = make_transport(cfg.transport, host, port, tls)
        self.ipr = IPRoute()
        self.cluster = None
        if cfg.kubernetes:
            from agent.kube import Cluster
            from agent.pods import PodSource
            from agent.resolve import Resolver

            self.cluster = Cluster(cfg.node_name, cfg.kubeconfig, self.metrics)
            self.source = PodSource(self.cluster, Resolver(self.ipr), self.metrics)
        else:
            self.source = InterfaceSet(cfg.interface)
            self.source.check_named(links(self.ipr))
        self.program = FlowProgram(cfg.map_size)
        self.drain = BatchDrain(self.program)
        self.attacher = Attacher(self.program, cfg.tc_priority, self.ipr)
        self.table = FlowTable(
            cfg.active_timeout, cfg.idle_timeout, cfg.max_flows, end_grace_s=cfg.poll_interval
        )
        self.exporter = Exporter(
            self.transport,
            cfg.observation_domain_id,
            self.metrics,
            cfg.max_message_size,
            cfg.template_refresh,
            cfg.export_backlog,
            with_pods=cfg.kubernetes,
            biflow=cfg.biflow,
        )
        self.names: dict[int, str] = {}
        self.failed: set[int] = set()
        self.metrics.map_size.set(cfg.map_size)

    def reconcile(self) -> None:
        """Desired against attached, in one place: attach what is wanted, detach what
        is no longer wanted (opt-out), forget what vanished (its filters went with it)."""
        present = links(self.ipr)
        want = self.source.desired(present)
        for ifindex in list(self.attacher.attached):
            if ifindex not in present:
                self.attacher.forget(ifindex)
                log.info("interface vanished", extra={"ifindex": ifindex})
            elif ifindex not in want:
                self.attacher.detach(ifindex)
        for ifindex, name in want.items():
            if ifindex in self.attacher.attached or ifindex in self.failed:
                continue
            try:
                self.attacher.attach(ifindex, name)
                self.names[ifindex] = name
            except Exception as e:  # the interface may vanish between scan and attach
                self.failed.add(ifindex)
                self.metrics.attach_failures.inc()
                log.warning("attach failed", extra={"interface": name, "err": str(e)})
        self.failed &= set(present)
        self.metrics.interfaces_attached.set(len(self.attacher.attached))

    def poll(self, final: bool = False) -> None:
        t0 = time.perf_counter()
        batch = self.drain.drain()
        self.metrics.drain_seconds.observe(time.perf_counter() - t0)
        self.metrics.map_entries.set(len(batch))
        self.metrics.kernel_stats(self.program.stats())
        evicted = self.table.update(batch, unique=True)  # map keys
        due = self.table.flush() if final else self.table.expire(int(time.time() * 1000))
        if self.cfg.biflow:  # both directions leave together, to be paired
            due = np.concatenate([due, self.table.partners(due)])
        out = np.concatenate([evicted, due]) if len(evicted) else due
        reported = set(self.attacher.attached) | set(
            np.unique(self.table.flows["key"]["ifindex"]).tolist()) | set(
            np.unique(out["key"]["ifindex"]).tolist())
        pods = None
        if self.cluster is not None:
            pods = self.source.table(reported)
            self.metrics.pod_traffic(batch, {**self.source.remembered, **self.source.by_ifindex})
            self.metrics.pods_attached.set(
                sum(1 for i in self.source.by_ifindex if i in self.attacher.attached))
        t1 = time.perf_counter()
        self.exporter.export(out if len(out) else np.zeros(0, FLOW_DTYPE), self.names, pods)
        self.metrics.export_seconds.observe(time.perf_counter() - t1)
        self.metrics.flows_active.set(len(self.table))
        for ifindex in [i for i in self.names if i not in reported]:
            del self.names[ifindex]

    def run(self, stop: threading.Event) -> None:
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
            if not self.cluster.wait_synced(10):
                log.warning("API server not reached yet: metering what is known, retrying")
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.reconcile()
                    self.poll()
                except Exception:  # one bad poll must not stop metering for the node
                    self.metrics.poll_errors.inc()
                    log.exception("poll failed")
                stop.wait(max(0.0, self.cfg.poll_interval - (time.monotonic() - started)))
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Export what is pending (flowEndReason 4), then remove exactly our filters."""
        try:
            self.attacher.detach_all()
            self.poll(final=True)
            if self.exporter.backlog_records:
                log.warning(
                    "records not delivered at exit",
                    extra={"records": self.exporter.backlog_records},
                )
        finally:
            if self.cluster is not None:
                self.cluster.stop()
            self.exporter.close()
            self.program.close()
            self.ipr.close()
            log.info("agent stopped")
