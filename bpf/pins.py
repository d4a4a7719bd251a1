"""The pin directory: what outlives an agent on a bpffs, so its successor adopts it.

    PIN/v<LAYOUT>/<map>        the program's maps (BCC reuses them by path), and the
                               journal's (bpf/journal.py): commit, ring0 or ring1 (the
                               previous journal's pending, log, journal are migrated)
    PIN/links/<ifindex>-<hook> one TCX link per interface and hook: ingress, egress, or
                               entry (an entry point's ingress); pod, the ingress of the
                               pod's end of the veth (bpf/podside.py), by the host side's

A map whose type, sizes or capacity differ from what this agent would create (another
--map-size, another build) is not reused: its pin is removed, the agent keeps its fd,
and reads what it still holds once its own program runs (program.stale).
"""

from __future__ import annotations

import ctypes as ct
import logging
import os

from bpf import syscall

log = logging.getLogger(__name__)

LAYOUT = 1  # bump when struct flow_key / flow_val, a map or the journal change
BPF_FS_MAGIC = 0xCAFE4A11
HOOKS = ("ingress", "egress", "entry")  # the names of cniflow's hooks (bpf/attach.py)
POD_HOOK = "pod"  # the pod end's ingress, in the pod's namespace (bpf/podside.py)

_libc = ct.CDLL(None, use_errno=True)


class PinError(RuntimeError):
    """The pin path cannot hold pins (no bpffs there, not writable)."""


def on_bpffs(path: str) -> bool:
    """Whether the nearest existing directory of `path` is on a bpffs."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    buf = ct.create_string_buffer(128)  # struct statfs: f_type first
    if _libc.statfs(path.encode(), buf) != 0:
        return False
    return int.from_bytes(buf.raw[:8], "little") == BPF_FS_MAGIC


UNFINISHED = "_next"  # a link pin on its way to its name (PinDir.pin_link)


class PinDir:
    def __init__(self, root: str) -> None:
        if not on_bpffs(root):
            raise PinError(f"--pin-path {root}: not on a bpffs (mount -t bpf bpf "
                           f"{os.path.dirname(root) or root}, or --pin-path off)")
        self.root = root
        self.maps = f"{root}/v{LAYOUT}"
        self.links = f"{root}/links"
        try:
            os.makedirs(self.maps, exist_ok=True)
            os.makedirs(self.links, exist_ok=True)
        except OSError as e:
            raise PinError(f"--pin-path {root}: {e.strerror}") from None

    def map_path(self, name: str) -> str:
        return f"{self.maps}/{name}"

    def link_path(self, ifindex: int, hook: str) -> str:
        return f"{self.links}/{ifindex}-{hook}"

    def pin_link(self, fd: int, ifindex: int, hook: str) -> None:
        """Pin a link in place of the one pinned for this hook, in one step: pinned under
        a name of its own, then renamed over (a rename replaces atomically)."""
        path = self.link_path(ifindex, hook)
        syscall.obj_pin(fd, path + UNFINISHED)
        os.replace(path + UNFINISHED, path)

    def drop_unfinished(self) -> int:
        """Links an agent killed inside pin_link() left under the temporary name: the
        unpinning detaches each (its agent, which held the other reference, is gone),
        so the hook is not left with two cniflow links. How many."""
        names = [n for n in os.listdir(self.links) if n.endswith(UNFINISHED)]
        for name in names:
            os.unlink(f"{self.links}/{name}")
        return len(names)

    def link_pins(self, hooks: tuple[str, ...] = HOOKS) -> list[tuple[int, str, str]]:
        """(ifindex, hook name, path) of every pinned link of those hooks."""
        out = []
        for name in sorted(os.listdir(self.links)):
            ifindex, _, hook = name.partition("-")
            if ifindex.isdigit() and hook in hooks:
                out.append((int(ifindex), hook, f"{self.links}/{name}"))
        return out

    def reuse_maps(self, expected: dict[str, tuple[int, int, int, int]]) -> dict[str, int]:
        """Check the pinned maps against (type, key size, value size, max entries).
        All match (or none is pinned): {} and BCC reuses them. Any differs: every pin
        of `expected` is removed and the fds of those still there are returned, for the
        agent to read once its own program counts into fresh maps."""
        found = {name: syscall.obj_get(self.map_path(name)) for name in expected
                 if os.path.exists(self.map_path(name))}
        bad = [n for n, fd in found.items() if syscall.map_info(fd)[:4] != expected[n]]
        if not bad:
            for fd in found.values():
                os.close(fd)
            if found:
                log.info("adopting pinned maps", extra={"path": self.maps})
            return {}
        log.warning("pinned maps of another layout: read once, then replaced",
                    extra={"path": self.maps, "maps": ",".join(bad)})
        for name in found:
            os.unlink(self.map_path(name))
        return found

    def remove(self) -> None:
        """Unpin everything (the kernel frees what nothing else holds)."""
        for d in (self.maps, self.links):
            for name in os.listdir(d) if os.path.isdir(d) else ():
                os.unlink(f"{d}/{name}")
            with _quiet():
                os.rmdir(d)
        with _quiet():
            os.rmdir(self.root)
        log.info("pins removed", extra={"path": self.root})


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, OSError)
