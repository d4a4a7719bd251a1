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


def possible_cpus() -> int:
    """Per-CPU values are laid out for every possible CPU, online or not."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count
