"""Flows drained but not yet exported, kept in pinned maps so a SIGKILL loses none.

The flow table lives in the agent's memory for up to the active timeout; the kernel's
idle map is emptied every poll. Without this a killed agent loses both. Three pinned
maps hold that state:

    pending  flow key -> the table's row (FLOW_DTYPE without the key)
    log      this poll's changes: table rows (key pad1 0; end_reason 255 when the row
             left the table) and the records to export (pad1 1, 2, ...)
    journal  [0] = (generation, phase, idle slot drained)

A poll: read the idle map without deleting it; fold it into the table; write the log;
set the journal to COMMITTED (one 24-octet update: the commit point); apply the log to
pending; delete the idle map; export; set EXPORTED; clear the log. A successor finds:

- before the commit: pending as before the poll, the idle map intact -> drained again;
- COMMITTED: the log is applied again (it sets values: idempotent), the idle map named
  in the journal emptied, the logged records exported (the one window: a kill while
  they were being sent repeats the messages already sent, see README: Restarts);
- EXPORTED: nothing to redo.
"""

from __future__ import annotations

import logging
import os
import struct

import numpy as np

from agent.flowtable import FlowTable, key_hash, key_words
from agent.records import FLOW_DTYPE, KEY_DTYPE, take
from bpf import syscall
from bpf.pins import PinDir

log = logging.getLogger(__name__)

REST = FLOW_DTYPE.itemsize - KEY_DTYPE.itemsize  # a row without its key: 40 octets
ROW = np.dtype([("key", np.void, KEY_DTYPE.itemsize), ("rest", np.void, REST)])
GONE = 255  # end_reason of a logged row that left the table
COMMITTED, EXPORTED = 1, 2
_J = struct.Struct("<QQQ")
_ZERO = struct.pack("<I", 0)


class Journal:
    def __init__(self, pins: PinDir, max_flows: int, log_size: int) -> None:
        self.pins = pins
        self.pending, old = self._open("pending", syscall.MAP_HASH, KEY_DTYPE.itemsize, REST,
                                       max_flows, syscall.F_NO_PREALLOC)
        self.log, _ = self._open("log", syscall.MAP_HASH, KEY_DTYPE.itemsize, REST,
                                 log_size, syscall.F_NO_PREALLOC)
        self.journal, _ = self._open("journal", syscall.MAP_ARRAY, 4, _J.size, 1, 0)
        self.gen, self.phase, self.slot = _J.unpack(
            syscall.lookup(self.journal, _ZERO, _J.size))
        self.carried = old  # pending rows of a map that had to be recreated
        self.logged = np.zeros(0, FLOW_DTYPE)

    def _open(self, name: str, kind: int, k: int, v: int, n: int,
              flags: int) -> tuple[int, np.ndarray]:
        """The pinned map, or a new one pinned; one of another capacity is read out
        and replaced."""
        path = self.pins.map_path(name)
        rows = np.zeros(0, FLOW_DTYPE)
        if os.path.exists(path):
            fd = syscall.obj_get(path)
            if syscall.map_info(fd)[:4] == (kind, k, v, n):
                return fd, rows
            if syscall.map_info(fd)[1:3] == (k, v) and kind == syscall.MAP_HASH:
                rows = read(fd, syscall.map_info(fd)[3])
            log.warning("pinned map of another size replaced", extra={"map": name})
            os.close(fd)
            os.unlink(path)
        fd = syscall.map_create(kind, k, v, n, flags, f"cniflow_{name}"[:15])
        syscall.obj_pin(fd, path)
        return fd, rows

    def recover(self, empty_idle) -> tuple[np.ndarray, np.ndarray]:
        """After an agent that did not finish its last poll: (the table's rows, records
        still to export). empty_idle(slot) deletes the idle map the commit covered."""
        due = np.zeros(0, FLOW_DTYPE)
        if self.phase == COMMITTED:
            logged = read(self.log, 1 << 22)
            is_due = logged["key"]["pad1"] != 0
            self._apply(take(logged, ~is_due))
            empty_idle(int(self.slot))
            due = take(logged, is_due)
            due["key"]["pad1"] = 0
            log.warning("the previous agent stopped after a commit: its last records sent "
                        "again", extra={"records": len(due), "generation": self.gen})
        self._clear(read(self.log, 1 << 22))
        rows = read(self.pending, 1 << 22)
        if len(self.carried):
            rows = np.concatenate([rows, self.carried])
            self._write(self.pending, rows)
            self.carried = self.carried[:0]
        return rows, due

    def commit(self, table: FlowTable, batch: np.ndarray, out: np.ndarray, slot: int) -> None:
        """Log the table's rows for every key this poll touched and the records about to
        be exported; the journal's commit point; then apply the log to pending."""
        keys = np.concatenate([batch["key"], out["key"]]) if len(out) else batch["key"]
        if not len(keys):
            return
        keys = np.unique(np.ascontiguousarray(keys).view((np.void, KEY_DTYPE.itemsize)))
        rows = np.zeros(len(keys), FLOW_DTYPE)
        rows.view(ROW)["key"] = keys
        words = key_words(rows)
        at = table.find(key_hash(words), words)
        here = at >= 0
        rows[here] = take(table.flows, at[here])
        rows["end_reason"][~here] = GONE
        due = out.copy()
        due["key"]["pad1"] = np.arange(1, len(due) + 1, dtype=np.uint32)
        self.logged = np.concatenate([rows, due])
        self._write(self.log, self.logged)
        self.gen += 1
        self._mark(COMMITTED, slot)
        self._apply(rows)

    def exported(self) -> None:
        if self.phase != COMMITTED:
            return
        self._mark(EXPORTED, self.slot)
        self._clear(self.logged)
        self.logged = self.logged[:0]

    def _mark(self, phase: int, slot: int) -> None:
        self.phase, self.slot = phase, slot
        syscall.update(self.journal, _ZERO, _J.pack(self.gen, phase, slot))

    def _apply(self, rows: np.ndarray) -> None:
        gone = rows["end_reason"] == GONE
        self._write(self.pending, take(rows, ~gone))
        if gone.any():
            keys = np.ascontiguousarray(take(rows, gone).view(ROW)["key"])
            syscall.delete_batch(self.pending, keys.ctypes.data, KEY_DTYPE.itemsize, len(keys))

    def _clear(self, logged: np.ndarray) -> None:
        if len(logged):
            keys = np.ascontiguousarray(logged.view(ROW)["key"])
            syscall.delete_batch(self.log, keys.ctypes.data, KEY_DTYPE.itemsize, len(keys))

    @staticmethod
    def _write(fd: int, rows: np.ndarray) -> None:
        if len(rows):
            r = rows.view(ROW)
            keys, rest = np.ascontiguousarray(r["key"]), np.ascontiguousarray(r["rest"])
            syscall.update_batch(fd, keys.ctypes.data, rest.ctypes.data, len(rows))

    def close(self) -> None:
        for fd in (self.pending, self.log, self.journal):
            os.close(fd)


def read(fd: int, capacity: int) -> np.ndarray:
    """Every entry of a pinned hash of (flow key -> row rest), as FLOW_DTYPE rows."""
    capacity = min(capacity, syscall.map_info(fd)[3])
    out = np.zeros(capacity, FLOW_DTYPE)
    keys = np.zeros(capacity, (np.void, KEY_DTYPE.itemsize))
    rest = np.zeros(capacity, (np.void, REST))
    n = syscall.lookup_batch_into(fd, keys.ctypes.data, rest.ctypes.data, KEY_DTYPE.itemsize,
                                  REST, capacity)
    r = out.view(ROW)
    r["key"], r["rest"] = keys, rest
    return out[:n]
