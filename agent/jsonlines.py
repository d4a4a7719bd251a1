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

import io
import json
import socket
from dataclasses import dataclass
from functools import cache

import numpy as np
import polars as pl

from agent.ipfix.decoder import NTP_EPOCH_OFFSET, RecordSet, records, value

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
    """Consecutive fixed-length sets of one exporter, domain and template are joined
    and formatted as one table; the rest record by record."""
    parts: list[bytes] = []
    out_keys: list[bytes | None] | None = [] if keys else None
    count, i = 0, 0
    while i < len(sets):
        rs, j = sets[i], i + 1
        if rs.array is None:
            rows = [{**_meta(rs), **_unclash(row)} for row in records(rs)]
            if rows:
                parts.append(("\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
                              + "\n").encode())
            if out_keys is not None:
                out_keys += [flow_key(r) for r in rows]
            count += len(rows)
            i = j
            continue
        while (j < len(sets) and sets[j].spec is rs.spec and sets[j].exporter == rs.exporter
               and sets[j].domain == rs.domain):
            j += 1
        group = sets[i:j]
        n = sum(len(g.array) for g in group)
        if n:
            df = _table(group, n)
            buf = io.BytesIO()
            df.write_ndjson(buf)
            parts.append(buf.getvalue())
            if out_keys is not None:
                out_keys += _keys(df)
            count += n
        i = j
    return Lines(b"".join(parts), count, out_keys)


def _meta(rs: RecordSet) -> dict:
    return {"@exporter": rs.exporter, "@domain": rs.domain, "@template": rs.spec.id,
            "@exportTime": rs.export_time}


def _unclash(row: dict) -> dict:
    """An element an exporter named like one of our keys (RFC 5610 lets it) is kept,
    renamed, rather than overwriting the key."""
    if not any(k in row for k in META):
        return row
    return {(f"{k}#2" if k in META else k): v for k, v in row.items()}


def _table(group: list[RecordSet], n: int) -> pl.DataFrame:
    rs = group[0]
    if len(group) == 1:
        arr = rs.array
    else:  # the sets' records are contiguous rows of one dtype: join their bytes
        arr = np.frombuffer(b"".join(g.array.tobytes() for g in group), rs.spec.dtype)
    times = np.repeat(np.array([g.export_time for g in group], np.int64),
                      [len(g.array) for g in group])
    cols = [pl.Series("@exporter", [rs.exporter], pl.String).new_from_index(0, n),
            pl.Series("@domain", [rs.domain], pl.UInt32).new_from_index(0, n),
            pl.Series("@template", [rs.spec.id], pl.UInt16).new_from_index(0, n),
            pl.Series("@exportTime", times)]
    for f, name in zip(rs.spec.fields, arr.dtype.names, strict=True):
        cols.append(_column(f"{name}#2" if name in META else name, f, arr[name]))
    return pl.DataFrame(cols)


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
    if t == "ipv4Address" and n == 4:
        v, halves = col.astype(np.uint32), _halves()
        return pl.select(pl.concat_str([halves.gather(v >> 16), halves.gather(v & 0xFFFF)],
                                       separator=".")).to_series().alias(name)
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
    """A record's flow key: "proto|a|b" with a and b its endpoints (address/port) in
    sorted order; None without addresses."""
    src = next((row[k] for k in _SRC if k in row), None)
    dst = next((row[k] for k in _DST if k in row), None)
    if src is None or dst is None:
        return None
    a = f"{src}/{row.get('sourceTransportPort', 0)}"
    b = f"{dst}/{row.get('destinationTransportPort', 0)}"
    return f"{row.get('protocolIdentifier', 0)}|{min(a, b)}|{max(a, b)}".encode()


def _keys(df: pl.DataFrame) -> list[bytes | None]:
    """flow_key() for a whole table, as polars expressions."""
    src = next((k for k in _SRC if k in df.columns), None)
    dst = next((k for k in _DST if k in df.columns), None)
    if src is None or dst is None:
        return [None] * df.height

    def port(name: str) -> pl.Expr:
        return pl.col(name).cast(pl.String) if name in df.columns else pl.lit("0")

    proto = port("protocolIdentifier")
    a = pl.concat_str([pl.col(src), pl.lit("/"), port("sourceTransportPort")])
    b = pl.concat_str([pl.col(dst), pl.lit("/"), port("destinationTransportPort")])
    key = pl.when(a <= b).then(pl.concat_str([proto, a, b], separator="|")).otherwise(
        pl.concat_str([proto, b, a], separator="|"))
    return df.select(key.cast(pl.Binary)).to_series().to_list()
