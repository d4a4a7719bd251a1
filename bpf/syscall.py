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
    the number of entries."""
    return _batches(MAP_LOOKUP_AND_DELETE_BATCH, "BPF_MAP_LOOKUP_AND_DELETE_BATCH", fd, keys,
                    values, key_size, value_size, capacity)


def _batches(cmd: int, what: str, fd: int, keys: int, values: int, key_size: int,
             value_size: int, capacity: int) -> int:
    """One batch command repeated until the map is done (ENOENT) or the buffers are
    full. The kernel's batch token for hash maps is a bucket index."""
    token = ct.c_uint32(0)
    total, first = 0, True
    while total < capacity:
        attr = _Batch(0 if first else ct.addressof(token), ct.addressof(token),
                      keys + total * key_size, values + total * value_size,
                      capacity - total, fd, 0, 0)
        ret = _bpf(cmd, attr)
        total += attr.count
        first = False
        if ret == -errno.ENOENT:
            break
        _check(ret, what)
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


# TCX (kernel 6.6+): programs attached through BPF links, in an ordered chain per hook.
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
LINK_CREATE = 28
LINK_GET_FD_BY_ID = 30
LINK_DETACH = 34
OBJ_GET = 7
MAP_LOOKUP_BATCH = 24
MAP_DELETE_ELEM = 3

TCX_INGRESS = 46
TCX_EGRESS = 47
F_BEFORE = 1 << 3  # with no relative program or link: the head of the chain


class _LinkCreate(ct.Structure):
    _fields_ = [
        ("prog_fd", ct.c_uint32),
        ("target_ifindex", ct.c_uint32),
        ("attach_type", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("relative_fd", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("expected_revision", ct.c_uint64),
    ]


class _Query(ct.Structure):
    _fields_ = [
        ("target_ifindex", ct.c_uint32),
        ("attach_type", ct.c_uint32),
        ("query_flags", ct.c_uint32),
        ("attach_flags", ct.c_uint32),
        ("prog_ids", ct.c_uint64),
        ("count", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("prog_attach_flags", ct.c_uint64),
        ("link_ids", ct.c_uint64),
        ("link_attach_flags", ct.c_uint64),
        ("revision", ct.c_uint64),
    ]


class _GetById(ct.Structure):
    _fields_ = [("id", ct.c_uint32), ("next_id", ct.c_uint32), ("open_flags", ct.c_uint32)]


class _Info(ct.Structure):
    _fields_ = [("fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


class _ObjGet(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32)]


def link_create(prog_fd: int, ifindex: int, attach_type: int, flags: int = F_BEFORE) -> int:
    """Attach a program to a TCX hook through a new BPF link; returns the
    link's fd. The link lives as long as the fd (or a pin) does."""
    attr = _LinkCreate(prog_fd, ifindex, attach_type, flags, 0, 0, 0)
    return _check(_bpf(LINK_CREATE, attr), "BPF_LINK_CREATE")


def link_detach(link_fd: int) -> None:
    _check(_bpf(LINK_DETACH, ct.c_uint32(link_fd)), "BPF_LINK_DETACH")


def query(ifindex: int, attach_type: int) -> list[tuple[int, int]]:
    """(program id, link id) of every program on a TCX hook, in run order."""
    ids = (ct.c_uint32 * 64)()
    links = (ct.c_uint32 * 64)()
    attr = _Query(ifindex, attach_type, 0, 0, ct.addressof(ids), 64, 0, 0, ct.addressof(links))
    _check(_bpf(PROG_QUERY, attr), "BPF_PROG_QUERY")
    return [(ids[i], links[i]) for i in range(min(attr.count, 64))]


def supports(attach_type: int) -> bool:
    """Whether the kernel knows this hook (TCX: 6.6 and later), asked of loopback."""
    try:
        query(1, attach_type)
        return True
    except OSError:
        return False


def _fd_by_id(cmd: int, obj_id: int) -> int:
    return _check(_bpf(cmd, _GetById(obj_id, 0, 0)), "get fd by id")


def link_fd(link_id: int) -> int:
    return _fd_by_id(LINK_GET_FD_BY_ID, link_id)


def prog_name(prog_id: int) -> str:
    """The name a program was loaded with (at most 15 characters)."""
    fd = _fd_by_id(PROG_GET_FD_BY_ID, prog_id)
    try:
        info = ct.create_string_buffer(256)
        _check(_bpf(OBJ_GET_INFO_BY_FD, _Info(fd, 256, ct.addressof(info))), "prog info")
        return info.raw[64:80].split(b"\0")[0].decode(errors="replace")
    finally:
        os.close(fd)


def prog_id(fd: int) -> int:
    info = ct.create_string_buffer(256)
    _check(_bpf(OBJ_GET_INFO_BY_FD, _Info(fd, 256, ct.addressof(info))), "prog info")
    return int.from_bytes(info.raw[4:8], "little")


def obj_get(path: str) -> int:
    """The fd of a pinned map, program or link."""
    p = ct.create_string_buffer(path.encode())
    return _check(_bpf(OBJ_GET, _ObjGet(ct.addressof(p), 0, 0)), f"BPF_OBJ_GET {path}")


def delete(fd: int, key: bytes) -> bool:
    k = ct.create_string_buffer(key, len(key))
    return _bpf(MAP_DELETE_ELEM, _Elem(fd, 0, ct.addressof(k), 0, 0)) == 0


def lookup_batch(fd: int, key_size: int, value_size: int,
                 capacity: int) -> list[tuple[bytes, bytes]]:
    """Every entry of a hash map, read (not deleted) in batches."""
    keys = ct.create_string_buffer(key_size * capacity)
    vals = ct.create_string_buffer(value_size * capacity)
    token = ct.c_uint32(0)
    out, first = [], True
    while True:
        attr = _Batch(0 if first else ct.addressof(token), ct.addressof(token),
                      ct.addressof(keys), ct.addressof(vals), capacity, fd, 0, 0)
        ret = _bpf(MAP_LOOKUP_BATCH, attr)
        out += [(keys.raw[i * key_size:(i + 1) * key_size],
                 vals.raw[i * value_size:(i + 1) * value_size]) for i in range(attr.count)]
        first = False
        if ret == -errno.ENOENT:
            return out
        _check(ret, "BPF_MAP_LOOKUP_BATCH")


# Pinning and adoption (bpf/pins.py): objects that outlive the agent under a bpffs.
MAP_CREATE = 0
OBJ_PIN = 6
MAP_DELETE_BATCH = 27
LINK_UPDATE = 29
F_NO_PREALLOC = 1
F_MMAPABLE = 1 << 10  # an array map whose values user space maps and stores into
MAP_HASH, MAP_ARRAY, MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_HASH = 1, 2, 5, 6, 9


class _MapCreate(ct.Structure):
    _fields_ = [("map_type", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32),
                ("map_flags", ct.c_uint32), ("inner_map_fd", ct.c_uint32),
                ("numa_node", ct.c_uint32), ("map_name", ct.c_char * 16)]


class _LinkUpdate(ct.Structure):
    _fields_ = [("link_fd", ct.c_uint32), ("new_prog_fd", ct.c_uint32),
                ("flags", ct.c_uint32), ("old_prog_fd", ct.c_uint32)]


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> int:
    attr = _MapCreate(map_type, key_size, value_size, max_entries, flags, 0, 0,
                      name.encode()[:15])
    return _check(_bpf(MAP_CREATE, attr), f"BPF_MAP_CREATE {name}")


def obj_pin(fd: int, path: str) -> None:
    p = ct.create_string_buffer(path.encode())
    _check(_bpf(OBJ_PIN, _ObjGet(ct.addressof(p), fd, 0)), f"BPF_OBJ_PIN {path}")


def _map_words(fd: int) -> list[int]:
    """struct bpf_map_info's first words: type, id, key_size, value_size, max_entries,
    flags."""
    info = ct.create_string_buffer(88)
    _check(_bpf(OBJ_GET_INFO_BY_FD, _Info(fd, 88, ct.addressof(info))), "map info")
    return [int.from_bytes(info.raw[i:i + 4], "little") for i in range(0, 24, 4)]


def map_info(fd: int) -> tuple[int, int, int, int, int]:
    """(type, key_size, value_size, max_entries, flags) of a map."""
    t, _id, k, v, n, f = _map_words(fd)
    return t, k, v, n, f


def link_info(fd: int) -> tuple[int, int, int]:
    """(program id, ifindex, attach type) of a TCX link; ifindex 0 once its device is
    gone (the link is then defunct)."""
    info = ct.create_string_buffer(64)
    _check(_bpf(OBJ_GET_INFO_BY_FD, _Info(fd, 64, ct.addressof(info))), "link info")
    word = [int.from_bytes(info.raw[i:i + 4], "little") for i in range(0, 32, 4)]
    return word[2], word[4], word[5]  # type, id, prog_id, pad; the union: tcx {ifindex, type}


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program a link runs, in one step: no packet meets neither program."""
    _check(_bpf(LINK_UPDATE, _LinkUpdate(link_fd, prog_fd, 0, 0)), "BPF_LINK_UPDATE")


def lookup_batch_into(fd: int, keys: int, values: int, key_size: int, value_size: int,
                      capacity: int) -> int:
    """Copy a hash map's entries, without deleting them, into the buffers at `keys`
    and `values`; returns the count."""
    return _batches(MAP_LOOKUP_BATCH, "BPF_MAP_LOOKUP_BATCH", fd, keys, values, key_size,
                    value_size, capacity)


def delete_batch(fd: int, keys: int, key_size: int, count: int) -> None:
    """Delete `count` keys (buffer at address `keys`); keys already absent are skipped."""
    done = 0
    while done < count:
        attr = _Batch(0, 0, keys + done * key_size, 0, count - done, fd, 0, 0)
        ret = _bpf(MAP_DELETE_BATCH, attr)
        done += attr.count
        if ret == -errno.ENOENT:  # the kernel stops at an absent key: step over it
            done += 1
        else:
            _check(ret, "BPF_MAP_DELETE_BATCH")


def delete_batch_until_absent(fd: int, keys: int, key_size: int, count: int) -> int:
    """Delete keys in one system call up to the first absent one; returns how many were
    deleted (count when none was absent)."""
    attr = _Batch(0, 0, keys, 0, count, fd, 0, 0)
    ret = _bpf(MAP_DELETE_BATCH, attr)
    if ret == -errno.ENOENT:
        return attr.count
    _check(ret, "BPF_MAP_DELETE_BATCH")
    return count


def map_id(fd: int) -> int:
    """The kernel's id of a map (a pin replaced by a new map has another)."""
    return _map_words(fd)[1]
