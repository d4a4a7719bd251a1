"""The agent's Linux capabilities: raised from the permitted set, checked by name.

In the image the interpreter carries the agent's capabilities as file capabilities
without the effective bit: the kernel grants what the container's bounding set allows
and never refuses to start us, and we raise them here. A capability the container was
not granted is then a clear error naming it, not an EPERM deep in BCC or netlink.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

CAPS = {"NET_ADMIN": 12, "SYS_ADMIN": 21, "SYS_RESOURCE": 24, "PERFMON": 38, "BPF": 39}
# What the eBPF dataplane cannot run without, and why (README: In a cluster).
REQUIRED = {
    "BPF": "load the TC program and create, read and empty its maps",
    "NET_ADMIN": "load a TC program and attach it to the pods' interfaces",
    "PERFMON": "the verifier's full pointer checks for the program's packet parsing",
}
_VERSION_3 = 0x20080522


class MissingCapability(RuntimeError):
    """A capability the agent needs is not granted to it."""


SECCOMP_HINT = (
    "the container runtime's default seccomp profile allows bpf() only with CAP_SYS_ADMIN "
    "(containerd before 1.7 and early 1.6.x, Docker before 23.0, CRI-O and podman with an "
    "older containers-common profile): apply daemonset/overlays/legacy-seccomp (the "
    "agent's seccompProfile Unconfined, no capability added), or upgrade the runtime: "
    "newer profiles allow bpf() with CAP_BPF and perf_event_open() with CAP_PERFMON")


def _sets() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:")):
                key, value = line.split(":")
                out[key[3:].lower()] = int(value, 16)
    return out


def effective() -> int:
    """The effective set, a mask of capability numbers."""
    return _sets()["eff"]


def has(name: str) -> bool:
    """The capability is in the effective set now."""
    return bool(effective() >> CAPS[name] & 1)


def raise_permitted() -> None:
    """Make every permitted capability effective (file capabilities without the effective
    bit leave them permitted only); a process already effective is left alone."""
    s = _sets()
    if s["prm"] & ~s["eff"]:
        set_effective(s["prm"])


def set_effective(eff: int, drop: int = 0) -> None:
    """The effective set as given (a mask of capability numbers; within the permitted
    set), and `drop` gone from the permitted set for good: what raise_permitted() raised
    for one call is lowered again, or given up."""
    s = _sets()
    s["prm"] &= ~drop
    header = (ctypes.c_uint32 * 2)(_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words
    for i in range(2):
        data[3 * i] = (eff >> (32 * i)) & 0xFFFFFFFF
        data[3 * i + 1] = (s["prm"] >> (32 * i)) & 0xFFFFFFFF
        data[3 * i + 2] = (s["inh"] >> (32 * i)) & 0xFFFFFFFF
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), f"capset: {os.strerror(ctypes.get_errno())}")


def require(needed: dict[str, str] = REQUIRED) -> None:
    """Raise the permitted capabilities, then fail naming the first one that is missing."""
    raise_permitted()
    eff = _sets()["eff"]
    for name, why in needed.items():
        if not eff >> CAPS[name] & 1:
            raise MissingCapability(
                f"missing capability CAP_{name} (needed to {why}): grant it in the "
                f"container's securityContext.capabilities.add ({name}), uid {os.getuid()}")


def bpf_syscall_allowed() -> None:
    """Fail clearly when a seccomp filter refuses bpf(2) although CAP_BPF is held.

    An unknown command with no attributes is EINVAL from any kernel that has bpf(2); a
    filter matches on the syscall number alone and answers EPERM (or ENOSYS) before the
    kernel looks. Older runtimes' RuntimeDefault profiles allow bpf only with
    CAP_SYS_ADMIN: without this check the agent would fail deep in BCC."""
    from bpf.syscall import _NR_BPF

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(ctypes.c_long(_NR_BPF), ctypes.c_int(0x7FFF), None, ctypes.c_uint(0)) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EPERM, errno.ENOSYS) or not has("BPF"):
        return  # EINVAL: allowed; without CAP_BPF require() names the capability
    mode = _seccomp_mode()
    if err == errno.ENOSYS and mode != 2:
        raise MissingCapability("bpf() does not exist on this kernel (CONFIG_BPF_SYSCALL off)")
    raise MissingCapability(
        f"bpf() refused ({errno.errorcode[err]}) with CAP_BPF held, under a seccomp filter "
        f"(Seccomp: {mode}): " + SECCOMP_HINT)


def _seccomp_mode() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0
