"""Resolve interface names and globs to ifindexes, as interfaces come and go."""

from __future__ import annotations

import array
import fcntl
import fnmatch
import socket
import struct

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x3
DRVINFO_SIZE = 196  # struct ethtool_drvinfo


class InterfaceError(ValueError):
    """A named (non-glob) interface does not exist."""


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


# Interfaces are listed and told apart without pyroute2's link messages: decoding
# them leaks native memory in pyroute2 0.9.7 (about 3 KB a message, invisible to
# tracemalloc; measured with bench/k8s.py's churn, 7 MB a minute at 5 polls a
# second), and the interface list is read every poll.


def links() -> dict[int, str]:
    """ifindex -> name of every interface in this network namespace."""
    return dict(socket.if_nameindex())


def driver(ifindex: int) -> str:
    """The interface's driver as ethtool names it ("veth", "bridge"), or "" when it
    is gone or has none."""
    try:
        name = socket.if_indextoname(ifindex)
    except OSError:
        return ""
    buf = array.array("B", struct.pack("I", ETHTOOL_GDRVINFO) + bytes(DRVINFO_SIZE - 4))
    ifreq = struct.pack("16sP", name.encode(), buf.buffer_info()[0])
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCETHTOOL, ifreq)
    except OSError:
        return ""
    return bytes(buf[4:36]).split(b"\0")[0].decode()


class InterfaceSet:
    """The --interface names and globs."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = patterns

    def desired(self, present: dict[int, str]) -> dict[int, str]:
        return {i: n for i, n in present.items()
                if any(fnmatch.fnmatchcase(n, p) for p in self.patterns)}

    def check_named(self, present: dict[int, str]) -> None:
        """Exact names must exist when the agent starts: a typo is an error, not a wait."""
        names = set(present.values())
        missing = [p for p in self.patterns if not is_glob(p) and p not in names]
        if missing:
            raise InterfaceError(f"no such interface: {', '.join(missing)}")
