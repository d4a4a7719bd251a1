"""The IPFIX exporting process: templates, sequence numbers, message sizes, backlog.

Sequence numbers count the data records sent before each message, per
observation domain and transport session (RFC 7011 section 3.1). Templates go
out before the first data of a session and, over UDP, again every refresh
interval. While the collector is away, records wait in a bounded backlog;
what overflows it is counted, never silently lost.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping

import numpy as np

from agent.biflow import pair
from agent.ipfix import flows as flowmap
from agent.ipfix.message import (
    HEADER,
    SET_HEADER,
    encode_records,
    message,
    pack,
    set_bytes,
    template_sets,
)
from agent.metrics import Metrics
from agent.records import FLOW_DTYPE, take

log = logging.getLogger(__name__)

CLOSE_WAIT_STEPS = 20  # at exit, up to 2 s for the collector to acknowledge the last records
PROBE = 1000  # records tried first after an export the collector did not take whole


class Exporter:
    def __init__(
        self,
        transport,
        domain: int,
        metrics: Metrics,
        max_message: int = 1400,
        template_refresh_s: float = 0,
        backlog_limit: int = 100_000,
        clock: Callable[[], float] = time.time,
        with_pods: bool = False,
        biflow: bool = False,
        labels: bool = False,
        enterprise_number: int = 0,
    ) -> None:
        """labels, enterprise_number: pod labels and workload elements in the pod
        templates (--pod-labels, --enterprise-number), announced by RFC 5610 records."""
        self.transport = transport
        self.domain = domain
        self.metrics = metrics
        self.max_message = max_message
        self.template_refresh_s = template_refresh_s
        self.backlog_limit = backlog_limit
        self.clock = clock
        self.flow_templates = flowmap.templates(with_pods, biflow, labels, enterprise_number)
        self.announced = flowmap.announced(labels, enterprise_number)
        self.biflow = biflow
        self.with_pods = with_pods
        self.backlog = np.zeros(0, FLOW_DTYPE)  # records waiting, oldest first
        self._stalled = False  # the last export left records: probe before encoding all
        self.sequence = 0
        self.session = None
        self.templates_due = 0.0
        self._errors_seen = 0
        self.lost = {"flows": 0, "packets": 0, "octets": 0, "first_ms": 0, "last_ms": 0}
        self._options_sent: tuple | None = None
        self._sent_messages = self._sent_records = 0
        # Over TCP and TLS, records written into the connection count as exported only
        # once the collector's kernel acknowledged them; if the connection breaks first,
        # they are sent again on the next one. Per write: (the stream offset after each
        # message, their records, the records before each message and after the last)
        self.unconfirmed: deque[tuple[np.ndarray, np.ndarray, np.ndarray]] = deque()
        self._unconfirmed_session = None

    @property
    def backlog_records(self) -> int:
        return len(self.backlog)

    def export(self, records: np.ndarray, ifnames: Mapping[int, str], pods=None,
               commit: Callable[[np.ndarray], None] | None = None,
               progress: Callable[[int], None] | None = None) -> None:
        """Queue records and send everything the collector can take now. pods: an
        agent.podmeta.PodTable naming the pods (required when built with_pods).

        With the restart journal (bpf/journal.py): the records held are encoded first,
        commit(held) is called with them in the order the messages carry them, before
        any leaves; progress(n) after each write says the first n have left (whole
        messages), and at the end counts the oldest dropped from a full backlog too:
        what is not yet sent is always a tail of held. After an export the collector
        did not take whole, the next one tries PROBE records first (a collector still
        away costs their encoding, not the backlog's); if they go, the rest follows,
        committed again in its new order."""
        self._confirm()
        if len(records):
            if self.biflow:  # pairs are made from what is due together
                records = pair(records)
            self.backlog = np.concatenate([self.backlog, records]) if len(self.backlog) \
                else records
        limit = PROBE if self._stalled else len(self.backlog)
        committed, held, announced = False, 0, False
        while True:
            plan, head = [], self.backlog[:limit]
            if len(head) and self.transport.ready():
                if not announced:  # once an export, the probe's pass or not
                    self._start_session_if_new()
                    self._send_templates_if_due(ifnames)
                    announced = True
                plan = self._encode(head, ifnames, pods)
                if plan:
                    self.backlog = np.concatenate([take(sub, m.rows) for sub, m in plan]
                                                  + [self.backlog[len(head):]])
            if commit is not None and (plan or not committed):
                commit(self.backlog)
                committed, held = True, len(self.backlog)
            if not plan:
                break
            sent = self._send(plan, progress)
            self.backlog = self.backlog[sent:]
            if sent < len(head) or not len(self.backlog):
                break
            limit = len(self.backlog)  # the collector took them: the rest at once
        if self.unconfirmed and not self.transport.connected:
            # a reset discarded what the collector had not acknowledged: held again now,
            # and committed, not at the next poll (a SIGKILL before it would lose them)
            self._confirm()
            if commit is not None:
                commit(self.backlog)
                committed, held = True, len(self.backlog)
        self._stalled = bool(len(self.backlog))
        self._bound_backlog()  # what the collector could not take now: kept, up to the bound
        if progress is not None and committed:
            progress(held - len(self.backlog))
        self._count()
        self.metrics.export_backlog.set(len(self.backlog))

    def _bound_backlog(self) -> None:
        """The oldest records over the bound are dropped (counted): the head of the
        backlog, so what is kept stays a tail of what was held."""
        drop = len(self.backlog) - self.backlog_limit
        if drop > 0:
            self.metrics.records_dropped.inc(drop)
            self._count_lost(self.backlog[:drop])
            self.backlog = self.backlog[drop:]

    def _confirm(self) -> None:
        """Records the collector acknowledged count as exported; those written into a
        connection that broke before it acknowledged them wait to be sent again, first."""
        if not self.unconfirmed:
            return
        live = self.transport.connected and self.transport.session == self._unconfirmed_session
        session, acked = self.transport.closed  # a reset keeps what was acknowledged
        if live or session == self._unconfirmed_session:
            acked = self.transport.acked() if live else acked
            while self.unconfirmed:  # message by message
                ends, recs, before = self.unconfirmed[0]
                k = int(np.searchsorted(ends, acked, "right"))
                self._sent_records += int(before[k])
                if k < len(ends):
                    self.unconfirmed[0] = (ends[k:], recs[before[k]:], before[k:] - before[k])
                    break
                self.unconfirmed.popleft()
            if live or not self.unconfirmed:
                return
        resend = [recs for _, recs, _ in self.unconfirmed]
        self.unconfirmed.clear()
        count = sum(len(r) for r in resend)
        self.backlog = np.concatenate(resend + [self.backlog])
        self.metrics.records_resent.inc(count)
        log.info("records sent again: the connection broke before the collector "
                 "acknowledged them", extra={"records": count})

    def _count_lost(self, gone: np.ndarray) -> None:
        lost = self.lost
        lost["flows"] += len(gone)
        lost["packets"] += int(gone["packets"].sum())
        lost["octets"] += int(gone["octets"].sum())
        first, last = int(gone["first_ms"].min()), int(gone["last_ms"].max())
        lost["first_ms"] = min(lost["first_ms"] or first, first)
        lost["last_ms"] = max(lost["last_ms"], last)

    def _start_session_if_new(self) -> None:
        if self.transport.session != self.session:
            self.session = self.transport.session
            self.sequence = 0
            self.templates_due = 0.0

    def _send_templates_if_due(self, ifnames: Mapping[int, str]) -> None:
        now = self.clock()
        if now < self.templates_due:
            self._send_options_if_changed(ifnames)
            return
        if self._emit_sets(self._announcement(ifnames)):
            refresh = self.template_refresh_s if self.transport.kind == "udp" else float("inf")
            self.templates_due = now + refresh
            self._options_sent = (dict(ifnames), dict(self.lost))

    def _options_templates(self) -> list:
        return ([flowmap.IE_TYPES] if self.with_pods else []) + [flowmap.EXPORT_STATS,
                                                                 flowmap.INTERFACES]

    def _options_data(self, ifnames: Mapping[int, str]) -> list[tuple[bytes, int]]:
        """Options records (RFC 5610 types with pods, export statistics, interfaces) as
        sets of at most one message's room each, with their record counts."""
        room = self.max_message - HEADER.size - SET_HEADER.size
        blocks = [(flowmap.EXPORT_STATS, flowmap.export_stats_columns(self.domain, self.lost), 1)]
        if ifnames:
            blocks.append((flowmap.INTERFACES, flowmap.interface_columns(ifnames), len(ifnames)))
        if self.with_pods:
            names = self.announced
            blocks.insert(0, (flowmap.IE_TYPES, flowmap.ie_type_columns(names), len(names)))
        sets = []
        for template, cols, n in blocks:
            for g in encode_records(template, cols, n, max_record=room):
                per = room // g.size
                for i in range(0, len(g.rows), per):
                    chunk = g.data[i * g.size:(i + per) * g.size]
                    sets.append((set_bytes(template.id, chunk.tobytes()), len(chunk) // g.size))
        return sets

    def _announcement(self, ifnames: Mapping[int, str]) -> list[tuple[bytes, int]]:
        """Options templates and their records first (collectors must learn the RFC
        5610 types before the data templates that use them), then data templates."""
        data_templates = list(self.flow_templates.values())
        together = template_sets(data_templates)
        room = self.max_message - HEADER.size
        return ([(template_sets([t]), 0) for t in self._options_templates()]
                + self._options_data(ifnames)
                + ([(together, 0)] if len(together) <= room else
                   [(template_sets([t]), 0) for t in data_templates]))

    def _send_options_if_changed(self, ifnames: Mapping[int, str]) -> None:
        """New interfaces or new losses are told at once, not at the next refresh."""
        if self._options_sent == (dict(ifnames), dict(self.lost)):
            return
        if self._emit_sets(self._options_data(ifnames)):
            self._options_sent = (dict(ifnames), dict(self.lost))

    def _emit_sets(self, sets: list[tuple[bytes, int]]) -> bool:
        """Sets (with their record counts) in as few messages as fit --max-message-size,
        in order; False when the transport refused one (the rest waits for next time)."""
        room = self.max_message - HEADER.size
        body: list[bytes] = []
        size = count = 0
        for data, n in sets + [(b"", -1)]:
            if body and (n < 0 or size + len(data) > room):
                msg = message(b"".join(body), int(self.clock()), self.sequence, self.domain)
                if not self._emit(msg, count):
                    return False
                body, size, count = [], 0, 0
            if n >= 0:
                body.append(data)
                size += len(data)
                count += n
        return True

    def close(self) -> None:
        """Over TCP, withdraw every template before the connection ends (RFC 7011 8.1)."""
        if self.transport.kind != "udp" and self.session == self.transport.session and \
                self.transport.ready():
            withdraw = b"".join(struct.pack("!HH", t.id, 0)
                                for t in self.flow_templates.values())
            # Options templates are not withdrawn: they end with the connection (RFC 7011
            # 10.4.2), and Wireshark 4.0 misreads options withdrawal records.
            body = set_bytes(2, withdraw)
            self._emit(message(body, int(self.clock()), self.sequence, self.domain), 0)
        for _ in range(CLOSE_WAIT_STEPS):  # the collector's acknowledgements, briefly
            self._confirm()
            if not self.unconfirmed or not self.transport.connected:
                break
            time.sleep(0.1)
        for _, recs, _ in self.unconfirmed:  # not acknowledged, and no next connection
            self.metrics.records_dropped.inc(len(recs))
            self._count_lost(recs)
        self.unconfirmed.clear()
        self._count()
        self.transport.close()

    def _emit(self, msg: bytes, records: int) -> bool:
        """Send a message of templates or options records (not flow records)."""
        ok = self.transport.send(msg)
        if ok:
            self.sequence = (self.sequence + records) & 0xFFFFFFFF  # options records count
            self._sent_messages += 1
        return ok

    def _count(self) -> None:
        """Metrics once per export call, not per message (the hot loop stays lean)."""
        errors = self.transport.errors - self._errors_seen
        if errors:
            self.metrics.export_errors.inc(errors)
            self._errors_seen = self.transport.errors
            if self.transport.kind == "udp":
                # Refused: the collector is away or restarting, and one that comes back
                # knows no template. They go out again with the next data.
                self.templates_due = 0.0
        if self._sent_messages or self._sent_records:
            self.metrics.messages_exported.inc(self._sent_messages)
            self.metrics.records_exported.inc(self._sent_records)
            self._sent_messages = self._sent_records = 0

    def _encode(self, batch: np.ndarray, ifnames: Mapping[int, str], pods) -> list:
        """The batch as messages, a template at a time: [(records, Messages)], with
        sequence numbers as if every message before went out."""
        version = batch["key"]["ip_version"]
        room = self.max_message - HEADER.size - SET_HEADER.size
        plan, sequence = [], self.sequence
        for v, template in self.flow_templates.items():
            rows = np.flatnonzero(version == v)
            if not len(rows):
                continue
            sub = take(batch, rows)
            cols = flowmap.columns(sub, ifnames, pods if self.with_pods else None)
            groups = encode_records(template, cols, len(sub), max_record=room)
            msgs = pack(template.id, groups, self.max_message, int(self.clock()), self.domain,
                        sequence)
            sequence += int(msgs.counts.sum())
            plan.append((sub, msgs))
        return plan

    def _send(self, plan: list, progress: Callable[[int], None] | None) -> int:
        """Send the planned messages in order, until the transport takes no more; returns
        the records sent (those of the messages sent whole, in plan order)."""
        done = 0
        for sub, msgs in plan:
            before = np.concatenate([[0], np.cumsum(msgs.counts)])
            report = None if progress is None else \
                (lambda k, base=done, c=before: progress(base + int(c[k])))
            start = getattr(self.transport, "written", 0)
            sent = self.transport.send_many(msgs, report)
            records = int(before[sent])
            if report is not None:
                report(sent)
            self.sequence = (self.sequence + records) & 0xFFFFFFFF
            self._sent_messages += sent
            if self.transport.kind == "udp":
                self._sent_records += records
            elif records:  # counted once acknowledged (_confirm), message by message
                ends = start + msgs.offsets[:sent] + msgs.lengths[:sent]
                self.unconfirmed.append((ends, take(sub, msgs.rows[:records]), before[:sent + 1]))
                self._unconfirmed_session = self.transport.session
            done += records
            if sent < len(msgs):
                break
        return done
