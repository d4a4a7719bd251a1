"""Encode: decoded record sets into JSON lines, one object per record.

A line carries the record's elements by name (unknown ones as "PEN:ID" with the raw
value in hex) after four keys of its own: "@exporter" (address:port), "@domain"
(observation domain id), "@template" and "@exportTime" (seconds).

Fixed-length sets, what routers and cniflow's exporter send most, are written by
format_lines() in agent/_jsonlines.c straight from the wire's octets: one call a
piece of a table (encode()), some 4 ns a field where polars' NDJSON writer took 40
(bench/collector.py).
It prints octet arrays (hex) and plain strings too, so the tables of real routers'
templates (MPLS label stacks, route distinguishers, NUL-padded VRF names) take it as
well, some 7 times faster than polars did (bench/collector.py). Tables with a field
it does not print (floats, integers over 8 octets, strings JSON must escape) are
turned into columns with numpy and written by polars, except runs of records with
strings, written as they came by format_records() (below) when it prints them.

Records with variable-length fields in no run (an exporter that does not group them
by their strings' lengths) are written by format_records(), also in C, straight from
the wire, record by record: 5 to 7.5 times faster than reading each into a dict and
json.dumps() (bench/collector.py). A value it does not print (a float, an integer
over 8 octets, text beyond ASCII) is written by Python, that record alone.

Each record also gets a flow key for Kafka: protocol and the two endpoints in a
fixed order, so both directions of a flow land in one partition.
"""

from __future__ import annotations

import ctypes
import json
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache

import numpy as np
import polars as pl

from agent import native
from agent.ipfix.decoder import (
    FLOATS,
    NTP_EPOCH_OFFSET,
    Decoder,
    RecordSet,
    Spec,
    _names,
    read_record,
    value,
)
from agent.ipfix.registry import VARLEN

META = ("@exporter", "@domain", "@template", "@exportTime")
_SRC = ("sourceIPv4Address", "sourceIPv6Address")
_DST = ("destinationIPv4Address", "destinationIPv6Address")


@dataclass
class Lines:
    """JSON lines, a batch's or a piece of one (encode()'s sink): `text` ends every
    line with a newline; `keys`, when asked for, holds each record's flow key (None
    where the record has no addresses). A piece's `text` may be a view of the buffer
    the next piece is formatted into (written from where it was formatted, not copied
    first): use it, or copy it, before the sink returns."""

    text: bytes | memoryview
    count: int
    keys: list[bytes | None] | None = None

    def split(self) -> list[bytes]:
        return bytes(self.text).split(b"\n")[:-1] if self.count else []


def encode(sets: list[RecordSet], keys: bool = False, sink=None, failed=None) -> Lines:
    """Fixed-length sets of one layout (template id and fields), from any exporter,
    are joined and formatted as one table, in the order the layout first came, each
    exporter's records in the order they came (a layout of a run of strings' lengths
    with fewer than TABLE_MIN records in the batch: from its octets, a set at a time);
    the rest record by record.

    With `sink`, the lines go to sink(Lines) a piece at a time as they are made, and
    the Lines returned holds their count only. A table's pieces are at most _PIECE
    octets of whole lines, each a view of the buffer the next is formatted into: the
    kernel copies them into the page cache while they are still in the CPU's cache
    (measured: writing a batch's 2.8 MB after formatting all of it cost 2.5 to 3 times
    the system time of writing each 256 KB as it was formatted). Without, one Lines.

    With `failed`, a table that cannot be formatted (values the decoder's checks let
    through) is formatted again a set at a time, from the first set not yet written
    whole, and each set that still fails (or was cut short) goes to
    failed(set, exception): never the batch's nor the process's error, and no line
    twice. An output's own error (a full disk, a broken pipe) is raised as it is."""
    out = _Out(sink, keys)
    for group in _groups(sets):
        error = _attempt(group, out)
        if error is not None:
            if failed is None:
                raise error
            _retry(group, out, error, failed)
    return out.result()


def _attempt(group: list[RecordSet], out: _Out) -> Exception | None:
    """The group's lines to `out`; the formatting error if it failed (out.rows: how
    many of its rows went before). An output's own error is raised as it is."""
    out.rows = 0
    try:
        _group(group, out)
    except _OutputError as e:  # a full disk, a broken pipe: not the exporter's
        raise e.error from None
    except Exception as e:  # noqa: BLE001
        return e
    return None


def _retry(group: list[RecordSet], out: _Out, error: Exception, failed) -> None:
    """A table failed: its sets whose lines all went out stay, the one cut short is
    failed (the rest of its lines lost, none twice), and each one after it is
    formatted alone (failed if it fails too, cut short or not: never again)."""
    done, end = out.rows, 0
    for rs in group:
        start, end = end, end + len(rs)
        if end <= done:
            continue
        if start < done or len(group) == 1:
            failed(rs, error)
        elif (again := _attempt([rs], out)) is not None:
            failed(rs, again)


def _group(group: list[RecordSet], out: _Out) -> None:
    rs = group[0]
    if rs.array is None:
        _records(rs, out)
        return
    # runs of strings' lengths (their octets as they came): a few are cheaper read as
    # they came than as a table, and format_records() escapes strings (labels) as well
    origin = rs.spec.origin is not None and _plan(rs.spec.origin) is not None
    if origin and sum(map(len, group)) < TABLE_MIN:
        for g in group:
            _run_records(g, out)
        return
    arr = _joined(group)
    if not len(arr):
        return
    if origin and not _printed(group, arr):
        for g in group:
            _run_records(g, out)
        return
    keys = _keys(arr, {f.name: name for f, name in zip(
        reversed(rs.spec.fields), reversed(arr.dtype.names), strict=True)}) if out.keys else None
    if not _formatted(group, arr, out, keys):
        parts = _Parts()
        _table(group, arr).write_ndjson(parts)
        out.emit(b"".join(parts.parts), len(arr), keys)


class _OutputError(Exception):
    """An output's error, raised through encode() as it is: not a formatting error."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Out:
    """Where encode() puts the pieces it makes: a sink, or one Lines."""

    def __init__(self, sink, keys: bool) -> None:
        self.sink, self.keys = sink, keys
        self.parts: list[bytes] = []
        self.all_keys: list[bytes | None] = []
        self.count = 0
        self.rows = 0  # rows of the table being made that have gone

    def emit(self, text: bytes | memoryview, count: int, keys: list | None) -> None:
        if self.sink is not None:
            try:
                self.sink(Lines(text, count, keys))
            except Exception as e:
                raise _OutputError(e) from e
        else:
            self.parts.append(bytes(text))  # a view is reused for the next piece: copied
            if keys is not None:
                self.all_keys += keys
        self.count += count
        self.rows += count

    def result(self) -> Lines:
        if self.sink is not None:
            return Lines(b"", self.count)
        return Lines(b"".join(self.parts), self.count, self.all_keys if self.keys else None)


class _Parts:
    """Where polars' NDJSON writer puts a table's text: the bytes objects it hands over
    are kept, not copied into a BytesIO."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(data if type(data) is bytes else bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


def warm() -> None:
    """Format a made-up message once, at start: polars' first calls (type checks it
    then caches) and the address table cost some 40 ms, which would otherwise fall on
    the first batch's latency."""
    fields = ((8, 4), (12, 4), (7, 2), (4, 1), (1, 8), (152, 8))  # (element id, length)
    template = struct.pack("!HH", 256, len(fields)) + b"".join(
        struct.pack("!HH", ie, n) for ie, n in fields)
    data = bytes(range(27)) * 2
    body = (struct.pack("!HH", 2, 4 + len(template)) + template
            + struct.pack("!HH", 256, 4 + len(data)) + data)
    message = struct.pack("!HHIII", 10, 16 + len(body), 0, 0, 0) + body
    encode(Decoder().message(message, "0.0.0.0:0"), keys=True)


def _groups(sets: list[RecordSet]) -> list[list[RecordSet]]:
    """Sets by layout: many exporters sending one template cost one table a batch."""
    out: list[list[RecordSet]] = []
    by_layout: dict[tuple, list[RecordSet]] = {}
    layouts: dict[int, tuple] = {}  # id(spec) -> layout, for this batch
    for rs in sets:
        if rs.array is None:
            out.append([rs])
            continue
        layout = layouts.get(id(rs.spec))
        if layout is None:
            layout = layouts[id(rs.spec)] = (rs.spec.id, rs.spec.dtype, tuple(
                (f.name, f.type, f.length) for f in rs.spec.fields))
        group = by_layout.get(layout)
        if group is None:
            group = by_layout[layout] = []
            out.append(group)
        group.append(rs)
    return out


class _VField(ctypes.Structure):
    """struct vfield of agent/_jsonlines.c."""

    _fields_ = [("cls", ctypes.c_uint32), ("length", ctypes.c_uint32),
                ("prefix", ctypes.c_void_p), ("prefix_len", ctypes.c_uint64)]


# enum class_ and enum status of agent/_jsonlines.c
(C_UNSIGNED, C_SIGNED, C_NTP, C_IPV4, C_IPV6, C_MAC, C_BOOLEAN, C_STRING, C_FLOAT64,
 C_FLOAT32, C_OCTETS) = range(11)
S_END, S_FULL, S_PYTHON, S_MALFORMED = range(4)
KEY_WIDTH = 40  # a flow key's slot in format_records()'s keys: its length, its octets
_MAX_RECORDS = 4096  # records a format_records() call, at most
_CLASSES = {"dateTimeMicroseconds": C_NTP, "dateTimeNanoseconds": C_NTP,
            "ipv4Address": C_IPV4, "ipv6Address": C_IPV6, "macAddress": C_MAC,
            "boolean": C_BOOLEAN, "string": C_STRING, "float64": C_FLOAT64,
            "float32": C_FLOAT32}


def _class(f) -> int:
    """A field's class for format_records(), which picks what value() picks from it
    and a value's length."""
    t = f.type
    if t.startswith("unsigned") or t in ("dateTimeSeconds", "dateTimeMilliseconds"):
        return C_UNSIGNED
    if t.startswith("signed"):
        return C_SIGNED
    return _CLASSES.get(t, C_OCTETS)


@dataclass
class _Plan:
    """How format_records() writes a variable-length template's records: each field's
    class, length and JSON name; the flow key's fields (key_size 0: no addresses;
    None: not as C reads them, flow_key() a record's)."""

    fields: ctypes.Array
    keep: list
    key: ctypes.Array
    key_size: int | None


_plans: OrderedDict[int, tuple[Spec, _Plan | None]] = OrderedDict()  # id(spec): LRU
_MAX_PLANS = 1024


def _plan(spec: Spec) -> _Plan | None:
    """spec's _Plan, kept for the templates last used; None, for Python to write the
    records, where their keys clash (an element named "@exporter#2" beside one named
    "@exporter": a dict keeps one) or every record holds a value C does not print (a
    fixed-length float: handed over a record at a time, they would be written so)."""
    held = _plans.get(id(spec))
    if held is not None and held[0] is spec:
        _plans.move_to_end(id(spec))
        return held[1]
    names = [f"{n}#2" if n in META else n for n in _names(spec.fields)]
    plan = None
    if len(set(names)) == len(names) and all(
            f.length == VARLEN or _kind(f) is not None for f in spec.fields):
        classes = [_class(f) for f in spec.fields]
        prefixes = [_padded(("," + json.dumps(name) + ":").encode()) for name in names]
        fields = (_VField * len(names))(*(
            _VField(c, f.length, ctypes.addressof(p), len(p.value))
            for c, f, p in zip(classes, spec.fields, prefixes, strict=True)))
        plan = _Plan(fields, prefixes, (ctypes.c_int32 * 5)(-1, -1, -1, -1, -1), 0)
        where = {name: i for i, name in enumerate(names)}
        for src, dst, size, cls in ((_SRC[0], _DST[0], 4, C_IPV4),
                                    (_SRC[1], _DST[1], 16, C_IPV6)):
            if src in where and dst in where:
                parts = (src, dst, "sourceTransportPort", "destinationTransportPort",
                         "protocolIdentifier")
                plan.key[:] = [where.get(name, -1) for name in parts]
                numbers = [classes[i] for i in plan.key[2:] if i >= 0]
                plan.key_size = size if classes[where[src]] == classes[where[dst]] == cls \
                    and all(c == C_UNSIGNED for c in numbers) else None
                break
    _plans[id(spec)] = (spec, plan)
    if len(_plans) > _MAX_PLANS:
        _plans.popitem(last=False)
    return plan


def _records(rs: RecordSet, out: _Out) -> None:
    """Records with variable-length fields as they came, by format_records(); a record
    with a value it does not print (or every record, where the plan says so) by
    read_record() and json.dumps()."""
    if not rs.count:
        return
    plan = _plan(rs.spec)
    raw = np.frombuffer(rs.raw, np.uint8)
    meta = json.dumps(_meta(rs), separators=(",", ":"))[:-1]
    size = plan.key_size if plan is not None and out.keys else 0
    if plan is None or size is None:
        _python(rs, 0, rs.count, meta, out)
        return
    padded = _padded(meta.encode())
    lib = _library()
    pos, written, status = ctypes.c_uint64(0), ctypes.c_uint64(0), ctypes.c_uint32(0)
    keys = _held_keys[0]
    cap = _PIECE  # a piece at most, as a table's; wider where one record is
    buf = _scratch(cap)
    left = rs.count
    while left:
        done = lib.format_records(raw.ctypes.data, len(raw), ctypes.byref(pos),
                                  len(plan.fields), plan.fields, ctypes.addressof(padded),
                                  len(padded.value), buf.ctypes.data, cap,
                                  ctypes.byref(written), plan.key, size,
                                  keys.ctypes.data, min(_MAX_RECORDS, len(keys) // KEY_WIDTH),
                                  ctypes.byref(status))
        if done:
            out.emit(memoryview(buf)[: written.value], done, _keys_of(keys, done, size)
                     if out.keys else None)
            left -= done
        if status.value == S_PYTHON:
            pos.value = _python(rs, pos.value, 1, meta, out)
            left -= 1
        elif status.value == S_FULL and not done:  # a record wider than a piece
            cap = written.value
            buf = _scratch(cap)
        elif status.value in (S_END, S_MALFORMED) and left:
            raise RuntimeError(f"format_records: {left} records not read")  # a bug


def _run_records(rs: RecordSet, out: _Out) -> None:
    """A run of records with strings (a layout's array: their octets as they came) by
    format_records(), a message's records at a time where they were gathered."""
    raw = rs.array.tobytes()
    size, times = rs.array.dtype.itemsize, rs.export_time
    if np.ndim(times) == 0:
        _records(RecordSet(rs.exporter, rs.domain, times, rs.spec.origin, raw=raw,
                           count=len(rs)), out)
        return
    starts = [0, *(np.flatnonzero(times[1:] != times[:-1]) + 1).tolist(), len(times)]
    for a, b in zip(starts, starts[1:]):  # noqa: B905
        _records(RecordSet(rs.exporter, rs.domain, int(times[a]), rs.spec.origin,
                           raw=raw[a * size : b * size], count=b - a), out)


_held_keys = [np.empty(_MAX_RECORDS * KEY_WIDTH, np.uint8)]


def _keys_of(keys: np.ndarray, n: int, size: int | None) -> list[bytes | None]:
    """format_records()'s keys of n records: each slot's length octet, then the key."""
    if not size:
        return [None] * n
    slots = keys[: n * KEY_WIDTH].tobytes()
    return [slots[i + 1 : i + 1 + slots[i]] or None for i in range(0, n * KEY_WIDTH, KEY_WIDTH)]


def _python(rs: RecordSet, pos: int, n: int, meta: str, out: _Out) -> int:
    """n records from pos read into dicts and written by json.dumps(): where the next
    begins."""
    rows = []
    for _ in range(n):
        row, pos = read_record(rs.spec, rs.raw, pos)
        rows.append(row)
    text = "".join(meta + "," + json.dumps(_unclash(r), separators=(",", ":"))[1:] + "\n"
                   for r in rows)
    out.emit(text.encode(), n, [flow_key(r) for r in rows] if out.keys else None)
    return pos


def _meta(rs: RecordSet) -> dict:
    return {"@exporter": rs.exporter, "@domain": rs.domain, "@template": rs.spec.id,
            "@exportTime": rs.export_time}


def _unclash(row: dict) -> dict:
    """An element an exporter named like one of our keys (RFC 5610 lets it) is kept,
    renamed, rather than overwriting the key."""
    if not any(k in row for k in META):
        return row
    return {(f"{k}#2" if k in META else k): v for k, v in row.items()}


def _joined(group: list[RecordSet]) -> np.ndarray:
    if len(group) == 1:
        return group[0].array
    # the sets' records are rows of one dtype: join their bytes
    return np.frombuffer(b"".join(g.array.tobytes() for g in group), group[0].spec.dtype)


def _table_meta(group: list[RecordSet]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """A table's own keys, record by record: its exporters, each record's exporter (an
    index into them), observation domain and export time."""
    sizes = [len(g.array) for g in group]
    exporters = list(dict.fromkeys(g.exporter for g in group))
    which = np.repeat(np.array([exporters.index(g.exporter) for g in group], np.uint32), sizes)
    domain = np.repeat(np.array([g.domain for g in group], np.uint32), sizes)
    if all(np.ndim(g.export_time) == 0 for g in group):
        export_time = np.repeat(np.array([g.export_time for g in group], np.uint32), sizes)
    else:  # gathered sets carry a record's each
        export_time = np.concatenate([np.broadcast_to(np.uint32(g.export_time), len(g.array))
                                      for g in group])
    return exporters, which, domain, export_time


def _table(group: list[RecordSet], arr: np.ndarray) -> pl.DataFrame:
    rs, n = group[0], len(arr)
    exporters, which, domain, export_time = _table_meta(group)
    cols = [pl.Series("@exporter", exporters, pl.String).gather(which),
            pl.Series("@domain", domain, pl.UInt32),
            pl.Series("@template", [rs.spec.id], pl.UInt16).new_from_index(0, n),
            pl.Series("@exportTime", export_time.astype(np.int64))]
    addresses: dict[int, tuple[str, np.ndarray]] = {}  # IPv4 columns: done together
    for f, name in zip(rs.spec.fields, arr.dtype.names, strict=True):
        out = f"{name}#2" if name in META else name
        if f.type == "ipv4Address" and f.length == 4:
            addresses[len(cols)] = (out, arr[name].astype(np.uint32))
            cols.append(pl.Series())  # its place
        else:
            cols.append(_column(out, f, arr[name]))
    if addresses:
        for i, col in zip(addresses, _ipv4(list(addresses.values())), strict=True):
            cols[i] = col
    return pl.DataFrame(cols)


class _Column(ctypes.Structure):
    """struct column of agent/_jsonlines.c."""

    _fields_ = [("data", ctypes.c_void_p), ("stride", ctypes.c_uint64),
                ("kind", ctypes.c_uint32), ("length", ctypes.c_uint32),
                ("prefix", ctypes.c_void_p), ("prefix_len", ctypes.c_uint64),
                ("strings", ctypes.POINTER(ctypes.c_void_p)),
                ("string_lens", ctypes.POINTER(ctypes.c_uint64)), ("nstrings", ctypes.c_uint64)]


# enum kind of agent/_jsonlines.c
UNSIGNED, SIGNED, NTP, IPV4, IPV6, MAC, BOOLEAN, STRING, _, TEXT, HEX = range(11)


def _kind(f) -> int | None:
    """How format_lines() prints this field, as the decoder's value() has it; None
    where it does not (floats, integers longer than 8 octets)."""
    t, n = f.type, f.length
    if t.startswith("unsigned") or t in ("dateTimeSeconds", "dateTimeMilliseconds"):
        return UNSIGNED if 1 <= n <= 8 else None
    if t.startswith("signed"):
        return SIGNED if 1 <= n <= 8 else None
    if t == "string":
        return TEXT
    if (t, n) in FLOATS:
        return None
    return {("dateTimeMicroseconds", 8): NTP, ("dateTimeNanoseconds", 8): NTP,
            ("ipv4Address", 4): IPV4, ("ipv6Address", 16): IPV6, ("macAddress", 6): MAC,
            ("boolean", 1): BOOLEAN}.get((t, n), HEX)  # value()'s last resort: hex


def _plain(text: np.ndarray) -> bool:
    """Whether a string column is printable ASCII without a quote or a backslash, what
    JSON takes as it is (names of pods, namespaces, interfaces): format_lines() copies
    it, and leaves out trailing NULs (a fixed-length field's padding, as value() does;
    a NUL before other text is not plain); anything else is left to polars' escaping."""
    if text.ndim == 1:
        text = np.ascontiguousarray(text).view(np.uint8).reshape(len(text), -1)
    nul = text == 0
    return bool((((text >= 0x20) & (text <= 0x7E) & (text != 0x22) & (text != 0x5C)) | nul)
                .all() and (nul[:, 1:] >= nul[:, :-1]).all())


@cache
def _library() -> ctypes.CDLL:
    lib = native.library()
    lib.format_lines.restype = ctypes.c_int64
    lib.format_lines.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32,
                                 ctypes.POINTER(_Column), ctypes.c_void_p, ctypes.c_uint64]
    lib.line_width.restype = ctypes.c_uint64
    lib.line_width.argtypes = [ctypes.c_uint32, ctypes.POINTER(_Column)]
    u64 = ctypes.POINTER(ctypes.c_uint64)
    lib.format_records.restype = ctypes.c_int64
    lib.format_records.argtypes = [
        ctypes.c_void_p, ctypes.c_uint64, u64, ctypes.c_uint32, ctypes.POINTER(_VField),
        ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64, u64,
        ctypes.POINTER(ctypes.c_int32), ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint64,
        ctypes.POINTER(ctypes.c_uint32)]
    return lib


def _printed(group: list[RecordSet], arr: np.ndarray) -> bool:
    """Whether format_lines() prints the table: every field a kind it prints, strings
    plain."""
    kinds = [_kind(f) for f in group[0].spec.fields]
    if None in kinds:
        return False
    return all(_plain(arr[name]) for name, kind in zip(arr.dtype.names, kinds, strict=True)
               if kind == TEXT)


def _formatted(group: list[RecordSet], arr: np.ndarray, out: _Out,
               keys: list | None) -> bool:
    """The table's lines by format_lines(), the same text polars writes; False if a
    field is one it does not print."""
    rs, n = group[0], len(arr)
    if not _printed(group, arr):
        return False
    kinds = [_kind(f) for f in rs.spec.fields]
    exporters, which, domain, export_time = _table_meta(group)
    keep = [arr]  # what the columns point into, alive until the call returns
    cols = [(which, STRING, 4, "@exporter"), (domain.astype(">u4"), UNSIGNED, 4, "@domain"),
            (np.full(n, rs.spec.id, ">u2"), UNSIGNED, 2, "@template"),
            (export_time.astype(">u4"), UNSIGNED, 4, "@exportTime")]
    table = (_Column * (len(cols) + len(kinds)))()
    for c, (values, kind, length, _) in zip(table, cols, strict=False):
        keep.append(values)
        c.data, c.stride, c.kind, c.length = values.ctypes.data, values.strides[0], kind, length
    for c, f, name, kind in zip(table[len(cols):], rs.spec.fields, arr.dtype.names, kinds,
                                strict=True):
        c.data = arr.ctypes.data + arr.dtype.fields[name][1]
        c.stride, c.kind, c.length = arr.strides[0], kind, f.length
    names = [name for *_, name in cols] + [f"{n}#2" if n in META else n
                                           for n in arr.dtype.names]
    for i, (c, name) in enumerate(zip(table, names, strict=True)):
        prefix = _padded((("{" if i == 0 else ",") + json.dumps(name, ensure_ascii=False)
                          + ":").encode())
        keep.append(prefix)
        c.prefix, c.prefix_len = ctypes.addressof(prefix), len(prefix.value)
    padded = [_padded(json.dumps(e).encode()) for e in exporters]
    texts = (ctypes.c_void_p * len(padded))(*map(ctypes.addressof, padded))
    lens = (ctypes.c_uint64 * len(padded))(*(len(t.value) for t in padded))
    keep += [texts, lens, padded]
    table[0].strings, table[0].string_lens, table[0].nstrings = texts, lens, len(padded)
    lib = _library()
    widest = lib.line_width(len(table), table)
    if not widest:
        raise RuntimeError("format_lines: a kind given a length it cannot have")  # a bug
    rows = max(1, _PIECE // widest)
    buf = _scratch(rows * widest)
    view = memoryview(buf)
    for first in range(0, n, rows):
        k = min(rows, n - first)
        size = lib.format_lines(first, k, len(table), table, buf.ctypes.data, len(buf))
        if size < 0:
            raise RuntimeError("format_lines: output bound passed")  # a bug, not input
        out.emit(view[:size], k, keys[first:first + k] if keys is not None else None)
    return True


# Records of a layout (a run of strings' lengths) in a batch below which they are
# written from their octets by format_records() rather than as a table: a table's
# columns cost some 0.5 ms to set up (bench/collector.py layouts())
TABLE_MIN = 256
_PIECE = 256 << 10  # octets of lines formatted and handed on at a time: within L2
_held = [np.empty(0, np.uint8)]


def _scratch(size: int) -> np.ndarray:
    """The buffer format_lines() and format_records() write into, kept between
    batches (a fresh one costs its page faults every batch): _PIECE, or one line where
    a line is wider. One encode() at a time uses it (the collector's lock)."""
    if len(_held[0]) < size:
        _held[0] = np.empty(size, np.uint8)
    return _held[0]


def _padded(text: bytes) -> ctypes.Array:
    """text in a buffer padded to a multiple of 32 octets, as put_text() reads it;
    .value is the text (it holds no NUL: it is JSON)."""
    return ctypes.create_string_buffer(text, -(-len(text) // 32) * 32 or 32)


def _ipv4(columns: list[tuple[str, np.ndarray]]) -> pl.DataFrame:
    """IPv4 addresses as text, all of a table's in one polars call (each call costs
    more than its work at these sizes): an address is two lookups of its halves."""
    halves = pl.lit(_halves())
    return pl.select([pl.concat_str([halves.gather(pl.lit(pl.Series(v >> 16))),
                                     halves.gather(pl.lit(pl.Series(v & 0xFFFF)))],
                                    separator=".").alias(name) for name, v in columns])


def _as_int(col: np.ndarray) -> np.ndarray:
    if col.ndim == 1:
        return col.astype(np.uint64)
    out = np.zeros(len(col), np.uint64)  # odd lengths (3, 5, 6, 7 octets), big-endian
    for i in range(col.shape[1]):
        out = (out << np.uint64(8)) | col[:, i]
    return out


@cache
def _halves() -> pl.Series:
    """"a.b" for every 16-bit half of an IPv4 address: an address is two lookups."""
    return pl.Series([f"{i >> 8}.{i & 255}" for i in range(1 << 16)])


def _column(name: str, f, col: np.ndarray) -> pl.Series:
    t, n = f.type, f.length
    if t.startswith("unsigned") or t in ("dateTimeSeconds", "dateTimeMilliseconds"):
        return pl.Series(name, _as_int(col))
    if t.startswith("signed"):
        v = _as_int(col).astype(np.int64)
        if 0 < n < 8:  # sign-extend the reduced size
            v = np.where(v >= 1 << (8 * n - 1), v - (1 << (8 * n)), v)
        return pl.Series(name, v)
    if t in ("dateTimeMicroseconds", "dateTimeNanoseconds") and n == 8:
        v = _as_int(col)
        sec = (v >> np.uint64(32)).astype(np.int64) - NTP_EPOCH_OFFSET
        frac = (v & np.uint64(0xFFFFFFFF)) * np.uint64(1_000_000_000) >> np.uint64(32)
        return pl.Series(name, sec * 1_000_000_000 + frac.astype(np.int64))
    if col.ndim == 1:  # a 1, 2, 4 or 8 octet field read as an integer: back to wire order
        col = col.astype(f">u{n}")
    blob = np.ascontiguousarray(col).tobytes()  # one copy; slicing bytes is cheap
    rows = [blob[i : i + n] for i in range(0, len(blob), n)] if n else [b""] * len(col)
    if t == "ipv6Address" and n == 16:
        return pl.Series(name, [socket.inet_ntop(socket.AF_INET6, b) for b in rows], pl.String)
    vals = [value(f, b) for b in rows]
    if (t, n) in FLOATS:  # value() gives other lengths in hex
        return pl.Series(name, [v if v == v and abs(v) != float("inf") else None for v in vals],
                         pl.Float64)
    if t == "boolean":
        return pl.Series(name, vals)
    return pl.Series(name, vals, pl.String)  # strings, hex, MAC


def flow_key(row: dict) -> bytes | None:
    """A record's flow key: protocol (1 octet), then its two endpoints, each address
    (4 or 16 octets) and port (2), the smaller first, so both directions of a flow
    share it; None without both addresses."""
    for src_name, dst_name, family in ((_SRC[0], _DST[0], socket.AF_INET),
                                       (_SRC[1], _DST[1], socket.AF_INET6)):
        if src_name in row and dst_name in row:
            try:
                src = socket.inet_pton(family, row[src_name])
                dst = socket.inet_pton(family, row[dst_name])
            except (OSError, TypeError):
                return None
            a = src + _port(row.get("sourceTransportPort"))
            b = dst + _port(row.get("destinationTransportPort"))
            proto = row.get("protocolIdentifier", 0)
            return bytes([proto if isinstance(proto, int) and 0 <= proto < 256 else 0]) + \
                min(a, b) + max(a, b)
    return None


def _port(value) -> bytes:
    return (value if isinstance(value, int) and 0 <= value < 65536 else 0).to_bytes(2, "big")


def _keys(arr: np.ndarray, names: dict[str, str]) -> list[bytes | None]:
    """flow_key() for a whole fixed-length table, with numpy: the same octets. Each
    endpoint is compared as numbers (address and port read big-endian are ordered
    as their octets are), and the keys leave as one array's items."""
    n = len(arr)
    for src_name, dst_name, size in ((_SRC[0], _DST[0], 4), (_SRC[1], _DST[1], 16)):
        if src_name in names and dst_name in names:
            src, dst = _octets(arr, names[src_name], size), _octets(arr, names[dst_name], size)
            if src is None or dst is None:
                return [None] * n
            a = _endpoint(src, _octets(arr, names.get("sourceTransportPort"), 2))
            b = _endpoint(dst, _octets(arr, names.get("destinationTransportPort"), 2))
            a_first = np.zeros(n, bool)  # a <= b, decided by the first word that differs
            same = np.ones(n, bool)
            for wa, wb in zip(a, b, strict=True):
                a_first |= same & (wa < wb)
                same &= wa == wb
            a_first |= same
            k = 1 + 2 * (size + 2)
            out = np.empty((n, k), np.uint8)
            out[:, :1] = _octets(arr, names.get("protocolIdentifier"), 1)
            half = size + 2
            for col, first_if_a in ((1, True), (1 + half, False)):
                words = [np.where(a_first == first_if_a, wa, wb) for wa, wb in zip(a, b,
                                                                                  strict=True)]
                out[:, col : col + half] = _octets_of(words, size)
            return out.view(f"V{k}").ravel().tolist()
    return [None] * n


def _endpoint(address: np.ndarray, port: np.ndarray) -> list[np.ndarray]:
    """An address and port as big-endian words that order as their octets do: IPv4
    one 48-bit number, IPv6 two 64-bit halves and the port."""
    port = port.astype(np.uint64)
    port = (port[:, 0] << np.uint64(8)) | port[:, 1]
    if address.shape[1] == 4:
        v4 = np.ascontiguousarray(address).view(">u4").ravel().astype(np.uint64)
        return [(v4 << np.uint64(16)) | port]
    halves = np.ascontiguousarray(address).view(">u8").astype(np.uint64)
    return [halves[:, 0], halves[:, 1], port]


def _octets_of(words: list[np.ndarray], size: int) -> np.ndarray:
    """_endpoint()'s words back to the address's and port's octets."""
    big = np.stack(words, axis=1).astype(">u8").view(np.uint8)
    if size == 4:
        return big[:, 2:8]  # the 48-bit number's six octets
    return np.hstack([big[:, :16], big[:, 22:24]])


def _octets(arr: np.ndarray, name: str | None, size: int) -> np.ndarray | None:
    """A field as an (n, size) matrix of its wire octets; zeros if absent, None if its
    length is not the one the key needs."""
    if name is None:
        return np.zeros((len(arr), size), np.uint8) if size <= 2 else None
    col = arr[name]
    width = col.shape[1] if col.ndim == 2 else col.dtype.itemsize
    if width != size:
        return None if size > 2 else np.zeros((len(arr), size), np.uint8)
    if col.ndim == 2:
        return np.ascontiguousarray(col)
    return np.ascontiguousarray(col.astype(f">u{size}")).view(np.uint8).reshape(len(arr), size)
