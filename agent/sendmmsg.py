"""sendmmsg(2) for a connected UDP socket: up to 1024 datagrams per system call.

Python's socket module has no sendmmsg, and one send() per 1400-octet message
costs more than everything else between the kernel map and the wire (see
bench/run.py); this builds the mmsghdr/iovec arrays with numpy, once per batch.
"""

from __future__ import annotations

import ctypes as ct
import errno

import numpy as np

_libc = ct.CDLL(None, use_errno=True)
_libc.sendmmsg.argtypes = [ct.c_int, ct.c_void_p, ct.c_uint, ct.c_int]
_libc.sendmmsg.restype = ct.c_int

UIO_MAXIOV = 1024
_IOVEC = np.dtype([("base", "<u8"), ("len", "<u8")])
_MMSGHDR = np.dtype(
    [  # struct mmsghdr on 64-bit Linux
        ("name", "<u8"),
        ("namelen", "<u4"),
        ("pad0", "<u4"),
        ("iov", "<u8"),
        ("iovlen", "<u8"),
        ("control", "<u8"),
        ("controllen", "<u8"),
        ("flags", "<i4"),
        ("pad1", "<u4"),
        ("len", "<u4"),
        ("pad2", "<u4"),
    ]
)
assert _MMSGHDR.itemsize == 64 and ct.sizeof(ct.c_void_p) == 8


def sendmmsg(fd: int, buf: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> tuple[int, int]:
    """Send each [offset, offset+length) of buf as one datagram. Returns
    (datagrams sent, errno of the call that failed or 0). A call the kernel stopped
    early after sending some returns at once with a short count and no errno: the
    kernel reports the count and drops the error (net/socket.c __sys_sendmmsg), and
    the caller must find out why (agent/transport.py)."""
    n = len(lengths)
    iov = np.zeros(n, _IOVEC)
    iov["base"] = buf.ctypes.data + offsets
    iov["len"] = lengths
    hdr = np.zeros(n, _MMSGHDR)
    hdr["iov"] = iov.ctypes.data + np.arange(n, dtype=np.uint64) * _IOVEC.itemsize
    hdr["iovlen"] = 1
    sent = 0
    while sent < n:
        batch = min(UIO_MAXIOV, n - sent)
        r = _libc.sendmmsg(fd, hdr.ctypes.data + sent * _MMSGHDR.itemsize, batch, 0)
        if r < 0:
            return sent, ct.get_errno() or errno.EIO
        sent += r
        if r < batch:
            break
    return sent, 0
