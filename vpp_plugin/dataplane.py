"""The VPP dataplane as the pipeline sees it: interfaces present, apply the wanted
set, drain flow records.

VPP may be down, restarting, or another release than the agent expects; none of
that stops the agent. Each poll checks the connection (control_ping's vpe_pid);
when VPP is new it re-resolves pods and re-applies everything, since VPP forgets
its configuration when it restarts. A VPP restarted in its container keeps its pid
(a new PID namespace), its message table and even its client index; what tells it
is the lost connection, then an exporter that is no longer ours.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from agent.config import Config
from agent.metrics import Metrics
from agent.records import FLOW_DTYPE
from vpp_plugin.apidefs import CrcMismatch
from vpp_plugin.connection import Connection, ReleaseChanged, VppError
from vpp_plugin.flowprobe import IP4, IP6, L2, Flowprobe, discover
from vpp_plugin.interfaces import VppInterfaces
from vpp_plugin.mediate import Mediator

log = logging.getLogger(__name__)


FLUSH_SECONDS = 5.0  # flow-report-process sends flowprobe's buffered records this often


class VppDataplane:
    unique = False  # VPP reports a flow again every active timer: fold repeats

    @property
    def both_ways(self) -> bool:
        """Whether flowprobe meters the pods' interfaces in both directions (22.06+); up
        to 22.02 it meters transmit only, so a packet between two pods is seen once."""
        return self.flowprobe.modern
    reports = True  # each row is one VPP report: the flow table times them out one by one

    def __init__(self, cfg: Config, socket_path: str, metrics: Metrics) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.conn = Connection(socket_path)
        self.interfaces = VppInterfaces(self.conn)
        self.flowprobe = Flowprobe(self.conn, cfg.active_timeout, cfg.idle_timeout)
        self.mediator: Mediator | None = None
        self.generation = 0  # bumps when VPP is a new process: interface indexes changed
        self._retry_at = 0.0
        self._backoff = 1.0
        self._last_error = ""
        self.restart_needed = ""  # set when only a new process can go on

    @property
    def attached(self) -> set[int]:
        return set(self.flowprobe.ours)

    @property
    def report_lag(self) -> float:
        """How much later than its last report VPP may next report a flow it still
        sees: its active timer, then up to one flush of its buffers. The flow table's
        idle timeout waits that much longer, or it would end running flows between
        two reports."""
        return self.flowprobe.active + FLUSH_SECONDS

    def present(self) -> dict[int, str]:
        """VPP's interfaces now ({} while VPP is unreachable)."""
        if not self._ready():
            return {}
        try:
            return self.interfaces.scan()
        except VppError as e:
            self._failed("lost", e)
            return {}

    def apply(self, want: dict[int, str], present: dict[int, str]) -> None:
        if not self.conn.connected:
            return
        variants = {i: self._variant(i) for i in want}
        try:
            for failure in self.flowprobe.reconcile(variants):
                self.metrics.vpp_errors.labels("refused").inc()
                log.warning("flowprobe request refused", extra={"err": failure})
        except VppError as e:
            self._failed("lost", e)
        self.metrics.interfaces_attached.set(len(self.flowprobe.ours))

    def _variant(self, index: int) -> int:
        itf = self.interfaces.by_index.get(index)
        if itf is not None and not itf.l3:
            return L2  # an Ethernet tap: one variant covers IPv4 and IPv6 (VPP-2003)
        return IP6 if index in self.interfaces.ipv6 else IP4

    def wait(self, stop, seconds: float) -> bool:
        """Sleep until the next poll (VPP meters in its own memory: nothing fills here)."""
        stop.wait(seconds)
        return False

    def drain(self) -> np.ndarray:
        if self.mediator is None:
            return np.zeros(0, FLOW_DTYPE)
        batch = self.mediator.drain()
        errors = self.mediator.decoder.errors
        for why, count in list(errors.items()):
            self.metrics.vpp_decode_errors.labels(why).inc(count)
            log.warning("malformed IPFIX from VPP", extra={"reason": why, "count": count})
        errors.clear()
        if self.mediator.foreign:  # not from VPP: dropped, never named
            self.metrics.vpp_foreign_datagrams.inc(self.mediator.foreign)
            self.mediator.foreign = 0
        if self.mediator.unusable:  # variable-length or options records: not flowprobe's
            self.metrics.vpp_decode_errors.labels("records not in a flowprobe layout").inc(
                self.mediator.unusable)
            self.mediator.unusable = 0
        self.metrics.vpp_records.inc(len(batch))
        return batch

    def _ready(self) -> bool:
        """Connected to a configured VPP, (re)connecting when due."""
        if self.conn.connected and self.conn.alive():
            return True
        self.metrics.vpp_connected.set(0)
        now = time.monotonic()
        if now < self._retry_at:
            return False
        try:
            fresh = self.conn.connect()
            self.interfaces.scan()
            target = discover(self.conn, self.interfaces, self.cfg)
            if self.mediator is None or (self.mediator.address, self.mediator.port,
                                         self.mediator.source) != (
                    target.collector, target.port, target.source):
                if self.mediator is not None:
                    self.mediator.close()
                self.mediator = Mediator(
                    target.collector, target.port, target.source,
                    forget_after_s=self.flowprobe.active + self.flowprobe.passive
                    + 2 * FLUSH_SECONDS, max_flows=self.cfg.max_flows)
            if not fresh and self.flowprobe.target is not None and not self.flowprobe.in_force():
                # The same pid, but our exporter is gone: VPP restarted in its container
                # (a new PID namespace). Its interfaces may have other indexes now.
                log.warning("VPP forgot its configuration: a new VPP process with the same "
                            "pid; re-resolving and re-applying everything",
                            extra={"vpe_pid": self.conn.vpe_pid})
                fresh = True
            if fresh:
                self.flowprobe.ours.clear()  # a new VPP process remembers nothing
                self.generation += 1
            self.flowprobe.configure(target)
        except ReleaseChanged as e:  # this process holds the old release's layouts
            self.restart_needed = str(e)
            return False
        except CrcMismatch as e:
            self._failed("crc", e)
            return False
        except (VppError, OSError) as e:
            self._failed("connect" if not self.conn.connected else "config", e)
            return False
        self._backoff, self._last_error = 1.0, ""
        self.metrics.vpp_connected.set(1)
        log.info("VPP configured", extra={"version": self.conn.version,
                                           "exporter": f"{target.source} -> {target.collector}:"
                                                       f"{target.port} vrf {target.vrf}"})
        return True

    def _failed(self, kind: str, e: Exception) -> None:
        self.metrics.vpp_errors.labels(kind).inc()
        self.metrics.vpp_connected.set(0)
        # one line per distinct problem, not per retry; VPP lost mid-call and failing
        # to reconnect (whatever the errno, which changes as VPP restarts) are one
        # problem until VPP is back: said once, the rest counted
        problem = "unreachable" if kind in ("lost", "connect") else str(e)
        if problem != self._last_error:
            log.error("VPP: " + str(e), extra={"kind": kind})
            self._last_error = problem
        self.conn.drop()
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 30.0)

    def detach_all(self) -> None:
        if self.conn.connected:
            self.flowprobe.disable_all()

    def close(self) -> None:
        if self.mediator is not None:
            self.mediator.close()
        self.conn.close()
