"""Packets delivered into metered pods past the hook that counts them.

cniflow counts what a pod receives at its host-side veth's egress. A CNI that
delivers with bpf_redirect_peer puts the packet straight into the pod's end of the
veth, past that hook: Cilium does so with BPF host routing (its default where the
kernel allows) for traffic from a physical device, i.e. from other nodes and from
outside the cluster (bpf/lib/local_delivery.h, should_redirect_peer()), and for pod
to pod traffic on one node, which cniflow counts at the sender's veth instead.

cniflow's entry points (bpf/entry.py) count most of those where they come in. The
veth's counters tell what is left: its pod's end received (rx) what the host side
sent (tx) plus what was redirected into it. Less what cniflow counted for this pod
at the ingress of another metered pod of the node (pod to pod) or at an entry point,
the rest was delivered unseen (a Service's traffic DNAT'ed to the pod by the CNI's
program after the entry point, or --entry-points off): counted in
cniflow_packets_past_hook_total and said once an interface, so an undercount is
never silent. Where packets counted at an entry point also cross the veth (a CNI
that does not redirect past it), the figure is low by them: a lower bound still.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from agent.peerns import past_host_side

log = logging.getLogger(__name__)

CHECK_SECONDS = 5.0  # two link dumps and one a pod's namespace


class PastHook:
    def __init__(self, metrics) -> None:
        self.metrics = metrics
        self.counted: Counter = Counter()  # ifindex -> packets counted at a sender for it
        self.pending: dict[int, int] | None = None  # read at the last check, not yet used
        self.state: dict[int, list[int]] = {}  # ifindex -> [past, counted at first, shown]
        self.said: set[int] = set()
        self.names: dict[int, str] = {}

    def read(self, attached: dict[int, str]) -> None:
        """At a reconcile: each attached veth's deliveries past its host side so far
        (a lower bound). A veth seen for the first time takes its baseline now, with
        what was counted for it so far (drains before now: a lower bound too)."""
        try:
            past = past_host_side(set(attached))
        except OSError as e:
            log.debug("reading veth counters failed", extra={"err": str(e)})
            return
        for ifindex in [i for i in self.state if i not in attached]:
            del self.state[ifindex]
            self.said.discard(ifindex)
            self.counted.pop(ifindex, None)
        for ifindex, total in past.items():
            if ifindex not in self.state:
                self.state[ifindex] = [total, self.counted[ifindex], 0]
        self.pending, self.names = past, attached

    def counted_elsewhere(self, ifindexes: np.ndarray, packets: np.ndarray) -> None:
        """Packets cniflow counted for metered veths (0: none) elsewhere than at their
        egress: at a sender's veth on this node, or at an entry point (bpf/entry.py)."""
        mine = ifindexes != 0
        if mine.any():
            index, inverse = np.unique(ifindexes[mine], return_inverse=True)
            sums = np.bincount(inverse, weights=packets[mine])
            for ifindex, n in zip(index.tolist(), sums.tolist(), strict=True):
                self.counted[ifindex] += int(n)

    def drained(self, receivers: np.ndarray, packets: np.ndarray) -> None:
        """After a drain: what cniflow counted at senders for each metered receiver; then
        the pending reading compared, now that everything counted before it is drained
        (what was counted after it only makes the difference smaller)."""
        self.counted_elsewhere(receivers, packets)
        pending, self.pending = self.pending, None
        for ifindex, total in (pending or {}).items():
            state = self.state.get(ifindex)
            if state is None:
                continue
            unseen = (total - state[0]) - (self.counted[ifindex] - state[1])
            if unseen > state[2]:
                self.metrics.packets_past_hook.inc(unseen - state[2])
                state[2] = unseen
                if ifindex not in self.said:
                    self.said.add(ifindex)
                    log.warning("packets reached the pod past cniflow's hook on its veth (a "
                                "CNI delivering with bpf_redirect_peer, as Cilium's BPF host "
                                "routing does from other nodes): not counted",
                                extra={"interface": self.names.get(ifindex, ifindex),
                                       "packets": unseen})
