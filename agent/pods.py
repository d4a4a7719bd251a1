"""The pods this agent meters: opt-in decisions, their resolved host interfaces,
and who is behind each interface (for the records' pod metadata)."""

from __future__ import annotations

import logging

from agent.kube import Cluster, Pod
from agent.metrics import Metrics
from agent.optin import decide
from agent.podmeta import PodTable
from agent.resolve import Resolver
from agent.services import Services
from agent.workloads import workloads

log = logging.getLogger(__name__)

MAX_WARNED = 1024  # bad annotations remembered (and warned about once each)


class PodSource:
    def __init__(self, cluster: Cluster, resolver: Resolver, metrics: Metrics,
                 cluster_cidrs: tuple[str, ...] = (), labels: bool = False,
                 enterprise_number: int = 0) -> None:
        self.cluster, self.resolver, self.metrics = cluster, resolver, metrics
        self.cluster_cidrs = cluster_cidrs
        self.labels, self.enterprise_number = labels, enterprise_number
        self.services = Services(cluster.service_objects, cluster.node_addresses)
        self.resolved: dict[str, tuple[tuple[str, ...], int]] = {}  # uid -> (ips, ifindex)
        self.by_ifindex: dict[int, Pod] = {}  # metered now
        self.remembered: dict[int, Pod] = {}  # gone, while their flows are still reported
        self.known: list[Pod] = []
        self._warned: set[tuple[str, str]] = set()
        self._over = False
        self._host_logged: set[str] = set()

    def desired(self, present: dict[int, str]) -> dict[int, str]:
        """ifindex -> interface name of every opted-in pod resolved to a present veth."""
        pods, namespaces = self.cluster.snapshot()
        d = decide(pods, namespaces)
        for who, message in d.invalid:
            if (who, message) in self._warned:
                continue
            if len(self._warned) >= MAX_WARNED:  # what namespace owners write: bounded
                if not self._over:
                    log.warning("more bad annotations than are remembered: the rest are "
                                "neither logged nor counted until some are fixed",
                                extra={"remembered": MAX_WARNED})
                self._over = True
                continue
            self._warned.add((who, message))
            self.metrics.annotation_errors.inc()
            log.warning("bad annotation", extra={"object": who, "problem": message})
        # forget what is fixed or gone: a value set again is warned about again
        self._warned &= set(d.invalid)
        self._over = self._over and len(self._warned) >= MAX_WARNED
        for pod in d.host_network:
            if pod.uid not in self._host_logged:
                self._host_logged.add(pod.uid)
                log.info("hostNetwork pod opted in: it has no interface of its own, not metered",
                         extra={"pod": f"{pod.namespace}/{pod.name}"})
        self.known = pods
        self._host_logged &= {p.uid for p in pods}
        want: dict[int, str] = {}
        by_ifindex: dict[int, Pod] = {}
        live = {p.uid for p in d.metered}
        for uid in [u for u in self.resolved if u not in live]:
            del self.resolved[uid]
        for pod in d.metered:
            cached = self.resolved.get(pod.uid)
            fresh = cached and cached[0] == pod.ips and cached[1] in present
            ifindex = cached[1] if fresh else None
            if ifindex is None:
                ifindex = self.resolver.resolve(pod.ips) if pod.ips else None
                if ifindex is None or ifindex not in present:
                    continue  # not there yet: tried again next poll
                self.resolved[pod.uid] = (pod.ips, ifindex)
            want[ifindex] = present[ifindex]
            other = by_ifindex.get(ifindex)
            if other is None or other.created <= pod.created:  # one interface, the newer pod
                by_ifindex[ifindex] = pod
        for ifindex, pod in self.by_ifindex.items():
            if ifindex not in by_ifindex:
                self.remembered[ifindex] = pod
        self.by_ifindex = by_ifindex
        self.metrics.pods_opted_in.set(len(d.metered))
        return want

    def addresses(self) -> dict[str, int]:
        """Address -> interface of every metered pod (the entry points count by them)."""
        return {ip: ifindex for ifindex, pod in self.by_ifindex.items() for ip in pod.ips}

    def table(self, still_reported: set[int]) -> PodTable:
        """Metadata for this poll's records; forget gone pods whose flows are all out."""
        for ifindex in [i for i in self.remembered if i not in still_reported]:
            del self.remembered[ifindex]
        metered = {**self.remembered, **self.by_ifindex}
        replicasets, jobs = self.cluster.owners()
        return PodTable(self.cluster.node_name, metered, self.known, self.cluster_cidrs,
                        self.cluster.node_addresses(), self.services,
                        workloads([*self.known, *metered.values()], replicasets, jobs),
                        self.labels, self.enterprise_number)
