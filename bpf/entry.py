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
loopback and whose ingress hook holds another program, a TCX link or a tc filter: only
there can a program deliver past the veth, and only there is the cost paid (a parse and
one hash lookup a packet, 15 ns). A list of names and globs: those interfaces, whatever
holds their hooks. off: none. Of a device and one stacked on it (a VLAN, a bond on its
slaves, however deep) both chosen, only the lower one is metered: a packet crosses both
ingresses. The devices stacked on an entry point are marked as such, unattached: a packet
that reaches a veth from one is checked against what the entry points counted.

What is not counted this way: a packet whose destination the CNI's own program rewrites
after the entry point is for the node's address there. Replies to a pod's connections
that Cilium masqueraded are found in Cilium's SNAT map (bpf/masquerade.py); the rest (a
NodePort or LoadBalancer Service DNAT'ed to a pod of this node, a hostPort) is reported
by bpf/pasthook.py.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import time

from bpf import syscall
from bpf.attach import HANDLE, PARENT_INGRESS, PREFIX, SPARE_HANDLE

log = logging.getLogger(__name__)

RECHECK_SECONDS = 10.0  # an interface's hooks are read again after this (new ones at once)


class EntryPoints:
    def __init__(self, setting: str, attacher) -> None:
        self.setting = setting
        self.patterns = [] if setting in ("auto", "off") else setting.split(",")
        self.attacher = attacher
        self.checked: dict[int, tuple[float, bool]] = {}  # ifindex -> (when, has a program)
        self.stacked: set[str] = set()  # the devices stacked on the last choice's

    def choose(self, present: dict[int, str], pods: set[int]) -> dict[int, str]:
        """ifindex -> name of the interfaces to attach cniflow_entry to."""
        self.stacked = set()
        if self.setting == "off":
            return {}
        others = {i: n for i, n in present.items() if i not in pods and n != "lo"}
        out = {i: n for i, n in others.items()
               if any(fnmatch.fnmatchcase(n, p) for p in self.patterns)} if self.patterns \
            else self._held_ones(others)
        names = set(out.values())
        stacks = {n: stacked(n) for n in names}  # (lower, upper) devices
        chosen = {i: n for i, n in out.items() if not stacks[n][0] & names}
        self.stacked = {u for n in chosen.values() for u in stacks[n][1]}
        return chosen

    def _held_ones(self, others: dict[int, str]) -> dict[int, str]:
        """Those whose ingress holds another program (read again every RECHECK_SECONDS)."""
        now = time.monotonic()
        for ifindex in [i for i in self.checked if i not in others]:
            del self.checked[ifindex]
        out = {}
        for ifindex, name in others.items():
            when, held = self.checked.get(ifindex, (-RECHECK_SECONDS, False))
            if now - when >= RECHECK_SECONDS:
                held = self._held(ifindex, held)
                self.checked[ifindex] = (now, held)
            if held:
                out[ifindex] = name
        return out

    def _held(self, ifindex: int, before: bool) -> bool:
        """Whether the interface's ingress hook holds a program that is not cniflow's (an
        earlier agent's, not yet replaced, is cniflow's too); `before` when it cannot be
        read now."""
        a = self.attacher
        try:
            if a.tcx:
                for prog, _ in syscall.query(ifindex, syscall.TCX_INGRESS):
                    if prog not in a.ours and not _name(prog).startswith(PREFIX):
                        return True
            return any(handle not in (HANDLE, SPARE_HANDLE) and not name.startswith(PREFIX)
                       for handle, _, _, name in a.filters(ifindex, PARENT_INGRESS))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT, errno.ENODEV):  # no clsact, or gone
                return False
            return before


def _name(prog: int) -> str:
    """A program's name; "" when it went meanwhile (a CNI replacing it: not cniflow's)."""
    try:
        return syscall.prog_name(prog)
    except OSError:
        return ""


def stacked(name: str) -> tuple[set[str], set[str]]:
    """The devices an interface is stacked on (a VLAN's parent, a bond's slaves) and
    those stacked on it (its VLANs, its bond), however deep, from the kernel's adjacency
    lists in sysfs (lower_<name>, upper_<name> links)."""
    return _adjacent(name, "lower_"), _adjacent(name, "upper_")


def _adjacent(name: str, kind: str, depth: int = 8) -> set[str]:
    out: set[str] = set()
    todo = [name]
    while todo and depth:
        depth -= 1
        found = set()
        for n in todo:
            try:
                found |= {e[len(kind):] for e in os.listdir(f"/sys/class/net/{n}")
                          if e.startswith(kind)}
            except OSError:
                continue
        todo = list(found - out)
        out |= found
    return out
