"""Compile bpf/flow.bpf.c once with BCC; every interface shares its two program fds."""

from __future__ import annotations

import ctypes as ct
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("flow.bpf.c")

# enum stat_index in flow.bpf.c
STAT_NAMES = ("map_full", "not_ip", "malformed", "counted")


class LoadError(RuntimeError):
    """The program did not compile or load: BCC, headers or the kernel said no."""


class FlowProgram:
    """The loaded classifier: program fds for ingress and egress, and its maps."""

    def __init__(self, map_size: int = 65536) -> None:
        try:
            from bcc import BPF  # Debian's python3-bpfcc, seen through system site packages
        except ImportError as e:  # pragma: no cover - setup.sh installs it
            raise LoadError(f"bcc is not importable ({e}): run scripts/setup.sh") from e
        self.map_size = map_size
        try:
            self.bpf = BPF(src_file=str(SOURCE), cflags=[f"-DMAP_SIZE={map_size}", "-w"])
            self.ingress = self.bpf.load_func("cniflow_ingress", BPF.SCHED_CLS)
            self.egress = self.bpf.load_func("cniflow_egress", BPF.SCHED_CLS)
        except Exception as e:
            raise LoadError(f"loading {SOURCE.name} failed: {e}") from e
        self.flow_maps = (self.bpf["flows_a"], self.bpf["flows_b"])
        self._slot = self.bpf["slot"]
        self._stats = self.bpf["stats"]
        log.info("program loaded", extra={"map_size": map_size})

    def set_slot(self, value: int) -> None:
        """Point the program at flows_a (0) or flows_b (1)."""
        self._slot[ct.c_int(0)] = ct.c_uint32(value)

    def stats(self) -> dict[str, int]:
        """Per-CPU counters of flow.bpf.c, summed."""
        return {name: int(sum(self._stats[ct.c_int(i)])) for i, name in enumerate(STAT_NAMES)}

    def close(self) -> None:
        self.bpf.cleanup()
