"""Templates, record sets and message framing (RFC 7011 sections 3 and 7).

Records are encoded a whole batch at a time: fixed-length fields through one
big-endian numpy dtype, variable-length strings with vectorised gathers from a
table of distinct values (interface and pod names repeat across records).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.ipfix.registry import VARLEN, Element, element

VERSION = 10
HEADER = struct.Struct("!HHIII")  # version, length, export time, sequence, domain
SET_HEADER = struct.Struct("!HH")
TEMPLATE_SET, OPTIONS_TEMPLATE_SET = 2, 3


@dataclass
class Template:
    id: int
    elements: Sequence[Element]
    scope_count: int = 0  # > 0: an options template
    fixed_dtype: np.dtype = field(init=False)
    varlen: list[str] = field(init=False)

    @classmethod
    def of(cls, tid: int, names: Sequence[str], scope_count: int = 0) -> Template:
        return cls(tid, [element(n) for n in names], scope_count)

    def __post_init__(self) -> None:
        fixed = [e for e in self.elements if e.length != VARLEN]
        self.varlen = [e.name for e in self.elements if e.length == VARLEN]
        # fixed fields first, then strings: the order the template announces
        names = [e.name for e in self.elements]
        if names != [e.name for e in fixed] + self.varlen:
            raise ValueError(f"template {self.id}: variable-length fields must come last")
        self.fixed_dtype = np.dtype([(e.name, e.dtype) for e in fixed])

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.elements]

    def record(self) -> bytes:
        """The template record, as sent in a (options) template set."""
        if self.scope_count:
            out = struct.pack("!HHH", self.id, len(self.elements), self.scope_count)
        else:
            out = struct.pack("!HH", self.id, len(self.elements))
        for e in self.elements:
            if e.pen:
                out += struct.pack("!HHI", 0x8000 | e.id, e.length, e.pen)
            else:
                out += struct.pack("!HH", e.id, e.length)
        return out


@dataclass
class Strings:
    """A string column: idx[i] picks record i's value from `values`."""

    values: Sequence[str]
    idx: np.ndarray

    def encoded(self, max_octets: int = 0xFFFE) -> tuple[np.ndarray, np.ndarray]:
        """Each value's variable-length encoding (RFC 7011 section 7) as a row of a
        zero-padded matrix, and its length; values cut to max_octets of UTF-8."""
        parts = []
        for v in self.values:
            b = v.encode()
            if len(b) > max_octets:  # cut on a character boundary
                b = b[:max_octets].decode(errors="ignore").encode()
            prefix = bytes([len(b)]) if len(b) < 255 else b"\xff" + struct.pack("!H", len(b))
            parts.append(prefix + b)
        lengths = np.array([len(p) for p in parts], np.int64)
        matrix = np.zeros((len(parts), int(lengths.max(initial=1))), np.uint8)
        for i, p in enumerate(parts):  # one per distinct value, not per record
            matrix[i, : len(p)] = np.frombuffer(p, np.uint8)
        return matrix, lengths


def _fields(dtype: np.dtype) -> list:
    return [(name, dtype.fields[name][0]) for name in dtype.names]


@dataclass
class RecordGroup:
    """Records of equal encoded size, laid out back to back."""

    rows: np.ndarray  # their positions in the batch given to encode_records
    data: np.ndarray  # uint8, len(rows) * size
    size: int


def encode_records(
    template: Template, columns: Mapping[str, np.ndarray | Strings], n: int,
    max_record: int = 0xFFFF,
) -> list[RecordGroup]:
    """Encode n records. Records whose strings have the same lengths share one
    numpy dtype and are written in one assignment per field. If the longest
    strings could make a record exceed max_record octets, each string column
    is cut to an equal share of the room left by the fixed fields."""
    fsize = template.fixed_dtype.itemsize
    share = 0xFFFE
    if template.varlen:
        longest = sum(
            3 + max((len(v.encode()) for v in columns[name].values), default=0)
            for name in template.varlen)
        if fsize + longest > max_record:
            share = (max_record - fsize) // len(template.varlen) - 3
    if not template.varlen:
        fixed = np.empty(n, template.fixed_dtype)
        for name in template.fixed_dtype.names:
            fixed[name] = columns[name]
        return [RecordGroup(np.arange(n), fixed.view(np.uint8), fsize)]
    encoded, lens, keys = [], [], np.zeros(n, np.int64)
    radix = 1
    for name in template.varlen:
        col = columns[name]
        assert isinstance(col, Strings), name
        matrix, lengths = col.encoded(share)
        per_record = lengths[col.idx]
        present = np.flatnonzero(np.bincount(per_record))  # few distinct lengths: no sort
        if len(present) > 1:
            rank = np.zeros(present[-1] + 1, np.int64)
            rank[present] = np.arange(len(present))
            keys += rank[per_record] * radix
            radix *= len(present)
        encoded.append((matrix, col.idx))
        lens.append(per_record)
    if radix == 1:  # one layout for all records: fields written straight into place
        widths = [int(ln[0]) if n else 0 for ln in lens]
        dtype = np.dtype(
            _fields(template.fixed_dtype)
            + [(f"s{i}", np.uint8, (w,)) for i, w in enumerate(widths)]
        )
        out = np.empty(n, dtype)
        for name in template.fixed_dtype.names:
            out[name] = columns[name]
        for i, (matrix, idx) in enumerate(encoded):
            out[f"s{i}"] = matrix[idx, : widths[i]]
        return [RecordGroup(np.arange(n), out.view(np.uint8), dtype.itemsize)]
    fixed = np.empty(n, template.fixed_dtype)
    for name in template.fixed_dtype.names:
        fixed[name] = columns[name]
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    fixed_v = fixed.view(np.dtype((np.void, fsize)))
    groups = []
    for rows in np.split(order, bounds):
        first = rows[0]
        widths = [int(ln[first]) for ln in lens]
        dtype = np.dtype(
            [("fixed", fixed_v.dtype)] + [(f"s{i}", np.uint8, (w,)) for i, w in enumerate(widths)]
        )
        out = np.empty(len(rows), dtype)
        out["fixed"] = fixed_v[rows]
        for i, ((matrix, idx), w) in enumerate(zip(encoded, widths)):
            out[f"s{i}"] = matrix[idx[rows], :w]
        groups.append(RecordGroup(rows, out.view(np.uint8), dtype.itemsize))
    return groups


def set_bytes(set_id: int, body: bytes) -> bytes:
    return SET_HEADER.pack(set_id, SET_HEADER.size + len(body)) + body


def template_sets(templates: Sequence[Template]) -> bytes:
    """Options templates first, one a set (pmacct's nfacctd 1.7.7 rejects a set of
    several and drops the rest of the message), then the data templates in one set."""
    data = b"".join(t.record() for t in templates if not t.scope_count)
    out = b"".join(set_bytes(OPTIONS_TEMPLATE_SET, t.record()) for t in templates
                   if t.scope_count)
    if data:
        out += set_bytes(TEMPLATE_SET, data)
    return out


def message(body: bytes, export_time: int, sequence: int, domain: int) -> bytes:
    return (
        HEADER.pack(VERSION, HEADER.size + len(body), export_time, sequence & 0xFFFFFFFF, domain)
        + body
    )


# header and the one set header of a message that carries a single data set
_HEAD = np.dtype(
    [
        ("version", ">u2"),
        ("length", ">u2"),
        ("export_time", ">u4"),
        ("sequence", ">u4"),
        ("domain", ">u4"),
        ("set_id", ">u2"),
        ("set_length", ">u2"),
    ]
)


@dataclass
class Messages:
    """Messages laid out back to back, ready for one sendmmsg or one stream write."""

    buf: np.ndarray  # uint8
    offsets: np.ndarray  # start of each message
    lengths: np.ndarray
    counts: np.ndarray  # data records in each message
    rows: np.ndarray  # the records' rows, in message order

    def __len__(self) -> int:
        return len(self.lengths)


def pack(
    set_id: int,
    groups: Sequence[RecordGroup],
    max_message: int,
    export_time: int,
    domain: int,
    sequence: int,
) -> Messages:
    """All records of the groups in messages of at most max_message octets, with
    sequence numbers counting from `sequence`. Full messages of a group are built
    as one numpy array; the groups' remainders share messages (several sets each)."""
    room = max_message - _HEAD.itemsize
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    rest: list[tuple[RecordGroup, int]] = []
    for g in groups:
        k = room // g.size
        if k <= 0:
            raise ValueError(f"a {g.size}-octet record does not fit a {max_message}-octet message")
        full = len(g.rows) // k
        if full:
            body = k * g.size
            msgs = np.zeros(full, [("head", _HEAD), ("body", np.uint8, (body,))])
            msgs["body"] = g.data[: full * body].reshape(full, body)
            head = msgs["head"]
            head["version"], head["length"], head["export_time"] = (
                VERSION,
                _HEAD.itemsize + body,
                export_time,
            )
            head["domain"], head["set_id"], head["set_length"] = (
                domain,
                set_id,
                SET_HEADER.size + body,
            )
            parts.append(
                (
                    msgs.view(np.uint8),
                    np.full(full, _HEAD.itemsize + body),
                    np.full(full, k),
                    g.rows[: full * k],
                )
            )
        if len(g.rows) > full * k:
            rest.append((g, full * k))
    parts.extend(_pack_rest(set_id, rest, max_message, export_time, domain))
    if not parts:
        z = np.zeros(0, np.int64)
        return Messages(np.zeros(0, np.uint8), z, z, z, z)
    buf = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    lengths = np.concatenate([p[1] for p in parts]).astype(np.int64)
    counts = np.concatenate([p[2] for p in parts]).astype(np.int64)
    rows = np.concatenate([p[3] for p in parts])
    offsets = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    seq = (sequence + np.concatenate([[0], np.cumsum(counts)[:-1]])) & 0xFFFFFFFF
    buf[(offsets[:, None] + 8 + np.arange(4)).ravel()] = seq.astype(">u4").view(np.uint8)
    return Messages(buf, offsets, lengths, counts, rows)


def _pack_rest(set_id, rest, max_message, export_time, domain):
    """Remainders of groups (fewer records than fill a message), several sets a message."""
    out, sets, rows, count = [], [], [], 0
    space = max_message - HEADER.size

    def close():
        body = b"".join(sets)
        msg = np.frombuffer(bytearray(message(body, export_time, 0, domain)), np.uint8)
        out.append((msg, np.array([len(msg)]), np.array([count]), np.concatenate(rows)))

    for g, start in rest:
        i = start
        while i < len(g.rows):
            k = min((space - SET_HEADER.size) // g.size, len(g.rows) - i)
            if k <= 0:
                close()
                sets, rows, count, space = [], [], 0, max_message - HEADER.size
                continue
            sets.append(set_bytes(set_id, g.data[i * g.size : (i + k) * g.size].tobytes()))
            rows.append(g.rows[i : i + k])
            space -= SET_HEADER.size + k * g.size
            count += k
            i += k
    if count:
        close()
    return out
