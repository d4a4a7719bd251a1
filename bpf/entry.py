"""Entry points: the node's other interfaces, where packets for metered pods come in.

cniflow counts what a pod receives at its host-side veth's egress. A CNI that delivers
with bpf_redirect_peer puts the packet into the pod's end of the veth, past that hook:
Cilium with BPF host routing (its default where the kernel allows) does so from its
programs on physical devices and tunnel devices (cil_from_netdev, cil_from_overlay),
and from every pod's veth ingress (cil_from_container), an unmetered pod's too. At an
entry point's ingress cniflow_entry counts each packet whose destination is a metered
pod's address as that pod's veth's egress, before the CNI's program runs (TCX head).
A packet that still reaches the veth's egress (another CNI, legacy host routing) finds
its flow counted at the entry point and is not counted again (flow.bpf.c).

--entry-points auto (the default): every interface that is not a metered pod's nor the
loopback and whose ingress hook holds another program, a TCX link or a cls_bpf filter:
only there can a program deliver past the veth, and only there is the cost paid (a parse
and one hash lookup a packet). A list of names and globs: those interfaces, whatever
holds their hooks. off: none.

What is not counted this way: a packet whose destination is rewritten after the entry
point (a NodePort or LoadBalancer Service DNAT'ed by the CNI's own program to a pod of
this node) is for the node's address there; bpf/pasthook.py still reports those.
"""

from __future__ import annotations

import fnmatch
import logging
import time

from bpf import syscall
from bpf.attach import HANDLE, PARENT_INGRESS, SPARE_HANDLE

log = logging.getLogger(__name__)

RECHECK_SECONDS = 10.0  # an interface's hooks are read again after this (new ones at once)


class EntryPoints:
    def __init__(self, setting: str, attacher) -> None:
        self.setting = setting
        self.patterns = [] if setting in ("auto", "off") else setting.split(",")
        self.attacher = attacher
        self.checked: dict[int, tuple[float, bool]] = {}  # ifindex -> (when, has a program)

    def choose(self, present: dict[int, str], pods: set[int]) -> dict[int, str]:
        """ifindex -> name of the interfaces to attach cniflow_entry to."""
        if self.setting == "off":
            return {}
        others = {i: n for i, n in present.items() if i not in pods and n != "lo"}
        if self.patterns:
            return {i: n for i, n in others.items()
                    if any(fnmatch.fnmatchcase(n, p) for p in self.patterns)}
        now = time.monotonic()
        for ifindex in [i for i in self.checked if i not in others]:
            del self.checked[ifindex]
        out = {}
        for ifindex, name in others.items():
            when, held = self.checked.get(ifindex, (-RECHECK_SECONDS, False))
            if now - when >= RECHECK_SECONDS:
                held = self._held(ifindex)
                self.checked[ifindex] = (now, held)
            if held:
                out[ifindex] = name
        return out

    def _held(self, ifindex: int) -> bool:
        """Whether the interface's ingress hook holds a program that is not cniflow's."""
        a = self.attacher
        try:
            if a.tcx and any(prog not in a.ours
                             for prog, _ in syscall.query(ifindex, syscall.TCX_INGRESS)):
                return True
            return any(handle not in (HANDLE, SPARE_HANDLE)
                       for handle, *_ in a.filters(ifindex, PARENT_INGRESS))
        except OSError:  # gone, or no clsact: nothing there
            return False
