"""The IPFIX exporting process: templates, sequence numbers, message sizes, backlog.

Sequence numbers count the data records sent before each message, per
observation domain and transport session (RFC 7011 section 3.1). Templates go
out before the first data of a session and, over UDP, again every refresh
interval. While the collector is away, records wait in a bounded backlog;
what overflows it is counted, never silently lost.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping

import numpy as np

from agent.ipfix import flows as flowmap
from agent.ipfix.message import (
    HEADER,
    SET_HEADER,
    chunks,
    encode_records,
    message,
    set_bytes,
    template_sets,
)
from agent.metrics import Metrics

log = logging.getLogger(__name__)


class Exporter:
    def __init__(
        self,
        transport,
        domain: int,
        metrics: Metrics,
        max_message: int = 1400,
        template_refresh_s: float = 60,
        backlog_limit: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.transport = transport
        self.domain = domain
        self.metrics = metrics
        self.max_message = max_message
        self.template_refresh_s = template_refresh_s
        self.backlog_limit = backlog_limit
        self.clock = clock
        self.templates = list(flowmap.TEMPLATES.values())
        self.backlog: deque[np.ndarray] = deque()
        self.backlog_records = 0
        self.sequence = 0
        self.session = None
        self.templates_due = 0.0
        self._errors_seen = 0

    def export(self, records: np.ndarray, ifnames: Mapping[int, str]) -> None:
        """Queue records and send everything the collector can take now."""
        if len(records):
            self.backlog.append(records)
            self.backlog_records += len(records)
            self._bound_backlog()
        if self.backlog_records and self.transport.ready():
            self._start_session_if_new()
            self._send_templates_if_due()
            while self.backlog:
                batch = self.backlog.popleft()
                self.backlog_records -= len(batch)
                rest = self._send(batch, ifnames)
                if len(rest):
                    self.backlog.appendleft(rest)
                    self.backlog_records += len(rest)
                    break
        self.metrics.export_backlog.set(self.backlog_records)

    def _bound_backlog(self) -> None:
        while self.backlog_records > self.backlog_limit and self.backlog:
            over = self.backlog_records - self.backlog_limit
            oldest = self.backlog[0]
            drop = min(over, len(oldest))
            self.metrics.records_dropped.inc(drop)
            self.backlog_records -= drop
            if drop == len(oldest):
                self.backlog.popleft()
            else:
                self.backlog[0] = oldest[drop:]

    def _start_session_if_new(self) -> None:
        if self.transport.session != self.session:
            self.session = self.transport.session
            self.sequence = 0
            self.templates_due = 0.0

    def _send_templates_if_due(self) -> None:
        now = self.clock()
        if now < self.templates_due:
            return
        msg = message(template_sets(self.templates), int(now), self.sequence, self.domain)
        if self._emit(msg, 0):
            refresh = self.template_refresh_s if self.transport.kind == "udp" else float("inf")
            self.templates_due = now + refresh

    def _emit(self, msg: bytes, records: int) -> bool:
        ok = self.transport.send(msg)
        errors = self.transport.errors - self._errors_seen
        if errors:
            self.metrics.export_errors.inc(errors)
            self._errors_seen = self.transport.errors
        if ok:
            self.sequence = (self.sequence + records) & 0xFFFFFFFF
            self.metrics.messages_exported.inc()
            self.metrics.records_exported.inc(records)
        return ok

    def _send(self, batch: np.ndarray, ifnames: Mapping[int, str]) -> np.ndarray:
        """Send one batch; returns the records that could not be sent."""
        budget = self.max_message - HEADER.size - SET_HEADER.size
        version = batch["key"]["ip_version"]
        for v, template in flowmap.TEMPLATES.items():
            sub = batch[version == v]
            if not len(sub):
                continue
            buf, offsets = encode_records(template, flowmap.columns(sub, ifnames), len(sub))
            for i, j in chunks(offsets, budget):
                body = set_bytes(template.id, buf[offsets[i] : offsets[j]].tobytes())
                msg = message(body, int(self.clock()), self.sequence, self.domain)
                if not self._emit(msg, j - i):
                    unsent = np.concatenate([sub[i:], batch[(version != v) & (version > v)]])
                    return unsent
        return batch[:0]
