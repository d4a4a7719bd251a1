"""Restart without loss: what the eBPF dataplane does with its pin directory.

At start: the maps were reused by the program (bpf/pins.py) and the links adopted by
the attacher; here the journal is opened, the table an earlier agent left is handed
back (restore), maps of another layout are read once, and links nobody claims are
removed after a grace. At every poll: commit before export, and the export's
progress (bpf/journal.py). At exit:
everything unpinned, or left as it is for the next agent (--handover).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from agent.config import Config
from agent.records import FLOW_DTYPE, KEY_DTYPE
from bpf import syscall
from bpf.compile import OVERFLOW_SIZE
from bpf.drain import GRACE_SECONDS, VAL_DTYPE, merge
from bpf.journal import Journal

log = logging.getLogger(__name__)

# Adopted links whose interface no reconcile has claimed by then are removed: long
# enough for a first pod list and resolution after a restart.
ADOPT_GRACE_SECONDS = 30.0


class Restart:
    def __init__(self, cfg: Config, program, drainer, attacher) -> None:
        self.handover = cfg.handover == "true"  # auto: decided at SIGTERM (hand_over)
        self.program, self.drainer, self.attacher = program, drainer, attacher
        self.pins = program.pins
        poll = cfg.map_size + OVERFLOW_SIZE  # the most one drain brings
        self.journal = Journal(self.pins, poll)
        drainer.before = self.journal.draining  # DRAINING, then the flip and the drain
        self.started = time.monotonic()
        self.settled = False
        if program.adopted:
            log.info("adopting an earlier agent's state", extra={
                "path": self.pins.root, "links": len(attacher.adopted),
                "generation": self.journal.gen})

    def restore(self) -> tuple[np.ndarray, np.ndarray]:
        """The flow table's rows an earlier agent left, and the records it had not
        sent (its last export's rest, and its backlog)."""
        rows, due = self.journal.recover(self.drainer.empty, self.drainer.read_pinned)
        if len(rows) or len(due):
            log.info("restored flows not yet exported",
                     extra={"flows": len(rows), "records": len(due)})
        return rows, due

    def first(self, batch: np.ndarray) -> np.ndarray:
        """The first drain also carries what maps of another layout still held (read
        only now: the links have run this agent's program since reconcile)."""
        if not self.program.stale:
            return batch
        time.sleep(GRACE_SECONDS)
        old = [batch] + [read_stale(fd, self.program.ncpu, self.drainer.clock.placer())
                         for name, fd in self.program.stale.items()
                         if name.startswith(("flows_", "overflow_"))]
        for fd in self.program.stale.values():
            os.close(fd)
        self.program.stale = {}
        out = np.concatenate(old)
        log.info("read the maps of another layout", extra={"flows": len(out) - len(batch)})
        return out

    def settle(self) -> None:
        if not self.settled and time.monotonic() - self.started >= ADOPT_GRACE_SECONDS:
            self.settled = True
            self.attacher.prune()

    def commit(self, table, held: np.ndarray) -> None:
        self.journal.commit(table, held, self.drainer.idle)

    def close(self) -> None:
        self.journal.close()
        if self.handover:
            self.attacher.release()
            log.info("pins left for the next agent", extra={"path": self.pins.root})
        else:
            self.pins.remove()


def read_stale(fd: int, ncpu: int, place) -> np.ndarray:
    """Empty a flow or overflow map of another capacity (same key and value layout)."""
    kind, k, v, n, _ = syscall.map_info(fd)
    if (k, v) != (KEY_DTYPE.itemsize, VAL_DTYPE.itemsize):
        log.warning("a pinned map of an unknown layout: its counts are lost",
                    extra={"key_size": k, "value_size": v})
        return np.zeros(0, FLOW_DTYPE)
    copies = ncpu if kind == syscall.MAP_PERCPU_HASH else 1
    keys = np.zeros(n, KEY_DTYPE)
    vals = np.zeros((n, copies), VAL_DTYPE)
    got = syscall.lookup_and_delete_batch(fd, keys.ctypes.data, vals.ctypes.data, k,
                                          v * copies, n)
    return merge(keys[:got], vals[:got], place)
