"""Drain the kernel flow map into a FLOW_DTYPE batch: one syscall per many flows.

The program writes into one of two hash maps (see flow.bpf.c). A drain flips
the slot, waits out programs still running on the old map, then empties it with
BPF_MAP_LOOKUP_AND_DELETE_BATCH into buffers allocated once. Values of the
per-CPU layout are folded with numpy reductions, and monotonic nanoseconds
become wall-clock milliseconds.
"""

from __future__ import annotations

import time

import numpy as np

from agent.records import FLOW_DTYPE, KEY_DTYPE
from bpf import syscall

VAL_DTYPE = np.dtype(
    [
        ("packets", "<u8"),
        ("octets", "<u8"),
        ("first_ns", "<u8"),
        ("last_ns", "<u8"),
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


def clock_offset_ns() -> int:
    """Wall clock minus CLOCK_MONOTONIC, the base of bpf_ktime_get_coarse_ns."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)


_ROW = np.dtype([("key", np.void, KEY_DTYPE.itemsize), ("val", np.void, VAL_DTYPE.itemsize)])
assert _ROW.itemsize == FLOW_DTYPE.itemsize
assert [FLOW_DTYPE.fields[n][1] - KEY_DTYPE.itemsize for n in ("packets", "first_ms", "tos")] == [
    VAL_DTYPE.fields[n][1] for n in ("packets", "first_ns", "tos")]


class BatchDrain:
    """Owns the preallocated buffers and the slot flip for one FlowProgram."""

    def __init__(self, program, ncpu: int | None = None) -> None:
        self.program = program
        self.capacity = program.map_size
        self.ncpu = ncpu or program.value_copies
        self.fds = list(program.flow_map_fds)
        self.keys = np.zeros(self.capacity, KEY_DTYPE)
        self.vals = np.zeros((self.capacity, self.ncpu), VAL_DTYPE)
        self.active = 0
        program.set_slot(self.active)

    def drain_raw(self) -> int:
        """Flip and empty the idle map into self.keys / self.vals; return the count."""
        idle = self.active
        self.active ^= 1
        self.program.set_slot(self.active)
        time.sleep(GRACE_SECONDS)
        return self._lookup_and_delete(self.fds[idle])

    def _lookup_and_delete(self, fd: int) -> int:
        return syscall.lookup_and_delete_batch(
            fd,
            self.keys.ctypes.data,
            self.vals.ctypes.data,
            KEY_DTYPE.itemsize,
            VAL_DTYPE.itemsize * self.ncpu,
            self.capacity,
        )

    def drain(self) -> np.ndarray:
        """Empty the kernel map and return its flows as a FLOW_DTYPE batch."""
        n = self.drain_raw()
        return merge(self.keys[:n], self.vals[:n], clock_offset_ns())


def merge(keys: np.ndarray, vals: np.ndarray, offset_ns: int) -> np.ndarray:
    """Keys and values (n x copies) as flow records. Per-CPU values are folded a
    CPU at a time (1-D operations beat 2-D strided reductions for the few CPUs of
    a node); records are written through void views, numpy's slow path for nested
    structured dtypes avoided."""
    n = len(keys)
    off = np.uint64(offset_ns)
    ms = np.uint64(1_000_000)
    if vals.shape[1] == 1:  # a shared map: one value a key, nothing to fold
        # A record is the key then the value's bytes (the same fields in the same
        # order): two opaque copies, then the times from ns to ms in place.
        out = np.empty(n, FLOW_DTYPE)
        rows = out.view(_ROW)
        rows["key"] = np.ascontiguousarray(keys).view(_ROW["key"])
        rows["val"] = np.ascontiguousarray(vals[:, 0]).view(_ROW["val"])
        out["end_reason"] = 0
        out["pad"] = 0
        for name in ("first_ms", "last_ms"):
            t = out[name]
            t += off
            t //= ms
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
        np.minimum(first, np.where(seen, v["first_ns"], never), out=first)
        later = v["last_ns"] >= last
        np.maximum(last, v["last_ns"], out=last)
        flags |= v["tcp_flags"]
        np.minimum(min_ttl, np.where(seen, v["min_ttl"], 255).astype(np.uint8), out=min_ttl)
        np.maximum(max_ttl, v["max_ttl"], out=max_ttl)
        np.copyto(tos, v["tos"], where=later & seen)
    out["packets"], out["octets"] = packets, octets
    out["first_ms"], out["last_ms"] = (first + off) // ms, (last + off) // ms
    out["tcp_flags"], out["min_ttl"], out["max_ttl"], out["tos"] = flags, min_ttl, max_ttl, tos
    return out
