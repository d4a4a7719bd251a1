"""The flow table: keeps flows across drains and decides when each is reported.

State is one FLOW_DTYPE array sorted by a 64-bit hash of the key, so merging a
drained batch is a pair of searchsorted calls and a few vectorised folds; no
Python object per flow. Keys are always compared in full, so a hash collision
costs a slow path, never a wrong merge.

Counters in the table are deltas since the flow's previous record, and so are
first_ms/last_ms (first and last packet of the reporting interval): an interval
never starts before the end of the one reported before it.
"""

from __future__ import annotations

import numpy as np

from agent.records import (
    ACTIVE_TIMEOUT,
    END_OF_FLOW,
    FLOW_DTYPE,
    FORCED_END,
    IDLE_TIMEOUT,
    KEY_DTYPE,
    LACK_OF_RESOURCES,
    TCP_FIN,
    TCP_RST,
    take,
)

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


_KEY_AND_REST = np.dtype([("key", np.void, KEY_DTYPE.itemsize),
                          ("rest", np.void, FLOW_DTYPE.itemsize - KEY_DTYPE.itemsize)])


def key_words(flows: np.ndarray) -> np.ndarray:
    """The 48-byte keys as an (n, 6) uint64 array (copied as opaque bytes: numpy's
    copy of a nested structured field is several times slower)."""
    keys = np.ascontiguousarray(flows.view(_KEY_AND_REST)["key"])
    return keys.view("<u8").reshape(-1, 6)


def key_hash(words: np.ndarray) -> np.ndarray:
    h = np.zeros(len(words), np.uint64)
    with np.errstate(over="ignore"):
        for i in range(words.shape[1]):
            h = (h ^ words[:, i]) * _M1
            h ^= h >> np.uint64(31)
        h = (h ^ (h >> np.uint64(30))) * _M2
        h = (h ^ (h >> np.uint64(27))) * _M3
        h ^= h >> np.uint64(31)
    return h


def sort_exact(h: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Order by hash; rows sharing a hash are then ordered by full key, so equal
    keys are always adjacent even when distinct keys collide."""
    order = np.argsort(h, kind="stable")
    hs = h[order]
    same = hs[1:] == hs[:-1]
    if same.any():
        rows = np.unique(np.concatenate([np.nonzero(same)[0], np.nonzero(same)[0] + 1]))
        sub = order[rows]
        cols = [words[sub, i] for i in range(words.shape[1] - 1, -1, -1)] + [h[sub]]
        order[rows] = sub[np.lexsort(cols)]
    return order


def in_report_order(h: np.ndarray, words: np.ndarray, last_ms: np.ndarray) -> bool:
    """Is the batch ordered by hash, then each key's reports by end (as Continuity.apply
    leaves it, and any boolean mask of it)? Then sorting it again would change nothing.
    Distinct keys sharing a hash: answered no (the sort decides their order)."""
    rise = h[1:] != h[:-1]
    if not (h[1:] >= h[:-1]).all():
        return False
    if rise.all():
        return True
    same = np.flatnonzero(~rise)
    return bool((words[same] == words[same + 1]).all()
                and (last_ms[same] <= last_ms[same + 1]).all())


def report_order(h: np.ndarray, words: np.ndarray, last_ms: np.ndarray) -> np.ndarray:
    """Order by hash, full key, then end (ties: as they came). One sort by hash; only
    rows that share a hash (a key reported twice, or a collision) are sorted further."""
    order = np.argsort(h, kind="stable")
    hs = h[order]
    same = np.flatnonzero(hs[1:] == hs[:-1])
    if len(same):
        rows = np.union1d(same, same + 1)
        sub = order[rows]
        cols = [last_ms[sub]] + [words[sub, i] for i in range(words.shape[1] - 1, -1, -1)]
        order[rows] = sub[np.lexsort(cols + [h[sub]])]
    return order


def _copy(rows: np.ndarray) -> np.ndarray:
    """rows.copy() as opaque bytes (numpy copies nested structured dtypes field by field)."""
    return rows.view(np.dtype((np.void, rows.dtype.itemsize))).copy().view(rows.dtype)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """np.concatenate of record arrays, as opaque bytes (fields are copied one by one)."""
    dtype = parts[0].dtype
    row = np.dtype((np.void, dtype.itemsize))
    return np.concatenate([p.view(row) for p in parts]).view(dtype)


def fold_into(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Counters of src added to dst (same keys, row for row); returns the result."""
    out = _copy(dst)
    fresh = dst["packets"] == 0  # reset by an active timeout: dst's last_ms was reported
    out["packets"] = dst["packets"] + src["packets"]
    out["octets"] = dst["octets"] + src["octets"]
    after = np.maximum(src["first_ms"], np.minimum(dst["last_ms"], src["last_ms"]))
    out["first_ms"] = np.where(fresh, after, np.minimum(dst["first_ms"], src["first_ms"]))
    out["last_ms"] = np.maximum(dst["last_ms"], src["last_ms"])
    out["tcp_flags"] = dst["tcp_flags"] | src["tcp_flags"]
    out["min_ttl"] = np.where(fresh, src["min_ttl"], np.minimum(dst["min_ttl"], src["min_ttl"]))
    out["max_ttl"] = np.where(fresh, src["max_ttl"], np.maximum(dst["max_ttl"], src["max_ttl"]))
    out["tos"] = src["tos"]
    return out


def aggregate(batch: np.ndarray) -> np.ndarray:
    """One record per key (the kernel drain never repeats a key; VPP records may)."""
    if len(batch) < 2:
        return batch
    words = key_words(batch)
    order = sort_exact(key_hash(words), words)
    b, w = take(batch, order), words[order]
    new_group = np.ones(len(b), bool)
    new_group[1:] = (w[1:] != w[:-1]).any(axis=1)
    if new_group.all():
        return batch
    starts = np.nonzero(new_group)[0]
    out = take(b, starts)
    for name in ("packets", "octets"):
        out[name] = np.add.reduceat(b[name], starts)
    out["first_ms"] = np.minimum.reduceat(b["first_ms"], starts)
    out["last_ms"] = np.maximum.reduceat(b["last_ms"], starts)
    out["tcp_flags"] = np.bitwise_or.reduceat(b["tcp_flags"], starts)
    out["min_ttl"] = np.minimum.reduceat(b["min_ttl"], starts)
    out["max_ttl"] = np.maximum.reduceat(b["max_ttl"], starts)
    last_of_group = np.append(starts[1:] - 1, len(b) - 1)
    out["tos"] = b["tos"][last_of_group]
    return out


class FlowTable:
    """Active flows and their reporting rules (RFC 5102 flowEndReason).

    `flows` stays in insertion order; beside it, `sorted_h` holds the key hashes in
    ascending order and `order` the slot of each, so lookups are searchsorted and
    inserting never moves the 88-octet records.
    """

    def __init__(
        self,
        active_timeout_s: float = 60,
        idle_timeout_s: float = 15,
        max_flows: int = 1_000_000,
        end_grace_s: float = 1.0,
    ) -> None:
        self.active_ms = int(active_timeout_s * 1000)
        self.idle_ms = int(idle_timeout_s * 1000)
        self.end_grace_ms = int(end_grace_s * 1000)
        self.max_flows = max_flows
        self.flows = np.zeros(0, FLOW_DTYPE)
        self._words = np.zeros((0, 6), np.uint64)
        self.sorted_h = np.zeros(0, np.uint64)
        self.order = np.zeros(0, np.int64)
        self._early: list[np.ndarray] = []  # fell due while folding reports: out next expire
        self._dirty: np.ndarray | None = None  # tracking (track()): rows changed, by slot
        self._gone: list[np.ndarray] = []  # tracking: rows removed since changes()

    def __len__(self) -> int:
        return len(self.flows)

    @property
    def tracking(self) -> bool:
        return self._dirty is not None

    def track(self) -> None:
        """Report changes from now on (bpf/journal.py logs them instead of looking every
        touched key up again); every row present counts as changed."""
        self._dirty, self._gone = np.ones(len(self.flows), bool), []

    def changes(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots in `flows` of the rows added or changed since the last call, rows
        removed since, as they were) and forget them. A key may be in both: removed,
        then added again. Every write to a row goes through this class, which marks it."""
        assert self._dirty is not None, "track() first"
        slots = np.flatnonzero(self._dirty)
        gone = np.concatenate(self._gone) if self._gone else self.flows[:0]
        self._dirty[:] = False
        self._gone = []
        return slots, gone

    def _mark(self, slots: np.ndarray) -> None:
        if self._dirty is not None:
            self._dirty[slots] = True

    def update(self, batch: np.ndarray, unique: bool = False,
               reports: bool = False) -> np.ndarray:
        """Fold a batch in; returns the records evicted because the table is full.
        unique: the batch never repeats a key (a kernel drain), skip folding it.
        reports: each row is a meter's report (VPP's flowprobe) of the interval since
        its previous report of that flow, and a key may come several times. A key's
        reports are folded one at a time in the order of their ends, with the timeouts
        applied at each as if it had come alone: an entry idle for the idle timeout
        before a report's first packet ends before it, an interval that reaches the
        active timeout ends with the report that reaches it. Those records leave with
        the next expire() or flush()."""
        if not len(batch):
            return batch[:0]
        if reports:
            return self._reports(batch)
        if not unique:
            batch = aggregate(batch)
        words = key_words(batch)
        return self._fold(batch, words, key_hash(words))

    def _reports(self, batch: np.ndarray) -> np.ndarray:
        """A batch of reports in rounds: the first report of each key, then the second,
        and so on (a poll holds one report per key, or a few when VPP's buffers were
        flushed late), each round vectorised."""
        words = key_words(batch)
        h = key_hash(words)
        if in_report_order(h, words, batch["last_ms"]):  # from Continuity.apply: no sort
            order, b, w, hs = None, batch, words, h
        else:
            order = report_order(h, words, batch["last_ms"])
            b, w, hs = take(batch, order), words[order], h[order]
        first_of_key = np.ones(len(b), bool)
        first_of_key[1:] = (w[1:] != w[:-1]).any(axis=1)
        if first_of_key.all():
            return self._fold(batch, words, h, reports=True)
        at = np.arange(len(b))
        rank = at - np.maximum.accumulate(np.where(first_of_key, at, 0))
        evicted = [self._fold(take(b, rank == r), w[rank == r], hs[rank == r], reports=True)
                   for r in range(int(rank.max()) + 1)]
        return _concat(evicted)

    def _reset(self, rows: np.ndarray, which: np.ndarray, reason: int) -> None:
        """Rows that fell due while folding reports: recorded, their counters reset
        (first_ms/last_ms stay: the next interval starts after this one's end)."""
        out = take(rows, which)
        out["end_reason"] = reason
        self._early.append(out)
        for name in ("packets", "octets", "tcp_flags", "min_ttl", "max_ttl"):
            rows[name][which] = 0

    def _fold(self, batch: np.ndarray, words: np.ndarray, h: np.ndarray,
              reports: bool = False) -> np.ndarray:
        """Fold a batch whose keys are all distinct."""
        match = self._find(h, words)
        hit = match >= 0
        if hit.any():
            idx = match[hit]
            dst = take(self.flows, idx)
            src = batch if len(idx) == len(batch) else take(batch, hit)
            if reports:  # quiet for the idle timeout before this report: ended before it
                quiet = src["first_ms"].astype(np.int64) - dst["last_ms"].astype(np.int64)
                idle = (dst["packets"] > 0) & (quiet >= self.idle_ms)
                if idle.any():
                    self._reset(dst, idle, IDLE_TIMEOUT)
            dst = fold_into(dst, src)
            if reports:
                self._active_reached(dst)
            row = np.dtype((np.void, dst.dtype.itemsize))  # as bytes: field by field is slow
            self.flows.view(row)[idx] = dst.view(row)
            self._mark(idx)
        new = ~hit
        if not new.any():
            return batch[:0]
        if reports:
            batch = _copy(batch)
            self._active_reached(batch, new)
        evicted = self._make_room(int(new.sum()))
        if not len(self.flows) and new.all():  # first fill: take the batch as it is
            self.flows, self._words = batch, words
            if self._dirty is not None:
                self._dirty = np.ones(len(batch), bool)
            self.order = np.argsort(h)
            self.sorted_h = h[self.order]
            return evicted
        start = len(self.flows)
        row = np.dtype((np.void, batch.dtype.itemsize))  # as bytes: fields are slow
        self.flows = np.concatenate([self.flows.view(row), take(batch, new).view(row)]).view(
            batch.dtype)
        self._words = np.concatenate([self._words, words[new]])
        if self._dirty is not None:
            self._dirty = np.concatenate([self._dirty, np.ones(len(self.flows) - start, bool)])
        # merged in, not sorted again: equal hashes need no order (_find scans their range)
        added, slots = h[new], np.arange(start, len(self.flows))
        if not (added[1:] >= added[:-1]).all():
            perm = np.argsort(added)
            added, slots = added[perm], slots[perm]
        at = np.searchsorted(self.sorted_h, added)
        self.sorted_h = np.insert(self.sorted_h, at, added)
        self.order = np.insert(self.order, at, slots)
        return evicted

    def _active_reached(self, rows: np.ndarray, among: np.ndarray | None = None) -> None:
        """Intervals that reached the active timeout at their last report end there."""
        span = rows["last_ms"].astype(np.int64) - rows["first_ms"].astype(np.int64)
        due = (rows["packets"] > 0) & (span >= self.active_ms)
        if among is not None:
            due &= among
        if due.any():
            self._reset(rows, due, ACTIVE_TIMEOUT)

    def find(self, h: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Slot of each key (key_hash, key_words) in the table, or -1."""
        return self._find(h, words)

    def _find(self, h: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Slot of each key in the table, or -1. Equal hashes sit side by side in
        sorted_h, so a collision is a range to scan."""
        match = np.full(len(h), -1, np.int64)
        if not len(self.sorted_h):
            return match
        sh, last = self.sorted_h, len(self.sorted_h) - 1
        lo = np.searchsorted(sh, h, "left")  # one search: a neighbour tells a collision
        found = sh[np.minimum(lo, last)] == h
        more = found & (lo < last) & (sh[np.minimum(lo + 1, last)] == h)
        one = np.flatnonzero(found & ~more)
        if len(one):
            cand = self.order[lo[one]]
            equal = (self._words[cand] == words[one]).all(axis=1)
            match[one[equal]] = cand[equal]
        for i in np.flatnonzero(more):  # hash collisions: rare
            for j in self.order[lo[i] : np.searchsorted(sh, h[i], "right")]:
                if (self._words[j] == words[i]).all():
                    match[i] = j
                    break
        return match

    def _make_room(self, incoming: int) -> np.ndarray:
        over = len(self.flows) + incoming - self.max_flows
        if over <= 0:
            return self.flows[:0]
        over = min(over, len(self.flows))
        victims = np.argpartition(self.flows["last_ms"], over - 1)[:over]
        out = take(self.flows, victims)
        out = take(out, out["packets"] > 0)
        out["end_reason"] = LACK_OF_RESOURCES
        self._remove(victims)
        return out

    def _remove(self, slots: np.ndarray) -> None:
        keep = np.ones(len(self.flows), bool)
        keep[slots] = False
        if self._dirty is not None:
            self._gone.append(take(self.flows, slots))
            self._dirty = self._dirty[keep]
        renumber = np.cumsum(keep) - 1
        kept = keep[self.order]
        self.sorted_h = self.sorted_h[kept]
        self.order = renumber[self.order[kept]]
        self.flows, self._words = take(self.flows, keep), self._words[keep]

    def _take_early(self) -> np.ndarray:
        early, self._early = self._early, []
        return _concat(early) if early else self.flows[:0]

    def expire(self, now_ms: int) -> np.ndarray:
        """Records due at now_ms: end of flow (3), idle (1), active timeout (2), after
        those that fell due while reports were folded."""
        early = self._take_early()
        if len(early):
            return _concat([early, self._expire(now_ms)])
        return self._expire(now_ms)

    def _expire(self, now_ms: int) -> np.ndarray:
        f = self.flows
        if not len(f):
            return f[:0]
        live = f["packets"] > 0
        quiet = np.int64(now_ms) - f["last_ms"].astype(np.int64)
        ended = ((f["tcp_flags"] & (TCP_FIN | TCP_RST)) != 0) & (quiet >= self.end_grace_ms)
        idle = quiet >= self.idle_ms
        active = live & (np.int64(now_ms) - f["first_ms"].astype(np.int64) >= self.active_ms)
        reason = np.where(ended, END_OF_FLOW, np.where(idle, IDLE_TIMEOUT, ACTIVE_TIMEOUT))
        emit = live & (ended | idle | active)
        out = take(f, emit)
        out["end_reason"] = reason[emit]
        gone = ended | idle
        reset = active & ~gone
        if reset.any():
            for name in ("packets", "octets", "tcp_flags", "min_ttl", "max_ttl"):
                f[name][reset] = 0
            self._mark(reset)
        if gone.any():
            self._remove(np.flatnonzero(gone))
        return out

    def partners(self, due: np.ndarray) -> np.ndarray:
        """For biflows: the partners (same interface, opposite direction, swapped
        addresses and ports) of records being reported, reported with them and with
        the same reason. An active timeout keeps the partner, as it keeps the flow."""
        from agent.biflow import reversed_keys

        if not len(due) or not len(self.flows):
            return self.flows[:0]
        rev = np.ascontiguousarray(reversed_keys(due)).view("<u8").reshape(-1, 6)
        match = self._find(key_hash(rev), rev)
        hit = match >= 0
        slots, reasons = match[hit], due["end_reason"][hit]
        slots, first = np.unique(slots, return_index=True)
        reasons = reasons[first]
        out = take(self.flows, slots)
        live = out["packets"] > 0
        out["end_reason"] = reasons
        out = take(out, live)
        active = reasons == ACTIVE_TIMEOUT
        if active.any():
            for name in ("packets", "octets", "tcp_flags", "min_ttl", "max_ttl"):
                self.flows[name][slots[active]] = 0
            self._mark(slots[active])
        if (~active).any():
            self._remove(slots[~active])
        return out

    def flush(self) -> np.ndarray:
        """Everything pending, as at shutdown (4)."""
        early = self._take_early()
        out = take(self.flows, self.flows["packets"] > 0)
        out["end_reason"] = FORCED_END
        out = _concat([early, out]) if len(early) else out
        if self._dirty is not None:
            self._gone.append(self.flows)
            self._dirty = self._dirty[:0]
        self.flows, self._words = self.flows[:0], self._words[:0]
        self.sorted_h, self.order = self.sorted_h[:0], self.order[:0]
        return out
