"""Child process: compile flow.bpf.c with BCC, load it, and hand the program and
map file descriptors to the parent over a unix socket (SCM_RIGHTS), then exit.

    python -m bpf.compile SOCKET_FD MAP_SIZE shared|percpu [pin=PIN_DIR] [nat=TYPE,FLAGS]
                          [pod=1]

nat: Cilium's SNAT map's type (lru_hash, hash) and flags, for the map-in-map that holds
it (bpf/masquerade.py); the program then has the map cilium_nat. pod: pods are metered
at their end of the veth (--pod-side, bpf/podside.py): the host side leaves them to it.

Keeping BCC and LLVM out of the agent process saves it about 130 MB of
resident memory; the kernel objects live on through the fds the parent holds.

Headers: BCC compiles in a kernel build tree, BCC_KERNEL_SOURCE (the image sets it to
the headers it carries), else /lib/modules/$(uname -r)/build, else the kernel's own
/sys/kernel/kheaders.tar.xz. The program uses uapi headers only, so any recent
kernel's tree serves; with none of the three the error says so, not BCC's.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("flow.bpf.c")
PROGRAMS = ("cniflow_ingress", "cniflow_egress", "cniflow_entry", "cniflow_jiffies",
            "cniflow_pod")
SPARES = PROGRAMS[:3]  # the classifiers, loaded twice (SPARE names the second copy)
SPARE = "/2"
MAPS = ("flows_a", "flows_b", "overflow_a", "overflow_b", "slot", "stats", "fill", "metered",
        "pod_addrs", "entry_overflowed", "pod_side", "from_sender")
# Overflow entries: one per interface, direction and IP version; metered interfaces (and
# entry points), metered pods' addresses.
OVERFLOW_SIZE = 16384
METERED_SIZE = 8192


def cflags(map_size: int, shared: bool, pin_dir: str = "", nat: str = "",
           pod_side: bool = False) -> list[str]:
    kind, _, flags = nat.partition(",")
    return [f"-DMAP_SIZE={map_size}", f"-DOVERFLOW_SIZE={OVERFLOW_SIZE}",
            f"-DMETERED_SIZE={METERED_SIZE}", "-w"] + (["-DSHARED_MAP"] if shared else []) + (
            [f'-DPIN_DIR="{pin_dir}"'] if pin_dir else []) + (
            [f'-DNAT_TYPE="{kind}"', f"-DNAT_FLAGS={int(flags)}"] if nat else []) + (
            ["-DPOD_SIDE"] if pod_side else [])


def kernel_tree() -> str:
    """The build tree BCC will compile in (its own order), or an error naming what to do."""
    marker = "include/linux/kconfig.h"  # what BCC itself checks for
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        if not os.path.isfile(os.path.join(env, marker)):
            raise RuntimeError(f"BCC_KERNEL_SOURCE={env} is not a kernel build tree "
                               f"(no {marker})")
        return env
    kdir = f"/lib/modules/{os.uname().release}"
    for sub in ("source", "build"):
        if os.path.isfile(os.path.join(kdir, sub, marker)):
            return os.path.join(kdir, sub)
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return "/sys/kernel/kheaders.tar.xz"
    raise RuntimeError(
        f"no kernel headers: {kdir}/build does not exist, the kernel has no "
        "/sys/kernel/kheaders.tar.xz and BCC_KERNEL_SOURCE is not set (the cniflow image "
        "carries headers and sets it; elsewhere install linux-headers or point "
        "BCC_KERNEL_SOURCE at any recent kernel's build tree)")


def main() -> int:
    sock = socket.socket(fileno=int(sys.argv[1]))
    map_size = int(sys.argv[2])
    shared = len(sys.argv) > 3 and sys.argv[3] == "shared"
    opts = dict(a.partition("=")[::2] for a in sys.argv[4:])
    pin_dir, nat, pod_side = opts.get("pin", ""), opts.get("nat", ""), opts.get("pod") == "1"
    maps = MAPS + (("cilium_nat",) if nat else ())
    try:
        from bpf import caps

        caps.raise_permitted()  # file capabilities of the image's interpreter
        kernel_tree()
        from bcc import BPF

        flags = cflags(map_size, shared, pin_dir, nat, pod_side)
        b = BPF(src_file=str(SOURCE), cflags=flags)
        progs = [b.load_func(name, BPF.SCHED_CLS) for name in PROGRAMS]
        # A second copy of each classifier (the same maps): a hook's chain holds a
        # program once, and moving cniflow's link back to its head puts the other copy
        # in front before the old link goes (bpf/attach.py, keep_first).
        spares = []
        for name in SPARES:
            b.funcs.pop(name.encode())  # BCC loads a function once, then hands out that fd
            spares.append(b.load_func(name, BPF.SCHED_CLS))
        fds = [p.fd for p in progs + spares] + [b[name].map_fd for name in maps]
        names = list(PROGRAMS) + [n + SPARE for n in SPARES] + list(maps)
        socket.send_fds(sock, [json.dumps({"names": names}).encode()], fds)
        return 0
    except Exception as e:  # reported to the parent, which turns it into LoadError
        socket.send_fds(sock, [json.dumps({"error": str(e)}).encode()], [])
        return 1


if __name__ == "__main__":
    sys.exit(main())
