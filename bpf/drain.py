"""Drain the kernel flow map into a FLOW_DTYPE batch: one syscall per many flows.

The program writes into one of two hash maps (see flow.bpf.c). A drain flips
the slot, waits out programs still running on the old map, then empties it with
BPF_MAP_LOOKUP_AND_DELETE_BATCH into buffers allocated once. Values of the
per-CPU layout are folded with numpy reductions, and jiffies become wall-clock
milliseconds.

Pinned (keep), those buffers are the pages of a pinned mmap-able array ("drained"):
the kernel deletes each entry in the same system call that copies it there, so an
entry is always in the map or in the buffer, whatever kills the agent; the journal
says when the buffer holds a drain not yet committed (bpf/journal.py, DRAINING). Keys
are zeroed before each drain: the first all-zero key (ifindex 0, never a packet's
interface) ends what a drain cut short wrote.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
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
PINNED = "drained"  # the pinned buffers' map
_HEAD = np.dtype([("magic", "<u8"), ("capacity", "<u8"), ("copies", "<u8"),
                  ("overflow", "<u8")])
_MAGIC = 0x31445243  # layout 1 of the buffers below


def _layout(capacity: int, copies: int, overflow: int) -> list[tuple[int, np.dtype, tuple]]:
    """(offset, dtype, shape) of keys, values, overflow keys, overflow values."""
    parts = [(KEY_DTYPE, (capacity,)), (VAL_DTYPE, (capacity, copies)),
             (KEY_DTYPE, (overflow,)), (VAL_DTYPE, (overflow, 1))]
    out, at = [], _HEAD.itemsize
    for dtype, shape in parts:
        out.append((at, dtype, shape))
        at += dtype.itemsize * math.prod(shape)
    return out


def _map(fd: int) -> np.ndarray:
    size = syscall.map_info(fd)[3] * 8
    m = mmap.mmap(fd, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE, mmap.MAP_SHARED,
                  mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(m, np.uint8, count=size)


def _views(buf: np.ndarray) -> list[np.ndarray]:
    head = buf[:_HEAD.itemsize].view(_HEAD)[0]
    return [buf[at:at + dtype.itemsize * math.prod(shape)].view(dtype).reshape(shape)
            for at, dtype, shape in _layout(int(head["capacity"]), int(head["copies"]),
                                            int(head["overflow"]))]


def pinned_buffers(path: str, capacity: int, copies: int, overflow: int) -> list[np.ndarray]:
    """The drain's buffers in the pinned map at path (created, or replaced when of
    another geometry: called only once a successor has read it, read_pinned)."""
    layout = _layout(capacity, copies, overflow)
    at, dtype, shape = layout[-1]
    words = -(-(at + dtype.itemsize * math.prod(shape)) // 8)
    want = (syscall.MAP_ARRAY, 4, 8, words, syscall.F_MMAPABLE)
    if os.path.exists(path):
        fd = syscall.obj_get(path)
        if syscall.map_info(fd) == want:
            buf = _map(fd)
            os.close(fd)
            if buf[:_HEAD.itemsize].view(_HEAD)[0]["magic"] == _MAGIC:
                return _views(buf)
        else:
            os.close(fd)
        os.unlink(path)
    fd = syscall.map_create(*want[:4], want[4], "cniflow_drained")
    syscall.obj_pin(fd, path)
    buf = _map(fd)
    os.close(fd)
    buf[:_HEAD.itemsize].view(_HEAD)[0] = (_MAGIC, capacity, copies, overflow)
    return _views(buf)


def written(keys: np.ndarray) -> int:
    """Entries a drain wrote: up to the first all-zero key."""
    zero = ~keys.view("<u8").reshape(len(keys), -1).any(axis=1)
    return int(np.argmax(zero)) if zero.any() else len(keys)


def read_pinned(path: str, place: Callable[[np.ndarray], None]) -> np.ndarray:
    """What the pinned buffers hold of a drain (bpf/journal.py decides whether it
    counts), as FLOW_DTYPE records, read by the geometry they were written with."""
    if not os.path.exists(path):
        return np.zeros(0, FLOW_DTYPE)
    fd = syscall.obj_get(path)
    buf = _map(fd)
    os.close(fd)
    if buf[:_HEAD.itemsize].view(_HEAD)[0]["magic"] != _MAGIC:
        return np.zeros(0, FLOW_DTYPE)
    keys, vals, okeys, ovals = _views(buf)
    n, m = written(keys), written(okeys)
    return np.concatenate([merge(keys[:n], vals[:n], place),
                           merge(okeys[:m], ovals[:m], place)])
assert _ROW.itemsize == FLOW_DTYPE.itemsize
assert [FLOW_DTYPE.fields[n][1] - KEY_DTYPE.itemsize for n in ("packets", "first_ms", "tos")] == [
    VAL_DTYPE.fields[n][1] for n in ("packets", "first", "tos")]


class BatchDrain:
    """Owns the preallocated buffers and the slot flip for one FlowProgram."""

    def __init__(self, program, ncpu: int | None = None, keep: bool = False) -> None:
        """keep: drain into pinned buffers (program.pins), opened at the first drain,
        after a successor has read what they held; before(slot) is called once their
        keys are zeroed, before the flip (the journal records DRAINING)."""
        self.program = program
        self.keep = keep
        self.before: Callable[[int], None] | None = None
        self.pinned = False
        self.used = (0, 0)  # entries the last drain wrote: zeroed before the next
        self.held = (0, 0)  # entries of the idle maps read, not deleted (none, now)
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
        if self.keep:
            self._pin()
        idle = self.active
        self.active ^= 1
        self.program.set_slot(self.active)
        time.sleep(GRACE_SECONDS)
        self.program.reset_fill(idle)
        read = syscall.lookup_and_delete_batch
        self.overflowed = read(
            self.overflow_fds[idle], self.overflow_keys.ctypes.data,
            self.overflow_vals.ctypes.data, KEY_DTYPE.itemsize, VAL_DTYPE.itemsize,
            self.overflow_capacity)
        n = read(self.fds[idle], self.keys.ctypes.data, self.vals.ctypes.data,
                 KEY_DTYPE.itemsize, VAL_DTYPE.itemsize * self.ncpu, self.capacity)
        self.used = (n, self.overflowed)
        return n

    def _pin(self) -> None:
        """The buffers in the pinned map (the first time), what the last drain wrote
        there zeroed, then before(slot about to be drained)."""
        if not self.pinned:
            self.keys, self.vals, self.overflow_keys, self.overflow_vals = pinned_buffers(
                self.program.pins.map_path(PINNED), self.capacity, self.ncpu,
                self.overflow_capacity)
            self.used, self.pinned = (self.capacity, self.overflow_capacity), True
        n, m = self.used
        self.keys[:n].view(np.uint8).fill(0)
        self.overflow_keys[:m].view(np.uint8).fill(0)
        if self.before is not None:
            self.before(self.active)

    @property
    def idle(self) -> int:
        return self.active ^ 1

    def forget(self) -> None:
        """Delete what a drain read without deleting (none does now: kept for
        bpf/dataplane.py, which calls it after a failed poll)."""
        n, m = self.held
        if n:
            syscall.delete_batch(self.fds[self.idle], self.keys.ctypes.data,
                                 KEY_DTYPE.itemsize, n)
        if m:
            syscall.delete_batch(self.overflow_fds[self.idle], self.overflow_keys.ctypes.data,
                                 KEY_DTYPE.itemsize, m)
        self.held = (0, 0)

    def empty(self, slot: int) -> None:
        """Delete everything in one slot's flow and overflow maps (read, discarded; into
        buffers of its own: the pinned ones may hold what a successor reads)."""
        size = max(self.capacity, self.overflow_capacity)
        keys, vals = np.zeros(size, KEY_DTYPE), np.zeros((size, self.ncpu), VAL_DTYPE)
        syscall.lookup_and_delete_batch(self.fds[slot], keys.ctypes.data, vals.ctypes.data,
                                        KEY_DTYPE.itemsize, VAL_DTYPE.itemsize * self.ncpu,
                                        self.capacity)
        syscall.lookup_and_delete_batch(self.overflow_fds[slot], keys.ctypes.data,
                                        vals.ctypes.data, KEY_DTYPE.itemsize,
                                        VAL_DTYPE.itemsize, self.overflow_capacity)

    def read_pinned(self) -> np.ndarray:
        """What the pinned buffers hold (an earlier agent's drain), as records."""
        return read_pinned(self.program.pins.map_path(PINNED), self.clock.placer())

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
