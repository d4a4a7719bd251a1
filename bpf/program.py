"""The loaded classifier: two program fds shared by every interface, and its maps.

BCC compiles and loads it in a child process (bpf/compile.py); this process
only holds the file descriptors and talks to the maps with bpf(2) directly.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess
import sys
from typing import NamedTuple

from bpf import syscall
from bpf.compile import METERED_SIZE, OVERFLOW_SIZE, SPARE, SPARES
from bpf.pins import PinDir

log = logging.getLogger(__name__)

# enum stat_index in flow.bpf.c
STAT_NAMES = ("map_full", "not_ip", "malformed", "lost", "dedup")
METERED_POD, METERED_ENTRY = 1, 2  # the metered map's values
DIR_ENTRY = 2  # a key's direction: the interface's egress, counted at an entry point
ADDR_KEY_SIZE = 20


def addr_key(ip: str) -> bytes:
    """struct addr_key of flow.bpf.c for an address: IP version (u32), 16 octets."""
    raw = ipaddress.ip_address(ip).packed
    return struct.pack("<I", 4 if len(raw) == 4 else 6) + raw.ljust(16, b"\0")


class LoadError(RuntimeError):
    """The program did not compile or load: BCC, headers or the kernel said no."""


class Prog(NamedTuple):
    fd: int
    name: str


def expected_maps(map_size: int, shared: bool) -> dict[str, tuple[int, int, int, int]]:
    """(type, key size, value size, max entries) of each map flow.bpf.c declares."""
    flows = (syscall.MAP_HASH if shared else syscall.MAP_PERCPU_HASH, 48, 40, map_size)
    return {"flows_a": flows, "flows_b": flows,
            "overflow_a": (syscall.MAP_HASH, 48, 40, OVERFLOW_SIZE),
            "overflow_b": (syscall.MAP_HASH, 48, 40, OVERFLOW_SIZE),
            "slot": (syscall.MAP_ARRAY, 4, 4, 1),
            "stats": (syscall.MAP_PERCPU_ARRAY, 4, 8, len(STAT_NAMES)),
            "fill": (syscall.MAP_PERCPU_ARRAY, 4, 8, 2),
            "metered": (syscall.MAP_HASH, 4, 4, METERED_SIZE),
            "pod_addrs": (syscall.MAP_HASH, 20, 4, METERED_SIZE),
            "entry_overflowed": (syscall.MAP_LRU_HASH, 48, 1, OVERFLOW_SIZE),
            "pod_side": (syscall.MAP_HASH, 20, 16, METERED_SIZE),
            "from_sender": (syscall.MAP_LRU_HASH, 48, 1, OVERFLOW_SIZE)}


class FlowProgram:
    def __init__(self, map_size: int = 65536, shared: bool = True,
                 pins: PinDir | None = None, nat: str = "", pod_side: bool = False) -> None:
        """shared: one hash for all CPUs, counters added atomically (the default: the
        drain copies half as much and merges nothing, bench/run.py); False: a per-CPU
        hash, no atomics, values folded in user space. pins: the maps live there, and
        those an earlier agent pinned are reused when their layout matches. nat: the
        type and flags of Cilium's SNAT map ("lru_hash,0"), for entry points to look up
        replies to masqueraded connections in (bpf/masquerade.py)."""
        self.map_size = map_size
        self.shared = shared
        self.ncpu = syscall.possible_cpus()
        self.value_copies = 1 if shared else self.ncpu  # values a map entry holds
        self.pins = pins
        self.adopted = False  # the maps were an earlier agent's
        self.stale: dict[str, int] = {}  # fds of an earlier agent's maps of another layout
        if pins is not None:
            self.stale = pins.reuse_maps(expected_maps(map_size, shared))
            self.adopted = not self.stale and os.path.exists(pins.map_path("flows_a"))
        try:
            try:
                fds = self._load(map_size, shared, pins.maps if pins else "", nat, pod_side)
            except LoadError as e:
                if not nat:
                    raise
                log.warning("replies to masqueraded connections not counted at entry "
                            "points: the program does not build with Cilium's SNAT map",
                            extra={"err": str(e)})
                fds = self._load(map_size, shared, pins.maps if pins else "", "", pod_side)
        except LoadError:
            for fd in self.stale.values():
                os.close(fd)
            raise
        self.ingress = Prog(fds["cniflow_ingress"], "cniflow_ingress")
        self.egress = Prog(fds["cniflow_egress"], "cniflow_egress")
        self.entry = Prog(fds["cniflow_entry"], "cniflow_entry")
        self.pod = Prog(fds["cniflow_pod"], "cniflow_pod")
        # the same programs loaded once more: the other copy for a hook's chain
        self.spares = tuple(Prog(fds[name + SPARE], name) for name in SPARES)
        self._jiffies = fds["cniflow_jiffies"]
        self.flow_map_fds = (fds["flows_a"], fds["flows_b"])
        self.overflow_map_fds = (fds["overflow_a"], fds["overflow_b"])
        self.overflow_size = OVERFLOW_SIZE
        self._slot, self._stats, self._fill = fds["slot"], fds["stats"], fds["fill"]
        self._metered = fds["metered"]
        self._pod_addrs, self._pod_side = fds["pod_addrs"], fds["pod_side"]
        self.nat_fd = fds.get("cilium_nat")  # the map-in-map Cilium's SNAT map goes into
        self.addresses: dict[bytes, bytes] | None = None  # pod_addrs: key -> value
        self.pod_ends: dict[bytes, bytes] | None = None  # pod_side: key -> value
        self.full: set[str] = set()  # maps said to be full
        self._fds = list(fds.values())
        log.info("program loaded", extra={"map_size": map_size})

    @staticmethod
    def _load(map_size: int, shared: bool = False, pin_dir: str = "",
              nat: str = "", pod_side: bool = False) -> dict[str, int]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with parent, child:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bpf.compile", str(child.fileno()), str(map_size),
                 "shared" if shared else "percpu"] + ([f"pin={pin_dir}"] if pin_dir else [])
                + ([f"nat={nat}"] if nat else []) + (["pod=1"] if pod_side else []),
                pass_fds=[child.fileno()],
                stderr=subprocess.PIPE,
                text=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            child.close()
            msg, fds, _, _ = socket.recv_fds(parent, 65536, 64)
            _, err = proc.communicate(timeout=120)
        reply = json.loads(msg or b"{}") if msg else {"error": err.strip() or "compiler died"}
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise LoadError(f"loading flow.bpf.c failed: {reply['error']}")
        return dict(zip(reply["names"], fds, strict=True))

    def set_slot(self, value: int) -> None:
        """Point the program at flows_a (0) or flows_b (1)."""
        syscall.update(self._slot, struct.pack("<I", 0), struct.pack("<I", value))

    def get_slot(self) -> int:
        return struct.unpack("<I", syscall.lookup(self._slot, struct.pack("<I", 0), 4))[0]

    def fill(self, slot: int) -> int:
        """New flows inserted into a flow map since it was last drained."""
        raw = syscall.lookup(self._fill, struct.pack("<I", slot), 8 * self.ncpu)
        return sum(struct.unpack(f"<{self.ncpu}Q", raw))

    def reset_fill(self, slot: int) -> None:
        syscall.update(self._fill, struct.pack("<I", slot), bytes(8 * self.ncpu))

    def meter(self, ifindex: int, on: bool, entry: bool = False) -> None:
        """Tell the program an interface is metered (its senders' packets are counted at
        its ingress, so not again at another metered interface's egress), or an entry
        point (what it counted is not counted again at a veth's egress), or neither."""
        key = struct.pack("<I", ifindex)
        if on:
            syscall.update(self._metered, key, struct.pack(
                "<I", METERED_ENTRY if entry else METERED_POD))
        else:
            syscall.delete(self._metered, key)

    def pod_addresses(self, want: dict[bytes, int]) -> None:
        """Make pod_addrs hold exactly `want` (addr_key -> the pod's host interface, see
        addr_key()). The first call also removes what a pinned map held from an earlier
        agent (pods gone meanwhile: their interface index may be another pod's by now)."""
        self.addresses = self._sync(self._pod_addrs, "pod_addrs", self.addresses, {
            k: struct.pack("<I", i) for k, i in want.items()},
            "packets for the rest of the pods are not counted at entry points", 4)

    def pod_side_addresses(self, want: dict[bytes, tuple[int, int, bytes]]) -> None:
        """Make pod_side hold exactly `want` (addr_key -> (host-side ifindex, pod-side
        ifindex, pod-side MAC)): the pods counted at their end of the veth
        (bpf/podside.py)."""
        self.pod_ends = self._sync(self._pod_side, "pod_side", self.pod_ends, {
            k: struct.pack("<II6sxx", *v) for k, v in want.items()},
            "the rest of the pods are counted at their host side", 16)

    def pod_side_without(self, host: int) -> None:
        """pod_side's entries for one host-side veth out (whatever else it holds)."""
        if self.pod_ends is None:
            self.pod_ends = _read(self._pod_side, 16)
        for key in [k for k, v in self.pod_ends.items()
                    if struct.unpack_from("<I", v)[0] == host]:
            syscall.delete(self._pod_side, key)
            del self.pod_ends[key]

    def _sync(self, fd: int, name: str, have: dict[bytes, bytes] | None,
              want: dict[bytes, bytes], lost: str, size: int) -> dict[bytes, bytes]:
        """What changed written one entry at a time (pods come and go a few a second),
        removals first; `have` None: read from the map (pinned: an earlier agent's)."""
        if have is None:
            have = _read(fd, size)
        for key in [k for k in have if k not in want]:
            syscall.delete(fd, key)
            del have[key]
        for key, value in want.items():
            if have.get(key) != value:
                try:
                    syscall.update(fd, key, value)
                except OSError as e:  # full: said once
                    if name not in self.full:
                        log.warning(f"{name} map full: {lost}",
                                    extra={"err": str(e), "entries": METERED_SIZE})
                    self.full.add(name)
                    continue
                have[key] = value
        return have

    def entry_marks(self) -> set[int]:
        """The interfaces the metered set holds as entry points (and key 0, an earlier
        release's flag)."""
        return {struct.unpack("<I", k)[0] for k, v in syscall.lookup_batch(
            self._metered, 4, 4, METERED_SIZE) if struct.unpack("<I", v)[0] != METERED_POD}

    def unmeter_pods(self) -> int:
        """Take every pod interface out of the metered set (an earlier agent's, with
        dedup, when this one runs without): how many."""
        pods = [k for k, v in syscall.lookup_batch(self._metered, 4, 4, METERED_SIZE)
                if struct.unpack("<I", v)[0] == METERED_POD]
        for key in pods:
            syscall.delete(self._metered, key)
        return len(pods)

    def jiffies(self) -> int:
        """The kernel's jiffies now (low 32 bits), the clock of the flow times."""
        return syscall.test_run(self._jiffies)[0]

    def stats(self) -> dict[str, int]:
        """Per-CPU counters of flow.bpf.c, summed."""
        out = {}
        for i, name in enumerate(STAT_NAMES):
            raw = syscall.lookup(self._stats, struct.pack("<I", i), 8 * self.ncpu)
            out[name] = sum(struct.unpack(f"<{self.ncpu}Q", raw))
        return out

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _read(fd: int, value_size: int) -> dict[bytes, bytes]:
    """An address map's entries (pod_addrs, pod_side): a pinned one's, an earlier agent's."""
    return dict(syscall.lookup_batch(fd, ADDR_KEY_SIZE, value_size, METERED_SIZE))
