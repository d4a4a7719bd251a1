"""Encode: decoded record sets into JSON lines, one object per record.

A line carries the record's elements by name (unknown ones as "PEN:ID" with the raw
value in hex) after four keys of its own: "@exporter" (address:port), "@domain"
(observation domain id), "@template" and "@exportTime" (seconds).

Fixed-length sets, what routers and cniflow's exporter send most, are turned into
columns with numpy and written by polars' NDJSON writer: a batch costs a few calls
per column, not per record, which is what lets one core write a million lines a
second. Sets with variable-length fields go record by record.

Each record also gets a flow key for Kafka: protocol and the two endpoints in a
fixed order, so both directions of a flow land in one partition.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from functools import cache

import numpy as np
import polars as pl

from agent.ipfix.decoder import NTP_EPOCH_OFFSET, Decoder, RecordSet, records, value

META = ("@exporter", "@domain", "@template", "@exportTime")
_SRC = ("sourceIPv4Address", "sourceIPv6Address")
_DST = ("destinationIPv4Address", "destinationIPv6Address")


@dataclass
class Lines:
    """JSON lines of a batch: `text` ends every line with a newline; `keys`, when
    asked for, holds each record's flow key (None where the record has no addresses)."""

    text: bytes
    count: int
    keys: list[bytes | None] | None = None

    def split(self) -> list[bytes]:
        return self.text.split(b"\n")[:-1] if self.count else []


def encode(sets: list[RecordSet], keys: bool = False) -> Lines:
    """Fixed-length sets of one layout (template id and fields), from any exporter,
    are joined and formatted as one table, in the order the layout first came, each
    exporter's records in the order they came; the rest record by record."""
    parts = _Parts()
    out_keys: list[bytes | None] | None = [] if keys else None
    count = 0
    for group in _groups(sets):
        rs = group[0]
        if rs.array is None:
            rows = [{**_meta(rs), **_unclash(row)} for row in records(rs)]
            if rows:
                parts.write(("\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
                              + "\n").encode())
            if out_keys is not None:
                out_keys += [flow_key(r) for r in rows]
            count += len(rows)
            continue
        arr = _joined(group)
        if not len(arr):
            continue
        _table(group, arr).write_ndjson(parts)
        if out_keys is not None:
            out_keys += _keys(arr, {f.name: name for f, name in
                                    zip(reversed(rs.spec.fields), reversed(arr.dtype.names),
                                        strict=True)})
        count += len(arr)
    return Lines(b"".join(parts.parts), count, out_keys)


class _Parts:
    """Where polars' NDJSON writer puts a table's text: the bytes object it hands
    over is kept, not copied into a BytesIO (a megabyte a batch less to move)."""

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


def _table(group: list[RecordSet], arr: np.ndarray) -> pl.DataFrame:
    rs, n = group[0], len(arr)
    sizes = [len(g.array) for g in group]
    if len({(g.exporter, g.domain) for g in group}) == 1:
        exporter = pl.Series("@exporter", [rs.exporter], pl.String).new_from_index(0, n)
        domain = pl.Series("@domain", [rs.domain], pl.UInt32).new_from_index(0, n)
    else:
        which = np.repeat(np.arange(len(group), dtype=np.uint32), sizes)
        exporter = pl.Series("@exporter", [g.exporter for g in group], pl.String).gather(which)
        domain = pl.Series("@domain", np.repeat([g.domain for g in group], sizes), pl.UInt32)
    cols = [exporter, domain,
            pl.Series("@template", [rs.spec.id], pl.UInt16).new_from_index(0, n),
            pl.Series("@exportTime", np.repeat(np.array([g.export_time for g in group],
                                                        np.int64), sizes))]
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
        if n < 8:  # sign-extend the reduced size
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
    rows = [blob[i : i + n] for i in range(0, len(blob), n)]
    if t == "ipv6Address" and n == 16:
        return pl.Series(name, [socket.inet_ntop(socket.AF_INET6, b) for b in rows], pl.String)
    vals = [value(f, b) for b in rows]
    if t in ("float32", "float64"):
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
    """flow_key() for a whole fixed-length table, with numpy: the same octets."""
    n = len(arr)
    for src_name, dst_name, size in ((_SRC[0], _DST[0], 4), (_SRC[1], _DST[1], 16)):
        if src_name in names and dst_name in names:
            src, dst = _octets(arr, names[src_name], size), _octets(arr, names[dst_name], size)
            if src is None or dst is None:
                return [None] * n
            a = np.hstack([src, _octets(arr, names.get("sourceTransportPort"), 2)])
            b = np.hstack([dst, _octets(arr, names.get("destinationTransportPort"), 2)])
            proto = _octets(arr, names.get("protocolIdentifier"), 1)
            differ = a != b  # the first octet where they differ decides the order
            first = differ.argmax(axis=1)
            a_first = a[np.arange(n), first] <= b[np.arange(n), first]
            lo = np.where(a_first[:, None], a, b)
            hi = np.where(a_first[:, None], b, a)
            blob = np.hstack([proto, lo, hi]).tobytes()
            k = 1 + 2 * (size + 2)
            return [blob[i : i + k] for i in range(0, len(blob), k)]
    return [None] * n


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
