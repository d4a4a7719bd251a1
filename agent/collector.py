"""`cniflow collector`: receive IPFIX from any exporter, write one JSON object per
record per line.

Each line carries the record's elements by name (unknown ones as "PEN:ID" with
the raw value in hex) and four keys of its own: "@exporter" (address:port),
"@domain" (observation domain id), "@template" and "@exportTime" (seconds).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    start_http_server,
)

from agent.config import CollectorConfig
from agent.ipfix.decoder import (
    NTP_EPOCH_OFFSET,
    Decoder,
    Malformed,
    RecordSet,
    records,
    split_stream,
    value,
)

log = logging.getLogger(__name__)


class Output:
    """JSON lines to standard output, or to a file rotated by size."""

    def __init__(self, path: str, rotate_bytes: int, keep: int) -> None:
        self.path = None if path == "-" else Path(path)
        self.rotate_bytes, self.keep = rotate_bytes, keep
        self.f = sys.stdout if self.path is None else self.path.open("a")
        self.size = 0 if self.path is None else self.path.stat().st_size

    def write(self, lines: list[str]) -> None:
        if not lines:
            return
        text = "\n".join(lines) + "\n"
        self.f.write(text)
        self.f.flush()
        self.size += len(text)
        if self.path is not None and self.rotate_bytes and self.size >= self.rotate_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self.f.close()
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.rename(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self.f, self.size = self.path.open("a"), 0

    def close(self) -> None:
        if self.path is not None:
            self.f.close()


def lines(sets: list[RecordSet]) -> list[str]:
    """Records as JSON lines. Consecutive fixed-length sets of one exporter, domain
    and template are joined and formatted a column at a time into one format
    string; sets with variable-length fields go record by record."""
    out: list[str] = []
    i = 0
    while i < len(sets):
        rs = sets[i]
        j = i + 1
        if rs.array is None:
            meta = {"@exporter": rs.exporter, "@domain": rs.domain, "@template": rs.spec.id,
                    "@exportTime": rs.export_time}
            out += [json.dumps({**meta, **row}, separators=(",", ":")) for row in records(rs)]
            i = j
            continue
        while (j < len(sets) and sets[j].spec is rs.spec and sets[j].exporter == rs.exporter
               and sets[j].domain == rs.domain):
            j += 1
        group = sets[i:j]
        arr = group[0].array if j == i + 1 else np.concatenate([g.array for g in group])
        times = np.repeat([g.export_time for g in group], [len(g.array) for g in group])
        out += _format(rs, arr, times)
        i = j
    return out


def _format(rs: RecordSet, arr: np.ndarray, times: np.ndarray) -> list[str]:
    meta = {"@exporter": rs.exporter, "@domain": rs.domain, "@template": rs.spec.id}
    parts = [json.dumps(meta, separators=(",", ":"))[:-1].replace("%", "%%"),
             ',"@exportTime":%d']
    cols = [times.tolist()]
    for f, name in zip(rs.spec.fields, arr.dtype.names, strict=True):
        text, col = _column(f, arr[name])
        parts.append("," + json.dumps(name).replace("%", "%%") + ":" + text)
        cols.append(col)
    fmt = "".join(parts) + "}"
    return [fmt % row for row in zip(*cols, strict=True)]


def _as_int(col: np.ndarray) -> np.ndarray:
    if col.ndim == 1:
        return col.astype(np.uint64)
    out = np.zeros(len(col), np.uint64)  # odd lengths (3, 5, 6, 7 octets), big-endian
    for i in range(col.shape[1]):
        out = (out << np.uint64(8)) | col[:, i]
    return out


def _column(f, col: np.ndarray) -> tuple[str, list]:
    """A format directive and the column's values for it."""
    t, n = f.type, f.length
    if t.startswith("unsigned") or t in ("dateTimeSeconds", "dateTimeMilliseconds"):
        return "%d", _as_int(col).tolist()
    if t.startswith("signed"):
        v = _as_int(col).astype(np.int64)
        if n < 8:  # sign-extend the reduced size
            v = np.where(v >= 1 << (8 * n - 1), v - (1 << (8 * n)), v)
        return "%d", v.tolist()
    if t in ("dateTimeMicroseconds", "dateTimeNanoseconds") and n == 8:
        v = _as_int(col)
        sec = (v >> np.uint64(32)).astype(np.int64) - NTP_EPOCH_OFFSET
        frac = (v & np.uint64(0xFFFFFFFF)) * np.uint64(1_000_000_000) >> np.uint64(32)
        return "%d", (sec * 1_000_000_000 + frac.astype(np.int64)).tolist()
    if col.ndim == 1:  # a 1, 2, 4 or 8 octet field read as an integer: back to wire order
        col = col.astype(f">u{n}")
    blob = np.ascontiguousarray(col).tobytes()  # one copy; slicing bytes is cheap
    rows = [blob[i : i + n] for i in range(0, len(blob), n)]
    if t == "ipv4Address" and n == 4:
        return '"%s"', list(map(socket.inet_ntoa, rows))
    if t == "ipv6Address" and n == 16:
        return '"%s"', [socket.inet_ntop(socket.AF_INET6, b) for b in rows]
    vals = [value(f, b) for b in rows]
    if t in ("string", "float32", "float64", "boolean"):
        return "%s", [json.dumps(v) if v == v and v not in (float("inf"), float("-inf"))
                      else "null" for v in vals]
    return '"%s"', vals  # hex, MAC: safe text


def _reason(text: str) -> str:
    """A bounded label: numbers folded, so a hostile exporter cannot grow the series."""
    return re.sub(r"\d+", "N", text)[:60]


MAX_EXPORTER_LABELS = 256  # Prometheus series per metric a remote party can make


class CollectorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.records = Counter("cniflow_collector_records", "Data records decoded",
                               ["exporter"], registry=r)
        self.messages = Counter("cniflow_collector_messages", "IPFIX messages received",
                                ["exporter"], registry=r)
        self.template_misses = Counter(
            "cniflow_collector_template_misses", "Data sets that arrived before their template",
            registry=r)
        self.dropped_sets = Counter(
            "cniflow_collector_dropped_sets",
            "Data sets dropped: their template never came in time", registry=r)
        self.decode_errors = Counter("cniflow_collector_decode_errors",
                                     "Malformed messages or sets", ["reason"], registry=r)
        self.sequence_gaps = Counter("cniflow_collector_sequence_gaps",
                                     "Messages whose sequence number was not the expected one",
                                     registry=r)
        self.socket_drops = Gauge("cniflow_collector_socket_drops",
                                  "Datagrams the kernel dropped on the UDP socket "
                                  "(from /proc/net/udp)", registry=r)
        self.exporters_over_cap = Counter(
            "cniflow_collector_exporters_over_cap",
            f"Messages of exporter addresses beyond the first {MAX_EXPORTER_LABELS} "
            "(labelled \"other\")", registry=r)
        self._labels: set[str] = set()

    def exporter(self, exporter: str) -> str:
        """The label of an exporter: its address, not its port (an exporter's source port
        may change with every restart or connection), the first MAX_EXPORTER_LABELS of
        them; the rest share "other"."""
        address = exporter.rsplit(":", 1)[0]
        if address in self._labels:
            return address
        if len(self._labels) < MAX_EXPORTER_LABELS:
            self._labels.add(address)
            return address
        self.exporters_over_cap.inc()
        return "other"


class Collector:
    def __init__(self, cfg: CollectorConfig, output: Output,
                 metrics: CollectorMetrics | None = None, tls=None) -> None:
        self.cfg, self.output, self.tls = cfg, output, tls
        self.lock = threading.Lock()  # decoder and output, shared by TCP connections
        self.metrics = metrics or CollectorMetrics()
        self.decoder = Decoder(hold_seconds=cfg.hold_seconds)
        self._seen_stats: dict[str, int] = {}
        self._seen_errors: dict[str, int] = {}
        self._last_log: dict[str, float] = {}

    def handle(self, batch: list[tuple[bytes, str]]) -> None:
        """Datagrams or framed messages as they came, (data, exporter) each."""
        sets: list[RecordSet] = []
        for data, exporter in batch:
            msgs_before = self.decoder.stats["messages"]
            got = self.decoder.message(data, exporter)
            sets += got
            label = self.metrics.exporter(exporter)
            if got:
                self.metrics.records.labels(label).inc(sum(len(rs) for rs in got))
            if self.decoder.stats["messages"] > msgs_before:
                self.metrics.messages.labels(label).inc()
            self._sync(exporter)
        self.output.write(self._lines(sets))

    def _lines(self, sets: list[RecordSet]) -> list[str]:
        """JSON lines of a batch; a set that cannot be formatted (values the checks let
        through) is its exporter's counted error, never the batch's or the process's."""
        try:
            return lines(sets)
        except Exception:  # noqa: BLE001
            out: list[str] = []
            for rs in sets:
                try:
                    out += lines([rs])
                except Exception as e:  # noqa: BLE001
                    self.decoder.errors[f"unexpected {type(e).__name__} formatting"] += 1
                    self._sync(rs.exporter)
            return out

    def _sync(self, exporter: str) -> None:
        s = self.decoder.stats
        for name, metric in (("template_misses", self.metrics.template_misses),
                             ("dropped_sets", self.metrics.dropped_sets),
                             ("sequence_gaps", self.metrics.sequence_gaps)):
            delta = s[name] - self._seen_stats.get(name, 0)
            if delta:
                metric.inc(delta)
                self._seen_stats[name] = s[name]
        for reason, count in self.decoder.errors.items():
            delta = count - self._seen_errors.get(reason, 0)
            if delta:
                self.metrics.decode_errors.labels(_reason(reason)).inc(delta)
                self._seen_errors[reason] = count
                self._log_bounded(reason, exporter)

    def _log_bounded(self, reason: str, exporter: str) -> None:
        """At most one line per reason every 10 s, so a flood cannot flood the log."""
        now, kind = time.monotonic(), _reason(reason)
        if now - self._last_log.get(kind, -1e9) >= 10:
            self._last_log[kind] = now
            log.warning("malformed IPFIX", extra={"exporter": exporter, "reason": reason,
                                                  "total": self.decoder.errors[reason]})

    def serve(self, stop: threading.Event) -> None:
        host, port = self.cfg.listen_host_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if self.cfg.transport == "udp":
            self._serve_udp(family, host, port, stop)
        else:
            self._serve_tcp(family, host, port, stop)

    def _serve_udp(self, family, host, port, stop) -> None:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind((host, port))
        sock.settimeout(0.5)
        inode = os.fstat(sock.fileno()).st_ino
        log.info("collector listening", extra={"listen": self.cfg.listen, "transport": "udp"})
        next_drops = 0.0
        while not stop.is_set():
            batch = []
            try:
                data, addr = sock.recvfrom(65535)
                batch.append((data, f"{addr[0]}:{addr[1]}"))
                while len(batch) < 512:  # whatever else is already waiting
                    data, addr = sock.recvfrom(65535, socket.MSG_DONTWAIT)
                    batch.append((data, f"{addr[0]}:{addr[1]}"))
            except (TimeoutError, BlockingIOError):
                pass
            if batch:
                self.handle(batch)
            if time.monotonic() >= next_drops:
                self.metrics.socket_drops.set(udp_drops(inode))
                next_drops = time.monotonic() + 2
        sock.close()

    def _serve_tcp(self, family, host, port, stop) -> None:
        """One thread a connection (TLS handshakes block); decoding under one lock."""
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(64)
        srv.settimeout(0.5)
        log.info("collector listening", extra={"listen": self.cfg.listen,
                                               "transport": self.cfg.transport})
        while not stop.is_set():
            try:
                conn, addr = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._connection, args=(conn, addr, stop),
                             daemon=True).start()
        srv.close()

    def _connection(self, conn: socket.socket, addr, stop: threading.Event) -> None:
        exporter = f"{addr[0]}:{addr[1]}"
        conn.settimeout(5)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
        except OSError:  # a bad or missing certificate, a plain TCP client
            with self.lock:
                self.decoder.errors["tls handshake failed"] += 1
                self._sync(exporter)
            conn.close()
            return
        conn.settimeout(0.5)
        pending = b""
        try:
            while not stop.is_set():
                try:
                    chunk = conn.recv(1 << 20)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                try:
                    msgs, pending = split_stream(pending + chunk)
                except Malformed as e:  # a stream out of frame cannot be resynced
                    with self.lock:
                        self.decoder.errors[str(e)] += 1
                        self._sync(exporter)
                    break
                with self.lock:
                    self.handle([(m, exporter) for m in msgs])
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.decoder.forget(exporter)  # templates die with the connection


def udp_drops(inode: int) -> int:
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if len(cols) > 12 and int(cols[9]) == inode:
                        return int(cols[-1])
        except OSError:
            continue
    return 0


def serve_metrics(metrics: CollectorMetrics, address: str) -> None:
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=metrics.registry)
