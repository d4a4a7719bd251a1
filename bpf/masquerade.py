"""Cilium's BPF masquerade, seen from the entry points (bpf/entry.py).

A pod's connection to the outside leaves masqueraded (the node's address), so its
replies come in addressed to the node: Cilium's program on the uplink (cil_from_netdev)
rewrites them back to the pod and, with BPF host routing, delivers them past the pod's
veth. The entry point sees them before that, for the node's address. Cilium keeps the
mapping in a pinned map beside its endpoint map (tc/globals/cilium_snat_v4_external;
bpf/lib/nat.h: key struct ipv4_ct_tuple, value struct ipv4_nat_entry, a reply's
reverse entry flagged TUPLE_F_IN): the entry point looks the reply up there and counts
it for the pod, as the pod receives it (TCP and UDP over IPv4).

The program reaches the map through a map-in-map (cilium_nat), compiled with the type
and flags of the map found at start (a map-in-map holds maps of one kind), or Cilium's
default (an LRU hash, no flags) where there is none yet: cniflow may start before Cilium
on a booting node. Cilium makes a new map when it restarts or resizes it: the pin is
read again every CHECK_SECONDS and a new map put in; one gone, or of other flags, is
taken out (a restart of cniflow takes the new flags).
"""

from __future__ import annotations

import logging
import os
import struct
import time

from bpf import syscall

log = logging.getLogger(__name__)

NAT_MAP = "cilium_snat_v4_external"
KEY_SIZE, VALUE_SIZE = 14, 40  # struct ipv4_ct_tuple (packed), struct ipv4_nat_entry
KINDS = {syscall.MAP_LRU_HASH: "lru_hash", syscall.MAP_HASH: "hash"}
DEFAULT = "lru_hash,0"  # Cilium's map where the kernel has LRU maps
CHECK_SECONDS = 5.0


class Masquerade:
    def __init__(self, endpoints_path: str) -> None:
        """endpoints_path: Cilium's endpoint map (--cilium-endpoints), "" for none."""
        self.path = os.path.join(os.path.dirname(endpoints_path), NAT_MAP) \
            if endpoints_path else ""
        self.template = DEFAULT if self.path else ""  # what the program is compiled for
        self.used = 0  # the id of the map in the program
        self.next_check = 0.0
        self.said = ""  # the last problem logged
        fd = self._open()
        if fd is None:
            return
        try:
            self.template = self._kind(syscall.map_info(fd))
        finally:
            os.close(fd)

    def _open(self) -> int | None:
        if not self.path or not os.path.exists(self.path):
            return None
        try:
            return syscall.obj_get(self.path)
        except OSError as e:
            log.debug("Cilium's SNAT map", extra={"path": self.path, "err": str(e)})
            return None

    def _kind(self, info: tuple[int, int, int, int, int]) -> str:
        kind, key, value, _, flags = info
        if kind in KINDS and (key, value) == (KEY_SIZE, VALUE_SIZE):
            return f"{KINDS[kind]},{flags}"
        self._say("Cilium's SNAT map has a layout cniflow does not know: replies to "
                  "masqueraded connections are not counted at entry points",
                  type=kind, key_size=key, value_size=value)
        return ""

    def _say(self, problem: str, **extra) -> None:
        if self.said != problem:
            self.said = problem
            log.warning(problem, extra={"path": self.path, **extra})

    def refresh(self, program) -> None:
        """Put the pinned map into the program: at the first reconcile, and when Cilium
        has made a new one."""
        if not self.template or program.nat_fd is None or time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + CHECK_SECONDS
        fd = self._open()
        if fd is None:
            self._take_out(program)
            return
        try:
            ident = syscall.map_id(fd)
            if ident == self.used:
                return
            kind = self._kind(syscall.map_info(fd))
            if kind != self.template:
                self._take_out(program)
                if kind:
                    self._say("Cilium's SNAT map was made anew with other flags: replies to "
                              "masqueraded connections are counted again once cniflow "
                              "restarts", flags=kind)
                return
            syscall.update(program.nat_fd, struct.pack("<I", 0), struct.pack("<I", fd))
            self.used, self.said = ident, ""
            log.info("counting replies to masqueraded connections at entry points",
                     extra={"map": self.path, "id": ident})
        except OSError as e:  # the old map, which Cilium left, must not be used either
            self._take_out(program)
            self._say("Cilium's SNAT map could not be used", err=str(e))
        finally:
            os.close(fd)

    def _take_out(self, program) -> None:
        """The map in use is gone, or not the one Cilium uses now: out of the program."""
        if self.used:
            syscall.delete(program.nat_fd, struct.pack("<I", 0))
            self.used = 0
            log.info("Cilium's SNAT map no longer in use", extra={"path": self.path})
