"""Drain the kernel flow map into a FLOW_DTYPE batch: one syscall per many flows.

The program writes into one of two hash maps (see flow.bpf.c). A drain flips
the slot, waits out programs still running on the old map, then empties it with
BPF_MAP_LOOKUP_AND_DELETE_BATCH into buffers allocated once. Values of the
per-CPU layout are folded with numpy reductions, and jiffies become wall-clock
milliseconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np

from agent.records import FLOW_DTYPE, KEY_DTYPE
from bpf import syscall

log = logging.getLogger(__name__)

VAL_DTYPE = np.dtype(
    [
        ("packets", "<u8"),
        ("octets", "<u8"),
        ("first", "<u8"),  # jiffies
        ("last", "<u8"),
        ("tcp_flags", "<u2"),
        ("min_ttl", "u1"),
        ("max_ttl", "u1"),
        ("tos", "u1"),
        ("pad", "u1", (3,)),
    ]
)
assert VAL_DTYPE.itemsize % 8 == 0  # the kernel pads per-CPU values to 8 octets

# TC programs run with bottom halves off and finish in microseconds; this is
# ample for every program that read the old slot to be done with its map.
GRACE_SECONDS = 0.002

HZ_CHOICES = (100, 250, 300, 1000)  # CONFIG_HZ's choices
_LOW32 = np.uint64(0xFFFFFFFF)


class Jiffies:
    """Turns the program's jiffies into wall-clock milliseconds. A program reads
    jiffies for 2 ns, the coarse clock for 15; HZ is a kernel build option, so it
    is measured once against CLOCK_MONOTONIC and rounded to the nearest choice."""

    def __init__(self, read: Callable[[], int], seconds: float = 0.2) -> None:
        self.read = read  # the kernel's jiffies, low 32 bits
        for _ in range(3):  # a busy machine can stall a reading: measure again
            j0, t0 = self._edge()
            time.sleep(seconds)
            j1, t1 = self._edge()
            rate = ((j1 - j0) & 0xFFFFFFFF) / (t1 - t0)
            self.hz = min(HZ_CHOICES, key=lambda hz: abs(math.log(rate / hz)))
            if abs(rate / self.hz - 1) < 0.04:
                break
        log.info("kernel clock", extra={"hz": self.hz, "measured": round(rate, 1)})

    def _edge(self) -> tuple[int, float]:
        """Jiffies and monotonic time just after a tick: no fraction of a tick lost."""
        first = self.read()
        while (j := self.read()) == first:
            pass
        return j, time.monotonic()

    def placer(self) -> Callable[[np.ndarray], None]:
        """Read the clocks now; returns a function that turns an array of jiffies up
        to now into wall-clock milliseconds, in place."""
        now_j, now_ms = np.uint64(self.read()), np.uint64(time.time_ns() // 1_000_000)
        ms_per, hz = np.uint64(1000), np.uint64(self.hz)

        def place(t: np.ndarray) -> None:
            np.subtract(now_j, t, out=t)  # ticks ago; modulo 2**32, as the reading
            t &= _LOW32
            t *= ms_per
            t //= hz
            np.subtract(now_ms, t, out=t)

        return place


_ROW = np.dtype([("key", np.void, KEY_DTYPE.itemsize), ("val", np.void, VAL_DTYPE.itemsize)])
assert _ROW.itemsize == FLOW_DTYPE.itemsize
assert [FLOW_DTYPE.fields[n][1] - KEY_DTYPE.itemsize for n in ("packets", "first_ms", "tos")] == [
    VAL_DTYPE.fields[n][1] for n in ("packets", "first", "tos")]


class BatchDrain:
    """Owns the preallocated buffers and the slot flip for one FlowProgram."""

    def __init__(self, program, ncpu: int | None = None, keep: bool = False) -> None:
        """keep: the idle map is read, not emptied, until forget() (bpf/journal.py
        deletes it only once what it held is committed)."""
        self.program = program
        self.keep = keep
        self.held = (0, 0)  # entries of the idle flow and overflow maps read, not deleted
        self.capacity = program.map_size
        self.ncpu = ncpu or program.value_copies
        self.fds = list(program.flow_map_fds)
        self.overflow_fds = list(program.overflow_map_fds)
        self.overflow_capacity = program.overflow_size
        self.keys = np.zeros(self.capacity, KEY_DTYPE)
        self.vals = np.zeros((self.capacity, self.ncpu), VAL_DTYPE)
        # Overflow entries are few (one per interface, direction and IP version) and
        # always in a shared map: their own small buffers.
        self.overflow_keys = np.zeros(self.overflow_capacity, KEY_DTYPE)
        self.overflow_vals = np.zeros((self.overflow_capacity, 1), VAL_DTYPE)
        self.overflowed = 0  # entries of the last drain's overflow map
        self.active = program.get_slot() if keep else 0  # an adopted map: where it was
        program.set_slot(self.active)
        self.clock = Jiffies(program.jiffies)

    def fill(self) -> int:
        """New flows in the map the program writes now (drain early when it fills)."""
        return self.program.fill(self.active)

    def drain_raw(self) -> int:
        """Flip and empty the idle map into self.keys / self.vals and its overflow map
        into self.overflow_keys / _vals (count in self.overflowed); return the count."""
        idle = self.active
        self.active ^= 1
        self.program.set_slot(self.active)
        time.sleep(GRACE_SECONDS)
        self.program.reset_fill(idle)
        read = syscall.lookup_batch_into if self.keep else syscall.lookup_and_delete_batch
        self.overflowed = read(
            self.overflow_fds[idle], self.overflow_keys.ctypes.data,
            self.overflow_vals.ctypes.data, KEY_DTYPE.itemsize, VAL_DTYPE.itemsize,
            self.overflow_capacity)
        n = read(self.fds[idle], self.keys.ctypes.data, self.vals.ctypes.data,
                 KEY_DTYPE.itemsize, VAL_DTYPE.itemsize * self.ncpu, self.capacity)
        self.held = (n, self.overflowed) if self.keep else (0, 0)
        return n

    @property
    def idle(self) -> int:
        return self.active ^ 1

    def forget(self) -> None:
        """Delete what the last drain read from the idle maps (keep mode), by key."""
        n, m = self.held
        if n:
            syscall.delete_batch(self.fds[self.idle], self.keys.ctypes.data,
                                 KEY_DTYPE.itemsize, n)
        if m:
            syscall.delete_batch(self.overflow_fds[self.idle], self.overflow_keys.ctypes.data,
                                 KEY_DTYPE.itemsize, m)
        self.held = (0, 0)

    def empty(self, slot: int) -> None:
        """Delete everything in one slot's flow and overflow maps (read, discarded)."""
        syscall.lookup_and_delete_batch(self.fds[slot], self.keys.ctypes.data,
                                        self.vals.ctypes.data, KEY_DTYPE.itemsize,
                                        VAL_DTYPE.itemsize * self.ncpu, self.capacity)
        syscall.lookup_and_delete_batch(self.overflow_fds[slot], self.overflow_keys.ctypes.data,
                                        self.overflow_vals.ctypes.data, KEY_DTYPE.itemsize,
                                        VAL_DTYPE.itemsize, self.overflow_capacity)

    def drain(self) -> np.ndarray:
        """Empty the kernel maps and return their flows as a FLOW_DTYPE batch, the
        overflow entries (key.overflow 1) last."""
        n = self.drain_raw()
        place = self.clock.placer()
        flows = merge(self.keys[:n], self.vals[:n], place)
        if not self.overflowed:
            return flows
        m = self.overflowed
        return np.concatenate([flows, merge(self.overflow_keys[:m], self.overflow_vals[:m],
                                            place)])


def merge(
    keys: np.ndarray, vals: np.ndarray, place: Callable[[np.ndarray], None]
) -> np.ndarray:
    """Keys and values (n x copies) as flow records. Per-CPU values are folded a
    CPU at a time (1-D operations beat 2-D strided reductions for the few CPUs of
    a node); records are written through void views, numpy's slow path for nested
    structured dtypes avoided."""
    n = len(keys)
    if vals.shape[1] == 1:  # a shared map: one value a key, nothing to fold
        # A record is the key then the value's bytes (the same fields in the same
        # order): two opaque copies, then the times from jiffies to ms in place.
        out = np.empty(n, FLOW_DTYPE)
        rows = out.view(_ROW)
        rows["key"] = np.ascontiguousarray(keys).view(_ROW["key"])
        rows["val"] = np.ascontiguousarray(vals[:, 0]).view(_ROW["val"])
        out["end_reason"] = 0
        out["pad"] = 0
        place(out["first_ms"])
        place(out["last_ms"])
        return out
    out = np.zeros(n, FLOW_DTYPE)
    if not n:
        return out
    out.view(_ROW)["key"] = np.ascontiguousarray(keys).view(_ROW["key"])
    never = np.uint64(np.iinfo(np.uint64).max)
    packets = np.zeros(n, np.uint64)
    octets = np.zeros(n, np.uint64)
    first = np.full(n, never)
    last = np.zeros(n, np.uint64)
    flags = np.zeros(n, np.uint16)
    min_ttl = np.full(n, 255, np.uint8)
    max_ttl = np.zeros(n, np.uint8)
    tos = np.zeros(n, np.uint8)
    for c in range(vals.shape[1]):
        v = vals[:, c]
        seen = v["packets"] > 0
        packets += v["packets"]
        octets += v["octets"]
        np.minimum(first, np.where(seen, v["first"], never), out=first)
        later = v["last"] >= last
        np.maximum(last, v["last"], out=last)
        flags |= v["tcp_flags"]
        np.minimum(min_ttl, np.where(seen, v["min_ttl"], 255).astype(np.uint8), out=min_ttl)
        np.maximum(max_ttl, v["max_ttl"], out=max_ttl)
        np.copyto(tos, v["tos"], where=later & seen)
    out["packets"], out["octets"] = packets, octets
    place(first)
    place(last)
    out["first_ms"], out["last_ms"] = first, last
    out["tcp_flags"], out["min_ttl"], out["max_ttl"], out["tos"] = flags, min_ttl, max_ttl, tos
    return out
