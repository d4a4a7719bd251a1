"""Templates, record sets and message framing (RFC 7011 sections 3 and 7).

Records are encoded a whole batch at a time: fixed-length fields through one
big-endian numpy dtype, variable-length strings with vectorised gathers from a
table of distinct values (interface and pod names repeat across records).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
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

    def encoded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Blob of length-prefixed encodings, start and length of each value."""
        parts = []
        for v in self.values:
            b = v.encode()
            if len(b) > 0xFFFE:
                b = b[:0xFFFE]
            prefix = bytes([len(b)]) if len(b) < 255 else b"\xff" + struct.pack("!H", len(b))
            parts.append(prefix + b)
        lengths = np.array([len(p) for p in parts], np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        blob = np.frombuffer(b"".join(parts), np.uint8)
        return blob, starts, lengths


def encode_records(
    template: Template, columns: Mapping[str, np.ndarray | Strings], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """All n records as one byte buffer, with offsets[i] the start of record i
    (offsets[n] is the end)."""
    fixed = np.zeros(n, template.fixed_dtype)
    for name in template.fixed_dtype.names:
        fixed[name] = columns[name]
    if not template.varlen:
        size = template.fixed_dtype.itemsize
        return fixed.view(np.uint8), np.arange(n + 1, dtype=np.int64) * size
    fsize = template.fixed_dtype.itemsize
    pieces = []  # (blob, src start per record, length per record)
    total = np.full(n, fsize, np.int64)
    for name in template.varlen:
        col = columns[name]
        assert isinstance(col, Strings), name
        blob, starts, lengths = col.encoded()
        src, ln = starts[col.idx], lengths[col.idx]
        pieces.append((blob, src, ln))
        total += ln
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(total, out=offsets[1:])
    buf = np.zeros(int(offsets[-1]), np.uint8)
    fb = fixed.view(np.uint8).reshape(n, fsize)
    buf[(offsets[:-1, None] + np.arange(fsize)).ravel()] = fb.ravel()
    at = offsets[:-1] + fsize
    for blob, src, ln in pieces:
        _scatter(buf, at, blob, src, ln)
        at = at + ln
    return buf, offsets


def _scatter(buf: np.ndarray, dst: np.ndarray, blob: np.ndarray, src: np.ndarray, ln: np.ndarray):
    count = int(ln.sum())
    if not count:
        return
    base = np.repeat(np.cumsum(ln) - ln, ln)
    within = np.arange(count, dtype=np.int64) - base
    buf[np.repeat(dst, ln) + within] = blob[np.repeat(src, ln) + within]


def chunks(offsets: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Record ranges [i, j) whose bytes fit in budget (at least one record each)."""
    n = len(offsets) - 1
    i = 0
    while i < n:
        j = int(np.searchsorted(offsets, offsets[i] + budget, "right")) - 1
        j = max(j, i + 1)
        yield i, min(j, n)
        i = j


def set_bytes(set_id: int, body: bytes) -> bytes:
    return SET_HEADER.pack(set_id, SET_HEADER.size + len(body)) + body


def template_sets(templates: Sequence[Template]) -> bytes:
    data = b"".join(t.record() for t in templates if not t.scope_count)
    opts = b"".join(t.record() for t in templates if t.scope_count)
    out = b""
    if opts:
        out += set_bytes(OPTIONS_TEMPLATE_SET, opts)
    if data:
        out += set_bytes(TEMPLATE_SET, data)
    return out


def message(body: bytes, export_time: int, sequence: int, domain: int) -> bytes:
    return (
        HEADER.pack(VERSION, HEADER.size + len(body), export_time, sequence & 0xFFFFFFFF, domain)
        + body
    )
