"""The few bpf(2) commands the agent needs, through ctypes.

The agent process never imports BCC: BCC and LLVM cost 130 MB of resident
memory once loaded and compiling (bench/run.py measures it), while draining a
map needs four system calls. bpf/compile.py runs BCC in a child process.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import platform

_NR_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long

MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_LOOKUP_AND_DELETE_BATCH = 25
MAP_UPDATE_BATCH = 26
PROG_TEST_RUN = 10


class _Elem(ct.Structure):
    _fields_ = [
        ("map_fd", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("key", ct.c_uint64),
        ("value", ct.c_uint64),
        ("flags", ct.c_uint64),
    ]


class _Batch(ct.Structure):
    _fields_ = [
        ("in_batch", ct.c_uint64),
        ("out_batch", ct.c_uint64),
        ("keys", ct.c_uint64),
        ("values", ct.c_uint64),
        ("count", ct.c_uint32),
        ("map_fd", ct.c_uint32),
        ("elem_flags", ct.c_uint64),
        ("flags", ct.c_uint64),
    ]


class _TestRun(ct.Structure):
    _fields_ = [
        ("prog_fd", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("data_in", ct.c_uint64),
        ("data_out", ct.c_uint64),
        ("repeat", ct.c_uint32),
        ("duration", ct.c_uint32),
    ]


def _bpf(cmd: int, attr: ct.Structure) -> int:
    ret = _libc.syscall(_NR_BPF, cmd, ct.byref(attr), ct.sizeof(attr))
    return ret if ret >= 0 else -ct.get_errno()


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def lookup(fd: int, key: bytes, value_size: int) -> bytes:
    k = ct.create_string_buffer(key, len(key))
    v = ct.create_string_buffer(value_size)
    _check(_bpf(MAP_LOOKUP_ELEM, _Elem(fd, 0, ct.addressof(k), ct.addressof(v), 0)), "lookup")
    return v.raw


def update(fd: int, key: bytes, value: bytes) -> None:
    k = ct.create_string_buffer(key, len(key))
    v = ct.create_string_buffer(value, len(value))
    _check(_bpf(MAP_UPDATE_ELEM, _Elem(fd, 0, ct.addressof(k), ct.addressof(v), 0)), "update")


def lookup_and_delete_batch(
    fd: int, keys: int, values: int, key_size: int, value_size: int, capacity: int
) -> int:
    """Empty a hash map into the buffers at `keys` and `values` (addresses); returns
    the number of entries. The kernel's batch token for hash maps is a bucket index."""
    token = ct.c_uint32(0)
    total, first = 0, True
    while total < capacity:
        attr = _Batch(
            0 if first else ct.addressof(token),
            ct.addressof(token),
            keys + total * key_size,
            values + total * value_size,
            capacity - total,
            fd,
            0,
            0,
        )
        ret = _bpf(MAP_LOOKUP_AND_DELETE_BATCH, attr)
        total += attr.count
        first = False
        if ret == -errno.ENOENT:
            break
        _check(ret, "BPF_MAP_LOOKUP_AND_DELETE_BATCH")
    return total


def update_batch(fd: int, keys: int, values: int, count: int) -> None:
    attr = _Batch(0, 0, keys, values, count, fd, 0, 0)
    _check(_bpf(MAP_UPDATE_BATCH, attr), "BPF_MAP_UPDATE_BATCH")


_FRAME = b"\0" * 12 + b"\x08\x00" + b"\0" * 50  # an Ethernet frame, nothing in it


def test_run(fd: int, frame: bytes = _FRAME, repeat: int = 1) -> tuple[int, int]:
    """Run a TC program `repeat` times on a frame: what it returned, and the
    kernel's measure of nanoseconds per run."""
    buf = ct.create_string_buffer(frame, len(frame))
    attr = _TestRun(fd, 0, len(frame), 0, ct.addressof(buf), 0, repeat, 0)
    _check(_bpf(PROG_TEST_RUN, attr), "BPF_PROG_TEST_RUN")
    return attr.retval, attr.duration


def possible_cpus() -> int:
    """Per-CPU values are laid out for every possible CPU, online or not."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count
