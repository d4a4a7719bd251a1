"""`cniflow collector`: receive IPFIX from any exporter, decode it, and hand each
batch's JSON lines (agent/jsonlines.py) to the outputs (agent/outputs.py): a file,
standard output, Kafka.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import select
import socket
import threading
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    start_http_server,
)

from agent.config import CollectorConfig
from agent.ipfix.decoder import Decoder, Malformed, RecordSet, split_stream
from agent.jsonlines import Lines, encode, warm
from agent.logs import Bounded
from agent.outputs import OutputGone
from agent.stopping import Stop
from bpf import caps

log = logging.getLogger(__name__)

JOIN_SECONDS = 5.0  # at a stop, for receivers to end their batches before the outputs close


def _reason(text: str) -> str:
    """A bounded label: numbers folded, so a hostile exporter cannot grow the series."""
    return re.sub(r"\d+", "N", text)[:60]


MAX_EXPORTER_LABELS = 256  # Prometheus series per metric a remote party can make


class CollectorMetrics:
    """The collector's metrics. With --workers, each worker's counters are summed by
    prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR set before any
    worker starts) and the supervisor serves them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
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
        self.receive_buffer = Gauge(
            "cniflow_collector_receive_buffer_bytes",
            "Octets of datagrams the UDP socket holds while the collector is busy "
            "(--receive-buffer, or less: net.core.rmem_max)", registry=r,
            multiprocess_mode="min")
        self.socket_drops = Gauge("cniflow_collector_socket_drops",
                                  "Datagrams the kernel dropped on the UDP socket "
                                  "(from /proc/net/udp)", registry=r, multiprocess_mode="livesum")
        self.written = Counter("cniflow_collector_lines", "JSON lines handed to the outputs",
                               registry=r)
        self.output_failed = Counter(
            "cniflow_collector_output_failed_lines",
            "Lines an output could not take (a full disk, a closed pipe): counted, the "
            "other outputs and the next lines go on", ["output"], registry=r)
        self.kafka_delivered = Counter("cniflow_collector_kafka_delivered",
                                       "Records the Kafka brokers acknowledged", registry=r)
        self.kafka_failed = Counter("cniflow_collector_kafka_failed",
                                    "Records the Kafka brokers refused", registry=r)
        self.kafka_dropped = Counter(
            "cniflow_collector_kafka_dropped",
            "Records dropped: the queue for the brokers was full, or still held at exit",
            registry=r)
        self.kafka_queued = Gauge("cniflow_collector_kafka_queued",
                                  "Records waiting for the Kafka brokers", registry=r,
                                  multiprocess_mode="livesum")
        self.exporters_over_cap = Counter(
            "cniflow_collector_exporters_over_cap",
            f"Messages of exporter addresses beyond the first {MAX_EXPORTER_LABELS} "
            "(labelled \"other\")", registry=r)
        self._labels: set[str] = set()

    def exporter(self, exporter: str, messages: int = 1) -> str:
        """The label of an exporter: its address, not its port (an exporter's source port
        may change with every restart or connection), the first MAX_EXPORTER_LABELS of
        them; the rest share "other" (and their `messages` are counted over the cap)."""
        address = exporter.rsplit(":", 1)[0]
        if address in self._labels:
            return address
        if len(self._labels) < MAX_EXPORTER_LABELS:
            self._labels.add(address)
            return address
        self.exporters_over_cap.inc(messages)
        return "other"

    def received(self, counts: dict[str, list[int]]) -> None:
        """A batch's counts, [datagrams, messages, records] by exporter, in the order
        the exporters first came: one increment per label and counter a batch."""
        by_label: dict[str, list[int]] = {}
        for exporter, (datagrams, messages, records) in counts.items():
            label = self.exporter(exporter, datagrams)
            total = by_label.setdefault(label, [0, 0])
            total[0] += messages
            total[1] += records
        for label, (messages, records) in by_label.items():
            if records:
                self.records.labels(label).inc(records)
            if messages:
                self.messages.labels(label).inc(messages)


class Collector:
    def __init__(self, cfg: CollectorConfig, outputs: list,
                 metrics: CollectorMetrics | None = None, tls=None) -> None:
        self.cfg, self.outputs, self.tls = cfg, outputs, tls
        self.keys = any(hasattr(o, "topic") for o in outputs)  # Kafka wants flow keys
        self.lock = threading.Lock()  # decoder and output, shared by TCP connections
        self.metrics = metrics or CollectorMetrics()
        self.decoder = Decoder(hold_seconds=cfg.hold_seconds)
        self._seen_stats: dict[str, int] = {}
        self._seen_errors: dict[str, int] = {}
        self._log = Bounded(10)
        self.gone: OutputGone | None = None  # an output that cannot go on: the process ends
        self.stuck = 0  # receivers left in an output's write at exit: their batches lost

    def handle(self, batch: list[tuple[bytes, str]]) -> None:
        """Datagrams or framed messages as they came, (data, exporter) each. Metrics
        are counted per batch; errors are synced at the message that had them, so
        the log names its exporter."""
        sets, counts = self.decoder.messages(batch, self._sync)
        self.metrics.received(counts)
        self._sync_stats()
        if sets:
            lines = encode(sets, self.keys, self._write, self._unformatted)
            self.metrics.written.inc(lines.count)

    def _write(self, lines: Lines) -> None:
        """A piece of a batch's lines to every output, as soon as it is formatted. An
        output that fails loses this piece, counted and logged; it is tried again with
        the next, and the other outputs never miss a line for it."""
        gone = None
        for output in self.outputs:
            try:
                output.write(lines)
            except OutputGone as e:  # the others still take this piece, then the end
                gone = e
            except Exception as e:  # noqa: BLE001  (OSError, librdkafka's errors)
                self.metrics.output_failed.labels(output.name).inc(lines.count)
                if self._log.due(f"output {output.name}"):
                    log.error("output failed: lines lost", extra={
                        "output": output.name, "error": f"{type(e).__name__}: {e}"})
        if gone is not None:
            raise gone

    def _unformatted(self, rs: RecordSet, e: Exception) -> None:
        """A set that cannot be formatted (values the checks let through) is its
        exporter's counted error, never the batch's or the process's."""
        self.decoder.errors[f"unexpected {type(e).__name__} formatting"] += 1
        self._sync(rs.exporter)

    def idle(self) -> None:
        """Between batches: outputs that work in the background report (Kafka)."""
        for output in self.outputs:
            if hasattr(output, "poll"):
                output.poll()

    def _sync_stats(self) -> None:
        s = self.decoder.stats
        for name, metric in (("template_misses", self.metrics.template_misses),
                             ("dropped_sets", self.metrics.dropped_sets),
                             ("sequence_gaps", self.metrics.sequence_gaps)):
            delta = s[name] - self._seen_stats.get(name, 0)
            if delta:
                metric.inc(delta)
                self._seen_stats[name] = s[name]

    def _sync(self, exporter: str) -> None:
        """The decoder's new errors into the metrics, logged as `exporter`'s."""
        self._sync_stats()
        for reason, count in self.decoder.errors.items():
            delta = count - self._seen_errors.get(reason, 0)
            if delta:
                self.metrics.decode_errors.labels(_reason(reason)).inc(delta)
                self._seen_errors[reason] = count
                self._log_bounded(reason, exporter)

    def _log_bounded(self, reason: str, exporter: str) -> None:
        if self._log.due(_reason(reason)):
            log.warning("malformed IPFIX", extra={"exporter": exporter, "reason": reason,
                                                  "total": self.decoder.errors[reason]})

    def serve(self, stop: Stop) -> None:
        host, port = self.cfg.listen_host_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if self.cfg.transport == "udp":
            self._serve_udp(family, host, port, stop)
        else:
            self._serve_tcp(family, host, port, stop)

    def _serve_udp(self, family, host, port, stop) -> None:
        """One receiving thread; this one waits for the stop, so an output that blocks
        for good (a pipe nobody reads) cannot keep the process from stopping: the
        receiver gets the same deadline as TCP connections (_join)."""
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if self.cfg.workers > 1:  # the kernel hashes each exporter to one worker
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        self.metrics.receive_buffer.set(receive_buffer(sock, self.cfg.receive_buffer))
        sock.setblocking(False)
        _warm()  # bound first: what exporters send meanwhile waits in the socket
        log.info("collector listening", extra={"listen": self.cfg.listen, "transport": "udp"})
        failed: list[BaseException] = []
        receiver = threading.Thread(target=self._receiving, args=(sock, stop, failed),
                                    daemon=True)
        receiver.start()
        try:
            # in steps: Python runs handlers in this thread only, and a SIGTERM the
            # kernel gave another thread only wakes this one when it next runs
            while not stop.wait(0.5):
                pass
        finally:
            stop.set()
            self._join([receiver])
            if not receiver.is_alive():
                sock.close()
        if failed:
            raise failed[0]

    def _receiving(self, sock: socket.socket, stop: Stop, failed: list) -> None:
        inode = os.fstat(sock.fileno()).st_ino
        next_drops = 0.0
        try:
            while not stop.is_set():
                batch = self._receive(sock)
                if batch:
                    self.handle(batch)
                self.idle()
                if time.monotonic() >= next_drops:
                    self.metrics.socket_drops.set(udp_drops(inode))
                    next_drops = time.monotonic() + 2
        except OutputGone as e:  # the process stops: collect() says why
            self.gone = e
        except BaseException as e:  # noqa: BLE001  (raised again by _serve_udp)
            failed.append(e)
        finally:
            stop.set()

    @staticmethod
    def _receive(sock: socket.socket, most: int = 512, window: float = 0.1) -> list:
        """Datagrams for one batch: what is waiting, and what comes within `window` of
        the first, up to `most`. Decoding and formatting cost per batch as well as per
        record; a few milliseconds of latency make batches large at any rate."""
        batch: list[tuple[bytes, str]] = []
        wait, deadline = 0.5, None
        while len(batch) < most:
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                if deadline is not None:
                    wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([sock], [], [], wait)[0]:
                    break
                continue
            batch.append((data, f"{addr[0]}:{addr[1]}"))
            if deadline is None:
                deadline = time.monotonic() + window
        return batch

    def _serve_tcp(self, family, host, port, stop) -> None:
        """One thread a connection (TLS handshakes block); decoding under one lock."""
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.cfg.workers > 1:  # the kernel spreads connections over the workers
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        srv.bind((host, port))
        srv.listen(64)
        _warm()  # listening first: exporters that connect meanwhile wait in the backlog
        srv.settimeout(0.5)
        log.info("collector listening", extra={"listen": self.cfg.listen,
                                               "transport": self.cfg.transport})
        connections: list[threading.Thread] = []
        try:
            while not stop.is_set():
                try:
                    conn, addr = srv.accept()
                except TimeoutError:
                    if self.lock.acquire(timeout=0.5):  # a stalled output holds it: stop
                        try:                            # must still be seen
                            self.idle()
                        except OutputGone as e:  # the process stops: collect() says why
                            self.gone = e
                            break
                        finally:
                            self.lock.release()
                    continue
                connections = [t for t in connections if t.is_alive()]
                connections.append(threading.Thread(target=self._connection,
                                                    args=(conn, addr, stop), daemon=True))
                connections[-1].start()
        finally:
            srv.close()
            stop.set()  # also when accept() failed: the connections end
            self._join(connections)

    def _join(self, receivers: list[threading.Thread]) -> None:
        """Each receiver (the UDP one, a TCP connection) ends its batch before the
        outputs close; one stuck in an output that does not return (a stalled pipe, a
        hung mount) is left behind."""
        deadline = time.monotonic() + JOIN_SECONDS
        for t in receivers:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(t.is_alive() for t in receivers)
        if stuck:
            self.stuck += stuck
            log.error("receivers still writing at exit: their batches are lost",
                      extra={"receivers": stuck})

    def _connection(self, conn: socket.socket, addr, stop: Stop) -> None:
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
        except OutputGone as e:  # the process stops: collect() says why
            self.gone = e
            stop.set()
        finally:
            conn.close()
            with self.lock:
                self.decoder.forget(exporter)  # templates die with the connection


def _warm() -> None:
    warm()
    gc.freeze()  # start-up's 50,000 objects: a full collection walked them all (15 ms)


SO_RCVBUFFORCE = 33  # linux/asm-generic/socket.h: SO_RCVBUF past net.core.rmem_max


def receive_buffer(sock: socket.socket, want: int) -> int:
    """The socket's receive buffer: SO_RCVBUF, which the kernel silently caps at
    net.core.rmem_max (212,992 octets on most distributions, where a poll's burst of
    some thousand datagrams from the agent overflows it even with the collector
    reading), or SO_RCVBUFFORCE past that cap where CAP_NET_ADMIN is permitted (the
    DaemonSet grants it): raised for this call, then given up (a collector that
    parses what any local process sends keeps no capability). Returns what the socket
    got for data (the kernel doubles the size for its overhead: half of what it
    reports), and says so when it is less than asked."""
    before = caps.effective()
    try:
        caps.raise_permitted()
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, want)
    except OSError:  # no CAP_NET_ADMIN: capped at net.core.rmem_max
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
    finally:
        raised = caps.effective() & ~before
        if raised:
            caps.set_effective(before, drop=raised)
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    if got < want:
        log.warning("the UDP receive buffer is smaller than asked: a burst of datagrams "
                    "beyond it is dropped (cniflow_collector_socket_drops); grant the "
                    "collector CAP_NET_ADMIN or raise net.core.rmem_max",
                    extra={"asked": want, "got": got})
    return got


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
