"""Flows drained but not yet exported, kept in pinned maps so a SIGKILL loses none.

The flow table lives in the agent's memory for up to the active timeout; the kernel's
idle map is emptied every poll. Without this a killed agent loses both. Pinned maps
hold that state:

    drained      the drain's buffers (bpf/drain.py): the kernel copies each entry of
                 the idle map there and deletes it in the same system call
    ring0|ring1  an mmap-able array of FLOW_DTYPE rows used as a ring, written with
                 plain stores (no system call per row): the table as a sequence of row
                 versions
    due0|due1    mmap-able arrays: the records to export (the poll's, and those held
                 back while the collector is away), in the order they go out
    commit       [0] = (generation, phase, slot, ring in use, base, end, due array in
                 use, records due, records of them sent): one 72-octet update, the
                 commit point

State S = the ring's rows [base, end) replayed in order: the last version of each key
wins, a version with end_reason GONE removes it. Records still to send: due[sent:n].
A poll: zero the buffers' keys; record DRAINING (slot: the map about to be drained);
flip and empty the idle map into the buffers; fold them into the table and take the
table's changes since the last commit (it marks every row it writes and keeps every
row it removes: FlowTable.changes()); then either append them (GONE versions of the
removed keys first, then the current rows of the changed ones: a key removed and added
again ends live) or, when the ring since base would exceed 1.25 table sizes (or on the
first commit), write the whole table (compaction: a snapshot), at end, into ring space
outside [base, end): (end - base) + written <= capacity, checked. The exporter has
encoded every record it holds (agent/exporter.py), and they go, in the order the
messages carry them, into the due array the record does not name. Then the commit
record: COMMITTED, the new end (after a compaction, base = the snapshot's start), the
other due array, sent 0. Then the export: after each write into the socket, `sent`
becomes the records of the messages wholly written (one update: they leave in that
order, so what is not yet sent is always due[sent:n]; the records dropped from a full
backlog are the oldest, and count as sent). Then EXPORTED.

Why nothing is lost or counted twice, whenever the agent dies (every drained entry
is, at every instant, in the kernel map or in the buffers: one system call moves it,
and a SIGKILL does not cut a system call in half; the buffers' keys were zeroed first,
so the first all-zero key ends what was moved):

- before DRAINING: the buffers are not counted (the record says COMMITTED or
  EXPORTED): S and due[sent:n] as after the last poll's last write; the maps hold
  the rest.
- DRAINING, before the commit: S is the table as of the last commit (only space
  outside [base, end) and the due array not named were written). The successor folds
  what the buffers hold into S and commits that at once (before its own drain reuses
  them); what the drain had not yet moved is still in the kernel map, drained later.
  Nothing of this poll was in S or sent.
- COMMITTED: S is the table after this poll (every moved entry folded in, or in a
  record due); the buffers no longer count. The successor sends due[sent:n]. The one
  window: a kill between a write into the socket and the update after it (or inside a
  sendmmsg) sends those messages' records a second time.
- EXPORTED: due[sent:n] is what the collector could not take (the backlog).
- a growing (or shrinking) ring or due array is a new map pinned under the other
  name; a ring is named by the commit update that follows its compaction, the old one
  unpinned after it; the due arrays take turns. A successor removes whichever ring the
  record does not name.

S equals the table only if every write to a row is marked: FlowTable marks them
itself (fold, active-timeout resets, partners) and keeps removed rows (evictions,
expiry, flush). The previous layout (a pending hash and a log, the idle map read and
deleted by key after the commit) is migrated once: see _legacy; so is the previous
commit record (56 octets, the records due in the ring after end): see _open_record.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct

import numpy as np

from agent.flowtable import FlowTable, key_hash, key_words, sort_exact
from agent.records import FLOW_DTYPE, KEY_DTYPE, take
from bpf import syscall
from bpf.pins import PinDir

log = logging.getLogger(__name__)

REST = FLOW_DTYPE.itemsize - KEY_DTYPE.itemsize  # a row without its key: 40 octets
ROW = np.dtype([("key", np.void, KEY_DTYPE.itemsize), ("rest", np.void, REST)])
GONE = 255  # end_reason of a row version that removes its key
COMMITTED, EXPORTED, DRAINING = 1, 2, 3
# generation, phase, slot, ring, base, end, due array, records due, records sent
_J = struct.Struct("<QQQQQQQQQ")
_J_OLD = struct.Struct("<QQQQQQQ")  # the previous record: the due records in the ring
_ZERO = struct.pack("<I", 0)
_RING = (syscall.MAP_ARRAY, 4, FLOW_DTYPE.itemsize)
ALIGN = 4096  # ring capacities in rows: whole pages (88 of them)
_BYTES = np.dtype((np.void, FLOW_DTYPE.itemsize))
SPAN = 1.25  # compact once the ring since base would exceed this many table sizes


class Journal:
    def __init__(self, pins: PinDir, poll: int) -> None:
        """poll: the most rows one drain brings (the ring holds twice that at first)."""
        self.pins = pins
        self.min_rows = _round(2 * poll)
        self.record, old = self._open_record()
        (self.gen, self.phase, self.slot, self.which, self.base, self.end,
         self.dwhich, self.ndue, self.sent) = old or _J.unpack(
            syscall.lookup(self.record, _ZERO, _J.size))
        self.ring, self.rows = self._open_ring()
        self.dues: dict[int, tuple[int, np.ndarray]] = {}
        if old is not None:  # the previous record: its due records move out of the ring
            self.ndue = self.ndue if self.phase == COMMITTED else 0
            self._stage(self._read(self.end, self.ndue))
            self._store()
            os.replace(self.pins.map_path("commit_new"), self.pins.map_path("commit"))
            log.info("journal record of the previous layout migrated",
                     extra={"records": self.ndue})
        self._migrate()

    def _open_record(self) -> tuple[int, tuple | None]:
        """The commit record, and the previous layout's values when it is that one (its
        replacement is pinned as commit_new until the migration is stored)."""
        path = self.pins.map_path("commit")
        old = None
        if os.path.exists(path):
            fd = syscall.obj_get(path)
            info = syscall.map_info(fd)[:4]
            if info == (syscall.MAP_ARRAY, 4, _J.size, 1):
                return fd, None
            if info == (syscall.MAP_ARRAY, 4, _J_OLD.size, 1):
                old = _J_OLD.unpack(syscall.lookup(fd, _ZERO, _J_OLD.size))
                old = old[:6] + (0, old[6], 0)  # due array 0, records due, none sent
            else:
                os.unlink(path)
                log.warning("pinned commit record of another layout replaced")
            os.close(fd)
        fd = syscall.map_create(syscall.MAP_ARRAY, 4, _J.size, 1, 0, "cniflow_commit")
        new = self.pins.map_path("commit_new")  # a migration cut short left it
        if os.path.exists(new):
            os.unlink(new)
        syscall.obj_pin(fd, path if old is None else new)
        return fd, old

    def _path(self, which: int) -> str:
        return self.pins.map_path(f"ring{which}")

    def _open_ring(self) -> tuple[int, np.ndarray]:
        """The ring the record names (any capacity), or a new one when none was ever
        committed; the other ring's pin (a grow cut short, or one not yet unpinned)
        removed."""
        other = self._path(1 - self.which)
        if os.path.exists(other):
            os.unlink(other)
        path = self._path(self.which)
        if os.path.exists(path):
            fd = syscall.obj_get(path)
            kind, k, v, n, flags = syscall.map_info(fd)
            if (kind, k, v) == _RING and flags == syscall.F_MMAPABLE:
                return fd, _rows(fd, n)
            os.close(fd)
            os.unlink(path)
        if self.gen:
            log.error("the journal's ring is gone: the flows it held are lost",
                      extra={"path": path})
            self.base = self.end = 0
            self.phase = EXPORTED
        return self._create(path, self.min_rows)

    def _create(self, path: str, rows: int) -> tuple[int, np.ndarray]:
        if os.path.exists(path):
            os.unlink(path)
        fd = syscall.map_create(*_RING, rows, syscall.F_MMAPABLE, "cniflow_ring")
        syscall.obj_pin(fd, path)
        return fd, _rows(fd, rows)

    def _due(self, which: int, want: int = 0) -> np.ndarray | None:
        """Due array `which` (opened from its pin), replaced by one of room for `want`
        rows when it has too little or four times too much; None if there is none."""
        path = self.pins.map_path(f"due{which}")
        if which not in self.dues and os.path.exists(path):
            fd = syscall.obj_get(path)
            kind, k, v, n, flags = syscall.map_info(fd)
            if (kind, k, v) == _RING and flags == syscall.F_MMAPABLE:
                self.dues[which] = fd, _rows(fd, n)
            else:
                os.close(fd)
        have = self.dues.get(which)
        if want and (have is None or not want <= len(have[1]) <= 4 * _round(want)):
            if have is not None:
                os.close(have[0])
            self.dues[which] = self._create(path, _round(want))
        return self.dues[which][1] if which in self.dues else None

    def left(self) -> np.ndarray:
        """A copy of the records due and not yet sent, in their order."""
        if self.sent >= self.ndue:
            return np.zeros(0, FLOW_DTYPE)
        due = self._due(self.dwhich)
        if due is None or len(due) < self.ndue:
            log.error("the journal's due records are gone: they are lost",
                      extra={"records": self.ndue - self.sent})
            return np.zeros(0, FLOW_DTYPE)
        return due[self.sent:self.ndue].copy()

    def recover(self, empty_idle, drained) -> tuple[np.ndarray, np.ndarray]:
        """After an agent that did not finish its last poll: (the table's rows, records
        still to export). empty_idle(slot) deletes the idle map a commit covered (the
        previous layout only read it); drained() reads the pinned drain buffers, folded
        into the table when the record says DRAINING and committed at once (the next
        drain overwrites them)."""
        if self.phase == COMMITTED:
            empty_idle(int(self.slot))
        due = self.left()
        if len(due):
            log.warning("the previous agent left records it had not sent: sent now",
                        extra={"records": len(due), "generation": self.gen})
        rows = replay(self._read(self.base, self.end - self.base))
        if self.phase == DRAINING:
            extra = drained()
            if len(extra):
                table = FlowTable(max_flows=len(rows) + len(extra))
                table.update(rows, unique=True)
                table.update(extra, unique=True)  # one drain: no key twice
                rows = table.flows
                log.warning("the previous agent stopped during a poll: what it had drained "
                            "is restored", extra={"flows": len(extra)})
            self._compact(rows, self.slot, EXPORTED)
        return rows, due

    def draining(self, slot: int) -> None:
        """The drain buffers are about to receive the map of `slot` (bpf/drain.py): from
        now until the commit they count."""
        self._mark(DRAINING, slot)

    def commit(self, table: FlowTable, held: np.ndarray, slot: int) -> None:
        """Log the table's changes since the last commit (or the whole table: the table
        reports them) and every record the exporter holds, in the order they go out;
        then the commit point."""
        full = not table.tracking
        if full:
            table.track()
        slots, gone = table.changes()
        if not (full or len(slots) or len(gone) or len(held) or self.ndue
                or self.phase == DRAINING):
            return
        self._stage(held)
        n, live = len(table), self.end - self.base
        k = len(slots) + len(gone)
        if full or live + k > SPAN * n or live + k > len(self.rows):
            self._compact(table.flows, slot)
            return
        marks = gone.copy()
        marks["end_reason"] = GONE
        self._write(self.end, marks, take(table.flows, slots))
        self.gen += 1
        self.end += k
        self._mark(COMMITTED, slot)

    def keep(self, held: np.ndarray) -> None:
        """The records held, in the order they go out, as the records due (the table
        unchanged): what a new agent sends of what the last one left."""
        self._stage(held)
        self._store()

    def _stage(self, held: np.ndarray) -> None:
        """held into the due array the record does not name; named by the next store."""
        if len(held):
            self.dwhich = 1 - self.dwhich
            due = self._due(self.dwhich, len(held))
            due.view(_BYTES)[:len(held)] = np.ascontiguousarray(held).view(_BYTES)
        self.ndue, self.sent = len(held), 0

    def progress(self, sent: int) -> None:
        """The first `sent` records due have left (whole messages written)."""
        if sent != self.sent:
            self.sent = sent
            self._store()

    def _compact(self, flows: np.ndarray, slot: int, phase: int = COMMITTED) -> None:
        """The whole table as the new base; in a new ring when this one has no room
        beside what it holds (or is four times too large)."""
        n, live = len(flows), self.end - self.base
        # room for the next compaction beside this one: live (<= 1.25 n) + n
        want = _round(max(self.min_rows, 10 * n // 4))
        cap = len(self.rows)
        if live + n <= cap and cap <= 4 * want:
            self._write(self.end, flows)
            self.gen += 1
            self.base = self.end
            self.end += n
            self._mark(phase, slot)
            return
        old, path = self.ring, self._path(self.which)
        fd, rows = self._create(self._path(1 - self.which), want)
        log.info("journal ring resized", extra={"rows": want})
        self.ring, self.rows, self.which = fd, rows, 1 - self.which
        self._write(0, flows)
        self.gen += 1
        self.base, self.end = 0, n
        self._mark(phase, slot)
        os.unlink(path)
        os.close(old)

    def exported(self) -> None:
        if self.phase != COMMITTED:
            return
        self._mark(EXPORTED, self.slot)

    def _mark(self, phase: int, slot: int) -> None:
        self.phase, self.slot = phase, slot
        self._store()

    def _store(self) -> None:
        syscall.update(self.record, _ZERO, _J.pack(
            self.gen, self.phase, self.slot, self.which, self.base, self.end, self.dwhich,
            self.ndue, self.sent))

    def _write(self, at: int, *parts: np.ndarray) -> int:
        """Store parts one after the other from ring position `at` (wrapping); returns
        the position after them."""
        cap, ring = len(self.rows), self.rows.view(_BYTES)
        for p in parts:  # as opaque bytes: numpy copies nested fields one by one
            i, n, b = at % cap, len(p), np.ascontiguousarray(p).view(_BYTES)
            first = min(n, cap - i)
            ring[i:i + first] = b[:first]
            if first < n:
                ring[:n - first] = b[first:]
            at += n
        return at

    def _read(self, at: int, n: int) -> np.ndarray:
        """A copy of n rows from ring position `at` (wrapping)."""
        cap = len(self.rows)
        i = at % cap
        first = min(n, cap - i)
        if first == n:
            return self.rows[i:i + n].copy()
        return np.concatenate([self.rows[i:], self.rows[:n - first]])

    def _migrate(self) -> None:
        """The previous layout's state (pending hash, log) written as one compaction
        with its phase, then its maps unpinned; only into a journal never committed (a
        migration cut short is done again, a committed one is not)."""
        legacy = _legacy(self.pins) if not self.gen else None
        if legacy is not None:
            rows, due, slot, committed = legacy
            self._stage(due if committed else due[:0])
            self._compact(rows, slot, COMMITTED if committed else EXPORTED)
            log.info("journal of the previous layout migrated",
                     extra={"flows": len(rows), "records": len(due)})
        for name in ("pending", "log", "journal"):
            if os.path.exists(self.pins.map_path(name)):
                os.unlink(self.pins.map_path(name))

    def close(self) -> None:
        self.rows = self.rows[:0]
        for fd in [self.ring, self.record] + [fd for fd, _ in self.dues.values()]:
            os.close(fd)
        self.dues = {}


def replay(seg: np.ndarray) -> np.ndarray:
    """The last version of each key of a sequence of row versions, those marked GONE
    left out. sort_exact keeps equal keys in their order (stable), so the last of each
    run is the latest."""
    if not len(seg):
        return seg
    words = key_words(seg)
    order = sort_exact(key_hash(words), words)
    w = words[order]
    last = np.ones(len(seg), bool)
    last[:-1] = (w[1:] != w[:-1]).any(axis=1)
    latest = take(seg, order[last])
    return take(latest, latest["end_reason"] != GONE)


def _round(rows: int) -> int:
    return max(ALIGN, -(-rows // ALIGN) * ALIGN)


def _rows(fd: int, n: int) -> np.ndarray:
    """The ring map's values as a writable FLOW_DTYPE array (the map's own pages)."""
    size = n * FLOW_DTYPE.itemsize
    m = mmap.mmap(fd, (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE,
                  mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(m, FLOW_DTYPE, count=n)


def _legacy(pins: PinDir) -> tuple[np.ndarray, np.ndarray, int, bool] | None:
    """The previous layout's state, if its maps are pinned: pending (flow key -> row
    without the key), its log (rows, then records due) and a 40-octet journal
    (generation, phase, slot, rows logged, records logged); a committed log applied."""
    paths = [pins.map_path(n) for n in ("pending", "journal", "log")]
    if not all(os.path.exists(p) for p in paths[:2]):
        return None
    fds = [syscall.obj_get(p) for p in paths if os.path.exists(p)]
    try:
        _, phase, slot, nrows, ndue = struct.unpack(
            "<QQQQQ", syscall.lookup(fds[1], _ZERO, 40))
        rows = read(fds[0], syscall.map_info(fds[0])[3])
        due = rows[:0]
        if phase == COMMITTED:  # the old agent replaced its log only outside a commit
            logged = _rows(fds[2], syscall.map_info(fds[2])[3])
            rows = replay(np.concatenate([rows, logged[:nrows]]))
            due = logged[nrows:nrows + ndue].copy()
        return rows, due, int(slot), phase == COMMITTED
    finally:
        for fd in fds:
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
