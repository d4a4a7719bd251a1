"""Decode IPFIX messages from any exporter (RFC 7011), defensively.

Templates live per (exporter, observation domain), as RFC 7011 section 8
scopes them. Fixed-length data sets are decoded a whole set at a time through
one big-endian numpy dtype. Sets with variable-length fields are scanned for
where each record ends: runs of records with the same string lengths that recur
get a numpy layout of their own, the other records are handed on as they came
(the JSON lines' C reader writes them from there, records() reads them).
Data that arrives before its template is held for a bounded time and size,
then counted as dropped. Anything malformed raises nothing out of here: it is
counted by reason and the rest of the message (or the next one) goes on, and
one exporter's errors never touch another exporter's state.
"""

from __future__ import annotations

import ctypes
import re
import socket
import struct
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from agent import native
from agent.ipfix.registry import TYPES, VARLEN, lookup

HEADER = struct.Struct("!HHIII")
HEADER_AND_SET = struct.Struct("!HHIIIHH")  # a message header and its first set's header
NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
MAX_FIELDS = 512  # more fields than this in one template is refused as malformed


@dataclass(frozen=True)
class Field:
    pen: int
    id: int
    length: int
    name: str
    type: str


@dataclass
class Spec:
    """A template as an exporter defined it."""

    id: int
    fields: list[Field]
    scope_count: int = 0
    dtype: np.dtype | None = None  # all fields fixed-length: the record's numpy layout
    min_length: int = 0
    # a variable-length template's layout (_layout): where its string length octets are
    length_octets: list[tuple[int, int]] = field(default_factory=list)
    origin: Spec | None = None  # a layout's variable-length template
    teaches: bool = field(init=False)  # RFC 5610 type records: names for _learn
    # fixed octets before each variable-length field, and after the last, as _scan()
    # hands them to C
    steps: ctypes.Array = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.teaches = _TEACHING <= {f.name for f in self.fields}
        steps, fixed = [], 0
        for f in self.fields:
            if f.length == VARLEN:
                steps.append(fixed)
                fixed = 0
            else:
                fixed += f.length
        self.steps = (ctypes.c_uint32 * (len(steps) + 1))(*steps, fixed)


@dataclass
class Session:
    templates: dict[int, Spec] = field(default_factory=dict)
    next_sequence: int | None = None
    held: deque = field(default_factory=deque)  # (arrival, set_id, bytes)
    held_bytes: int = 0


@dataclass
class RecordSet:
    """Records of one data set (or of several messages' sets, gathered: then
    `export_time` may be an array, a record's each): `array` for fixed-length
    templates and string runs, else `raw`, `count` whole records with
    variable-length fields as they came (records() reads them, the JSON lines'
    formatter writes them from there)."""

    exporter: str
    domain: int
    export_time: int | np.ndarray
    spec: Spec
    array: np.ndarray | None = None
    raw: bytes | memoryview = b""
    count: int = 0

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else self.count


MAX_NAMES = 1024  # RFC 5610 names one session may teach
_TEACHING = {"informationElementId", "informationElementName"}  # an RFC 5610 type record
FLOATS = (("float64", 8), ("float64", 4), ("float32", 4))  # (type, length) value() reads
# as a float; other lengths of a float type are hex
MAX_LAYOUTS = 512  # string-length combinations (of all templates) kept as layouts
# Records in a run (the same string lengths) below which they are read as they came,
# by the JSON lines' C reader of such records: a layout made and formatted for a few
# records costs more.
MIN_RUN = 8
# A layout is made for a combination of string lengths once runs of it have held
# ADMIT records among WINDOW records with strings (the counts start anew each
# window): a share of the traffic whose tables, 256 records or more in a batch
# (jsonlines.TABLE_MIN), print 3 times faster than its records read as they came. Pod
# names of many lengths (thousands of combinations, none such a share) stay as they
# came: made layouts, they were 2 times slower (bench/collector.py layouts()).
ADMIT = 256
WINDOW = 16384


class Malformed(ValueError):
    """A message or set that breaks RFC 7011; the message names the reason."""


def _field(pen: int, ie: int, length: int, names: dict) -> Field:
    e = lookup(pen, ie)
    learned = names.get((pen, ie))
    if learned is not None:  # RFC 5610 type records this exporter sent
        return Field(pen, ie, length, learned[0], learned[1])
    if e is None:
        return Field(pen, ie, length, f"{pen}:{ie}", "octetArray")
    return Field(pen, ie, length, e.name, e.type)


_TYPE_CODES = {code: name for name, (_, code) in TYPES.items()}


def _dtype(fields: list[Field]) -> np.dtype | None:
    if any(f.length == VARLEN for f in fields):
        return None
    return np.dtype([(name, _format(f.length)) for name, f in zip(_names(fields), fields,
                                                                  strict=True)])


def _names(fields: list[Field]) -> list[str]:
    """Column names: duplicate names are legal (the same element twice), numbered, never
    reusing a name already taken (an exporter's RFC 5610 records may teach "x#2"
    beside two "x")."""
    out: list[str] = []
    for f in fields:
        name, k = f.name, 1
        while name in out:
            k += 1
            name = f"{f.name}#{k}"
        out.append(name)
    return out


def _format(length: int):
    """A field's numpy format: big-endian integers where numpy has them, else octets."""
    return f">u{length}" if length in (1, 2, 4, 8) else (np.uint8, (length,))


def reason(text: str) -> str:
    """Numbers folded out: a hostile exporter must not grow the set of reasons."""
    return re.sub(r"\d+", "N", text)[:80]


class Decoder:
    def __init__(self, hold_seconds: float = 5.0, hold_bytes: int = 1 << 20,
                 clock=time.monotonic, max_sessions: int = 1024,
                 max_templates: int = 1024, max_templates_total: int = 4096) -> None:
        self.sessions: OrderedDict[tuple[str, int], Session] = OrderedDict()
        self.max_sessions, self.max_templates = max_sessions, max_templates
        self.max_templates_total = max_templates_total
        self.templates_total = 0  # over all sessions: what bounds this decoder's memory
        self.names: dict[tuple[str, int], dict] = {}  # RFC 5610: (pen, id) -> (name, type)
        self.hold_seconds, self.hold_bytes, self.clock = hold_seconds, hold_bytes, clock
        self.errors: Counter = Counter()  # reason -> count
        self.faults = 0  # errors counted in all: one comparison tells a message had any
        self.stats: Counter = Counter()  # messages, records, template_misses, dropped, gaps
        # (id(spec), string lengths...) -> (spec, its layout), least recently used first
        self.layouts: OrderedDict[tuple, tuple[Spec, Spec]] = OrderedDict()
        self.seen: dict[tuple, int] = {}  # the same key: records in runs, this window
        self.window = 0  # records with strings decoded in this window

    def _fault(self, why: str) -> None:
        self.errors[reason(why)] += 1
        self.faults += 1

    def forget(self, exporter: str) -> None:
        """A TCP connection closed: its templates die with it (RFC 7011 10.4.2)."""
        for key in [k for k in self.sessions if k[0] == exporter]:
            self.templates_total -= len(self.sessions.pop(key).templates)
            self.names.pop(key, None)

    def message(self, data: bytes, exporter: str) -> list[RecordSet]:
        """The record sets of one message. Whatever the bytes, an error is this
        exporter's, counted by reason: never an exception out of here."""
        try:
            return self._message(memoryview(data), exporter)
        except Malformed as e:
            self._fault(str(e))
        except Exception as e:  # noqa: BLE001  (a case the checks above missed)
            self._fault(f"unexpected {type(e).__name__}")
        return []

    def messages(self, batch: list[tuple[bytes, str]], faulted=None
                 ) -> tuple[list[RecordSet], dict[str, list[int]]]:
        """message() on each (data, exporter) of a batch in turn: the same records,
        each exporter's, template's and string lengths' in the order they came, and
        [datagrams, messages, records] by exporter. A message that is one data set of
        a template already known (the common case) skips the general path: its records
        join the batch's other such records of that layout in one array. After a
        message that had errors, faulted(exporter)."""
        out: list[RecordSet] = []
        counts: dict[str, list[int]] = {}
        gathered: dict[tuple, _Gathered] = {}
        stats = self.stats
        for data, exporter in batch:
            c = counts.get(exporter)
            if c is None:
                c = counts[exporter] = [0, 0, 0]
            c[0] += 1
            try:
                n = self._gather(data, exporter, gathered) \
                    if len(data) > HEADER_AND_SET.size else 0
            except Exception:  # noqa: BLE001  (before any change: message() counts it)
                n = 0
            if n:
                c[1] += 1
                c[2] += n
                continue
            if gathered:  # what came before this message goes first
                out += [g.records() for g in gathered.values()]
                gathered.clear()
            messages, faults = stats["messages"], self.faults
            got = self.message(data, exporter)
            c[1] += stats["messages"] - messages
            if got:
                out += got
                c[2] += sum(map(len, got))
            if faulted is not None and self.faults != faults:
                faulted(exporter)
        out += [g.records() for g in gathered.values()]
        return out, counts

    def _gather(self, data: bytes, exporter: str, gathered: dict) -> int:
        """A message that is exactly one data set of a known template (fixed-length, or
        one run of string lengths), no sets held for its session: its records added to
        `gathered`, the count returned, as message() would account it. 0: anything
        else, for message() to decode."""
        version, length, export_time, sequence, domain, set_id, set_len = \
            HEADER_AND_SET.unpack_from(data)
        if version != 10 or length != len(data) or set_len != length - HEADER.size \
                or set_id < 256:
            return 0
        key = (exporter, domain)
        session = self.sessions.get(key)
        if session is None or session.held:
            return 0
        spec = session.templates.get(set_id)
        if spec is None or spec.teaches:
            return 0
        body = memoryview(data)[HEADER_AND_SET.size:]
        if spec.dtype is not None:
            layout, n = spec, len(body) // spec.dtype.itemsize
        else:
            run = self._run(spec, body)
            if run is None:
                return 0
            lengths, n, size = run
            if len(body) - n * size >= spec.min_length:
                return 0  # records in no run, or more runs: message() takes them
            combination = (id(spec), *lengths)
            held = self.layouts.get(combination)
            if (held is None or held[0] is not spec) and not self._admits(combination, n, n):
                return 0  # message() counts it (once) and reads it as it came
            self._windowed(n)
            layout = self._layout(spec, lengths, n)
        if not n:
            return 0
        self.sessions.move_to_end(key)
        self._sequence(session, sequence, n)
        self.stats["messages"] += 1
        self.stats["records"] += n
        g = gathered.get((key, id(layout)))
        if g is None:
            g = gathered[key, id(layout)] = _Gathered(exporter, domain, layout)
        g.parts.append(body[: n * layout.dtype.itemsize])
        g.times.append(export_time)
        g.sizes.append(n)
        return n

    def _message(self, data: memoryview, exporter: str) -> list[RecordSet]:
        if len(data) < HEADER.size:
            raise Malformed("message shorter than its header")
        version, length, export_time, sequence, domain = HEADER.unpack_from(data)
        if version != 10:
            raise Malformed(f"version {version}, not 10")
        if length < HEADER.size or length > len(data):
            raise Malformed("message length beyond the data")
        self.stats["messages"] += 1
        key = (exporter, domain)
        session = self._session(key)
        names = self.names.setdefault(key, {})
        out: list[RecordSet] = []
        records = 0
        off = HEADER.size
        while off < length:
            if length - off < 4:
                raise Malformed("set header cut short")
            set_id, set_len = struct.unpack_from("!HH", data, off)
            if set_len < 4 or off + set_len > length:
                raise Malformed("set length beyond the message")
            body = data[off + 4 : off + set_len]
            off += set_len
            try:
                if set_id in (2, 3):
                    self._templates(session, body, set_id == 3, names)
                elif set_id < 256:
                    self._fault("reserved set id")
                else:
                    for rs in self._data(session, key, set_id, body, export_time):
                        records += len(rs)
                        out.append(rs)
                        self._learn(rs, names)
            except Malformed as e:  # this set is lost, the rest of the message is not
                self._fault(str(e))
            except Exception as e:  # noqa: BLE001  (a case the checks missed: the same)
                self._fault(f"unexpected {type(e).__name__}")
        self._sequence(session, sequence, records)
        out.extend(self._release(session, key, export_time))
        self.stats["records"] += records
        return out

    def _sequence(self, session: Session, sequence: int, records: int) -> None:
        """A message's sequence number against what the session's last one announced."""
        if session.next_sequence is not None and sequence != session.next_sequence:
            self.stats["sequence_gaps"] += 1
        session.next_sequence = (sequence + records) & 0xFFFFFFFF

    def _session(self, key) -> Session:
        """Template state of (exporter, domain), least recently used evicted past the
        limit: random domain ids cannot grow it without bound."""
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = Session()
            while len(self.sessions) > self.max_sessions:
                old, gone = self.sessions.popitem(last=False)
                self.templates_total -= len(gone.templates)
                self.names.pop(old, None)
                self.stats["sessions_evicted"] += 1
        else:
            self.sessions.move_to_end(key)
        return session

    def _templates(self, session: Session, body: memoryview, options: bool, names) -> None:
        off = 0
        while len(body) - off >= 4:
            tid, count = struct.unpack_from("!HH", body, off)
            off += 4
            if count == 0:  # withdrawal; 2 or 3 withdraws every template of that kind
                before = len(session.templates)
                if tid in (2, 3):
                    session.templates.clear()
                else:
                    session.templates.pop(tid, None)
                self.templates_total -= before - len(session.templates)
                continue
            if tid < 256:
                raise Malformed(f"template id {tid} below 256")
            if count > MAX_FIELDS:
                raise Malformed("template with too many fields")
            scope = 0
            if options:
                if len(body) - off < 2:
                    raise Malformed("options template cut short")
                scope = struct.unpack_from("!H", body, off)[0]
                off += 2
                if scope == 0 or scope > count:
                    raise Malformed("options template scope count invalid")
            fields = []
            for _ in range(count):
                if len(body) - off < 4:
                    raise Malformed("template cut short")
                ie, flen = struct.unpack_from("!HH", body, off)
                off += 4
                pen = 0
                if ie & 0x8000:
                    if len(body) - off < 4:
                        raise Malformed("template cut short")
                    pen = struct.unpack_from("!I", body, off)[0]
                    off += 4
                    ie &= 0x7FFF
                if flen == 0:
                    raise Malformed("field of length 0")
                fields.append(_field(pen, ie, flen, names))
            old = session.templates.get(tid)
            if old is not None and old.scope_count == scope and old.fields == fields:
                continue  # a refresh: the template kept, and its layouts and formats
            new = old is None
            if new and len(session.templates) >= self.max_templates:
                raise Malformed("too many templates in one session")
            if new and self.templates_total >= self.max_templates_total:
                raise Malformed("too many templates in all")
            dtype = _dtype(fields)
            minimum = sum(1 if f.length == VARLEN else f.length for f in fields)
            session.templates[tid] = Spec(tid, fields, scope, dtype, minimum)
            self.templates_total += new
        # what is left is padding

    def _data(self, session: Session, key, set_id: int, body: memoryview,
              export_time: int) -> list[RecordSet]:
        spec = session.templates.get(set_id)
        if spec is None:
            self.stats["template_misses"] += 1
            self._hold(session, set_id, bytes(body))
            return []
        return self._decode(key, spec, body, export_time)

    def _decode(self, key, spec: Spec, body: memoryview, export_time: int) -> list[RecordSet]:
        """A set's records: one array for a fixed-length template; for a variable-length
        one, an array for each run of MIN_RUN or more records whose strings have the same
        lengths (an exporter that groups them, as cniflow's does, sends a set as one run)
        and the records in no run as they came, all in the set's order."""
        exporter, domain = key
        if spec.dtype is not None:
            n = len(body) // spec.dtype.itemsize  # the rest is padding
            return [RecordSet(exporter, domain, export_time, spec,
                              np.frombuffer(body, spec.dtype, n) if n
                              else np.zeros(0, spec.dtype))]
        count, ends, run, lengths = _scan(spec, body)
        self._windowed(count)
        if count < MIN_RUN or bytes((RUN_GOES_ON,)) * (MIN_RUN - 1) not in run[:count].tobytes():
            # no run (an exporter that does not group them): the set as it came
            return [_raw(exporter, domain, export_time, spec, body, ends, 0, count)]
        starts = np.flatnonzero(run[:count] != RUN_GOES_ON)  # where each run begins
        sizes = np.diff(starts, append=count)
        out: list[RecordSet] = []
        loose, nvar = 0, len(spec.steps) - 1  # loose: the first record in no run yet out
        for i, n in zip(starts[sizes >= MIN_RUN].tolist(), sizes[sizes >= MIN_RUN].tolist(),
                        strict=True):  # (a record in the three-octet form: a run of one)
            layout = self._layout(spec, tuple(lengths[i * nvar : (i + 1) * nvar].tolist()), n)
            if layout is None:
                continue
            if loose < i:
                out.append(_raw(exporter, domain, export_time, spec, body, ends, loose, i))
            out.append(RecordSet(exporter, domain, export_time, layout, np.frombuffer(
                body, layout.dtype, n, int(ends[i - 1]) if i else 0)))
            loose = i + n
        if loose < count or not out:
            out.append(_raw(exporter, domain, export_time, spec, body, ends, loose, count))
        return out

    def _windowed(self, n: int) -> None:
        """n more records with strings: past WINDOW of them, the counts start anew
        (which bounds them too: a count is a run's, of MIN_RUN records or more)."""
        self.window += n
        if self.window >= WINDOW:
            self.seen.clear()
            self.window = 0

    def _admits(self, key: tuple, n: int, coming: int = 0) -> bool:
        """Whether a run of n records of this combination makes it a layout, once
        `coming` more records with strings have entered the window (a window that
        ends starts the counts anew). A template that reuses a dead one's id() takes
        over its count: it only decides when a layout is made."""
        seen = 0 if self.window + coming >= WINDOW else self.seen.get(key, 0)
        return seen + n >= ADMIT

    def _layout(self, spec: Spec, lengths: tuple[int, ...], n: int) -> Spec | None:
        """The fixed-length layout of spec's records with these string lengths, for a
        run of n of them: kept for the MAX_LAYOUTS combinations last used, made once
        runs of it have held ADMIT records in a window (None before)."""
        key = (id(spec), *lengths)
        held = self.layouts.get(key)
        if held is not None and held[0] is spec:
            self.layouts.move_to_end(key)
            return held[1]
        if not self._admits(key, n):
            self.seen[key] = self.seen.get(key, 0) + n
            return None
        self.seen.pop(key, None)
        self.layouts[key] = (spec, layout := _layout(spec, lengths))
        if len(self.layouts) > MAX_LAYOUTS:
            self.layouts.popitem(last=False)
        return layout

    def _run(self, spec: Spec, body: memoryview) -> tuple[tuple[int, ...], int, int] | None:
        """The records from the set's start that have the string lengths of its first:
        those lengths, how many, and a record's size; None for fewer than MIN_RUN, a
        length of 255 or more, a record cut short. (A second reading of lengths beside
        scan_records(), kept on purpose: it looks at the first MIN_RUN records and the
        length octets' columns only, where a scan of every record through ctypes made
        cniflow's own messages 1.5 to 2 times slower to turn into lines.)"""
        lengths, octets, pos = [], [], 0  # the first record's, as read_record() reads
        for f in spec.fields:
            n = f.length
            if n == VARLEN:
                if pos >= len(body) or body[pos] == 255:
                    return None
                n = body[pos]
                lengths.append(n)
                octets.append((pos, n))
                pos += 1
            pos += n
        size = pos
        if pos > len(body) or len(body) // size < MIN_RUN:
            return None
        for k in range(1, MIN_RUN):  # the next records first, one by one: most runs of
            at = k * size            # an exporter that does not group are one record
            if any(body[at + o] != n for o, n in octets):
                return None
        count = len(body) // size
        raw = bytes(body[: count * size])
        for at, n in octets:  # the records up to the first whose differs
            column = raw[at::size]  # this length octet of every record
            count = min(count, len(column) - len(column.lstrip(bytes((n,)))))
        return tuple(lengths), count, size

    def _hold(self, session: Session, set_id: int, raw: bytes) -> None:
        session.held.append((self.clock(), set_id, raw))
        session.held_bytes += len(raw)
        while session.held_bytes > self.hold_bytes and session.held:
            _, _, old = session.held.popleft()
            session.held_bytes -= len(old)
            self.stats["dropped_sets"] += 1

    def _release(self, session: Session, key, export_time: int) -> list[RecordSet]:
        out, keep, now = [], deque(), self.clock()
        while session.held:
            t, set_id, raw = session.held.popleft()
            spec = session.templates.get(set_id)
            if spec is not None:
                try:
                    got = self._decode(key, spec, memoryview(raw), export_time)
                    out += got
                    self.stats["records"] += sum(map(len, got))
                except Malformed as e:
                    self._fault(str(e))
            elif now - t > self.hold_seconds:
                self.stats["dropped_sets"] += 1
            else:
                keep.append((t, set_id, raw))
        session.held = keep
        session.held_bytes = sum(len(h[2]) for h in keep)
        return out

    def _learn(self, rs: RecordSet, names: dict) -> None:
        """RFC 5610 type records teach names and types of enterprise elements: at most
        MAX_NAMES per session, each a short printable name (the rest counted)."""
        if not rs.spec.teaches:
            return
        for row in records(rs):
            pen = row.get("privateEnterpriseNumber", 0)
            code = row.get("informationElementDataType")
            name, key = row["informationElementName"], (pen, row["informationElementId"])
            if not isinstance(name, str) or not name.isprintable() or not 0 < len(name) <= 64:
                self._fault("RFC 5610 name not a short printable string")
            elif key not in names and len(names) >= MAX_NAMES:
                self.stats["names_refused"] += 1
            else:
                names[key] = (name, _TYPE_CODES.get(code, "octetArray"))


@dataclass
class _Gathered:
    """Records of one exporter, domain and layout from a batch's messages (others may
    come between them), in their order."""

    exporter: str
    domain: int
    spec: Spec
    parts: list[memoryview] = field(default_factory=list)
    times: list[int] = field(default_factory=list)  # export time, a message's each
    sizes: list[int] = field(default_factory=list)  # records, a message's each

    def records(self) -> RecordSet:
        times = self.times
        export_time = times[0] if times.count(times[0]) == len(times) else \
            np.repeat(np.array(times, np.uint32), self.sizes)
        return RecordSet(self.exporter, self.domain, export_time, self.spec,
                         np.frombuffer(b"".join(self.parts), self.spec.dtype))


def _scan(spec: Spec, body: memoryview) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The records of a variable-length set, by scan_records() (agent/_jsonlines.c): how
    many, where each ends, whether it goes on the run of the one before (RUN_GOES_ON)
    and its strings' lengths, as read_record() finds them; Malformed for a record cut
    short (the set is lost whole). What is left under the template's minimum length is
    padding. The arrays are views of buffers the next scan reuses."""
    nvar = len(spec.steps) - 1
    most = len(body) // max(spec.min_length, 1) + 1
    if len(_SCRATCH[0]) < most:
        _SCRATCH[:] = [np.empty(most, np.uint32), np.empty(most, np.uint8),
                       np.empty(most * nvar, np.uint16)]
    ends, run, lengths = _SCRATCH
    if len(lengths) < most * nvar:
        lengths = _SCRATCH[2] = np.empty(most * nvar, np.uint16)
    data = np.frombuffer(body, np.uint8)
    error = ctypes.c_uint32(0)
    count = _scanner().scan_records(data.ctypes.data, len(data), spec.steps, nvar,
                                    spec.min_length, ends.ctypes.data, run.ctypes.data,
                                    lengths.ctypes.data, most, ctypes.byref(error))
    if count < 0:
        raise Malformed("variable-length field past the set's end" if error.value == 1
                        else "field past the set's end")
    return count, ends, run, lengths


RUN_STARTS, RUN_GOES_ON, RUN_NONE = range(3)  # enum run of agent/_jsonlines.c
# scan_records()'s output, kept between sets: one decoder a process uses it at a time
# (a collector's receiving thread, or its TCP connections under its lock)
_SCRATCH = [np.empty(0, np.uint32), np.empty(0, np.uint8), np.empty(0, np.uint16)]


@cache
def _scanner() -> ctypes.CDLL:
    lib = native.library()
    lib.scan_records.restype = ctypes.c_int64
    lib.scan_records.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p,
                                 ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64,
                                 ctypes.POINTER(ctypes.c_uint32)]
    return lib


def _raw(exporter: str, domain: int, export_time: int, spec: Spec, body: memoryview,
         ends: np.ndarray, first: int, end: int) -> RecordSet:
    """Records first to end - 1 of a scanned set, as they came."""
    start = int(ends[first - 1]) if first else 0
    return RecordSet(exporter, domain, export_time, spec,
                     raw=body[start : int(ends[end - 1])] if end else body[:0],
                     count=end - first)


def read_record(spec: Spec, body: bytes | memoryview, off: int) -> tuple[dict, int]:
    """The record at off, a dict of element name to value (numbered as the numpy
    layouts number a repeated element), and where the next begins."""
    row = {}
    for f in spec.fields:
        n = f.length
        if n == VARLEN:
            if off >= len(body):
                raise Malformed("variable-length field past the set's end")
            n = body[off]
            off += 1
            if n == 255:
                if off + 2 > len(body):
                    raise Malformed("variable-length field past the set's end")
                n = struct.unpack_from("!H", body, off)[0]
                off += 2
        if off + n > len(body):
            raise Malformed("field past the set's end")
        key = f.name
        if key in row:  # the same element again: numbered, as in the numpy layout
            k = 2
            while f"{f.name}#{k}" in row:
                k += 1
            key = f"{f.name}#{k}"
        row[key] = value(f, bytes(body[off : off + n]))
        off += n
    return row, off


def _layout(spec: Spec, lengths: tuple[int, ...]) -> Spec:
    """A variable-length template with its strings' lengths fixed: fields of those
    lengths, a numpy dtype that skips the length octets, and where they are."""
    fields, offsets, octets = [], [], []
    at, strings = 0, iter(lengths)
    for f in spec.fields:
        n = f.length
        if n == VARLEN:
            n = next(strings)
            octets.append((at, n))
            at += 1
        fields.append(Field(f.pen, f.id, n, f.name, f.type))
        offsets.append(at)
        at += n
    names = _names(fields)  # numbered as _dtype() numbers them
    formats = [_format(f.length) for f in fields]
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": at})
    return Spec(spec.id, fields, spec.scope_count, dtype, at, octets, spec)


def split_stream(buf: bytes) -> tuple[list[bytes], bytes]:
    """IPFIX over a byte stream (TCP): whole messages framed by their header's
    length, and what is left for the next read. A length below 16 cannot frame
    anything: Malformed, and the connection must go."""
    out, off = [], 0
    while len(buf) - off >= 4:
        length = struct.unpack_from("!H", buf, off + 2)[0]
        if length < HEADER.size:
            raise Malformed("message length below the header's")
        if len(buf) - off < length:
            break
        out.append(buf[off : off + length])
        off += length
    return out, buf[off:]


def value(f: Field, raw: bytes):
    """One field's value as JSON wants it."""
    t = f.type
    if t.startswith("unsigned") or t in ("dateTimeSeconds", "dateTimeMilliseconds"):
        return int.from_bytes(raw, "big")
    if t.startswith("signed"):
        return int.from_bytes(raw, "big", signed=True)
    if t in ("dateTimeMicroseconds", "dateTimeNanoseconds") and len(raw) == 8:
        sec, frac = struct.unpack("!II", raw)  # NTP format: nanoseconds since 1970
        return (sec - NTP_EPOCH_OFFSET) * 1_000_000_000 + (frac * 1_000_000_000 >> 32)
    if t == "ipv4Address" and len(raw) == 4:
        return socket.inet_ntoa(raw)
    if t == "ipv6Address" and len(raw) == 16:  # an IPv4-mapped one as ::ffff:a.b.c.d
        return socket.inet_ntop(socket.AF_INET6, raw)  # (RFC 5952), as every path writes
    if t == "macAddress" and len(raw) == 6:
        return raw.hex(":")
    if t == "string":  # a fixed-length field's padding NULs left out, as tshark shows it
        return raw.rstrip(b"\0").decode("utf-8", errors="replace")
    if t == "boolean" and len(raw) == 1:
        return raw[0] == 1
    if (t, len(raw)) in FLOATS:
        return struct.unpack("!d" if len(raw) == 8 else "!f", raw)[0]
    return raw.hex()


def records(rs: RecordSet) -> list[dict]:
    """The set's records as dicts of element name to value (the slow, general form)."""
    if rs.array is None:
        rows, off = [], 0
        for _ in range(rs.count):
            row, off = read_record(rs.spec, rs.raw, off)
            rows.append(row)
        return rows
    arr = rs.array
    cols = []
    for f, name in zip(rs.spec.fields, arr.dtype.names, strict=True):
        col = arr[name]
        if col.ndim == 1 and (f.type.startswith("unsigned") or f.type in (
                "dateTimeSeconds", "dateTimeMilliseconds")):
            cols.append((name, col.tolist()))
        else:
            raw = col.tobytes()
            size = f.length
            cols.append((name, [value(f, raw[i * size:(i + 1) * size]) for i in range(len(arr))]))
    names = [c[0] for c in cols]
    return [dict(zip(names, vals, strict=True)) for vals in zip(*(c[1] for c in cols),
                                                                   strict=True)]

