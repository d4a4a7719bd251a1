"""Where the collector's JSON lines go: a file (or standard output) and Kafka.

Outputs never block reception: a file write is one system call per piece of a
batch's lines (agent/jsonlines.py: at most 256 KB, a view of the formatter's buffer,
used before write() returns), and Kafka's producer queues in librdkafka, bounded,
counting what it cannot keep.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from collections import deque
from contextlib import contextmanager
from itertools import repeat
from operator import length_hint
from pathlib import Path

from agent.config import kafka_url
from agent.jsonlines import Lines
from agent.logs import Bounded

log = logging.getLogger(__name__)


class OutputGone(Exception):
    """An output that can never take another line (Kafka's fatal producer errors): the
    collector exits with it, and is restarted, rather than lose every line after."""

    def __init__(self, output: KafkaOutput, reason: str) -> None:
        super().__init__(f"--output {output.name}: {reason}")
        self.output = output


class FileOutput:
    """JSON lines to standard output or a file rotated by size. Several workers may
    share one file: with `lock` (a lock file's path) each piece of lines is written
    and the rotation decided under flock, and a worker whose file was rotated by
    another reopens it, so lines never interleave and none land in a rotated file."""

    def __init__(self, path: str, rotate_bytes: int, keep: int, lock: str = "") -> None:
        self.name = path
        self.path = None if path == "-" else Path(path)
        self.rotate_bytes, self.keep = rotate_bytes, keep
        self.lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600) if lock else -1
        self.fd = sys.stdout.fileno() if self.path is None else self._open()
        self._warned = Bounded(60)

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, lines: Lines) -> None:
        """Raises the system's error (a full disk, a closed pipe) with the file still
        whole lines: a piece the disk took only part of is cut back off."""
        if not lines.count:
            return
        with self._locked():
            at_path = self.path is not None and self._follow()
            view, written = memoryview(lines.text), 0
            try:
                while len(view) > written:
                    written += os.write(self.fd, view[written:])
            except OSError:
                if written and self.path is not None:
                    os.ftruncate(self.fd, os.fstat(self.fd).st_size - written)
                raise
            if at_path and self.rotate_bytes and os.fstat(self.fd).st_size >= self.rotate_bytes:
                self._rotate()

    def _rotate(self) -> None:
        """The lines are written: a rotation that fails (a renamed directory, its
        permissions) is logged, at most once a minute, and tried again next piece."""
        try:
            self._shift()
        except OSError as e:
            self._warn("rotation failed", e)

    def _warn(self, what: str, e: OSError) -> None:
        if self._warned.due(what):
            log.warning(what, extra={"output": str(self.path), "error": str(e)})

    @contextmanager
    def _locked(self):
        if self.lock_fd < 0:
            yield
            return
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def _follow(self) -> bool:
        """Another worker rotated the file, a rotation of ours failed half way (renamed,
        the new file not made: no inode left), or someone moved it: write to a file at
        the path again. If none can be made, lines go on where they went (the renamed
        file), and False: no rotation shifts that file further down."""
        try:
            at, ours = os.stat(self.path), os.fstat(self.fd)
            if (at.st_dev, at.st_ino) == (ours.st_dev, ours.st_ino):
                return True
        except OSError:  # gone, or not to be looked at (ESTALE, EACCES): try a new one
            pass
        try:
            self._reopen()
            return True
        except OSError as e:
            self._warn("no new file at the path: lines go on to the file it was", e)
            return False

    def _reopen(self) -> None:
        fd = self._open()  # the old one stays ours until the new one is
        os.close(self.fd)
        self.fd = fd

    def _shift(self) -> None:
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.rename(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        self._reopen()

    def close(self) -> None:
        if self.path is not None:
            os.close(self.fd)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)


class KafkaOutput:
    """One Kafka message per record, the record's JSON line as value and its flow key
    as key (both directions of a flow in one partition). librdkafka batches,
    compresses and retries; the idempotent producer keeps retries from duplicating.
    While brokers are away records wait in librdkafka's queue (bounded by
    --kafka-queue); what does not fit is counted dropped, what a broker refuses is
    counted failed, the rest delivered."""

    def __init__(self, url: str, settings: dict, flush_seconds: float, metrics) -> None:
        from confluent_kafka import KafkaError, KafkaException, Producer

        self._refused, self._fatal = KafkaException, KafkaError._FATAL  # for write()
        self.name = url
        self.brokers, self.topic = kafka_url(url)
        self.metrics = metrics
        self.given = self.produced = self.failed = self.delivered = 0
        conf = {"bootstrap.servers": self.brokers, "client.id": "cniflow-collector",
                "enable.idempotence": True, "delivery.report.only.error": True,
                "message.timeout.ms": 0,  # records wait for the brokers: the queue bounds them
                "linger.ms": 20, "batch.num.messages": 10000,
                "error_cb": self._error, "on_delivery": self._failed, **settings}
        self.flush_seconds = flush_seconds
        self.producer = Producer(conf)
        self._last_error = ""
        self._gone = ""  # librdkafka's fatal error, once poll() or produce() raised it
        self._closing = False

    def write(self, lines: Lines) -> None:
        if not lines.count:
            return
        values = lines.split()
        self.given += len(values)
        left = iter(values)
        keys = iter(lines.keys) if lines.keys else repeat(None)
        lost = refused = 0
        while True:
            try:  # one produce() a record, driven by map(): no Python loop around them
                deque(map(self.producer.produce, repeat(self.topic), left, keys), maxlen=0)
                break
            except BufferError:  # the queue is full: the brokers are away or too slow
                lost = length_hint(left) + 1  # map() took the one refused
                self.metrics.kafka_dropped.inc(lost)
                break
            except self._refused as e:  # this record refused (too large): the next go on
                refused += 1
                self.metrics.kafka_failed.inc()
                error = e.args[0]
                if error.fatal() or error.code() == self._fatal:
                    self.produced += len(values) - length_hint(left) - refused
                    self.metrics.kafka_dropped.inc(length_hint(left))
                    self._gone = f"fatal producer error: {error.str()}"
                    raise OutputGone(self, self._gone) from e
                self._log(f"record refused by the producer: {error.str()}")
        self.produced += len(values) - lost - refused
        self.poll()

    def poll(self) -> None:
        """Serve delivery reports (failures only) and count what was delivered: what
        was accepted, minus what failed, minus what is still queued. A fatal error (the
        idempotent producer refused, as by a broker whose ACLs deny this client) means
        this producer can never deliver again: OutputGone, with or without traffic."""
        try:
            self.producer.poll(0)
        except self._refused as e:  # confluent-kafka raises librdkafka's fatal error here
            if not e.args[0].fatal():
                raise
            self._gone = f"fatal producer error: {e.args[0].str()}"
        self._count()
        if self._gone:
            raise OutputGone(self, self._gone)

    def _count(self) -> None:
        queued = len(self.producer)
        delivered = self.produced - self.failed - queued
        if delivered > self.delivered:
            self.metrics.kafka_delivered.inc(delivered - self.delivered)
            self.delivered = delivered
        self.metrics.kafka_queued.set(queued)

    def _failed(self, err, _msg) -> None:
        if self._closing:
            return
        self.failed += 1
        self.metrics.kafka_failed.inc()
        self._log(f"delivery failed: {err}")

    def _error(self, err) -> None:
        self._log(f"kafka: {err}")

    def _log(self, text: str) -> None:
        if text != self._last_error:  # a broker away says so once, not every retry
            self._last_error = text
            log.warning(text, extra={"brokers": self.brokers, "topic": self.topic})

    def close(self) -> None:
        """SIGTERM: what is queued gets --kafka-flush-seconds to reach the brokers;
        the rest is counted dropped and said so."""
        try:
            left = self.producer.flush(0 if self._gone else self.flush_seconds)
        except self._refused:  # the fatal error again: librdkafka purged its queue
            left = len(self.producer)
        self._count()
        if left:
            self.metrics.kafka_dropped.inc(left)
            log.warning("records not delivered at exit", extra={"records": left,
                                                                "topic": self.topic})
        # librdkafka destroyed now, not by the interpreter's finalization: with records
        # still queued for brokers that refused us, that destroy ran our callbacks in a
        # Python half torn down and the process died of SIGSEGV after its last line
        self._closing = True  # the purge's delivery reports: counted dropped above
        try:
            self.producer.purge()
            self.producer.flush(0)
        except self._refused:
            pass
        if hasattr(self.producer, "close"):  # confluent-kafka 2.12+
            self.producer.close()
        del self.producer  # before it: the last reference, destroyed here

    def undelivered(self) -> int:
        """Records this output was given and no broker took: failed, refused, dropped."""
        return self.given - self.delivered
