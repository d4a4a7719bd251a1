"""The eBPF dataplane as the pipeline sees it: the host's interfaces, TC filters on
the wanted ones, and the kernel map drained once per poll."""

from __future__ import annotations

import logging
import time

import numpy as np

from agent.config import Config, ConfigError
from agent.flowtable import aggregate
from agent.interfaces import driver, links
from agent.metrics import Metrics
from agent.records import EGRESS
from bpf import caps, syscall
from bpf.attach import Attacher, AttachError
from bpf.drain import BatchDrain
from bpf.entry import EntryPoints
from bpf.masquerade import Masquerade
from bpf.pasthook import CHECK_SECONDS, PastHook
from bpf.pins import PinDir, PinError
from bpf.podside import PodSide
from bpf.program import DIR_ENTRY, FlowProgram, LoadError, addr_key
from bpf.restart import Restart

log = logging.getLogger(__name__)

# How often the active map's fill level is read (one bpf(2) call): at 500,000 new flows a
# second, 10,000 flows arrive between two readings, far below the half map left.
FILL_CHECK_SECONDS = 0.02
RETRY_MAX_SECONDS = 60.0  # a refused attach is tried again, backing off to this


class EbpfDataplane:
    generation = 0  # Linux ifindexes do not move under the agent
    unique = True  # a drained map never repeats a key
    reports = False  # the flow table sees every packet's counts within a poll
    report_lag = 0.0
    restart_needed = ""
    both_ways = False  # the kernel deduplicates (the metered set): nothing left to do

    def __init__(self, cfg: Config, metrics: Metrics, ipr) -> None:
        self.metrics, self.ipr = metrics, ipr
        try:
            caps.require()
            caps.bpf_syscall_allowed()  # a runtime's seccomp profile may still refuse it
        except caps.MissingCapability as e:
            raise ConfigError(str(e)) from None
        pins = _pins(cfg)
        entries = cfg.kubernetes and cfg.entry_points != "off"
        self.masquerade = Masquerade(cfg.cilium_endpoints if entries else "")
        try:
            if cfg.pod_side:
                _pod_side_possible(cfg)
            self.program = self._load(cfg, pins)
        except LoadError as e:  # no headers, a kernel that refuses: one line, exit 2
            raise ConfigError(str(e)) from None
        self.drainer = BatchDrain(self.program, keep=pins is not None)
        # the pods' ends of their veths (with pins: also to undo an earlier agent's),
        # before the host sides' links are adopted
        self.pod_side = PodSide(self.program, pins, cfg.pod_side) \
            if cfg.pod_side or pins is not None else None
        try:
            self.attacher = Attacher(self.program, cfg.attach, cfg.tc_priority, ipr, cfg.dedup,
                                     pins)
        except AttachError as e:
            self.program.close()
            raise ConfigError(str(e)) from None
        # pinned: the journal of flows not yet exported, and what an earlier agent left
        self.restart = Restart(cfg, self.program, self.drainer, self.attacher) if pins else None
        self.failed: dict[int, tuple[float, float]] = {}  # ifindex -> (next try, delay)
        self.past_hook, self.next_past_check = PastHook(metrics), 0.0
        # pods' addresses are known with --kubernetes only: no entry points without them
        self.entries = EntryPoints(cfg.entry_points if cfg.kubernetes else "off",
                                   self.attacher)
        self.stacked: set[int] | None = None  # devices stacked on entry points, marked
        self.netkit: set[int] = set()  # wanted, but netkit devices: not metered (logged once)
        self.wake_at = cfg.map_size // 2  # drain early once the active map is half full
        metrics.map_size.set(cfg.map_size)

    def _load(self, cfg: Config, pins) -> FlowProgram:
        """The program, with the map-in-map for Cilium's SNAT map where wanted (without,
        if that part does not build here: FlowProgram)."""
        program = FlowProgram(cfg.map_size, pins=pins, nat=self.masquerade.template,
                              pod_side=cfg.pod_side)
        if program.nat_fd is None:
            self.masquerade.template = ""
        return program

    @property
    def attached(self) -> set[int]:
        """The metered pod interfaces (entry points are not: no record names them)."""
        return {i for i, a in self.attacher.attached.items() if not a.entry}

    def present(self) -> dict[int, str]:
        return links()

    def apply(self, want: dict[int, str], present: dict[int, str]) -> None:
        """Attach what is wanted, and the entry points (bpf/entry.py), detach what is no
        longer wanted (opt-out), forget what vanished (its filters went with it)."""
        entries = self.entries.choose(present, set(want))
        for ifindex, att in list(self.attacher.attached.items()):
            if ifindex not in present:
                self.attacher.forget(ifindex)  # its last records still leave, with its name
                log.info("interface vanished", extra={"interface": att.name,
                                                      "ifindex": ifindex})
            elif ifindex not in (entries if att.entry else want):
                self.attacher.detach(ifindex)
        now = time.monotonic()
        for ifindex, name, entry in [*((i, n, False) for i, n in want.items()),
                                     *((i, n, True) for i, n in entries.items())]:
            if ifindex in self.attacher.attached or ifindex in self.netkit or \
                    self.failed.get(ifindex, (0.0, 0.0))[0] > now:
                continue
            if not entry and driver(ifindex) == "netkit":
                # netkit runs its own program chain in place of TC on the pod's traffic, and
                # a CNI's netkit program that redirects hides it from TC: not metered.
                self.netkit.add(ifindex)
                log.warning("netkit device: not metered (cniflow attaches to TC hooks, which "
                            "a netkit CNI's programs bypass)", extra={"interface": name})
                continue
            try:
                self.attacher.attach(ifindex, name, entry)
                self.failed.pop(ifindex, None)
            except Exception as e:  # the interface may vanish between scan and attach
                # tried again after 1, 2, 4 ... 60 s
                delay = min(RETRY_MAX_SECONDS, 2 * self.failed.get(ifindex, (0.0, 0.5))[1])
                self.failed[ifindex] = (now + delay, delay)
                self.metrics.attach_failures.inc()
                log.warning("attach failed", extra={"interface": name, "err": str(e),
                                                    "retry_in_s": delay})
        moves = self.metrics.tcx_moved_to_head if self.attacher.mode == "tcx" else \
            self.metrics.tc_moved_to_head
        moves.inc(self.attacher.keep_first())
        for ifindex in [i for i in self.failed if i not in want and i not in entries]:
            del self.failed[ifindex]
        if self.restart is not None:
            self.restart.settle()
        self.netkit &= set(want)
        self.metrics.interfaces_not_metered.labels("netkit").set(len(self.netkit))
        pods = self.attached
        if self.pod_side is not None:  # only once the host side is attached
            self.pod_side.apply({i: want[i] for i in pods if i in want})
            self.metrics.pod_ends.set(len(self.pod_side.ends))
        self._mark_stacked(present)
        self.metrics.interfaces_attached.set(len(pods))
        self.metrics.entry_points.set(len(self.attacher.attached) - len(pods))

    def _mark_stacked(self, present: dict[int, str]) -> None:
        """The devices stacked on entry points (a VLAN, a bond) in the metered set as
        entry points, unattached: a packet that came in through one may have been
        counted at the entry point below it, and the veth's egress checks. Written every
        reconcile (a few devices; a prune of an adopted link may have taken a mark out);
        the first time, the marks an earlier agent left are taken as this one's, so those
        no longer wanted go."""
        if self.stacked is None:
            self.stacked = self.program.entry_marks() - set(self.attacher.attached)
        by_name = {n: i for i, n in present.items()}
        want = {by_name[n] for n in self.entries.stacked if n in by_name}
        want -= set(self.attacher.attached)
        try:
            for ifindex in self.stacked - want:
                if ifindex not in self.attacher.attached:
                    self.program.meter(ifindex, False)
            for ifindex in want:
                self.program.meter(ifindex, True, entry=True)
        except OSError as e:  # the metered set full: said, tried again next reconcile
            log.warning("marking devices stacked on entry points failed",
                        extra={"err": str(e)})
        self.stacked = want

    def pod_addresses(self, addresses: dict[str, int]) -> None:
        """The metered pods' addresses (address -> host interface), for the entry points:
        those of pods whose interface is attached now."""
        pods = self.attached
        attached = {ip: i for ip, i in addresses.items() if i in pods}
        if self.pod_side is not None:
            self.pod_side.pod_addresses(attached)
        if self.entries.setting == "off" and not self.pod_side_on:
            return  # pod_addrs: for entry points, and for the pod ends' dedup
        self.masquerade.refresh(self.program)
        self.program.pod_addresses({addr_key(ip): i for ip, i in attached.items()})

    def check_past_hook(self) -> None:
        """At a reconcile, now and then (pods known: bpf/pasthook.py)."""
        if time.monotonic() >= self.next_past_check:
            self.next_past_check = time.monotonic() + CHECK_SECONDS
            ends = self.pod_side.ends if self.pod_side_on else {}
            self.past_hook.read({i: a.name for i, a in self.attacher.attached.items()
                                 if not a.entry and i not in ends})  # pod ends: all seen

    def drained(self, receivers: np.ndarray, packets: np.ndarray) -> None:
        """After a drain: what senders' records say each metered pod received."""
        self.past_hook.drained(receivers, packets)

    def wait(self, stop, seconds: float) -> bool:
        """Sleep until the next poll, or less: True as soon as the map the program writes
        is half full (a flood of new flows drains early, before inserts fail)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if stop.wait(min(left, FILL_CHECK_SECONDS)):
                return False
            if self.drainer.fill() >= self.wake_at:
                self.metrics.early_drains.inc()
                return True
        return False

    def drain(self) -> np.ndarray:
        if self.drainer.held != (0, 0):  # a poll failed after its drain: its batch is in
            self.drainer.forget()        # the table, never to be counted again
        batch = self.drainer.drain()
        if self.restart is not None:
            batch = self.restart.first(batch)
        batch = self._entered(batch)
        self.metrics.map_entries.set(len(batch))
        self.metrics.kernel_stats(self.program.stats())
        self.metrics.overflow(batch, {i: a.name for i, a in self.attacher.attached.items()})
        return batch

    def _entered(self, batch: np.ndarray) -> np.ndarray:
        """Flows counted at an entry point become their veth's egress flows (one record
        with what the veth's egress counted of the same flow, if anything); their
        packets are the pods' deliveries past the veth that cniflow did count."""
        k = batch["key"]
        entered = k["direction"] == DIR_ENTRY
        if not entered.any():
            return batch
        packets = batch["packets"][entered]
        self.past_hook.counted_elsewhere(k["ifindex"][entered], packets)
        self.metrics.entry_packets.inc(int(packets.sum()))
        k["direction"][entered] = EGRESS
        return aggregate(batch)

    @property
    def pod_side_on(self) -> bool:
        """Pods are metered at their own end of the veth (--pod-side)."""
        return self.pod_side is not None and self.pod_side.enabled

    def detach_all(self) -> None:
        if self.restart is not None and self.restart.handover:
            if self.pod_side is not None:
                self.pod_side.release()
            return  # links, maps and pending flows stay for the next agent
        if self.pod_side is not None:  # first: the host sides count again
            self.pod_side.detach_all()
        self.attacher.detach_all()

    # The journal around an export (bpf/journal.py); no-ops unpinned.
    def commit(self, table, held: np.ndarray) -> None:
        """Before anything is sent: the table, and every record held in sending order."""
        if self.restart is not None:
            self.restart.commit(table, held)

    def keep(self, held: np.ndarray) -> None:
        """The records held (the table as committed): at start, for what was left."""
        if self.restart is not None:
            self.restart.journal.keep(held)

    def progress(self, sent: int) -> None:
        """The first `sent` records held have left."""
        if self.restart is not None:
            self.restart.journal.progress(sent)

    def exported(self) -> None:
        if self.restart is not None:
            self.restart.journal.exported()

    def restore(self):
        """(the table's rows, records to export) an earlier agent left; None unpinned."""
        if self.restart is None:
            return None
        rows, due = self.restart.restore()  # an earlier agent's drain: raw keys, maybe
        due["key"]["direction"][due["key"]["direction"] == DIR_ENTRY] = EGRESS
        return self._entered(rows), due

    @property
    def handover(self) -> bool:
        return self.restart is not None and self.restart.handover

    def hand_over(self, yes: bool) -> None:
        """--handover auto's decision, made at SIGTERM; nothing to hand over unpinned."""
        if self.restart is not None:
            self.restart.handover = yes

    def close(self) -> None:
        if self.restart is not None:
            self.restart.close()
        if self.pod_side is not None:
            self.pod_side.close()
        self.program.close()


def _pod_side_possible(cfg: Config) -> None:
    """--pod-side needs TCX (a link made in the pod's namespace) and CAP_SYS_ADMIN (to
    enter it): a clear error, not a pod end that never attaches."""
    if cfg.attach == "tc" or not syscall.supports(syscall.TCX_INGRESS):
        raise ConfigError("--pod-side needs TCX (Linux 6.6 or later, --attach auto or tcx)")
    if not caps.has("SYS_ADMIN"):
        raise ConfigError("--pod-side needs CAP_SYS_ADMIN, to enter the pods' network "
                          "namespaces (daemonset/overlays/pod-side grants it)")


def _pins(cfg: Config) -> PinDir | None:
    """The pin directory, or None: --pin-path off, or the default path with no bpffs
    there (warned: a restart then loses what was not exported)."""
    if not cfg.pin_path:
        return None
    try:
        return PinDir(cfg.pin_path)
    except PinError as e:
        if cfg.pin_path != Config().pin_path:
            raise ConfigError(str(e)) from None
        log.warning("maps not pinned: a restart loses the flows not yet exported",
                    extra={"err": str(e)})
        return None
