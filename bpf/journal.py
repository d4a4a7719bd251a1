"""Flows drained but not yet exported, kept in pinned maps so a SIGKILL loses none.

The flow table lives in the agent's memory for up to the active timeout; the kernel's
idle map is emptied every poll. Without this a killed agent loses both. Three pinned
maps hold that state:

    pending  flow key -> the table's row (FLOW_DTYPE without the key)
    log      this poll's changes, an mmap-able array of FLOW_DTYPE rows: the table's
             rows for the keys it touched (end_reason 255 when the row left the
             table), then the records to export
    journal  [0] = (generation, phase, idle slot drained, rows logged, records logged)

A poll: read the idle map without deleting it; fold it into the table; write the log
(plain stores into the mapped array: no system call); set the journal to COMMITTED
with the log's counts (one 40-octet update: the commit point); apply the log to
pending; delete the idle map; export; set EXPORTED. A successor finds:

- before the commit: pending as before the poll, the idle map intact -> drained again
  (the log's contents mean nothing: the journal does not say COMMITTED for them);
- COMMITTED: the log is applied again (it sets values: idempotent), the idle map named
  in the journal emptied, the logged records exported (the one window: a kill while
  they were being sent repeats the messages already sent, see README: Restarts);
- EXPORTED: nothing to redo.

The log is only rewritten while the journal does not say COMMITTED (a poll whose
export failed is marked EXPORTED first), so a kill halfway through the stores never
leaves a committed log half overwritten. It grows (a new map, pinned in its place)
when a poll logs more rows than it holds, again only outside a commit.
"""

from __future__ import annotations

import logging
import mmap
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
_J = struct.Struct("<QQQQQ")
_ZERO = struct.pack("<I", 0)
_LOG = (syscall.MAP_ARRAY, 4, FLOW_DTYPE.itemsize)


class Journal:
    def __init__(self, pins: PinDir, pending_size: int, log_size: int) -> None:
        """pending_size: the table's --max-flows and room for one poll's new keys
        (_delete may insert them for a moment); log_size: rows the log holds at first."""
        self.pins = pins
        self.pending, old = self._open("pending", syscall.MAP_HASH, KEY_DTYPE.itemsize, REST,
                                       pending_size, syscall.F_NO_PREALLOC)
        self.journal, _ = self._open("journal", syscall.MAP_ARRAY, 4, _J.size, 1, 0)
        self.gen, self.phase, self.slot, self.nrows, self.ndue = _J.unpack(
            syscall.lookup(self.journal, _ZERO, _J.size))
        self.log, self.rows = self._log(log_size)
        self.carried = old  # pending rows of a map that had to be recreated

    def _open(self, name: str, kind: int, k: int, v: int, n: int,
              flags: int) -> tuple[int, np.ndarray]:
        """The pinned map, or a new one pinned; one of another capacity is read out
        and replaced."""
        path = self.pins.map_path(name)
        rows = np.zeros(0, FLOW_DTYPE)
        if os.path.exists(path):
            fd = syscall.obj_get(path)
            if syscall.map_info(fd) == (kind, k, v, n, flags):
                return fd, rows
            if syscall.map_info(fd)[1:3] == (k, v) and kind == syscall.MAP_HASH:
                rows = read(fd, syscall.map_info(fd)[3])
            log.warning("pinned map of another size replaced", extra={"map": name})
            os.close(fd)
            os.unlink(path)
        fd = syscall.map_create(kind, k, v, n, flags, f"cniflow_{name}"[:15])
        syscall.obj_pin(fd, path)
        return fd, rows

    def _log(self, size: int) -> tuple[int, np.ndarray]:
        """The pinned log (any capacity: it only grows) mapped as FLOW_DTYPE rows, or a
        new one of `size` rows. A committed log is always kept."""
        path = self.pins.map_path("log")
        if os.path.exists(path):
            fd = syscall.obj_get(path)
            kind, k, v, n, flags = syscall.map_info(fd)
            if (kind, k, v) == _LOG and flags == syscall.F_MMAPABLE and (
                    n >= size or self.phase == COMMITTED):
                return fd, _rows(fd, n)
            os.close(fd)
            os.unlink(path)
        fd = syscall.map_create(*_LOG, size, syscall.F_MMAPABLE, "cniflow_log")
        syscall.obj_pin(fd, path)
        return fd, _rows(fd, size)

    def recover(self, empty_idle) -> tuple[np.ndarray, np.ndarray]:
        """After an agent that did not finish its last poll: (the table's rows, records
        still to export). empty_idle(slot) deletes the idle map the commit covered."""
        due = np.zeros(0, FLOW_DTYPE)
        if self.phase == COMMITTED:
            self._apply(self.rows[:self.nrows].copy())
            empty_idle(int(self.slot))
            due = self.rows[self.nrows:self.nrows + self.ndue].copy()
            log.warning("the previous agent stopped after a commit: its last records sent "
                        "again", extra={"records": len(due), "generation": self.gen})
        rows = read(self.pending, 1 << 22)
        if len(self.carried):
            rows = np.concatenate([rows, self.carried])
            self._write(self.pending, rows)
            self.carried = self.carried[:0]
        return rows, due

    def commit(self, table: FlowTable, batch: np.ndarray, out: np.ndarray, slot: int) -> None:
        """Log the table's rows for every key this poll touched and the records about to
        be exported; the journal's commit point; then apply the log to pending."""
        if not len(batch) and not len(out):
            return
        rows = touched(table, batch, out)
        if self.phase == COMMITTED:  # the last poll's export failed: never overwrite
            self._mark(EXPORTED, self.slot, 0, 0)  # a committed log in place
        need = len(rows) + len(out)
        if need > len(self.rows):
            self._grow(need)
        self.rows[:len(rows)] = rows
        self.rows[len(rows):need] = out
        self.gen += 1
        self._mark(COMMITTED, slot, len(rows), len(out))
        self._apply(rows)

    def exported(self) -> None:
        if self.phase != COMMITTED:
            return
        self._mark(EXPORTED, self.slot, 0, 0)

    def _grow(self, need: int) -> None:
        size = 1 << (need - 1).bit_length()
        log.info("journal log grown", extra={"rows": size})
        self.rows = self.rows[:0]
        os.close(self.log)
        os.unlink(self.pins.map_path("log"))
        self.log, self.rows = self._log(size)

    def _mark(self, phase: int, slot: int, nrows: int, ndue: int) -> None:
        self.phase, self.slot, self.nrows, self.ndue = phase, slot, nrows, ndue
        syscall.update(self.journal, _ZERO, _J.pack(self.gen, phase, slot, nrows, ndue))

    def _apply(self, rows: np.ndarray) -> None:
        """Gone keys out of pending first (pending then holds at most the table before
        the poll), then the live rows written."""
        gone = rows["end_reason"] == GONE
        if gone.any():
            self._delete(np.ascontiguousarray(take(rows, gone).view(ROW)["key"]))
        self._write(self.pending, take(rows, ~gone))

    def _delete(self, keys: np.ndarray) -> None:
        """Delete keys from pending, some maybe absent (a flow that came and went within
        the poll). The kernel stops a batch delete at an absent key; rather than one
        system call per absent key, the rest are inserted first, then deleted in one."""
        n = len(keys)
        done = syscall.delete_batch_until_absent(self.pending, keys.ctypes.data,
                                                 KEY_DTYPE.itemsize, n)
        if done < n:
            rest = np.ascontiguousarray(keys[done:])
            blank = np.zeros(len(rest), (np.void, REST))
            syscall.update_batch(self.pending, rest.ctypes.data, blank.ctypes.data, len(rest))
            syscall.delete_batch(self.pending, rest.ctypes.data, KEY_DTYPE.itemsize, len(rest))

    @staticmethod
    def _write(fd: int, rows: np.ndarray) -> None:
        if len(rows):
            r = rows.view(ROW)
            keys, rest = np.ascontiguousarray(r["key"]), np.ascontiguousarray(r["rest"])
            syscall.update_batch(fd, keys.ctypes.data, rest.ctypes.data, len(rows))

    def close(self) -> None:
        self.rows = self.rows[:0]
        for fd in (self.pending, self.log, self.journal):
            os.close(fd)


def touched(table: FlowTable, batch: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The table's row for each key of the batch and of the records due, once each; keys
    no longer in the table as rows with end_reason GONE. Present keys are made unique
    by their table slot; gone keys are the records' (a drained key that left the table
    left it as a record), plus any gone batch key not among them, matched by hash and
    compared in full."""
    bw, ow = key_words(batch), key_words(out)
    bh, oh = key_hash(bw), key_hash(ow)
    bat, oat = table.find(bh, bw), table.find(oh, ow)
    seen = np.zeros(len(table.flows), bool)
    seen[bat[bat >= 0]] = True
    seen[oat[oat >= 0]] = True
    live = take(table.flows, np.flatnonzero(seen))
    gone = take(out, oat < 0)
    lost = bat < 0
    if lost.any():  # a drained key that left the table: normally among the records
        lh, lw = bh[lost], bw[lost]
        gh, gw = oh[oat < 0], ow[oat < 0]
        order = np.argsort(gh)
        at = np.minimum(np.searchsorted(gh[order], lh), max(len(gh) - 1, 0))
        dup = np.zeros(len(lh), bool)
        if len(gh):
            j = order[at]
            dup = (gh[j] == lh) & (gw[j] == lw).all(axis=1)
        gone = np.concatenate([gone, take(batch, np.flatnonzero(lost)[~dup])])
    blank = np.zeros(len(gone), FLOW_DTYPE)
    blank.view(ROW)["key"] = gone.view(ROW)["key"]
    blank["end_reason"] = GONE
    return np.concatenate([live, blank])


def _rows(fd: int, n: int) -> np.ndarray:
    """The log map's values as a writable FLOW_DTYPE array (the map's own pages)."""
    size = n * FLOW_DTYPE.itemsize
    m = mmap.mmap(fd, (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE,
                  mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(m, FLOW_DTYPE, count=n)


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
